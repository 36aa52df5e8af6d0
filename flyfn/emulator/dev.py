"""`manage.py flyfn dev`: the local Fly stack for this project, in one asyncio process.

It deploys the project's fly.toml as `fly deploy` would, on this computer: it serves the Machines
API emulator on a loopback port, loads the local secrets (`--secrets-file`, the format `fly
secrets import` takes), runs the release command, creates one app Machine per process group with
the project's own image ref (`local/<project>:dev-<hash of the sources>`) and serves the Fly Proxy
on `--port`. Every Machine is a process running the image's command (the Dockerfile's, workers and
all) in the environment Fly would give it (`ProcessRuntime`). Function Machines appear when
flyfn's pool creates them through the API, exactly as on Fly. Without a fly.toml, one app Machine
serves the project's ASGI app in one process, never stopped (the banner says so).

SIGINT or SIGTERM to this process stops everything it started within a few seconds (a second
signal kills at once); the Machines also die with it if it is killed outright.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import io
import os
import re
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import uvicorn
from dotenv import dotenv_values

from flyfn.emulator.api import create_app
from flyfn.emulator.child import DEFAULT_ASGI_APP
from flyfn.emulator.dockerfile import DockerfileError, ImageFacts, read_dockerfile
from flyfn.emulator.flytoml import FlyToml, FlyTomlError, load_fly_toml
from flyfn.emulator.live import LivePage
from flyfn.emulator.logline import RequestLog, machine_label
from flyfn.emulator.proxy.app import FlyProxy
from flyfn.emulator.proxy.autostop import DEFAULT_AUTOSTOP_INTERVAL
from flyfn.emulator.proxy.edge import IDLE_TIMEOUT, edge_protocol
from flyfn.emulator.proxy.regions import FROM_REGION_HEADER
from flyfn.emulator.schedule import FlySchedules
from flyfn.emulator.secrets import DEV_TOKEN_ENV, DevStackInfo, write_stack_file
from flyfn.emulator.state import EmulatorError, MachinesEmulator
from flyfn.emulator.supervisor import (
    DEFAULT_BOOT_TIMEOUT,
    ProcessRuntime,
    image_base_env,
    listening_socket,
)
from flyfn.emulator.validation import check_secret_name
from flyfn.fly.api_host import is_loopback_url
from flyfn.fly.env import TIME_SCALE_ENV
from flyfn.machine_dir import default_base
from flyfn.machines.models import (
    CreateMachineRequest,
    Machine,
    MachineConfig,
    MachinePort,
    MachineRestart,
    MachineService,
)

__all__ = ["DevOptions", "DevSetupError", "image_ref", "project_asgi_app", "run_dev"]

DEFAULT_PORT = 8080
SHUTDOWN_GRACE = 3.0
# Fly's default for a release command (`[deploy] release_command_timeout`).
RELEASE_COMMAND_TIMEOUT = 300.0
_HASHED_SUFFIXES = frozenset({".py", ".html", ".txt", ".css", ".js", ".json", ".toml", ".cfg"})
_SKIPPED_DIRS = frozenset({"node_modules", "__pycache__", "media", "staticfiles", "build", "dist"})
_MAX_HASHED_FILES = 5000


@dataclass(frozen=True)
class DevOptions:
    port: int = DEFAULT_PORT
    host: str = "127.0.0.1"
    # Divides Fly's periods: autostop's pass runs every 300 / time_scale seconds (same algorithm).
    time_scale: float = 1.0
    asgi_app: str | None = None  # module:attr; default the settings package's asgi module
    app_name: str | None = None  # default FLYFN['APP_NAME'] / FLY_APP_NAME / the project's name
    region: str | None = None  # default fly.toml's primary_region, else "local"
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    api_port: int = 0  # the Machines API's loopback port (0: any free one)
    live_port: int = 0  # the live page's loopback port (0: any free one)
    root: Path | None = None  # the project directory (default: the current one)
    # The fly.toml to deploy (default: fly.toml in the project directory, when there is one).
    config: Path | None = None
    # NAME=VALUE lines set as the app's secrets before any Machine starts (`fly secrets import`).
    secrets_file: Path | None = None
    # Fly regions with an app Machine each (default: the primary region only); requests enter
    # at the one their `flyfn-from-region` header names, and hops between regions take time.
    regions: tuple[str, ...] = ()
    # Regions where creating a Machine through the API fails for want of capacity.
    full_regions: tuple[str, ...] = ()
    emulate_latency: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.time_scale < float("inf"):
            raise ValueError(f"time_scale must be a positive number, got {self.time_scale!r}")


def project_asgi_app(settings_module: str) -> str:
    """`pkg.asgi:application` next to `pkg.settings` when it exists, else Django's own app."""
    package = settings_module.rpartition(".")[0]
    if package:
        with contextlib.suppress(ImportError, ValueError):
            if importlib.util.find_spec(f"{package}.asgi") is not None:
                return f"{package}.asgi:application"
    return DEFAULT_ASGI_APP


