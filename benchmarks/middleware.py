"""Benchmark area `middleware`: flyfn's per-request cost through Django's WSGI handler, in process.

Three handlers of the same project, built in one process and timed in interleaved rounds:
bare (no middleware, GET /direct/), flyfn passthrough (FlyReplayMiddleware, GET /direct/, a plain
view) and flyfn replay decision (GET /fn/, a serverless view, on the app Machine with a warm pool:
the answer is the fly-replay response). Each round times a batch of requests per handler; the
figures are medians over rounds of the mean per-request time. The pool talks to the Machines API
emulator in another process (loopback) only to warm up.
"""

from __future__ import annotations

import gc
import os
import random
import sys
import time
from typing import Any

from benchmarks.harness import JSONDict, median, percentile, ratio, rounded
from benchmarks.runner import area_main, log, require
from benchmarks.wsgi import Handler, bench_environ, call, call_quietly, wsgi_environ

BENCH_APP = "bench-middleware"


def time_batch(handler: Handler, template: dict[str, Any], n: int) -> tuple[float, float]:
    """(thread CPU, wall) microseconds per request over n requests, GC paused meanwhile.

    The warm path does no I/O, so its cost is CPU time; thread CPU time leaves out the time this
    thread spent preempted by the other processes of a shared machine, which wall time cannot.
    """
    gc.disable()
    try:
        cpu_start, wall_start = time.thread_time_ns(), time.perf_counter_ns()
        for _ in range(n):
            call_quietly(handler, template)
        cpu, wall = time.thread_time_ns() - cpu_start, time.perf_counter_ns() - wall_start
    finally:
        gc.enable()
    return cpu / n / 1000, wall / n / 1000


def build_handlers() -> dict[str, tuple[Handler, dict[str, Any]]]:
    from django.core.handlers.wsgi import WSGIHandler
    from django.test.utils import override_settings

    handlers: dict[str, tuple[Handler, dict[str, Any]]] = {}
    for name, middleware, path in (
        ("bare", [], "/direct/"),
        ("passthrough", ["flyfn.middleware.FlyReplayMiddleware"], "/direct/"),
        ("decision", ["flyfn.middleware.FlyReplayMiddleware"], "/fn/"),
        ("bare_fn", [], "/fn/"),
    ):
        # The handler builds its middleware chain once, from the setting as it is now.
        with override_settings(MIDDLEWARE=middleware):
            handlers[name] = (WSGIHandler(), wsgi_environ(path))
    return handlers


def check_answers(handlers: dict[str, tuple[Handler, dict[str, Any]]]) -> None:
    """Each handler must do what it stands for, or the timing means nothing."""
    expect = {"bare": b"direct", "passthrough": b"direct", "bare_fn": b"fn"}
    for name, body in expect.items():
        status, headers, got = call(*handlers[name])
        if status != 200 or got != body or "fly-replay" in headers:
            raise RuntimeError(f"{name}: expected 200 {body!r}, got {status} {got[:80]!r}")
    deadline = time.monotonic() + 30
    while True:  # the first serverless request may wait for the pool to create its Machine
        status, headers, got = call(*handlers["decision"])
        if "fly-replay" in headers and "instance=" in headers["fly-replay"]:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"decision: no fly-replay instance answer ({status} {got[:80]!r})")
        time.sleep(0.2)


def run(quick: bool) -> JSONDict:
    require("flyfn.middleware", "flyfn.pool", "flyfn.emulator.api")
    from benchmarks.apiserver import api_server

    rounds, per_round = (41, 100) if quick else (151, 200)
    with api_server() as api:
        # The app Machine's environment: role "main", pool aimed at the emulator.
        os.environ.update(bench_environ(api.url, api.token, BENCH_APP, "none"))
        import django

        django.setup()
        handlers = build_handlers()
        check_answers(handlers)
        for handler, environ in handlers.values():  # warm every code path
            time_batch(handler, environ, 200)
        api.reset()
        samples: dict[str, list[float]] = {name: [] for name in handlers}
        wall: dict[str, list[float]] = {name: [] for name in handlers}
        order = list(handlers)
        rng = random.Random(6)
        log(f"middleware: {rounds} rounds x {per_round} requests x {len(order)} handlers")
        for _ in range(rounds):
            rng.shuffle(order)  # interleaved, so drift in machine load hits every handler alike
            for name in order:
                cpu_us, wall_us = time_batch(*handlers[name], per_round)
                samples[name].append(cpu_us)
                wall[name].append(wall_us)
        api_calls = api.calls()

    bare, passthrough, decision = (
        median(samples["bare"]),
        median(samples["passthrough"]),
        median(samples["decision"]),
    )
    spread = {
        name: [rounded(percentile(s, 25), 2), rounded(percentile(s, 75), 2)]
        for name, s in samples.items()
    }
    return {
        "bare_us": rounded(bare, 2),
        "flyfn_passthrough_us": rounded(passthrough, 2),
        "flyfn_replay_decision_us": rounded(decision, 2),
        "passthrough_overhead_ratio": rounded(ratio(passthrough, bare), 4),
        "decision_vs_bare_ratio": rounded(ratio(decision, bare), 4),
        "bare_fn_us": rounded(median(samples["bare_fn"]), 2),
        "iqr_us": spread,
        "wall_median_us": {name: rounded(median(w), 2) for name, w in wall.items()},
        "clock": "thread CPU time (time.thread_time_ns), median of per-round means",
        "rounds": rounds,
        "requests_per_round": per_round,
        "api_calls_during_timing": api_calls,
        "handler": "django.core.handlers.wsgi.WSGIHandler, GET, body read and closed",
    }


if __name__ == "__main__":
    sys.exit(area_main(run))
