"""`manage.py flyfn dev` as the e2e, soak and browser tests run it: environment, process, API."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support_procs import child_env

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class DevProcess:
    """A running `flyfn dev` of a test project, serving on loopback `port`, and what it printed."""

    process: subprocess.Popen[str]
    port: int
    lines: list[str]  # its output so far
    api: str = ""  # the emulated Machines API, from the banner

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def project_env(settings_module: str, token: str) -> dict[str, str]:
    """The environment of `flyfn dev` on a test project: no inherited Fly identity, the
    repository importable, unbuffered output (read line by line while it runs)."""
    env = child_env()
    env.update(
        DJANGO_SETTINGS_MODULE=settings_module,
        FLYFN_DEV_TOKEN=token,
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONUNBUFFERED="1",
    )
    return env


def secrets_file(values: Mapping[str, str]) -> Path:
    """A file of `NAME='VALUE'` lines for `flyfn dev --secrets-file` (removed at exit): the only
    way a value of the test's reaches the Machines, as on Fly."""
    directory = Path(tempfile.mkdtemp(prefix="flyfn-test-secrets-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = directory / "secrets.env"
    for value in values.values():
        assert not {"'", "\n"} & set(value), "a test secret must fit in single quotes"
    path.write_text("".join(f"{name}='{value}'\n" for name, value in values.items()))
    return path


def start_project(
    project: Path,
    settings_module: str,
    token: str,
    *,
    port: int,
    time_scale: float,
    lines: list[str],
    secrets: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
) -> subprocess.Popen[str]:
    """`flyfn dev` on the test project in directory `project` (see `start`), with `secrets` as
    the app's secrets and `env` added to the command's own environment (not the Machines');
    autostop's pass every 300 / `time_scale` seconds; `args`: more options of the command."""
    command = [sys.executable, "-m", "django", "flyfn", "dev"]
    command += ["--port", str(port), "--time-scale", str(time_scale), *args]
    if secrets:
        command += ["--secrets-file", str(secrets_file(secrets))]
    environment = {**project_env(settings_module, token), **(env or {})}
    return start(command, cwd=project, env=environment, lines=lines)


def start(
    command: Sequence[str], *, cwd: Path, env: Mapping[str, str], lines: list[str]
) -> subprocess.Popen[str]:
    """Start `command` in its own session (the test can kill everything by group), its output
    appended to `lines` all along: a full pipe would stall the stack."""
    process = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=read, name="flyfn-dev-output", daemon=True).start()
    return process


def banner_api(
    process: subprocess.Popen[str],
    lines: list[str],
    *,
    cleanup: Callable[[], object],
    timeout: float = 60,
) -> str:
    """The emulated Machines API's URL, from the banner. If the command exits or prints none
    within `timeout` seconds: `cleanup()` (it kills what was started), then AssertionError."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            for line in list(lines):
                match = re.search(r"http://127\.0\.0\.1:\d+", line) if "API " in line else None
                if match:
                    return match.group(0)
            if process.poll() is not None:
                raise AssertionError("flyfn dev exited:\n" + "\n".join(lines))
            if time.monotonic() > deadline:
                raise AssertionError(f"no flyfn dev banner after {timeout}s:\n" + "\n".join(lines))
            time.sleep(0.05)
    except BaseException:
        cleanup()
        raise


def list_machines(api: str, app: str, token: str, **params: str) -> list[dict[str, Any]]:
    """`app`'s Machines as the emulated API lists them (`params` filter them), waiting out its
    rate limit: it answers 429 like Fly's."""
    for _ in range(20):
        response = httpx.get(
            f"{api}/v1/apps/{app}/machines",
            params=params,
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        if response.status_code != 429:
            break
        time.sleep(float(response.headers.get("retry-after", "1")))
    response.raise_for_status()
    machines: list[dict[str, Any]] = response.json()
    return machines
