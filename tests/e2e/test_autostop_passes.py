"""End-to-end: Fly's autostop under `manage.py flyfn dev`. The `elastic` group's three Machines,
started together and then idle, stop one per autostop pass, never two in one pass (Fly stops at
most one Machine per app, region and role a pass).

The proxy's autostop lines name the pass (`autostop: fn:9a2c stopped after 3s idle (pass 4, one
of 3 started)`); the test reads the pass numbers, never the clock.
"""

from __future__ import annotations

import functools
import itertools
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.stack import APP, TOKEN, Dev, running_stack
from tests.support_wait import wait_for

TIME_SCALE = 100  # autostop's pass every 3 s
GROUP = "elastic"
ATTEMPTS = 3  # a very slow computer may boot the Machines one pass apart: start them again
_LINE = re.compile(
    r"autostop: fn:(?P<id>\w{4}) (?:stopped|suspended) .*\(pass (?P<pass>\d+)"
    r"(?:, one of (?P<started>\d+) started)?\)"
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def dev() -> Iterator[Dev]:
    with running_stack(TIME_SCALE) as stack:
        yield stack


def start(dev: Dev, machine_id: str) -> None:
    """Start a Machine through the emulated Machines API (waiting out its rate limit)."""
    for _ in range(20):
        response = httpx.post(
            f"{dev.api}/v1/apps/{APP}/machines/{machine_id}/start",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        if response.status_code != 429:
            break
        time.sleep(float(response.headers.get("retry-after", "1")))
    response.raise_for_status()


def stops(dev: Dev, since: int, ids: set[str]) -> list[tuple[str, int, int]]:
    """The autostop lines of the group's Machines printed after line `since`: (id prefix, pass,
    Machines of the group started at that pass), in log order."""
    found = []
    for line in dev.lines[since:]:
        match = _LINE.search(line)
        if match and match["id"] in {i[:4] for i in ids}:
            found.append((match["id"], int(match["pass"]), int(match["started"] or 1)))
    return found


def all_stopped(dev: Dev, since: int, ids: set[str]) -> bool:
    """Every Machine of the group stopped, each by an autostop line after line `since`."""
    machines = dev.group_machines(GROUP)
    return all(m["state"] == "stopped" for m in machines) and len(stops(dev, since, ids)) >= 3


def test_idle_machines_of_a_group_stop_one_per_pass(dev: Dev) -> None:
    response = httpx.get(f"{dev.url}/elastic/1/", timeout=60)  # creates the group's Machines
    assert response.status_code == 200, response.text
    ids = {m["id"] for m in dev.group_machines(GROUP)}
    assert len(ids) == 3
    for _ in range(ATTEMPTS):
        mark = len(dev.lines)
        for machine in dev.group_machines(GROUP):
            if machine["state"] in ("created", "stopped", "suspended"):
                start(dev, machine["id"])
        wait_for(
            functools.partial(all_stopped, dev, mark, ids),
            120,  # a safety bound: a few passes are enough
            "every Machine of the group to be stopped by autostop",
        )
        found = stops(dev, mark, ids)
        passes = [p for _, p, _ in found]
        # Never two of the group in one pass, and in the order of the passes.
        assert len(set(passes)) == len(passes), found
        assert passes == sorted(passes), found
        if any(started > 1 for _, _, started in found):
            break  # a pass saw several started Machines and stopped only one of them
    else:
        raise AssertionError(f"no pass saw two Machines of the group started at once: {found}")
    # While several were started, each pass stopped one: the next stop is at the next pass.
    for (_, at, started), (_, after, _) in itertools.pairwise(found):
        if started > 1:
            assert after == at + 1, found
