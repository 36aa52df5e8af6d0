"""End-to-end: a multi-region app under `flyfn dev --regions iad,syd` (an app Machine in each,
iad the primary): a serverless request entering at syd runs on a syd function Machine; with
creation refused in syd (`--full-regions syd`, Fly's insufficient capacity) it runs in iad,
answered 200, and the syd app Machine logs the failover event."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest

from flyfn.emulator.proxy.regions import FROM_REGION_HEADER
from tests.e2e.stack import Dev, running_stack
from tests.support_wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FROM_SYD = {FROM_REGION_HEADER: "syd"}
# No autostop pass during a test: these are about where requests go.
TIME_SCALE = 1


def function_answer(dev: Dev, path: str) -> tuple[dict[str, Any], int]:
    """The first answer to `path` (from syd) that a function Machine ran, and the log line
    count before it. A cold start that outlasts the wait for a Machine falls back to the app
    Machine (a right answer, not this test's point): ask until a function Machine answers."""
    deadline = time.monotonic() + 120  # safety bound
    while True:
        since = len(dev.lines)
        response = httpx.get(f"{dev.url}{path}", headers=FROM_SYD, timeout=60)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        if answer["group"] == "default" or time.monotonic() > deadline:
            return answer, since
        time.sleep(0.2)


def replayed_from_syd(path: str, region: str) -> re.Pattern[str]:
    """A route line of `path` that entered at syd, where the syd app Machine replayed it to a
    function Machine in `region` (no fallback)."""
    return re.compile(
        rf"\[syd\] GET {re.escape(path)} (?!.*fallback).*main:\w+@syd( \(cold [^)]*\))? "
        rf"→ replay → fn:\w+@{region}"
    )


def region_of(dev: Dev, machine_id: str) -> str:
    [machine] = [m for m in dev.machines() if m["id"] == machine_id]
    region: str = machine["region"]
    return region


def test_a_request_from_syd_runs_on_a_syd_function_machine() -> None:
    with running_stack(TIME_SCALE, args=["--regions", "iad,syd"]) as dev:
        app_regions = sorted(
            m["region"]
            for m in dev.machines()
            if "FLYFN_GROUP" not in (m["config"].get("env") or {})
        )
        assert app_regions == ["iad", "syd"]
        # Ordinary traffic from syd is served by the syd app Machine, which Fly-Region names.
        plain = httpx.get(f"{dev.url}/plain/", headers=FROM_SYD, timeout=60).json()
        assert region_of(dev, plain["machine"]) == "syd"

        answer, since = function_answer(dev, "/square/7/")
        assert answer["result"] == 49
        assert region_of(dev, answer["machine"]) == "syd"
        line = dev.log_for("/square/7/", since)
        # The route: entered at syd, the syd app Machine replayed, a syd function Machine ran it
        # (Fly Proxy may first balance it onto that function Machine, which sends it elsewhere).
        assert replayed_from_syd("/square/7/", "syd").match(line), line
        assert [m["region"] for m in dev.group_machines("default")] == ["syd"]


def test_with_syd_creation_refused_a_request_from_syd_runs_in_iad() -> None:
    args = ["--regions", "iad,syd", "--full-regions", "syd"]
    with running_stack(TIME_SCALE, args=args) as dev:
        answer, since = function_answer(dev, "/square/8/")
        assert answer["result"] == 64
        assert region_of(dev, answer["machine"]) == "iad"
        line = dev.log_for("/square/8/", since)
        assert replayed_from_syd("/square/8/", "iad").match(line), line
        assert [m["region"] for m in dev.group_machines("default")] == ["iad"]
        event = wait_for(
            lambda: next((ln for ln in dev.lines if "home region syd go to region iad" in ln), ""),
            30,
            "the failover event",
        )
        assert "(no_capacity)" in event
