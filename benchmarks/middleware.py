"""Benchmark area `middleware`: flyfn's per-request cost through Django's WSGI handler, in process.

Handlers of the same project, built in one process and timed in interleaved rounds: bare (no
middleware, GET /direct/), flyfn passthrough (FlyReplayMiddleware, GET /direct/, a plain view),
flyfn replay decision (GET /fn/, a serverless view, on the app Machine with a warm pool: the
answer is the fly-replay response) and bare_fn (no middleware, GET /fn/); then the decision
against bare for requests whose paths all differ (/fn/<n>/ and /direct/<n>/), so that every
replay signs its own state; and bare_fn's view run on a function Machine, after flyfn has checked
the request's signed fly-replay-src (function_run).

Each round times a batch of requests per handler, in a shuffled order; rounds come from several
fresh processes. Each handler runs under a urlconf whose first pattern is its own, so none pays
for a failed match of another's. The figures are medians over rounds of the mean per-request
time; each ratio is the median over rounds of that round's own ratio (paired: a slow spell of a
shared machine hits both sides of a ratio alike, where a ratio of two medians takes it from one
side only). The pool talks to the Machines API emulator in another process (loopback) only to
warm up.

Every decision writes its entry on the Machine's record of issued replays (`flyfn.replay_record`):
the benchmark issues thousands of replays a second, more than the record's limit holds within the
16 s an entry lives, and a full record skips the write (the replay goes unrecorded), which would
time a cheaper decision than a Machine pays below its limit. So each process raises the limit to
`RECORD_LIMIT` before the record opens, and fails should the record still report itself full.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import random
import sys
import time
import types
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from benchmarks.harness import JSONDict, median, percentile, ratio, rounded
from benchmarks.runner import area_main, log, require
from benchmarks.wsgi import APP_MACHINE_ID, Handler, bench_environ, call, call_quietly, wsgi_environ

BENCH_APP = "bench-middleware"
# The record's limit in the benchmark: never reached (each process issues about 50,000 replays
# within an entry's life; 33 bytes each in /dev/shm), so every decision writes its entry.
RECORD_LIMIT = 10_000_000


@dataclass
class Bench:
    """One timed handler: the WSGI handler, the environs of its requests (taken in turn, from
    where the last batch stopped) and the urlconf it runs under."""

    handler: Handler
    environs: list[dict[str, Any]]
    urlconf: types.ModuleType
    on_function_machine: bool = False
    with_metrics: bool = False  # flyfn's Prometheus metrics recorded while it runs
    cursor: int = 0

    @property
    def environ(self) -> dict[str, Any]:
        return self.environs[0]


# Distinct item paths per handler: more than it serves in a second, so none repeats within one.
ITEM_PATHS = 8192
HANDLERS: tuple[tuple[str, list[str], str, str], ...] = (
    # name, MIDDLEWARE, first pattern, path ("{n}": the item number); "function_run" runs as a
    # function Machine of group "default" and its requests carry a signed fly-replay-src.
    ("bare", [], "direct", "/direct/"),
    ("passthrough", ["flyfn.middleware.FlyReplayMiddleware"], "direct", "/direct/"),
    ("decision", ["flyfn.middleware.FlyReplayMiddleware"], "fn", "/fn/"),
    ("bare_fn", [], "fn", "/fn/"),
    ("bare_items", [], "direct_item", "/direct/{n}/"),
    ("decision_items", ["flyfn.middleware.FlyReplayMiddleware"], "fn_item", "/fn/{n}/"),
    ("function_run", ["flyfn.middleware.FlyReplayMiddleware"], "fn", "/fn/"),
    # The same as passthrough and decision, with flyfn's metrics recording (FLYFN METRICS_PORT).
    ("passthrough_metrics", ["flyfn.middleware.FlyReplayMiddleware"], "direct", "/direct/"),
    ("decision_metrics", ["flyfn.middleware.FlyReplayMiddleware"], "fn", "/fn/"),
)


def replay_src(path: str) -> str:
    """The fly-replay-src Fly Proxy adds to a request the app Machine replayed just now."""
    from django.conf import settings

    from flyfn.fly.replay import ReplaySource
    from flyfn.replay_state import sign_state

    state = sign_state(settings.SECRET_KEY, "GET", path, "default")
    now_us = time.time_ns() // 1000
    return ReplaySource(instance=APP_MACHINE_ID, region="local", t=now_us, state=state).to_header()


@contextmanager
def role_of(bench: Bench) -> Iterator[None]:
    """The role `bench` runs in: the app Machine's, or a function Machine's with a state signed
    now on each of its requests (a state is only valid for seconds)."""
    if bench.with_metrics:
        from flyfn import metrics

        metrics.enable()
        try:
            yield
        finally:
            metrics.disable()
        return
    if not bench.on_function_machine:
        yield
        return
    from flyfn.machine_role import function, override_role

    for environ in bench.environs:
        environ["HTTP_FLY_REPLAY_SRC"] = replay_src(environ["PATH_INFO"])
    with override_role(function("default")):
        yield


def time_batch(bench: Bench, n: int) -> tuple[float, float]:
    """(thread CPU, wall) microseconds per request over n requests, GC paused meanwhile.

    The warm path does no I/O, so its cost is CPU time; thread CPU time leaves out the time this
    thread spent preempted by the other processes of a shared machine, which wall time cannot.
    """
    from django.conf import settings

    # Assigned, not overridden: override_settings would clear the URL caches each batch. The
    # handler reads ROOT_URLCONF per request and each urlconf's resolver stays cached.
    settings.ROOT_URLCONF = bench.urlconf
    handler, environs, count, start = (
        bench.handler,
        bench.environs,
        len(bench.environs),
        bench.cursor,
    )
    with role_of(bench):
        gc.disable()
        try:
            cpu_start, wall_start = time.thread_time_ns(), time.perf_counter_ns()
            for i in range(start, start + n):
                call_quietly(handler, environs[i % count])
            cpu, wall = time.thread_time_ns() - cpu_start, time.perf_counter_ns() - wall_start
        finally:
            gc.enable()
    bench.cursor = (start + n) % count
    return cpu / n / 1000, wall / n / 1000


def build_handlers() -> dict[str, Bench]:
    from django.core.handlers.wsgi import WSGIHandler
    from django.test.utils import override_settings

    from benchmarks.benchsite.urls import urlconf_first

    handlers: dict[str, Bench] = {}
    for name, middleware, first, path in HANDLERS:
        paths = [path.format(n=n) for n in range(ITEM_PATHS)] if "{n}" in path else [path]
        # The handler builds its middleware chain once, from the setting as it is now.
        with override_settings(MIDDLEWARE=middleware):
            handler = WSGIHandler()
        environs = [wsgi_environ(p) for p in paths]
        on_function = name == "function_run"
        handlers[name] = Bench(
            handler, environs, urlconf_first(first), on_function, name.endswith("_metrics")
        )
    return handlers


def check_answers(handlers: dict[str, Bench]) -> None:
    """Each handler must do what it stands for, or the timing means nothing."""
    expect = {
        "bare": b"direct",
        "passthrough": b"direct",
        "bare_fn": b"fn",
        "bare_items": b"direct",
    }
    for name, body in expect.items():
        status, headers, got = call(handlers[name].handler, handlers[name].environ)
        if status != 200 or got != body or "fly-replay" in headers:
            raise RuntimeError(f"{name}: expected 200 {body!r}, got {status} {got[:80]!r}")
    deadline = time.monotonic() + 30
    for name in ("decision", "decision_items", "decision_metrics"):
        while True:  # the first serverless request may wait for the pool to create its Machine
            status, headers, got = call(handlers[name].handler, handlers[name].environ)
            if "fly-replay" in headers and "instance=" in headers["fly-replay"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no fly-replay instance answer ({status} {got[:80]!r})")
            time.sleep(0.2)


def measure(api_url: str, token: str, rounds: int, per_round: int, seed: int) -> JSONDict:
    """One process's samples: {"cpu": {handler: [us]}, "wall": {...}, "api_calls": n}.

    Run in a fresh interpreter each time: how one process happens to lay out its objects moves
    every figure of that process a little, so the area pools the rounds of several processes.
    """
    # The app Machine's environment: role "main", pool aimed at the emulator.
    os.environ.update(bench_environ(api_url, token, BENCH_APP, "none"))
    import django

    from benchmarks.apiserver import ApiServer
    from flyfn import replay_record

    # Read as the record opens (its first replay): every decision writes its entry.
    replay_record.REPLAY_RECORD_LIMIT = RECORD_LIMIT
    refused = _RecordRefusals()
    logging.getLogger(replay_record.__name__).addHandler(refused)
    django.setup()
    handlers = build_handlers()
    check_answers(handlers)
    for bench in handlers.values():  # warm every code path
        time_batch(bench, 200)
    api = ApiServer(api_url, token)
    api.reset()
    samples: dict[str, list[float]] = {name: [] for name in handlers}
    wall: dict[str, list[float]] = {name: [] for name in handlers}
    order = list(handlers)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)  # interleaved, so drift in machine load hits every handler alike
        for name in order:
            cpu_us, wall_us = time_batch(handlers[name], per_round)
            samples[name].append(cpu_us)
            wall[name].append(wall_us)
    calls = api.calls()
    api.close()
    if refused.count:  # a replay went unrecorded: the figures would time a cheaper decision
        raise RuntimeError(f"the record of issued replays refused entries: {refused.last}")
    record = replay_record.machine_record(APP_MACHINE_ID)
    live = record.sweep() if isinstance(record, replay_record.DirectoryRecord) else None
    return {"cpu": samples, "wall": wall, "api_calls": calls, "record_live_entries": live}


class _RecordRefusals(logging.Handler):
    """Counts the record's warnings: full, or not writable (each a replay left unrecorded)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.last = record.getMessage()


