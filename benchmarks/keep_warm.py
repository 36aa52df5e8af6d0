"""Benchmark area `keep_warm`: the first request after a quiet spell, with 0 and 1 Machine kept
warm, through `manage.py flyfn dev`, and the price of the warmth beside it.

The bench project's `cold` group scales to zero; its `warm` group keeps one Machine started
(`keep_warm: 1`, Fly's `min_machines_running`). Each round waits until autostop has stopped the
cold group's Machine (a pass every 2.5 s: `--time-scale 120`), then times one request to each
group (client-side wall time). The route lines must say the cold request met a cold start and the
warm one did not, or the round is an error. The warmth's price is Fly's for the group's size
(`flyfn.fly.pricing`): a Machine running for 30 days, less the root file system it would pay
stopped.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.e2e import DevLog, dev_stack, project_env
from benchmarks.harness import JSONDict, median, rounded
from benchmarks.runner import area_main, log, require
from flyfn.fly.pricing import SECONDS_PER_MONTH, Guest, running_per_second, storage_per_second

TIME_SCALE = 120.0  # autostop's pass every 300 / 120 = 2.5 s
AUTOSTOP_PASS = 300.0 / TIME_SCALE


def first_request(client: httpx.Client, dev_log: DevLog, group: str) -> tuple[float, str]:
    """Seconds of one GET to the group's view, and its route line."""
    mark = len(dev_log.lines())
    start = time.perf_counter()
    response = client.get(f"/first/{group}/")
    seconds = time.perf_counter() - start
    if response.status_code != 200 or not response.text:
        raise RuntimeError(f"GET /first/{group}/: {response.status_code} {response.text[:80]!r}")
    line = dev_log.wait_for(f"GET /first/{group}/", after=mark, timeout=10)
    return seconds, dev_log.lines()[line]


def one_round(
    client: httpx.Client, dev_log: DevLog, cold_id: str, since: int
) -> tuple[float, float]:
    """Once autostop has stopped the cold group's Machine (a line after line `since`, when its
    last request was sent): (cold seconds, warm seconds)."""
    dev_log.wait_for(
        "autostop", after=since, timeout=AUTOSTOP_PASS * 8 + 10, also=f"fn:{cold_id[:4]}"
    )
    time.sleep(0.3)  # let the stopped process exit, so the next request finds it gone
    cold, cold_line = first_request(client, dev_log, "cold")
    warm, warm_line = first_request(client, dev_log, "warm")
    if "(cold" not in cold_line or "(cold" in warm_line:
        raise RuntimeError(f"expected one cold start, the cold group's: {cold_line} / {warm_line}")
    return cold, warm


def warmth_per_month() -> float:
    """Dollars per 30 days of one shared-cpu-1x 256 MB Machine always on rather than stopped."""
    return (running_per_second(Guest()) - storage_per_second()) * SECONDS_PER_MONTH


def run(quick: bool) -> JSONDict:
    require("flyfn.emulator.dev", "flyfn.emulator.proxy", "flyfn.middleware", "uvicorn")
    rounds = 1 if quick else 3
    with (
        tempfile.TemporaryDirectory(prefix="flyfn-bench-warm-") as tmp,
        dev_stack(Path(tmp) / "dev.log", project_env(), TIME_SCALE) as (_, base, dev_log),
        httpx.Client(base_url=base, timeout=60) as client,
    ):
        log("keep_warm: the first request of each group (creates its Machine)")
        since = len(dev_log.lines())
        cold_id = client.get("/first/cold/").text
        client.get("/first/warm/").raise_for_status()
        samples = []
        for n in range(rounds):
            log(f"keep_warm: round {n + 1}/{rounds}: wait for autostop, then one request each")
            samples.append(one_round(client, dev_log, cold_id, since))
            since = len(dev_log.lines())
    cold = median([c for c, _ in samples])
    warm = median([w for _, w in samples])
    return {
        "cold_first_request_s": rounded(cold, 3),
        "warm_first_request_s": rounded(warm, 3),
        "saved_s": rounded(cold - warm, 3),
        "warmth_usd_per_month": rounded(warmth_per_month(), 2),
        "cold_samples_s": [rounded(c, 3) for c, _ in samples],
        "warm_samples_s": [rounded(w, 3) for _, w in samples],
        "autostop_pass_s": AUTOSTOP_PASS,
    }


if __name__ == "__main__":
    sys.exit(area_main(run))
