"""Benchmark area `e2e`: latency through `manage.py flyfn dev` (proxy + Machines as processes).

The benchmark project (benchmarks.benchsite) runs under the local Fly stack on loopback:
- direct: GET /direct/ answered by the app Machine;
- replay: GET /fn/ (serverless), answered by the app Machine with fly-replay and re-delivered by
  the proxy to the warm function Machine;
- cold_start_s: the same request once the proxy has autostopped the function Machine (a pass
  every 1 s: `--time-scale 300`) and must start its process again (an autostop line, then a
  "(cold" line in the stack's log, prove it);
- app_boot_s: the same app process (the stack's supervisor child) started alone, from spawn to
  its first answer.
- throughput: the soak's load shape without its chaos: CONCURRENCY threads, one keep-alive
  connection each, all sending GET /direct/ (the baseline) then GET /fn/ (replayed), as requests
  per second; the replayed figure is reported as a ratio of the direct one, in the same run.
Latency requests are sequential over one keep-alive connection; latencies are client-side wall time.
"""

from __future__ import annotations

import http.client
import os
import queue
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import httpx

from benchmarks.harness import JSONDict, Skipped, median, percentile, rounded
from benchmarks.runner import (
    LOOPBACK,
    area_main,
    child_env,
    free_port,
    log,
    require,
    spawned,
    wait_http,
)

TIME_SCALE = 300.0  # autostop's pass every 300 / 300 = 1 s: an idle Machine stops within 2 s
AUTOSTOP_PASS = 300.0 / TIME_SCALE
CONCURRENCY = 50  # as tests/reliability/test_soak.py sends its load
SETTINGS = "benchmarks.benchsite.settings"
ASGI_APP = "benchmarks.benchsite.asgi:application"
# Where `flyfn dev` runs: the bench project's own directory (it has no fly.toml; the repository
# root has the demo's, which `flyfn dev` would deploy instead).
PROJECT_DIR = Path(__file__).resolve().parent / "benchsite"


def project_env() -> dict[str, str]:
    return child_env({"DJANGO_SETTINGS_MODULE": SETTINGS, "BENCH_MIDDLEWARE": "flyfn"})


def app_boot_seconds(log_dir: Path) -> float:
    """Start the project's app alone, as the stack starts a Machine's process (the supervisor's
    child on a listening socket it is handed); seconds from spawn until GET /fn/ answers 200."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        argv = [sys.executable, "-m", "flyfn.emulator.child", "--app", ASGI_APP]
        argv += ["--fd", str(sock.fileno()), "--parent-pid", str(os.getpid())]
        with (log_dir / "boot.log").open("ab") as out:
            start = time.perf_counter()
            with spawned(argv, env=project_env(), log_file=out, pass_fds=[sock.fileno()]) as proc:
                wait_http(
                    f"http://{LOOPBACK}:{port}/fn/",
                    timeout=60,
                    proc=proc,
                    ok=lambda r: r.status_code == 200,
                    interval=0.005,
                )
                return time.perf_counter() - start


def latencies_ms(client: httpx.Client, path: str, n: int, expect: bytes) -> list[float]:
    out: list[float] = []
    for _ in range(n):
        start = time.perf_counter()
        response = client.get(path)
        elapsed = time.perf_counter() - start
        if response.status_code != 200 or response.content != expect:
            raise RuntimeError(f"GET {path}: {response.status_code} {response.content[:80]!r}")
        out.append(elapsed * 1000)
    return out


def requests_per_second(port: int, path: str, n: int, expect: bytes) -> float:
    """n GETs of path from CONCURRENCY threads, one keep-alive connection each; every answer
    is checked. Plain http.client: a fraction of an async client's CPU, on a 2-core machine."""
    pending: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(n):
        pending.put(i)
    failures: list[str] = []

    def worker() -> None:
        connection = http.client.HTTPConnection(LOOPBACK, port, timeout=60)
        try:
            while True:
                try:
                    pending.get_nowait()
                except queue.Empty:
                    return
                connection.request("GET", path)
                response = connection.getresponse()
                body = response.read()
                if response.status != 200 or body != expect:
                    failures.append(f"GET {path}: {response.status} {body[:80]!r}")
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(CONCURRENCY)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} of {n} failed, first: {failures[0]}")
    return n / seconds


class DevLog:
    """The stack's output file, read for its per-request route lines."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[str]:
        return self.path.read_text(errors="replace").splitlines()

    def wait_for(self, predicate: str, *, after: int, timeout: float, also: str = "") -> int:
        """Index of the first line after `after` holding predicate (and also); raise on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            for i in range(after, len(lines)):
                line = lines[i].lower()  # the wording's case is the stack's to change
                if predicate.lower() in line and also.lower() in line:
                    return i
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {predicate!r} line in the flyfn dev log")
            time.sleep(0.05)


class DevStack(NamedTuple):
    """A running `flyfn dev`: its proxy's port and base URL, and its log."""

    port: int
    base: str
    log: DevLog


