"""Helpers of the demo store's tests: its environment, manage.py, a bounded server process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo_store"
BIN = Path(sys.executable).parent
PYTHON = str(BIN / "python")


def demo_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a demo process: production-like settings, files under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "FLYFN_"))}
    env.pop("DJANGO_SETTINGS_MODULE", None)  # pytest's tests.settings must not leak in
    static_root = tmp_path / "static"
    static_root.mkdir(exist_ok=True)
    env.update(
        SECRET_KEY="demo-tests-secret",
        DEBUG="false",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
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
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
