"""Machines as local processes: `ProcessRuntime` runs each emulated Machine as the project's app.

A Machine runs the image's command (`ENTRYPOINT` + `CMD` of the project's Dockerfile, or its
`init.cmd`: a fly.toml process), workers and all, with its listen address rewritten to a loopback
port of its own (`flyfn.emulator.listen`); without a Dockerfile it is one uvicorn process serving
the project's ASGI application. A Machine without services (a scheduled Machine) runs its
command and listens nowhere: it is started once its process is. Each runs in its own process
group, in the environment Fly gives a Machine and nothing else (`machine_env`). The runtime
implements the `MachineRuntime` seam of `flyfn.emulator.state`: launch waits until the app
accepts connections, stop is the configured signal then SIGKILL, suspend is SIGSTOP and resume
SIGCONT. A watcher per process reports an unexpected exit to the emulator (`machine_exited`), so
the Machine becomes stopped and the proxy starts it again on the next request.

Nothing is left behind: children die with their parent (PR_SET_PDEATHSIG on Linux, a stdin pipe
that reaches EOF elsewhere), and an atexit hook kills every process group still alive.

The child side is `flyfn.emulator.child`; process groups and signals are
`flyfn.emulator.process_groups`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO

from flyfn.emulator.child import DEFAULT_ASGI_APP, DEFAULT_STOP_TIMEOUT
from flyfn.emulator.dockerfile import ImageFacts
from flyfn.emulator.listen import ListenAddressError, bind_locally
from flyfn.emulator.logline import machine_label
from flyfn.emulator.process_groups import (
    exit_code,
    forget_group,
    kill_group,
    own_group,
    parse_signal,
    until_stopped,
)
from flyfn.emulator.state import stop_params
from flyfn.emulator.validation import RUNTIME_ENV_NAMES
from flyfn.fly import env as fly_env
from flyfn.machine_dir import MACHINE_DIRS_ENV, remove_machine_dir

if TYPE_CHECKING:
    from flyfn.machines.models import Machine

__all__ = [
    "DEFAULT_BOOT_TIMEOUT",
    "IMAGE_BASE_ENV",
    "MachineLaunchError",
    "ProcessRuntime",
    "image_base_env",
    "listening_socket",
]

DEFAULT_BOOT_TIMEOUT = 30.0
READY_POLL_INTERVAL = 0.01  # seconds between readiness probes of a booting Machine
_OUTPUT_TAIL = 20
_READ_LIMIT = 1 << 20
# What a Machine takes from the shell that runs `flyfn dev`: only what stands for the image's own
# filesystem and base image (this Python environment, the user's home, locale and temp dir).
# Everything else a Machine sees comes from the image's ENV, its config, the app's secrets and
# Fly, as on Fly: a variable set only in the shell is not there.
IMAGE_BASE_ENV = ("HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH")
# Docker's default PATH, after this Python's own bin directory (the local image's Python).
_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def image_base_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The base environment of the local image: `PATH` with this Python first, and the names in
    `IMAGE_BASE_ENV` from `environ` (default: this process's)."""
    source = os.environ if environ is None else environ
    env = {name: source[name] for name in IMAGE_BASE_ENV if name in source}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), _IMAGE_PATH])
    # The emulator shows each Machine's output line by line as it comes, as Fly's log stream.
    env["PYTHONUNBUFFERED"] = "1"
    return env


class MachineLaunchError(RuntimeError):
    """A Machine's process exited or did not answer before its boot timeout."""


class ExitReporter(Protocol):
    """What the runtime tells the emulator (a process died on its own) and asks it (the app
    secrets a Machine boots with); `MachinesEmulator` implements it."""

    async def machine_exited(self, app: str, machine_id: str, *, exit_code: int | None) -> None: ...

    def secret_env(self, app: str, machine_id: str) -> dict[str, str]: ...


