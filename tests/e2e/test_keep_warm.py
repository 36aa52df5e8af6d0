"""End-to-end: a group kept warm under `manage.py flyfn dev`. The `warm` group (`keep_warm: 1`)
keeps its Machine started while it is idle over several autostop passes, during which the
`default` group's idle Machine (kept warm by nothing) is stopped at each; the warm group's next
request then has no cold start.

The test reads the proxy's autostop and request lines, never the clock.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.stack import Dev, running_stack
from tests.e2e.test_autostop_passes import start
from tests.support_wait import wait_for

TIME_SCALE = 100  # autostop's pass every 3 s
PASSES = 3  # the control Machine is stopped this many times while the warm one idles
_PASS = re.compile(r"autostop: fn:(?P<id>\w{4}) stopped .*\(pass (?P<pass>\d+)")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def dev() -> Iterator[Dev]:
    with running_stack(TIME_SCALE) as stack:
        yield stack


def passes_stopping(dev: Dev, machine_id: str) -> list[int]:
    """The autostop passes that stopped `machine_id`, in log order."""
    return [
        int(match["pass"])
        for line in list(dev.lines)
        if (match := _PASS.search(line)) and match["id"] == machine_id[:4]
    ]


def stopped_times(dev: Dev, machine_id: str, times: int) -> bool:
    return len(passes_stopping(dev, machine_id)) >= times


def _changes(dev: Dev, group: str) -> list[tuple[int, str]]:
    """The group's one Machine's state changes `(timestamp ms, status)`, oldest first."""
    [machine] = dev.group_machines(group)
    return sorted((e["timestamp"], e["status"]) for e in machine.get("events") or [])


def event_times(dev: Dev, group: str, status: str) -> list[int]:
    return [at for at, entered in _changes(dev, group) if entered == status]


def state_at(dev: Dev, group: str, at: int) -> str | None:
    """The state the group's Machine had entered last at `at` (ms), from its events."""
    entered = [status for when, status in _changes(dev, group) if when <= at]
    return entered[-1] if entered else None


def state_is(dev: Dev, group: str, state: str) -> bool:
    return [m["state"] for m in dev.group_machines(group)] == [state]


def test_a_group_kept_warm_is_never_stopped_idle_and_answers_without_a_cold_start(
    dev: Dev,
) -> None:
    first = httpx.get(f"{dev.url}/warm/", timeout=60)  # creates the warm group's Machine
    assert first.status_code == 200, first.text
    control = httpx.get(f"{dev.url}/square/3/", timeout=60)  # and the default group's
    assert control.status_code == 200, control.text
    [warm] = dev.group_machines("warm")
    [cold] = dev.group_machines("default")
    assert warm["config"]["services"][0]["min_machines_running"] == 1
    assert first.json()["machine"] == warm["id"]

    for stopped in range(1, PASSES + 1):
        wait_for(
            functools.partial(stopped_times, dev, cold["id"], stopped),
            120,  # a safety bound: the control stops after a pass or two idle
            "autostop to stop the idle default group's Machine",
        )
        if stopped < PASSES:
            start(dev, cold["id"])
    assert len(passes_stopping(dev, cold["id"])) >= PASSES
    # At each moment autostop stopped the control (its Machine's `stopping` events), the warm
    # Machine was started, and idle: no request reached it between the first and the one below.
    stops = event_times(dev, "default", "stopping")
    assert len(stops) >= PASSES, _changes(dev, "default")
    for at in stops:
        assert state_at(dev, "warm", at) == "started", (at, dev.group_machines("warm"))
    assert sum(1 for line in dev.lines if " GET /warm/ " in f" {line}") == 1

    assert passes_stopping(dev, warm["id"]) == []
    assert not dev.was_stopped(warm["id"], 0)
    [still] = dev.group_machines("warm")
    assert still["state"] == "started"

    mark = len(dev.lines)
    again = httpx.get(f"{dev.url}/warm/", timeout=60)
    assert again.status_code == 200, again.text
    assert again.json()["machine"] == warm["id"]
    line = dev.log_for("/warm/", mark)
    assert f"fn:{warm['id'][:4]}" in line, line
    assert "(cold" not in line, line
    # The control, once stopped, has one: what keeping warm saves.
    wait_for(
        functools.partial(state_is, dev, "default", "stopped"), 60, "the control to be stopped"
    )
    mark = len(dev.lines)
    assert httpx.get(f"{dev.url}/square/4/", timeout=60).status_code == 200
    assert "(cold" in dev.log_for("/square/4/", mark)
