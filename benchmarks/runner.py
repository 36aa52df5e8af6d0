"""Process plumbing shared by the benchmark areas: the area entry point, free ports, readiness.

Each area runs in its own interpreter (`python -m benchmarks.<module> --out FILE`), so settings,
environment and singletons of one area never leak into another and a crash stays contained.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, suppress
from importlib.util import find_spec
from pathlib import Path
from typing import IO, Any

import httpx

from benchmarks.harness import JSONDict, Skipped

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays for the final table."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def require(*modules: str) -> None:
    """Raise Skipped naming the first module that is not importable (a dependency not landed)."""
    for name in modules:
        try:
            found = find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise Skipped(f"{name} is not available yet")


def require_attr(module: str, attr: str) -> Any:
    require(module)
    mod = __import__(module, fromlist=[attr])
    if not hasattr(mod, attr):
        raise Skipped(f"{module}.{attr} is not available yet")
    return getattr(mod, attr)


def area_main(run: Callable[[bool], JSONDict], argv: Sequence[str] | None = None) -> int:
    """Entry point of an area process: run it, write {"result"|"skipped"|"error": ...} to --out."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    outcome: JSONDict
    try:
        outcome = {"result": run(args.quick)}
    except Skipped as exc:
        outcome = {"skipped": str(exc)}
    except ImportError as exc:  # a dependency that has not landed (or is half-landed)
        traceback.print_exc()
        outcome = {"skipped": f"a dependency is not importable: {exc}"}
    except Exception as exc:
        traceback.print_exc()
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
    args.out.write_text(json.dumps(outcome))
    return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(
    extra: Mapping[str, str] | None = None, *, drop: Sequence[str] = ()
) -> dict[str, str]:
    """This process's environment with the repo importable, minus Fly variables, plus extra."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLY_", "FLYFN_")) and k not in drop and k != "DJANGO_SETTINGS_MODULE"
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


@contextmanager
def spawned(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path = REPO_ROOT,
    log_file: IO[bytes] | None = None,
    pass_fds: Sequence[int] = (),
) -> Any:
    """Start a process in its own session; on exit SIGTERM its group, SIGKILL after 5 s."""
    proc = subprocess.Popen(
        list(argv),
        env=dict(env),
        cwd=cwd,
        pass_fds=tuple(pass_fds),
        stdout=log_file if log_file is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log_file is not None else subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)
    else:
        # The leader is gone; children it left in the group must go too.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def wait_http(
    url: str,
    *,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    ok: Callable[[httpx.Response], bool] = lambda r: r.status_code < 500,
    interval: float = 0.02,
) -> float:
    """Poll url until ok(response); return seconds waited. Raise if proc dies or on timeout."""
    start = time.perf_counter()
    deadline = start + timeout
    with httpx.Client(timeout=2.0) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
            with suppress(httpx.HTTPError):
                if ok(client.get(url)):
                    return time.perf_counter() - start
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")
            time.sleep(interval)


def run_python_json(
    argv: Sequence[str], *, env: Mapping[str, str], timeout: float, out: Path
) -> JSONDict:
    """Run `python argv...` which writes a JSON object to `out`; return it (bounded in time)."""
    proc = subprocess.Popen(
        [sys.executable, *argv], env=dict(env), cwd=REPO_ROOT, start_new_session=True
    )
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(proc)
        raise TimeoutError(f"{' '.join(argv[:3])} took longer than {timeout:.0f}s") from None
    finally:
        stop_process_group(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} exited with {proc.returncode}")
    data: JSONDict = json.loads(out.read_text())
    return data