def run(quick: bool) -> JSONDict:
    require("flyfn.middleware", "flyfn.pool", "flyfn.emulator.api")
    from benchmarks.apiserver import api_server

    processes, rounds, per_round = (1, 41, 100) if quick else (3, 81, 200)
    spawn = multiprocessing.get_context("spawn")
    samples: dict[str, list[float]] = {}
    wall: dict[str, list[float]] = {}
    api_calls = 0
    record_live: list[int | None] = []
    per_process: list[dict[str, float | None]] = []
    with api_server() as api:
        log(f"middleware: {processes} processes x {rounds} rounds x {per_round} requests")
        for seed in range(processes):
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                part = pool.submit(measure, api.url, api.token, rounds, per_round, seed).result()
            for name, values in part["cpu"].items():
                samples.setdefault(name, []).extend(values)
            for name, values in part["wall"].items():
                wall.setdefault(name, []).extend(values)
            api_calls += part["api_calls"]
            record_live.append(part["record_live_entries"])
            per_process.append(
                {pair: rounded(median(_paired(part["cpu"], pair)), 4) for pair in PAIRS}
            )

    bare, passthrough, decision = (
        median(samples["bare"]),
        median(samples["passthrough"]),
        median(samples["decision"]),
    )
    paired = {pair: _paired(samples, pair) for pair in PAIRS}
    spread = {
        name: [rounded(percentile(s, 25), 2), rounded(percentile(s, 75), 2)]
        for name, s in samples.items()
    }
    return {
        "bare_us": rounded(bare, 2),
        "flyfn_passthrough_us": rounded(passthrough, 2),
        "flyfn_replay_decision_us": rounded(decision, 2),
        "passthrough_overhead_ratio": rounded(median(paired["passthrough"]), 4),
        "decision_vs_bare_ratio": rounded(median(paired["decision"]), 4),
        "ratio_of_medians": {
            "passthrough": rounded(ratio(passthrough, bare), 4),
            "decision": rounded(ratio(decision, bare), 4),
        },
        "ratio_iqr": {
            name: [rounded(percentile(r, 25), 4), rounded(percentile(r, 75), 4)]
            for name, r in paired.items()
        },
        "bare_fn_us": rounded(median(samples["bare_fn"]), 2),
        # On the function Machine: the same view, run after its fly-replay-src state is checked.
        "function_machine": {
            "bare_us": rounded(median(samples["bare_fn"]), 2),
            "flyfn_run_us": rounded(median(samples["function_run"]), 2),
            "run_vs_bare_ratio": rounded(median(paired["function_run"]), 4),
        },
        # Every request a path not replayed before in that second (/fn/<n>/ against
        # /direct/<n>/): each one signs its own state.
        "distinct_paths": {
            "bare_us": rounded(median(samples["bare_items"]), 2),
            "flyfn_replay_decision_us": rounded(median(samples["decision_items"]), 2),
            "decision_vs_bare_ratio": rounded(median(paired["decision_items"]), 4),
        },
        # With flyfn's Prometheus metrics on (a counter per replay) against the same handler with
        # metrics off in the same round; details against bare below.
        "metrics_passthrough_vs_off_ratio": rounded(median(paired["passthrough_metrics_cost"]), 4),
        "metrics_decision_vs_off_ratio": rounded(median(paired["decision_metrics_cost"]), 4),
        "metrics_on": {
            "flyfn_passthrough_us": rounded(median(samples["passthrough_metrics"]), 2),
            "flyfn_replay_decision_us": rounded(median(samples["decision_metrics"]), 2),
            "passthrough_overhead_ratio": rounded(median(paired["passthrough_metrics"]), 4),
            "decision_vs_bare_ratio": rounded(median(paired["decision_metrics"]), 4),
        },
        "iqr_us": spread,
        "wall_median_us": {name: rounded(median(w), 2) for name, w in wall.items()},
        "clock": "thread CPU time (time.thread_time_ns), median of per-round means",
        "ratios": "median over rounds of each round's ratio to bare (paired)",
        "processes": processes,
        "per_process_ratios": per_process,
        "rounds": rounds * processes,
        "requests_per_round": per_round,
        "api_calls_during_timing": api_calls,
        # Every replay written to the Machine's record (its limit raised out of reach; a refused
        # entry fails the run); its live entries at each process's end.
        "replay_record": {"limit": RECORD_LIMIT, "live_entries_at_end": record_live},
        "handler": "django.core.handlers.wsgi.WSGIHandler, GET, body read and closed",
    }


# Each paired ratio: (handler, the handler it is compared with in the same round).
PAIRS = {
    "passthrough": ("passthrough", "bare"),
    "decision": ("decision", "bare"),
    "decision_items": ("decision_items", "bare_items"),
    "function_run": ("function_run", "bare_fn"),
    "passthrough_metrics": ("passthrough_metrics", "bare"),
    "decision_metrics": ("decision_metrics", "bare"),
    "passthrough_metrics_cost": ("passthrough_metrics", "passthrough"),
    "decision_metrics_cost": ("decision_metrics", "decision"),
}


def _paired(samples: dict[str, list[float]], pair: str) -> list[float]:
    """Each round's time of the pair's handler over the same round's time of its baseline."""
    name, base = PAIRS[pair]
    return [s / b for s, b in zip(samples[name], samples[base], strict=True)]


if __name__ == "__main__":
    sys.exit(area_main(run))