@dataclass
class _Child:
    app: str
    machine_id: str
    label: str
    port: int
    process: asyncio.subprocess.Process
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=_OUTPUT_TAIL))
    stopping: bool = False
    suspended: bool = False
    ready: bool = False
    spawned_at: float = field(default_factory=time.monotonic)
    boot_seconds: float | None = None
    watcher: asyncio.Task[None] | None = None
    pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


def _has_services(machine: Machine) -> bool:
    return bool(machine.config is not None and machine.config.services)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` (0: any free port), for uvicorn to serve on.

    The protocol is named (IPPROTO_TCP, not 0) because asyncio only sets TCP_NODELAY on accepted
    connections whose socket says it is TCP; without it, Nagle's algorithm meets the client's
    delayed ACK and every keep-alive response after the first waits about 40 ms.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class ProcessRuntime:
    """Runs Machines as processes of this project's ASGI app (implements `MachineRuntime`)."""

    def __init__(
        self,
        asgi_app: str = DEFAULT_ASGI_APP,
        *,
        image: ImageFacts | None = None,
        internal_port: int = 8080,
        fly_env: Mapping[str, str] | None = None,
        api_hostname: str = "",
        api_token: str = "",
        region: str = "local",
        primary_region: str | None = None,
        cwd: str | Path | None = None,
        base_env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        host: str = "127.0.0.1",
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        output: TextIO | None = None,
        log_level: str = "warning",
        reporter: ExitReporter | None = None,
        machine_dirs: str | None = None,
    ) -> None:
        self.asgi_app = asgi_app
        # Where the Machines' own directories live (`flyfn.machine_dir`; None: its default).
        self.machine_dirs = machine_dirs
        self.api_hostname = api_hostname
        self._api_token = api_token
        self.region = region
        self.primary_region = primary_region or region
        self.image = image
        self.internal_port = internal_port
        self.cwd = Path(cwd) if cwd is not None else Path.cwd()
        self._base_env = image_base_env() if base_env is None else dict(base_env)
        self._fly_env = dict(fly_env or {})
        self.python = python
        self.host = host
        self.boot_timeout = boot_timeout
        self._output = output
        self.log_level = log_level
        self._reporter = reporter
        self._children: dict[str, _Child] = {}
        self._launching: dict[str, asyncio.Task[None]] = {}
        self._launched: set[str] = set()  # Machines whose directory (machine_dir) may exist

    def __repr__(self) -> str:  # never the token
        return f"ProcessRuntime(asgi_app={self.asgi_app!r}, machines={len(self._children)})"

    def attach(self, reporter: ExitReporter) -> None:
        """Tell the runtime whom to report dead processes to (the emulator, built after it)."""
        self._reporter = reporter

    # -- queries -------------------------------------------------------------------------------

    def address(self, machine_id: str) -> tuple[str, int] | None:
        """Where a started Machine's app listens, or None when it has no live process."""
        child = self._children.get(machine_id)
        if child is None or child.process.returncode is not None or not child.ready:
            return None
        if not child.port:  # it listens nowhere (no services)
            return None
        return (self.host, child.port)

    def pid(self, machine_id: str) -> int | None:
        child = self._children.get(machine_id)
        return child.pid if child is not None else None

    def boot_seconds(self, machine_id: str) -> float | None:
        """How long the Machine's current process took from spawn to accepting connections."""
        child = self._children.get(machine_id)
        return child.boot_seconds if child is not None else None

    def pids(self) -> dict[str, int]:
        """Machine id -> pid of every process this runtime currently owns."""
        return {mid: child.pid for mid, child in self._children.items()}

    def is_running(self, machine_id: str) -> bool:
        child = self._children.get(machine_id)
        return child is not None and child.process.returncode is None and not child.suspended

    async def reap(self, machine_id: str) -> bool:
        """True when the Machine's process is gone; its exit is reported before this returns.

        The proxy calls this after a refused connection, so that a killed process is seen at once
        rather than when the watcher task next runs.
        """
        child = self._children.get(machine_id)
        if child is None:
            return True
        if child.process.returncode is None:
            try:
                await asyncio.wait_for(asyncio.shield(child.process.wait()), 0.2)
            except TimeoutError:
                return False
        if child.watcher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(child.watcher)
        return True

    # -- MachineRuntime ------------------------------------------------------------------------

    async def launch(self, app: str, machine: Machine) -> None:
        """Start the Machine's process; return once its app accepts connections."""
        running = self._launching.get(machine.id)
        if running is not None:
            await asyncio.shield(running)
            return
        child = self._children.get(machine.id)
        if child is not None and child.process.returncode is None:
            if child.suspended:
                await self.resume(app, machine)
            return
        task = asyncio.ensure_future(self._launch(app, machine))
        self._launching[machine.id] = task
        try:
            await asyncio.shield(task)
        finally:
            if task.done():
                self._launching.pop(machine.id, None)

    async def stop(self, app: str, machine: Machine, signal: str, timeout: float) -> None:  # noqa: ASYNC109
        child = self._children.get(machine.id)
        if child is None:
            return
        await self._terminate(child, parse_signal(signal), timeout)

    async def suspend(self, app: str, machine: Machine) -> None:
        child = self._children.get(machine.id)
        if child is None or child.process.returncode is not None:
            return
        kill_group(child.pid, signal.SIGSTOP)
        child.suspended = True
        await until_stopped(child.pid)

    async def resume(self, app: str, machine: Machine) -> None:
        child = self._children.get(machine.id)
        if child is None or child.process.returncode is not None:
            await self.launch(app, machine)
            return
        kill_group(child.pid, signal.SIGCONT)
        child.suspended = False

    async def destroy(self, app: str, machine: Machine) -> None:
        child = self._children.get(machine.id)
        if child is not None:
            await self._terminate(child, signal.SIGTERM, DEFAULT_STOP_TIMEOUT)
        # Fly drops a destroyed Machine's file system; here its /dev/shm or /tmp files go.
        remove_machine_dir(machine.id, base=self.machine_dirs)
        self._launched.discard(machine.id)

    async def aclose(self, grace: float = 3.0) -> None:
        """Stop every process (SIGTERM, SIGKILL after `grace` seconds), concurrently."""
        for task in list(self._launching.values()):
            task.cancel()
        children = list(self._children.values())
        await asyncio.gather(
            *(self._terminate(child, signal.SIGTERM, grace) for child in children),
            return_exceptions=True,
        )
        for machine_id in self._launched:
            remove_machine_dir(machine_id, base=self.machine_dirs)
        self._launched.clear()

    def kill_all(self) -> None:
        """SIGKILL every process group now (synchronous; for signal handlers and finally blocks)."""
        for child in list(self._children.values()):
            child.stopping = True
            kill_group(child.pid, signal.SIGKILL)

    # -- internals -----------------------------------------------------------------------------

    def machine_env(self, app: str, machine: Machine) -> dict[str, str]:
        """The environment the Machine's process starts with, as Fly composes it: the image's
        base and `ENV`, the Machine's `config.env`, the app's secrets (as they are at boot: a
        running Machine keeps them until its next start or update; none of `RUNTIME_ENV_NAMES`),
        then Fly's variables.
        `FLY_PROCESS_GROUP` only on Machines of a fly.toml process group (not API-created ones)."""
        config = machine.config
        env = dict(self._base_env)
        if self.image is not None:
            env.update(self.image.env)
        if config is not None and config.env:
            env.update({k: str(v) for k, v in config.env.items()})
        if self._reporter is not None:
            secrets = self._reporter.secret_env(app, machine.id)
            # No secret says which API a Machine talks to, nor its flyfn group (issue 23).
            env.update({k: v for k, v in secrets.items() if k not in RUNTIME_ENV_NAMES})
        image = config.image if config is not None and config.image else ""
        metadata = (config.metadata if config is not None else None) or {}
        env.update(self._fly_env)
        env.update(
            {
                fly_env.FLY_APP_NAME: app,
                fly_env.FLY_MACHINE_ID: machine.id,
                fly_env.FLY_ALLOC_ID: machine.id,
                fly_env.FLY_IMAGE_REF: image,
                fly_env.FLY_REGION: machine.region or self.region,
                fly_env.FLY_PRIVATE_IP: machine.private_ip or self.host,
                "FLY_PUBLIC_IP": self.host,
                fly_env.FLY_API_HOSTNAME: self.api_hostname,
                fly_env.FLY_API_TOKEN: self._api_token,
                "PRIMARY_REGION": self.primary_region,
            }
        )
        env.pop("FLY_PROCESS_GROUP", None)
        if group := metadata.get("fly_process_group"):
            env["FLY_PROCESS_GROUP"] = group
        if machine.current_version:
            env["FLY_MACHINE_VERSION"] = machine.current_version
        guest = config.guest if config is not None else None
        if guest is not None and guest.memory_mb:
            env["FLY_VM_MEMORY_MB"] = str(guest.memory_mb)
        if self.machine_dirs is not None:
            env[MACHINE_DIRS_ENV] = self.machine_dirs
        # The project must stay importable from the child however the parent was started.
        paths = [str(self.cwd), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        return env

    def _image_command(self, machine: Machine) -> list[str] | None:
        """The argv the Machine's image runs (None: no image command, serve the ASGI app). With
        no Dockerfile, a Machine without services that names an `init.cmd` (a scheduled
        Machine's command) runs that command."""
        config = machine.config
        init_cmd = config.init.cmd if config is not None and config.init is not None else None
        if self.image is None:
            return list(init_cmd) if init_cmd and not _has_services(machine) else None
        if not (self.image.command(init_cmd)):
            return None
        return self.image.command(init_cmd)

    def _internal_port(self, machine: Machine) -> int:
        services = (machine.config.services if machine.config is not None else None) or []
        return next((s.internal_port for s in services if s.internal_port), self.internal_port)

    def _command(
        self,
        fd: int | None,
        argv: list[str] | None = None,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> list[str]:
        command = [self.python, "-m", "flyfn.emulator.child", "--parent-pid", str(os.getpid())]
        if argv is not None:
            return [*command, "--", *argv]
        return [
            *command,
            "--app",
            self.asgi_app,
            "--fd",
            str(fd),
            "--log-level",
            self.log_level,
            "--stop-timeout",
            f"{stop_timeout:g}",
        ]

    async def _spawn(
        self, argv: list[str], app: str, machine: Machine, pass_fds: tuple[int, ...] = ()
    ) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self.cwd,
                env=self.machine_env(app, machine),
                pass_fds=pass_fds,
                start_new_session=True,
                limit=_READ_LIMIT,
            )
        except OSError as exc:
            raise MachineLaunchError(f"Machine {machine.id} could not be spawned: {exc}") from exc

    async def _start_process(
        self, app: str, machine: Machine
    ) -> tuple[asyncio.subprocess.Process, int]:
        """Start the Machine's process; it and the loopback port it will listen on."""
        image_argv = self._image_command(machine)
        if image_argv is not None and not _has_services(machine):
            # Nothing is sent to it (a scheduled Machine's command): it listens on no port.
            return await self._spawn(self._command(None, image_argv), app, machine), 0
        if image_argv is not None:
            # The image's server binds the port itself; the port is free a moment before.
            with listening_socket(self.host, 0) as probe:
                port = probe.getsockname()[1]
            try:
                argv = bind_locally(image_argv, self._internal_port(machine), self.host, port)
            except ListenAddressError as exc:
                raise MachineLaunchError(f"Machine {machine.id}: {exc}") from None
            return await self._spawn(self._command(None, argv), app, machine), port
        # The runtime binds the port and hands the socket over: no window in which another
        # process could take the port between choosing it and the child listening on it.
        sock = listening_socket(self.host, 0)
        try:
            port = sock.getsockname()[1]
            argv = self._command(sock.fileno(), stop_timeout=stop_params(machine.config)[1])
            return await self._spawn(argv, app, machine, (sock.fileno(),)), port
        finally:
            sock.close()

    async def _launch(self, app: str, machine: Machine) -> None:
        self._launched.add(machine.id)
        process, port = await self._start_process(app, machine)
        own_group(process.pid)
        child = _Child(
            app=app, machine_id=machine.id, label=machine_label(machine), port=port, process=process
        )
        old = self._children.get(machine.id)
        if old is not None and old.process.returncode is None:
            await self._terminate(old, signal.SIGKILL, 0)
        self._children[machine.id] = child
        child.pump = asyncio.ensure_future(self._pump(child))
        try:
            if port:  # a Machine without services is started once its process is
                await self._wait_ready(child)
        except BaseException:
            child.stopping = True
            await self._terminate(child, signal.SIGKILL, 0)
            if child.pump is not None:
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(child.pump, 1.0)
            raise
        child.ready = True
        child.boot_seconds = time.monotonic() - child.spawned_at
        child.watcher = asyncio.ensure_future(self._watch(child))

    async def _wait_ready(self, child: _Child) -> None:
        deadline = time.monotonic() + self.boot_timeout
        while True:
            if child.process.returncode is not None:
                # Let the pump print the last words before reporting them.
                if child.pump is not None:
                    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                        await asyncio.wait_for(asyncio.shield(child.pump), 1.0)
                raise MachineLaunchError(
                    f"Machine {child.machine_id} exited during boot with code "
                    f"{exit_code(child.process.returncode)}{self._tail_text(child)}"
                )
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, child.port), 1.0
                )
            except (OSError, TimeoutError):
                pass
            else:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            if time.monotonic() >= deadline:
                raise MachineLaunchError(
                    f"Machine {child.machine_id} did not answer on port {child.port} within "
                    f"{self.boot_timeout:g}s{self._tail_text(child)}"
                )
            # A refused loopback connect costs microseconds: poll often, so a cold start is not
            # lengthened by the poll interval.
            await asyncio.sleep(READY_POLL_INTERVAL)

    @staticmethod
    def _tail_text(child: _Child) -> str:
        if not child.tail:
            return ""
        return ":\n" + "\n".join(child.tail)

    async def _pump(self, child: _Child) -> None:
        stream = child.process.stdout
        if stream is None:
            return
        out = self._output if self._output is not None else sys.stderr
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the limit: take what is there
                raw = await stream.read(_READ_LIMIT)
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\r\n")
            child.tail.append(line)
            try:
                out.write(f"{child.label} | {line}\n")
                out.flush()
            except (OSError, ValueError):  # console gone: keep draining so the child never blocks
                pass

    async def _watch(self, child: _Child) -> None:
        returncode = await child.process.wait()
        self._forget(child)
        if child.stopping:
            return
        if self._reporter is not None:
            await self._reporter.machine_exited(
                child.app, child.machine_id, exit_code=exit_code(returncode)
            )

    def _forget(self, child: _Child) -> None:
        forget_group(child.pid)
        if self._children.get(child.machine_id) is child:
            del self._children[child.machine_id]

    async def _terminate(self, child: _Child, sig: signal.Signals, grace: float) -> None:
        child.stopping = True
        process = child.process
        if process.returncode is None:
            if sig != signal.SIGKILL and grace > 0:
                kill_group(child.pid, sig)
                if child.suspended:  # a stopped process only acts on the signal once continued
                    kill_group(child.pid, signal.SIGCONT)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(process.wait()), grace)
            if process.returncode is None:
                kill_group(child.pid, signal.SIGKILL)
                await process.wait()
        # Whatever the leader left in its group goes too.
        kill_group(child.pid, signal.SIGKILL)
        if child.pump is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(child.pump), 1.0)
        watcher = child.watcher
        if watcher is not None and not watcher.done() and watcher is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        self._forget(child)
