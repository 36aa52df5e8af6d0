"""`manage.py flyfn dev`: the local Fly stack for this project, in one asyncio process.

It serves the Machines API emulator on a loopback port, runs every Machine as a process of the
project's ASGI app (`ProcessRuntime`), creates one app Machine with the project's own image ref
(`local/<project>:dev-<hash of the sources>`) and serves the Fly Proxy on `--port`. Function
Machines appear when flyfn's pool creates them through the API, exactly as on Fly.

SIGINT or SIGTERM to this process stops everything it started within a few seconds (a second
signal kills at once); the Machines also die with it if it is killed outright.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import ipaddress
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import uvicorn

from flyfn.emulator.api import RateLimit, create_app
from flyfn.emulator.child import DEFAULT_ASGI_APP
from flyfn.emulator.edge import IDLE_TIMEOUT, edge_protocol
from flyfn.emulator.live import LivePage
from flyfn.emulator.logline import RequestLog, machine_label
from flyfn.emulator.proxy import DEFAULT_AUTOSTOP_INTERVAL, FlyProxy
from flyfn.emulator.secrets import DEV_TOKEN_ENV, DevStackInfo, write_stack_file
from flyfn.emulator.state import EmulatorError, MachinesEmulator
from flyfn.emulator.supervisor import DEFAULT_BOOT_TIMEOUT, ProcessRuntime, listening_socket
from flyfn.machines.models import (
    CreateMachineRequest,
    Machine,
    MachineConfig,
    MachinePort,
    MachineRestart,
    MachineService,
)

__all__ = ["DevOptions", "image_ref", "project_asgi_app", "run_dev"]

DEFAULT_PORT = 8080
SHUTDOWN_GRACE = 3.0
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
    region: str = "local"
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    api_port: int = 0  # the Machines API's loopback port (0: any free one)
    live_port: int = 0  # the live page's loopback port (0: any free one)
    root: Path | None = None  # the project directory (default: the current one)
    # Fly's Machines API rate limits, emulated (429 + Retry-After). Off by default: locally they
    # only add retry pauses to cold starts; turn them on to see how an app copes with them.
    rate_limits: bool = False

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
        self, options: DevOptions, *, settings_module: str, out: TextIO, app_name: str
    ) -> None:
        self.options = options
        self.out = out
        self.root = (options.root or Path.cwd()).resolve()
        self.project = settings_module.partition(".")[0] or self.root.name
        self.app_name = app_name
        self.image = image_ref(self.project, self.root)
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
        runtime = ProcessRuntime(
            self.asgi_app,
            api_hostname=api_url,
            api_token=self._token,
            # flyfn.tasks sends its wakes through the proxy, as to the app's address on Fly.
            base_env={**os.environ, "FLYFN_PUBLIC_URL": f"http://{options.host}:{proxy_port}"},
            region=options.region,
            cwd=self.root,
            boot_timeout=options.boot_timeout,
            output=self.out,
        )
        self.runtime = runtime
        emulator = MachinesEmulator(
            runtime=runtime, region=options.region, default_app=self.app_name
        )
        runtime.attach(emulator)
        self.live = LivePage(emulator, emulator.app_names, tasks=_task_figures)
        live_server = _server(self.live)
        api_server = _server(
            create_app(
                emulator,
                token=self._token,
                rate_limit=RateLimit() if self.options.rate_limits else None,
            )
        )
        proxy = FlyProxy(
            emulator,
            runtime,
            app_name=self.app_name,
            region=options.region,
            autostop_interval=DEFAULT_AUTOSTOP_INTERVAL / options.time_scale,
            on_log=self._log,
            on_event=self._write,
        )
        proxy_server = _server(proxy, edge=True)
        servers: list[asyncio.Task[None]] = []
        written: Path | None = None
        try:
            servers.append(asyncio.ensure_future(api_server.serve(sockets=[api_sock])))
            servers.append(asyncio.ensure_future(live_server.serve(sockets=[live_sock])))
            begun = time.monotonic()
            machine = await self._create_app_machine(emulator)
            if machine is None:
                return 1
            self.app_machine = machine
            await proxy.start()
            servers.append(asyncio.ensure_future(proxy_server.serve(sockets=[proxy_sock])))
            while not proxy_server.started:
                if servers[-1].done() or self._stop.is_set():
                    return 1
                await asyncio.sleep(0.02)
            info = DevStackInfo(self.app_name, api_url, self._token, os.getpid())
            with contextlib.suppress(OSError):  # without it, `--api` still finds the stack
                written = write_stack_file(info)
            self._banner(machine, time.monotonic() - begun, api_url, live_url)
            await self._stop.wait()
            self._write("flyfn dev: stopping ...")
            return 0
        finally:
            proxy_server.should_exit = True
            api_server.should_exit = True
            live_server.should_exit = True
            await proxy.aclose()
            await emulator.aclose()
            await runtime.aclose(grace=SHUTDOWN_GRACE)
            runtime.kill_all()
            if servers:
                await asyncio.wait(servers, timeout=SHUTDOWN_GRACE)
            for sock in (proxy_sock, api_sock, live_sock):
                sock.close()
            if written is not None:
                with contextlib.suppress(OSError):
                    written.unlink()

    async def _create_app_machine(self, emulator: MachinesEmulator) -> Machine | None:
        config = MachineConfig(
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
        created = await emulator.create(self.app_name, CreateMachineRequest(config=config))
        self._write(f"flyfn dev: booting the app Machine {created.id} ({self.asgi_app}) ...")
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
            f"    secrets    python -m flyfn.emulator.secrets --app {self.app_name} set NAME=VALUE",
            "",
        ]
        if not _is_loopback(options.host):
            lines[1:1] = [
                f"  WARNING: the proxy listens on {options.host}, not only on this computer: "
                "anyone who can reach it can use the app (and its DEBUG pages).",
            ]
        self._write("\n".join(lines))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _task_figures() -> dict[str, dict[str, Any]]:
    """Per-group task figures for the live page when the project uses flyfn's tasks backend (the
    same database as its Machines: `flyfn dev` runs in the project's settings)."""
    from django.apps import apps

    if not apps.ready or not apps.is_installed("flyfn.tasks"):
        return {}
    from django.db import connection

    from flyfn.tasks.status import task_status

    try:
        return {
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
    finally:
        connection.close()  # this worker thread's own connection: nothing left open


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
    stack = DevStack(
        options,
        settings_module=settings_module,
        out=stream,
        app_name=options.app_name or default_app_name(settings_module),
    )
    return asyncio.run(stack.run())
