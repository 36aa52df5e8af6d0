"""End-to-end: an elastic group (at most 3 Machines of 2 requests each) under `manage.py flyfn dev`:
a trickle wakes exactly one Machine, a burst spreads over more than one, and idle ones stop
(one per autostop pass).

The tests share one `flyfn dev` and run in file order (the trickle comes first, on a fresh group).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.stack import Dev, running_stack
from tests.support_wait import wait_for

TIME_SCALE = 200  # autostop's pass every 1.5 s
MAX_MACHINES = 3
BURST = 8  # more than the soft limits of all three (2 each): the overflow runs anywhere

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def dev() -> Iterator[Dev]:
    with running_stack(TIME_SCALE) as stack:
        yield stack


def test_a_trickle_wakes_exactly_one_machine(dev: Dev) -> None:
    served = set()
    for n in range(5):
        response = httpx.get(f"{dev.url}/elastic/{n}/", timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["result"] == n
        served.add(response.headers["x-flyfn-machine"])
    machines = sorted(dev.group_machines("elastic"), key=lambda m: m["name"])
    assert len(machines) == MAX_MACHINES  # all created up front
    assert served == {machines[0]["id"]}  # the first in rank order
    assert [m["state"] for m in machines[1:]] == ["created", "created"]  # never started
    concurrency = machines[0]["config"]["services"][0]["concurrency"]
    assert concurrency == {"type": "requests", "soft_limit": 2, "hard_limit": 6}


def test_a_burst_spreads_over_more_than_one_machine(dev: Dev, tmp_path: Path) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=dev.url, timeout=150) as client:
            sent = [
                asyncio.ensure_future(client.get(f"/elastic/{n}/", params={"gate": str(tmp_path)}))
                for n in range(BURST)
            ]
            # Held until every request runs somewhere: then no Machine took more than its share.
            arrived = await asyncio.to_thread(
                wait_for,
                lambda: len(list(tmp_path.glob("arrived-*"))) == BURST,
                150,
                "every request of the burst to arrive",
            )
            assert arrived
            (tmp_path / "go").touch()
            return await asyncio.gather(*sent)

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * BURST
    assert sorted(r.json()["result"] for r in responses) == list(range(BURST))
    served = {r.headers["x-flyfn-machine"] for r in responses}
    first = min(dev.group_machines("elastic"), key=lambda m: m["name"])
    # The first Machine ran two (its soft limit) and sent the rest on; a sibling that has just
    # booted may run what reaches it before it knows its own siblings (up to its hard limit).
    assert first["id"] in served
    assert len(served) >= 2
    assert served <= {m["id"] for m in dev.group_machines("elastic")}
    assert {r.json()["machine"] for r in responses} == served


def test_once_idle_every_machine_is_stopped(dev: Dev) -> None:
    wait_for(
        # Stopped, or never started at all (created).
        lambda: all(m["state"] in ("stopped", "created") for m in dev.group_machines("elastic")),
        120,  # a safety bound: one stop per pass, a few passes
        "every Machine of the group to stop",
    )
