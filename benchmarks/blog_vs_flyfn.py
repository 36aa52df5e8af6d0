"""Benchmark area `blog_baseline`: flyfn's middleware beside the blog's, against the API emulator.

Both run the same benchmark project (benchmarks.benchsite) in their own interpreter, as an app
Machine (role "main") whose Machines API is the counting emulator on loopback
(benchmarks.apiserver); every API call is counted there. Per side:

- cold: 50 threads send the first request for the serverless view at once (a barrier releases
  them together) to an app that has no function Machine yet; afterwards the app's live Machines
  are counted.
- warm: after one warm-up request, N sequential requests for the serverless view through Django's
  WSGI handler, timed (requests per second) and counted (API calls per 1,000 requests).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import SIDE_BY_SIDE, JSONDict, per_thousand, rounded
from benchmarks.runner import area_main, child_env, log, require, run_python_json
from benchmarks.wsgi import Handler, bench_environ, call, call_quietly, wsgi_environ

COLD_REQUESTS = 50
DEAD_STATES = frozenset({"destroying", "destroyed"})
SERVERLESS_PATH = "/fn/"


def run(quick: bool) -> JSONDict:
    require("flyfn.middleware", "flyfn.pool", "flyfn.emulator.api", "requests")
    from benchmarks.apiserver import api_server

    warm_requests = {"flyfn": 1000 if quick else 5000, "blog": 300 if quick else 1000}
    out: JSONDict = {
        "api_calls_per_1000_requests": {},
        "machines_after_50_cold_requests": {},
        "requests_per_second": {},
        "cold_api_calls": {},
        "cold_replay_answers": {},
        "warm_requests": warm_requests,
        "api_calls_by_route": {},
    }
    with api_server() as api, tempfile.TemporaryDirectory(prefix="flyfn-bench-blog-") as tmp:
        for side in SIDE_BY_SIDE:
            app = f"bench-{side}-cold"
            api.reset()
            log(f"blog_baseline: {side}: {COLD_REQUESTS} concurrent cold requests")
            cold = _worker(api.url, api.token, app, side, ["cold"], Path(tmp) / f"{side}-cold.json")
            live = [m for m in api.machines(app) if m.get("state") not in DEAD_STATES]
            out["machines_after_50_cold_requests"][side] = len(live)
            out["cold_api_calls"][side] = api.calls()
            out["cold_replay_answers"][side] = cold["replay_answers"]

            app = f"bench-{side}-warm"
            n = warm_requests[side]
            log(f"blog_baseline: {side}: {n} warm requests")
            warm = _worker(
                api.url,
                api.token,
                app,
                side,
                ["warm", "--requests", str(n)],
                Path(tmp) / f"{side}-warm.json",
            )
            out["api_calls_per_1000_requests"][side] = rounded(
                per_thousand(warm["api_calls"], warm["requests"]), 1
            )
            out["requests_per_second"][side] = rounded(warm["requests"] / warm["seconds"], 1)
            out["api_calls_by_route"][side] = warm["by_route"]
    return out


def _worker(
    api_url: str, token: str, app: str, side: str, args: Sequence[str], out: Path
) -> JSONDict:
    env = child_env(bench_environ(api_url, token, app, side))
    return run_python_json(
        [
            "-m",
            "benchmarks.blog_vs_flyfn",
            "worker",
            *args,
            "--api-url",
            api_url,
            "--out",
            str(out),
        ],
        env=env,
        timeout=180,
        out=out,
    )


# -- worker side (a fresh interpreter per measurement) --------------------------------------------


def _handler() -> Handler:
    import django

    django.setup()
    from django.core.handlers.wsgi import WSGIHandler

    return WSGIHandler()


def _is_replay(headers: dict[str, str]) -> bool:
    return "instance=" in headers.get("fly-replay", "")


def cold_burst(handler: Handler) -> JSONDict:
    environ = wsgi_environ(SERVERLESS_PATH)
    barrier = threading.Barrier(COLD_REQUESTS)
    answers: list[tuple[int, str]] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait(timeout=30)
        status, headers, _body = call(handler, environ)
        with lock:
            answers.append((status, headers.get("fly-replay", "")))

    threads = [threading.Thread(target=one) for _ in range(COLD_REQUESTS)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return {
        "seconds": time.perf_counter() - start,
        "statuses": dict(Counter(str(status) for status, _ in answers)),
        "replay_answers": sum(1 for _, replay in answers if "instance=" in replay),
        "instances": len({replay for _, replay in answers if replay}),
    }


def warm_loop(handler: Handler, requests: int, api_url: str) -> JSONDict:
    environ = wsgi_environ(SERVERLESS_PATH)
    deadline = time.monotonic() + 30
    while True:  # warm-up: the first request may have to create the function Machine
        status, headers, body = call(handler, environ)
        if _is_replay(headers):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"no fly-replay answer after warm-up: {status} {body[:80]!r}")
        time.sleep(0.2)
    with httpx.Client(base_url=api_url, headers={"x-bench-uncounted": "1"}) as counter:
        before = counter.get("/_bench/calls").json()
        start = time.perf_counter()
        for _ in range(requests):
            call_quietly(handler, environ)
        seconds = time.perf_counter() - start
        after = counter.get("/_bench/calls").json()
    routes: Counter[str] = Counter(after["by_route"])
    routes.subtract(before["by_route"])
    return {
        "requests": requests,
        "seconds": seconds,
        "api_calls": after["total"] - before["total"],
        "by_route": {route: n for route, n in routes.items() if n},
    }


def worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.blog_vs_flyfn worker")
    parser.add_argument("mode", choices=["cold", "warm"])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--api-url", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    handler = _handler()
    result: dict[str, Any]
    if args.mode == "cold":
        result = cold_burst(handler)
    else:
        result = warm_loop(handler, args.requests, args.api_url)
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(area_main(run))
