"""Benchmark area `elastic`: an elastic group against a fixed one, through `manage.py flyfn dev`.

The benchmark project's views wait 200 ms (async, as I/O does) in three groups whose Machines take
10 requests each (`concurrency` soft limit 10, hard limit 15):
- burst: BURST concurrent requests to the `elastic` group (at most 5 Machines) and to the `fixed`
  group (1 Machine): total seconds, Machines that served, p50/p99 latency, as elastic/fixed ratios.
  One request first creates the group and boots its first Machine; then each group gets the burst
  twice: "scale" (the elastic group's other Machines start under it) and "warm" (right after).
- trickle: 1 request/s for TRICKLE_SECONDS to the fresh `trickle` group (at most 5 Machines): how
  many Machines served it (the goal: exactly one).
- idle: after the last request, the seconds until every function Machine is stopped again (the
  proxy's autostop stops them one per pass, a pass every 2.5 s: `--time-scale 120`).
Latencies are client-side wall time of each request; every answer is checked.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from benchmarks.e2e import DevLog, dev_stack, project_env
from benchmarks.harness import JSONDict, percentile, ratio, rounded
from benchmarks.runner import area_main, log, require

TIME_SCALE = 120.0  # autostop's pass every 300 / 120 = 2.5 s, one Machine of a group per pass
AUTOSTOP_PASS = 300.0 / TIME_SCALE
BURST = 200
IDLE_TIMEOUT = 120.0  # a safety bound: "never stopped" is an error, not a figure
TOKEN = "flyfn-bench-elastic"  # the emulated API's token (FLYFN_DEV_TOKEN), to list Machines
GROUPS = ("elastic", "fixed", "trickle")
PHASES = ("scale", "warm")


class Burst(NamedTuple):
    seconds: float
    latencies_ms: list[float]  # of the answered requests
    machines: set[str]  # that answered
    errors: list[str]  # what the others got


async def burst(client: httpx.AsyncClient, path: str, n: int) -> Burst:
    """n concurrent GETs of path. A request that fails is counted, not retried: the local stack
    shares two cores between the proxy, every Machine and this client, and may give up on some."""

    async def one() -> tuple[float, str, str | None]:
        start = time.perf_counter()
        response = await client.get(path)
        elapsed = (time.perf_counter() - start) * 1000
        if response.status_code != 200 or not response.text:
            return elapsed, "", f"{response.status_code} {response.text[:60]!r}"
        return elapsed, response.text, None

    start = time.perf_counter()
    answers = await asyncio.gather(*(one() for _ in range(n)))
    total = time.perf_counter() - start
    errors = [error for _, _, error in answers if error is not None]
    if len(errors) == n:
        raise RuntimeError(f"every GET {path} failed, the first with {errors[0]}")
    return Burst(
        total,
        [ms for ms, _, error in answers if error is None],
        {machine for _, machine, error in answers if error is None},
        errors,
    )


async def trickle(client: httpx.AsyncClient, path: str, seconds: int) -> set[str]:
    """One GET per second for `seconds`; the Machines that served them."""
    served: set[str] = set()
    start = time.perf_counter()
    for n in range(seconds):
        await asyncio.sleep(max(0.0, start + n - time.perf_counter()))
        response = await client.get(path)
        if response.status_code != 200 or not response.text:
            raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:80]!r}")
        served.add(response.text)
    return served


class Api:
    """The emulated Machines API of the running stack (its URL and app from the banner)."""

    def __init__(self, dev_log: DevLog, token: str = TOKEN) -> None:
        self.token = token
        lines = dev_log.lines()
        self.url = lines[dev_log.wait_for("FLY_API_HOSTNAME", after=0, timeout=30)].split()[1]
        banner = [line.split() for line in lines]
        self.app = next(words[1] for words in banner if words[:1] == ["app"])

    def states(self, group: str) -> list[str]:
        """The states of the group's Machines (waiting out the emulator's rate limit)."""
        for _ in range(20):
            response = httpx.get(
                f"{self.url}/v1/apps/{self.app}/machines",
                params={"metadata.flyfn_group": group},
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=10,
            )
            if response.status_code != 429:
                break
            time.sleep(float(response.headers.get("retry-after", "1")))
        response.raise_for_status()
        return [str(m.get("state", "")) for m in response.json()]


def figures(label: str, run: Burst) -> dict[str, Any]:
    return {
        f"{label}_total_s": rounded(run.seconds, 3),
        f"{label}_machines": len(run.machines),
        f"{label}_p50_ms": rounded(percentile(run.latencies_ms, 50), 1),
        f"{label}_p99_ms": rounded(percentile(run.latencies_ms, 99), 1),
        f"{label}_errors": len(run.errors),
        f"{label}_error_kinds": sorted(set(run.errors))[:3],
    }


async def measure(base: str, trickle_seconds: int) -> JSONDict:
    limits = httpx.Limits(max_connections=BURST + 10)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        out: JSONDict = {}
        for group in ("fixed", "elastic"):
            log(f"elastic: the {group} group's first request (creates it)")
            first = await burst(client, f"/wait/{group}/", 1)
            out[f"{group}_first_request_s"] = rounded(first.seconds, 3)
            for phase in PHASES:
                log(f"elastic: {BURST} concurrent requests to the {group} group ({phase})")
                out.update(
                    figures(f"{group}_{phase}", await burst(client, f"/wait/{group}/", BURST))
                )
        log(f"elastic: a trickle of 1 request/s for {trickle_seconds}s")
        out["trickle_machines"] = len(await trickle(client, "/wait/trickle/", trickle_seconds))
        out["trickle_seconds"] = trickle_seconds
    for phase in PHASES:
        for figure in ("total_s", "p50_ms", "p99_ms"):
            value = ratio(out[f"elastic_{phase}_{figure}"], out[f"fixed_{phase}_{figure}"])
            out[f"{phase}_{figure}_elastic_vs_fixed_ratio"] = rounded(value, 3)
    return out


def wait_all_stopped(api: Api) -> float:
    """Seconds until no function Machine of the three groups runs (stopped, or never started)."""
    start = time.perf_counter()
    while True:
        states = [s for g in GROUPS for s in api.states(g)]
        if not states:  # the bursts made some: the listing itself is wrong
            raise RuntimeError(f"no function Machine listed in app {api.app!r}")
        if all(s in ("stopped", "created") for s in states):
            return time.perf_counter() - start
        if time.perf_counter() - start > IDLE_TIMEOUT:
            raise RuntimeError(f"function Machines still running after {IDLE_TIMEOUT}s: {states}")
        time.sleep(0.2)


def run(quick: bool) -> JSONDict:
    require("flyfn.emulator.dev", "flyfn.emulator.proxy", "flyfn.middleware", "uvicorn")
    trickle_seconds = 10 if quick else 30
    with tempfile.TemporaryDirectory(prefix="flyfn-bench-elastic-") as tmp:
        env = {**project_env(), "FLYFN_DEV_TOKEN": TOKEN}
        with dev_stack(Path(tmp) / "dev.log", env, TIME_SCALE) as (_, base, dev_log):
            api = Api(dev_log)
            result = asyncio.run(measure(base, trickle_seconds))
            result["trickle_machines_created"] = len(api.states("trickle"))
            log("elastic: waiting for every function Machine to stop")
            result["all_stopped_after_s"] = rounded(wait_all_stopped(api), 1)
    result.update({"burst": BURST, "autostop_pass_s": AUTOSTOP_PASS})
    return result


if __name__ == "__main__":
    sys.exit(area_main(run))
