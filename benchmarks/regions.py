"""Benchmark area `regions`: replay latency for a visitor in syd under `manage.py flyfn dev
--regions iad,syd` (iad the primary region), same-region against cross-region, in one run.

- same region: GET /fn/ (group `default`, following the caller): entered at syd, the syd app
  Machine replays it to a syd function Machine;
- cross region: GET /fn/primary/ (group `primary`, `regions: "primary"`): the syd app Machine
  replays it to an iad function Machine, a hop that takes the emulated round trip between the
  two regions (`flyfn.fly.regions`: 1.5 x great-circle distance at 200 km/ms, each way).

Each path is warmed until its route line shows the replay to the expected region; latencies are
then client-side wall time of sequential requests over one keep-alive connection.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.e2e import DevLog, dev_stack, latencies_ms, project_env
from benchmarks.harness import JSONDict, percentile, rounded
from benchmarks.runner import area_main, log, require
from flyfn.emulator.proxy.regions import FROM_REGION_HEADER
from flyfn.fly.regions import one_way_latency_ms

VISITOR = "syd"
PRIMARY = "iad"
WARM_TIMEOUT = 120.0  # safety bound: a cold start on a loaded machine can fall back a while
ROUTE_LINE_TIMEOUT = 10.0  # safety bound: the line is written as the answer goes out


def route_pattern(path: str, region: str) -> re.Pattern[str]:
    """A route line of `path` that entered at the visitor's region and ended replayed to a
    function Machine in `region` (Fly Proxy may first balance it onto a function Machine, which
    sends it elsewhere, to an app Machine: ordinary traffic reaches function Machines on Fly too);
    a fallback is not that."""
    return re.compile(
        rf"^\[{VISITOR}\] GET {re.escape(path)} (?!.*fallback).*→ replay → fn:\w+@{region}"
        r"( \(cold [^)]*\))? \d{3}\b"
    )


def emulated_round_trip_ms(a: str, b: str) -> float:
    return 2 * one_way_latency_ms(a, b)


def route_of(client: httpx.Client, dev_log: DevLog, path: str) -> str:
    """The route line of one more request for `path` (written once it is answered)."""
    mark = len(dev_log.lines())
    latencies_ms(client, path, 1, b"fn")
    deadline = time.monotonic() + ROUTE_LINE_TIMEOUT
    while True:
        # One read per look: the file grows as the stack writes (a last line may be partial).
        found = [ln for ln in dev_log.lines()[mark:] if f" GET {path} " in f" {ln}"]
        if found and found[-1].endswith(("ms", "s")):
            return found[-1]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no route line of {path} in the flyfn dev log")
        time.sleep(0.02)


def check_route(client: httpx.Client, dev_log: DevLog, path: str, region: str) -> None:
    """Requests for `path` still go to a function Machine in `region` (none fell back)."""
    line = route_of(client, dev_log, path)
    if not route_pattern(path, region).match(line):
        raise RuntimeError(f"{path} was not replayed to {region}: {line}")


def warm(client: httpx.Client, dev_log: DevLog, path: str, region: str) -> None:
    """Ask `path` until a request of it is replayed to a function Machine in `region`."""
    pattern = route_pattern(path, region)
    deadline = time.monotonic() + WARM_TIMEOUT
    while True:
        line = route_of(client, dev_log, path)
        if pattern.match(line):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} never replayed to {region}; last route: {line}")
        time.sleep(0.1)


def run(quick: bool) -> JSONDict:
    require("flyfn.emulator.dev", "flyfn.emulator.proxy", "flyfn.middleware", "uvicorn")
    n = 20 if quick else 100
    with tempfile.TemporaryDirectory(prefix="flyfn-bench-regions-") as tmp:
        args = ["--regions", f"{PRIMARY},{VISITOR}"]
        with (
            dev_stack(Path(tmp) / "dev.log", project_env(), 1.0, args) as (_, base, dev_log),
            httpx.Client(
                base_url=base, timeout=60, headers={FROM_REGION_HEADER: VISITOR}
            ) as client,
        ):
            log(f"regions: warming /fn/ ({VISITOR}) and /fn/primary/ ({PRIMARY})")
            warm(client, dev_log, "/fn/", VISITOR)
            warm(client, dev_log, "/fn/primary/", PRIMARY)
            log(f"regions: {n} same-region, then {n} cross-region replays")
            same = latencies_ms(client, "/fn/", n, b"fn")
            check_route(client, dev_log, "/fn/", VISITOR)
            cross = latencies_ms(client, "/fn/primary/", n, b"fn")
            check_route(client, dev_log, "/fn/primary/", PRIMARY)
    same_p50, cross_p50 = percentile(same, 50), percentile(cross, 50)
    return {
        "same_region_replay_p50_ms": rounded(same_p50, 3),
        "cross_region_replay_p50_ms": rounded(cross_p50, 3),
        "cross_minus_same_p50_ms": rounded(cross_p50 - same_p50, 3),
        "emulated_round_trip_ms": rounded(emulated_round_trip_ms(VISITOR, PRIMARY), 3),
        "same_region_replay_p99_ms": rounded(percentile(same, 99), 3),
        "cross_region_replay_p99_ms": rounded(percentile(cross, 99), 3),
        "visitor": VISITOR,
        "function_regions": {"same": VISITOR, "cross": PRIMARY},
        "requests": n,
    }


if __name__ == "__main__":
    sys.exit(area_main(run))