def _source_files(root: Path) -> Iterator[Path]:
    count = 0
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIPPED_DIRS)
        for name in sorted(files):
            path = Path(directory, name)
            if path.suffix in _HASHED_SUFFIXES:
                count += 1
                if count > _MAX_HASHED_FILES:
                    return
                yield path


def image_ref(project: str, root: Path) -> str:
    """`local/<project>:dev-<12 hex>`: the same sources give the same ref, an edit a new one
    (so the pool versions function Machines by it, as after a deploy on Fly)."""
    digest = hashlib.sha256()
    for path in _source_files(root):
        with contextlib.suppress(OSError):
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(path.read_bytes())
    return f"local/{_slug(project)}:dev-{digest.hexdigest()[:12]}"


class DevSetupError(Exception):
    """fly.toml, the Dockerfile or the secrets file cannot be used; the message says why."""


def read_secrets_file(path: Path) -> dict[str, str]:
    """`NAME=VALUE` lines (comments, quotes and `export` as in a .env file); DevSetupError naming
    the line's name when one has no value. Values are never shown."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DevSetupError(f"--secrets-file {path}: cannot be read ({exc.strerror})") from None
    values = dotenv_values(stream=io.StringIO(text))
    missing = sorted(name for name, value in values.items() if value is None)
    if missing:
        raise DevSetupError(
            f"--secrets-file {path}: {', '.join(missing)} has no value (write NAME=VALUE)"
        )
    for name in values:
        try:
            check_secret_name("--secrets-file", name)
        except EmulatorError as exc:
            raise DevSetupError(f"{path}: {exc.error}") from None
    return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class DeployPlan:
    """What `flyfn dev` deploys: the fly.toml (if any) and the image built from its Dockerfile."""

    fly_toml: FlyToml | None
    image: ImageFacts | None

    @classmethod
    def load(cls, options: DevOptions, root: Path) -> DeployPlan:
        path = options.config
        if path is None and (root / "fly.toml").is_file():
            path = root / "fly.toml"
        if path is None:
            return cls(None, None)
        try:
            fly_toml = load_fly_toml(path)
            dockerfile = fly_toml.dockerfile
            image = read_dockerfile(dockerfile) if dockerfile is not None else None
        except (FlyTomlError, DockerfileError) as exc:
            raise DevSetupError(str(exc)) from None
        return cls(fly_toml, image)

    @property
    def internal_port(self) -> int:
        service = self.fly_toml.http_service if self.fly_toml is not None else None
        if service is None and self.fly_toml is not None and self.fly_toml.services:
            return self.fly_toml.services[0].internal_port
        return service.internal_port if service is not None else 8000


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "app"


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `flyfn dev` (several servers share one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _server(app: Any, *, edge: bool = False) -> _Server:
    """A server for `app`; `edge`: the proxy's, with Fly's idle and header timeouts."""
    timeouts: dict[str, Any] = {}
    if edge:
        timeouts = {"http": edge_protocol(), "timeout_keep_alive": int(IDLE_TIMEOUT)}
    config = uvicorn.Config(
        app,
        **timeouts,
        log_level="warning",
        access_log=False,
        lifespan="off",
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE),
        backlog=2048,
    )
    return _Server(config)


class DevStack:
    """The running stack; `run()` until a signal (or `stop()`)."""

    def __init__(
        self,
        options: DevOptions,
        *,
        settings_module: str,
        out: TextIO,
        app_name: str,
        plan: DeployPlan | None = None,
        app_secrets: dict[str, str] | None = None,
    ) -> None:
        self.options = options
        self.out = out
        self.root = (options.root or Path.cwd()).resolve()
        self.plan = plan or DeployPlan(None, None)
        self.secrets = app_secrets or {}
        self.settings_module = settings_module
        self.project = settings_module.partition(".")[0] or self.root.name
        self.app_name = app_name
        fly_toml = self.plan.fly_toml
        primary = options.region or (fly_toml.primary_region if fly_toml else None)
        if options.regions and primary not in options.regions:
            primary = options.regions[0]
        self.region = primary or "local"  # the primary region
        self.regions = (self.region, *(r for r in options.regions if r != self.region))
        # The image is built from fly.toml's directory (the build context) when there is one.
        self.image = image_ref(self.project, fly_toml.directory if fly_toml else self.root)
        self.asgi_app = options.asgi_app or project_asgi_app(settings_module)
        # A fixed token lets other tools (`flyfn status`, tests) use the emulated API; never shown.
        self._token = os.environ.get(DEV_TOKEN_ENV) or secrets.token_urlsafe(24)
        self._stop = asyncio.Event()
        self._signals = 0
        self.runtime: ProcessRuntime | None = None
        self.app_machine: Machine | None = None
        self.live: LivePage | None = None

    def __repr__(self) -> str:  # never the token
        return f"DevStack(app={self.app_name!r}, image={self.image!r})"

    def stop(self) -> None:
        self._stop.set()

    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals > 1 and self.runtime is not None:
            self.runtime.kill_all()  # second Ctrl-C: no more waiting
            os._exit(130)
        self._stop.set()

    def _log(self, entry: RequestLog) -> None:
        self._write(str(entry))
        if self.live is not None:
            self.live.record_route(entry)

    def _write(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.out.write(line + "\n")
            self.out.flush()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            return await self._run()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        options = self.options
        try:
            proxy_sock = listening_socket(options.host, options.port)
        except OSError as exc:
            self._write(f"flyfn dev: cannot listen on {options.host}:{options.port}: {exc}")
            return 1
        try:
            api_sock = listening_socket("127.0.0.1", options.api_port)
        except OSError as exc:
            proxy_sock.close()
            self._write(f"flyfn dev: cannot listen on 127.0.0.1:{options.api_port}: {exc}")
            return 1
        try:
            live_sock = listening_socket("127.0.0.1", options.live_port)
        except OSError as exc:
            proxy_sock.close()
            api_sock.close()
            self._write(f"flyfn dev: cannot listen on 127.0.0.1:{options.live_port}: {exc}")
            return 1
        api_url = f"http://127.0.0.1:{api_sock.getsockname()[1]}"
        live_url = f"http://127.0.0.1:{live_sock.getsockname()[1]}/"
        proxy_port = proxy_sock.getsockname()[1]
        # The Machines' own directories, in one of this run's: on this computer they share one
        # /dev/shm, which no boot empties as each Fly Machine's; removed as the stack stops.
        machine_dirs = tempfile.mkdtemp(prefix="flyfn-dev-", dir=default_base())
        runtime = ProcessRuntime(
            self.asgi_app,
            image=self.plan.image,
            internal_port=self.plan.internal_port,
            api_hostname=api_url,
            api_token=self._token,
            base_env=self._image_base_env(),
            # flyfn.tasks sends its wakes through the proxy, as to the app's address on Fly.
            fly_env={
                "FLYFN_PUBLIC_URL": f"http://{options.host}:{proxy_port}",
                # Schedules' slots pass as fast as the emulated Fly starts scheduled Machines.
                TIME_SCALE_ENV: f"{options.time_scale:g}",
            },
            region=self.region,
            primary_region=self.region,
            cwd=self._workdir(),
            boot_timeout=options.boot_timeout,
            output=self.out,
            machine_dirs=machine_dirs,
        )
        self.runtime = runtime
        emulator = MachinesEmulator(runtime=runtime, region=self.region, default_app=self.app_name)
        if self.secrets:
            emulator.set_secrets(self.app_name, self.secrets)
        runtime.attach(emulator)
        self.live = LivePage(
            emulator,
            emulator.app_names,
            tasks=partial(_task_figures, options.time_scale),
            port=live_sock.getsockname()[1],
        )
        live_server = _server(self.live)
        api_server = _server(
            create_app(emulator, token=self._token)  # within Fly's rate limits (429 + Retry-After)
        )
        proxy = FlyProxy(
            emulator,
            runtime,
            app_name=self.app_name,
            region=self.region,
            regions=self.regions,
            emulate_latency=options.emulate_latency,
            autostop_interval=DEFAULT_AUTOSTOP_INTERVAL / options.time_scale,
            on_log=self._log,
            on_event=self._write,
        )
        proxy_server = _server(proxy, edge=True)
        schedules = FlySchedules(emulator, time_scale=options.time_scale, on_event=self._write)
        servers: list[asyncio.Task[None]] = []
        written: Path | None = None
        try:
            servers.append(asyncio.ensure_future(api_server.serve(sockets=[api_sock])))
            servers.append(asyncio.ensure_future(live_server.serve(sockets=[live_sock])))
            begun = time.monotonic()
            if not await self._release(runtime, emulator):
                return 1
            machine = await self._create_app_machines(emulator)
            if machine is None:
                return 1
            self.app_machine = machine
            emulator.full_regions.update(options.full_regions)  # API creates from now on
            await proxy.start()
            schedules.start()
            servers.append(asyncio.ensure_future(proxy_server.serve(sockets=[proxy_sock])))
            while not proxy_server.started:
                if servers[-1].done() or self._stop.is_set():
                    return 1
                await asyncio.sleep(0.02)
            info = DevStackInfo(self.app_name, api_url, self._token, os.getpid())
            try:
                written = write_stack_file(info)
            except (OSError, ValueError) as exc:  # without it, `--api` still finds the stack
                self._write(f"flyfn dev: no stack file for `flyfn.emulator.secrets` ({exc})")
            self._banner(machine, time.monotonic() - begun, api_url, live_url)
            await self._stop.wait()
            self._write("flyfn dev: stopping ...")
            return 0
        finally:
            proxy_server.should_exit = True
            api_server.should_exit = True
            live_server.should_exit = True
            await schedules.aclose()
            await proxy.aclose()
            await emulator.aclose()
            await runtime.aclose(grace=SHUTDOWN_GRACE)
            runtime.kill_all()
            shutil.rmtree(machine_dirs, ignore_errors=True)
            if servers:
                await asyncio.wait(servers, timeout=SHUTDOWN_GRACE)
            for sock in (proxy_sock, api_sock, live_sock):
                sock.close()
            if written is not None:
                with contextlib.suppress(OSError):
                    written.unlink()

    def _image_base_env(self) -> dict[str, str]:
        env = image_base_env()
        if self.plan.image is None:
            # No Dockerfile: the settings module `flyfn dev` runs with stands in for the image's.
            env["DJANGO_SETTINGS_MODULE"] = self.settings_module
        return env

    def _workdir(self) -> Path:
        """Where Machines run: the local copy of the image's WORKDIR, else the project."""
        image = self.plan.image
        return image.local_workdir if image is not None and image.local_workdir else self.root

    async def _release(self, runtime: ProcessRuntime, emulator: MachinesEmulator) -> bool:
        """fly.toml's `[deploy] release_command`, as `fly deploy` runs it before the Machines:
        the new image, fly.toml's `[env]`, the app's secrets, the primary region. False (and
        the reason said) when it fails: nothing is deployed then."""
        fly_toml = self.plan.fly_toml
        command = fly_toml.deploy.release_command if fly_toml is not None else None
        if not command:
            return True
        machine = Machine(
            id=f"release{secrets.token_hex(4)}",
            region=self.region,
            config=MachineConfig(image=self.image, env=dict(fly_toml.env) or None)
            if fly_toml
            else None,
        )
        self._write(f"flyfn dev: running the release command: {command}")
        env = runtime.machine_env(self.app_name, machine)
        process = await asyncio.create_subprocess_exec(
            *shlex.split(command),
            cwd=self._workdir(),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            assert process.stdout is not None
            async with asyncio.timeout(RELEASE_COMMAND_TIMEOUT):
                async for raw in process.stdout:
                    self._write("release | " + raw.decode(errors="replace").rstrip())
                code = await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
            self._write(
                f"flyfn dev: the release command ran over {RELEASE_COMMAND_TIMEOUT:g}s; "
                "nothing was deployed"
            )
            return False
        except asyncio.CancelledError:
            process.kill()
            raise
        if code != 0:
            self._write(
                f"flyfn dev: the release command failed (exit {code}); nothing was deployed"
            )
            return False
        return True

    async def _create_app_machines(self, emulator: MachinesEmulator) -> Machine | None:
        """One app Machine per fly.toml process group (the default one without a fly.toml);
        the first, or None when one did not boot."""
        fly_toml = self.plan.fly_toml
        configs = (
            [fly_toml.machine_config(group, self.image) for group in fly_toml.process_groups()]
            if fly_toml is not None
            else [self._default_app_config()]
        )
        first: Machine | None = None
        for region in self.regions:  # `fly scale count N --region a,b`: one per region
            for config in configs:
                machine = await self._create_app_machine(emulator, config, region)
                if machine is None:
                    return None
                first = first or machine
        return first

    def _default_app_config(self) -> MachineConfig:
        return MachineConfig(
            image=self.image,
            metadata={"fly_process_group": "app", "fly_platform_version": "v2"},
            services=[
                MachineService(
                    protocol="tcp",
                    internal_port=8000,
                    autostart=True,
                    # The dev app Machine stays up; function Machines stop per their config.
                    autostop="off",
                    min_machines_running=1,
                    ports=[
                        MachinePort(port=80, handlers=["http"]),
                        MachinePort(port=443, handlers=["tls", "http"]),
                    ],
                )
            ],
            restart=MachineRestart(policy="on-failure", max_retries=3),
        )

    async def _create_app_machine(
        self, emulator: MachinesEmulator, config: MachineConfig, region: str
    ) -> Machine | None:
        if config.restart is None:
            config = config.model_copy(
                update={"restart": MachineRestart(policy="on-failure", max_retries=3)}
            )
        request = CreateMachineRequest(config=config, region=region)
        created = await emulator.create(self.app_name, request)
        where = f" in {region}" if len(self.regions) > 1 else ""
        self._write(f"flyfn dev: booting the app Machine {created.id}{where} ({self._runs()}) ...")
        waiter = asyncio.ensure_future(
            emulator.wait_for_state(
                self.app_name, created.id, "settled", timeout=self.options.boot_timeout + 5
            )
        )
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not waiter.done():
            waiter.cancel()
            return None
        try:
            machine = waiter.result()
        except EmulatorError as exc:
            self._write(f"flyfn dev: the app Machine did not boot: {exc}")
            return None
        if machine.state != "started":
            errors = [
                e.request.get("error", "")
                for e in machine.events or []
                if isinstance(e.request, dict) and e.request.get("error")
            ]
            self._write(
                f"flyfn dev: the app Machine did not start (state {machine.state})"
                + (f": {errors[0]}" if errors else "")
            )
            return None
        return machine

    def _banner(self, machine: Machine, seconds: float, api_url: str, live_url: str) -> None:
        options = self.options
        url = f"http://{options.host}:{options.port}/"
        lines = [
            "",
            f"  flyfn dev: local Fly for {self.project}",
            f"    open       {url}",
            f"    app        {self.app_name}   image {self.image}",
            f"    main       {machine_label(machine)} (Machine {machine.id}) "
            f"started in {seconds:.1f}s",
            f"    API        {api_url} (FLY_API_HOSTNAME of every Machine)",
            f"    live       {live_url} (Machines, routes and tasks as they change)",
            f"    autostop   a pass every {DEFAULT_AUTOSTOP_INTERVAL / options.time_scale:g}s "
            f"(time-scale {options.time_scale:g})   (Ctrl-C stops everything)",
            f"    secrets    python -m flyfn.emulator.secrets --app {self.app_name} set NAME=VALUE"
            + (f"   ({len(self.secrets)} from --secrets-file)" if self.secrets else ""),
            *self._deploy_lines(),
            *self._region_lines(),
            "",
        ]
        # The proxy's address as a URL's host (an IPv6 address goes in brackets there).
        host = f"[{options.host}]" if ":" in options.host else options.host
        if not is_loopback_url(f"http://{host}/"):
            lines[1:1] = [
                f"  WARNING: the proxy listens on {options.host}, not only on this computer: "
                "anyone who can reach it can use the app (and its DEBUG pages).",
            ]
        self._write("\n".join(lines))

    def _region_lines(self) -> list[str]:
        if len(self.regions) < 2:
            return []
        full = self.options.full_regions
        return [
            f"    regions    {', '.join(self.regions)} (primary {self.region}); a request from a "
            f"region: -H '{FROM_REGION_HEADER}: {self.regions[-1]}'"
            + ("; hops between regions take their latency" if self.options.emulate_latency else ""),
            *([f"    full       {', '.join(full)}: creating Machines there fails"] if full else []),
        ]

    def _runs(self) -> str:
        image = self.plan.image
        if image is not None and image.command():
            return shlex.join(image.command())
        return f"{self.asgi_app} in one uvicorn process"

    def _deploy_lines(self) -> list[str]:
        fly_toml = self.plan.fly_toml
        if fly_toml is None:
            return [
                "    fly.toml   none: one app Machine, autostop off, serving "
                f"{self.asgi_app} in one process (--config names a fly.toml)",
            ]
        image = self.plan.image
        lines = [
            f"    fly.toml   {fly_toml.path} (region {self.region}, "
            f"process groups {', '.join(fly_toml.process_groups())})",
            f"    runs       {self._runs()} in {self._workdir()}",
        ]
        if image is None:
            lines.append("    image      no Dockerfile beside fly.toml: the ASGI app is served")
        elif image.local_workdir is None:
            lines.append(
                f"    workdir    the image's WORKDIR {image.workdir} was not copied from the "
                f"build context: Machines run in {self.root}"
            )
        return lines


def _task_figures(time_scale: float = 1.0) -> dict[str, dict[str, Any]]:
    """Per-group task figures for the live page when the project uses flyfn's tasks backend (the
    same database as its Machines: `flyfn dev` runs in the project's settings), then each
    periodic task's last and next slot (`time_scale`: the stack's)."""
    from django.apps import apps

    if not apps.ready or not apps.is_installed("flyfn.tasks"):
        return {}
    from django.db import connection

    from flyfn.tasks.periodic import schedule_rows
    from flyfn.tasks.status import task_status

    try:
        figures: dict[str, dict[str, Any]] = {
            row.group: {
                "ready": row.ready,
                "scheduled": row.scheduled,
                "running": row.running,
                "failed": row.failed,
                "oldest waiting": (
                    f"{row.oldest_waiting.total_seconds():.0f}s" if row.oldest_waiting else None
                ),
            }
            for row in task_status()
        }
        for schedule in schedule_rows(time_scale):
            figures[f"schedule {schedule.name}"] = {
                "task": schedule.task,
                "when": schedule.when,
                "runs on": schedule.runs_on,
                "last slot": _clock_time(schedule.last_slot),
                "next slot": _clock_time(schedule.next_slot),
            }
        return figures
    finally:
        connection.close()  # this worker thread's own connection: nothing left open


def _clock_time(at: datetime | None) -> str | None:
    return None if at is None else at.strftime("%H:%M:%S")


def default_app_name(settings_module: str) -> str:
    """FLYFN['APP_NAME'] / FLY_APP_NAME when set, else the project's name as a Fly app name."""
    with contextlib.suppress(Exception):  # settings problems are reported by the Machines
        from flyfn.conf import get_settings

        name = get_settings().app_name
        if name:
            return name
    return _slug(settings_module.partition(".")[0] or Path.cwd().name)


def run_dev(options: DevOptions, *, out: TextIO | None = None) -> int:
    """Run the local Fly stack until SIGINT/SIGTERM; the exit status."""
    settings_module = os.environ.get("DJANGO_SETTINGS_MODULE", "")
    stream = out if out is not None else sys.stdout
    root = (options.root or Path.cwd()).resolve()
    try:
        plan = DeployPlan.load(options, root)
        app_secrets = read_secrets_file(options.secrets_file) if options.secrets_file else {}
    except DevSetupError as exc:
        stream.write(f"flyfn dev: {exc}\n")
        stream.flush()
        return 1
    fly_app = plan.fly_toml.app if plan.fly_toml is not None else None
    stack = DevStack(
        options,
        settings_module=settings_module,
        out=stream,
        app_name=options.app_name or fly_app or default_app_name(settings_module),
        plan=plan,
        app_secrets=app_secrets,
    )
    return asyncio.run(stack.run())