@contextmanager
def dev_stack(
    log_path: Path, env: Mapping[str, str], time_scale: float, args: Sequence[str] = ()
) -> Iterator[DevStack]:
    """`manage.py flyfn dev` of the bench project on a free port (autostop's pass every
    300 / `time_scale` s; `args`: more of its options), its output in `log_path`, once the app
    Machine answers."""
    port = free_port()
    argv = [sys.executable, "-m", "django", "flyfn", "dev"]
    argv += ["--port", str(port), "--time-scale", str(time_scale), *args]
    dev_log = DevLog(log_path)
    with (
        dev_log.path.open("ab") as out,
        spawned(argv, env=dict(env), cwd=PROJECT_DIR, log_file=out) as proc,
    ):
        base = f"http://{LOOPBACK}:{port}"
        try:
            wait_http(f"{base}/direct/", timeout=90, proc=proc, ok=lambda r: r.status_code == 200)
        except RuntimeError as exc:
            tail = "\n".join(dev_log.lines()[-5:])
            if "invalid choice" in tail:
                raise Skipped("`manage.py flyfn dev` is not available yet") from exc
            raise RuntimeError(f"{exc}; flyfn dev said:\n{tail}") from exc
        yield DevStack(port, base, dev_log)


def cold_start_seconds(client: httpx.Client, dev_log: DevLog) -> tuple[float, str]:
    """Wait for the function Machine's autostop, then time the request that starts it again.

    Returns the seconds and the stack's route line for that request.
    """
    mark = len(dev_log.lines())
    dev_log.wait_for("autostop", after=mark, timeout=AUTOSTOP_PASS * 8 + 10, also="fn:")
    time.sleep(0.3)  # let the stopped process exit, so the next request finds it gone
    mark = len(dev_log.lines())
    start = time.perf_counter()
    response = client.get("/fn/")
    seconds = time.perf_counter() - start
    if response.status_code != 200 or response.content != b"fn":
        raise RuntimeError(f"cold GET /fn/: {response.status_code} {response.content[:80]!r}")
    # The route line must say the function Machine was cold, or this was no cold start.
    line = dev_log.wait_for("GET /fn/", after=mark, timeout=5, also="(cold")
    return seconds, dev_log.lines()[line]


def run(quick: bool) -> JSONDict:
    require("flyfn.emulator.dev", "flyfn.emulator.proxy", "flyfn.middleware", "uvicorn")
    n, boots, colds = (100, 1, 1) if quick else (1000, 3, 3)
    burst = 500 if quick else 3000
    with tempfile.TemporaryDirectory(prefix="flyfn-bench-e2e-") as tmp:
        log_dir = Path(tmp)
        log(f"e2e: app boot x{boots}")
        boot = [app_boot_seconds(log_dir) for _ in range(boots)]

        with (
            dev_stack(log_dir / "dev.log", project_env(), TIME_SCALE) as (port, base, dev_log),
            httpx.Client(base_url=base, timeout=60) as client,
        ):
            log(f"e2e: {n} direct requests")
            latencies_ms(client, "/direct/", 50, b"direct")
            direct = latencies_ms(client, "/direct/", n, b"direct")
            log("e2e: first serverless request (creates and boots the function Machine)")
            first_start = time.perf_counter()
            latencies_ms(client, "/fn/", 1, b"fn")
            first_fn = time.perf_counter() - first_start
            latencies_ms(client, "/fn/", 50, b"fn")
            log(f"e2e: {n} replayed requests")
            replay = latencies_ms(client, "/fn/", n, b"fn")
            log(f"e2e: {burst} direct, then replayed, requests at concurrency {CONCURRENCY}")
            direct_rps = requests_per_second(port, "/direct/", burst, b"direct")
            replay_rps = requests_per_second(port, "/fn/", burst, b"fn")
            log(f"e2e: cold start x{colds} (autostop pass {AUTOSTOP_PASS:g}s)")
            try:
                cold_runs = [cold_start_seconds(client, dev_log) for _ in range(colds)]
            except TimeoutError as exc:
                tail = "\n".join(dev_log.lines()[-8:])
                raise RuntimeError(f"{exc}; the log ends:\n{tail}") from exc

    cold = [seconds for seconds, _ in cold_runs]
    return {
        "direct_p50_ms": rounded(percentile(direct, 50), 3),
        "direct_p99_ms": rounded(percentile(direct, 99), 3),
        "replay_p50_ms": rounded(percentile(replay, 50), 3),
        "replay_p99_ms": rounded(percentile(replay, 99), 3),
        "cold_start_s": rounded(median(cold), 3),
        "app_boot_s": rounded(median(boot), 3),
        "first_serverless_request_s": rounded(first_fn, 3),
        "direct_requests_per_second": rounded(direct_rps, 1),
        "replay_requests_per_second": rounded(replay_rps, 1),
        "replay_vs_direct_throughput_ratio": rounded(replay_rps / direct_rps, 3),
        "concurrency": CONCURRENCY,
        "cold_start_samples_s": [rounded(c, 3) for c in cold],
        "cold_start_routes": [line for _, line in cold_runs],
        "app_boot_samples_s": [rounded(b, 3) for b in boot],
        "requests": n,
        "autostop_pass_s": AUTOSTOP_PASS,
    }


if __name__ == "__main__":
    sys.exit(area_main(run))
