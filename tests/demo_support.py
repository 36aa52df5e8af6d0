"""Helpers of the demo store's tests: its environment, manage.py, a bounded server process, and
the demo on `manage.py flyfn dev` (`demo_stack`)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from flyfn.emulator.process_groups import kill_group
from tests.support_dev import list_machines, secrets_file, start
from tests.support_machines_api import free_loopback_port
from tests.support_postgres import Database, Postgres
from tests.support_procs import alive, child_env, descendants

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo_store"
BIN = Path(sys.executable).parent
PYTHON = str(BIN / "python")
DEV_TOKEN = "browser-tests-dev-token"  # the emulated Machines API's token, loopback only
# Autostop's pass every 30 s: a function Machine stops 30 to 60 s after its last request, not in
# the middle of a test.
TIME_SCALE = 10
BOOT_TIMEOUT = 90.0


# What the demo's Machines need from a test: set as the app's secrets (nothing else of the test's
# environment reaches them, as on Fly).
_DEMO_SECRETS = ("SECRET_KEY", "DEBUG", "ALLOWED_HOSTS", "DATABASE_URL", "STATIC_ROOT")


def demo_env(tmp_path: Path, database: Database, **extra: str) -> dict[str, str]:
    """The environment of a demo process: production-like settings, files under tmp_path, the
    PostgreSQL `database` (its Machines share one, as on Fly)."""
    env = child_env()
    env.pop("DJANGO_SETTINGS_MODULE", None)  # pytest's tests.settings must not leak in
    static_root = tmp_path / "static"
    static_root.mkdir(exist_ok=True)
    env.update(
        SECRET_KEY="demo-tests-secret",
        DEBUG="false",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        DATABASE_URL=database.url,
        STATIC_ROOT=str(static_root),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def manage(env: Mapping[str, str], *args: str, timeout: float = 60) -> str:
    done = subprocess.run(
        [PYTHON, "manage.py", *args],
        cwd=DEMO,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"manage.py {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@contextmanager
def serving(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], url: str, timeout: float = 60
) -> Iterator[httpx.Response]:
    """Run a server in its own process group until `url` answers; kill the group afterwards.

    Its output goes to a file (a pipe nobody reads could fill and stall it), shown on failure.
    """
    log_path = Path(env["STATIC_ROOT"]).parent / f"server-{time.monotonic_ns()}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            list(argv), cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{argv[0]} exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                response = httpx.get(url, timeout=5)
                if response.status_code < 500:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{url} did not answer in {timeout}s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield response
    finally:
        if kill_group(proc.pid, signal.SIGTERM):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


# -- the demo store on `flyfn dev` ----------------------------------------------------------------


@dataclass
class DemoStack:
    """A running `manage.py flyfn dev` of the demo store and what its banner said."""

    process: subprocess.Popen[str]
    lines: list[str]  # its output so far
    url: str = ""  # the proxy, e.g. http://127.0.0.1:PORT
    api: str = ""  # the emulated Machines API
    app: str = ""
    app_machine: str = ""
    live: str = ""  # the live page, e.g. http://127.0.0.1:PORT/
    env: dict[str, str] = field(default_factory=dict)  # its environment (its database's too)

    def output(self) -> str:
        return "\n".join(self.lines)

    def machine_ids(self) -> set[str]:
        """Every Machine of the app, as the emulated Machines API lists them."""
        return {m["id"] for m in list_machines(self.api, self.app, DEV_TOKEN)}

    def function_machines(self) -> list[dict[str, Any]]:
        """Every function Machine of the app (of any group)."""
        return [
            m
            for m in list_machines(self.api, self.app, DEV_TOKEN)
            if "flyfn_group" in (m["config"].get("metadata") or {})
        ]

    def group_machines(self, group: str = "default") -> list[dict[str, Any]]:
        """The function Machines of `group`, as the emulated Machines API lists them."""
        return list_machines(self.api, self.app, DEV_TOKEN, **{"metadata.flyfn_group": group})


_BANNER = {
    "url": re.compile(r"^\s+open\s+(http://\S+?)/?$"),
    "app": re.compile(r"^\s+app\s+(\S+)"),
    "app_machine": re.compile(r"^\s+main\s+.*\(Machine (\w+)\)"),
    "api": re.compile(r"^\s+API\s+(http://\S+)"),
    "live": re.compile(r"^\s+live\s+(http://\S+)"),
}


def _read_banner(stack: DemoStack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    found: dict[str, str] = {}
    seen = 0
    while len(found) < len(_BANNER):
        for line in stack.lines[seen:]:
            for key, pattern in _BANNER.items():
                if match := pattern.match(line):
                    found.setdefault(key, match.group(1))
            seen += 1
        if len(found) == len(_BANNER):
            break
        if stack.process.poll() is not None:
            raise AssertionError(
                f"flyfn dev exited ({stack.process.returncode}):\n{stack.output()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"no flyfn dev banner after {timeout}s:\n{stack.output()}")
        time.sleep(0.1)
    for key, value in found.items():
        setattr(stack, key, value)


@contextmanager
def demo_stack(
    workdir: Path,
    postgres: Postgres,
    *,
    purchases: int,
    timeout: float = BOOT_TIMEOUT,
    time_scale: float = TIME_SCALE,
) -> Iterator[DemoStack]:
    """The demo store, seeded in a fresh database of `postgres`, files under `workdir`, served by
    `flyfn dev`.

    On exit the stack is stopped and every process it started must be gone (AssertionError if not).
    """
    database = postgres.create_database("demo")
    try:
        with _demo_stack(workdir, database, purchases, timeout, time_scale) as stack:
            yield stack
    finally:
        postgres.drop_database(database)


@contextmanager
def _demo_stack(
    workdir: Path, database: Database, purchases: int, timeout: float, time_scale: float
) -> Iterator[DemoStack]:
    env = demo_env(workdir, database, DEBUG="1", FLYFN_DEV_TOKEN=DEV_TOKEN)
    manage(env, "migrate", "--noinput", "-v", "0")
    manage(env, "seed_store", "--purchases", str(purchases))
    # As `make demo`: the repository's fly.toml and Dockerfile, the test's settings as secrets.
    secrets = {name: env[name] for name in _DEMO_SECRETS}
    command = [PYTHON, "manage.py", "flyfn", "dev", "--port", str(free_loopback_port())]
    command += ["--time-scale", str(time_scale)]
    command += ["--config", str(ROOT / "fly.toml")]
    command += ["--secrets-file", str(secrets_file(secrets))]
    lines: list[str] = []
    process = start(command, cwd=DEMO, env=env, lines=lines)  # its own process group
    stack = DemoStack(process, lines, env=env)
    try:
        _read_banner(stack, timeout)
        yield stack
    finally:
        stop_and_reap(process)


# -- processes ------------------------------------------------------------------------------------


def stop_and_reap(process: subprocess.Popen[str], *, grace: float = 20) -> None:
    """SIGTERM `process` (flyfn dev stops its Machines), then SIGKILL its group and anything left.

    Raises AssertionError naming the processes that outlived a graceful stop.
    """
    family = descendants(process.pid)  # the Machines run in their own sessions
    if process.poll() is None:
        kill_group(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    kill_group(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    deadline = time.monotonic() + 30  # Machines die with their parent, a moment after it
    while any(alive(proc) for proc in family) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = sorted(proc[0] for proc in family if alive(proc))
    for pid in survivors:
        for sig in (signal.SIGCONT, signal.SIGKILL):  # a suspended Machine is SIGSTOPped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    assert not survivors, f"processes left behind by flyfn dev: {survivors}"
