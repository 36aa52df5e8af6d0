"""Machines API faults (429 / 500 / timeout / bad JSON / refused) on list, create, wait and start.

Every request through FlyReplayMiddleware is still answered: replayed, run here (fallback
`local`) or 503 with Retry-After (fallback `error`); never a 500 or a traceback, and the API token
appears in no log line, page or header. Once the API heals, the group converges to exactly its
configured number of Machines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest
from django.http import HttpResponseBase
from django.test import AsyncClient, Client, override_settings
from pytest_django.fixtures import Settings

from flyfn.machine_role import MAIN, override_role
from flyfn.pool.manager import PoolManager
from tests.reliability.answers import Answer, classify
from tests.reliability.conftest import SENTINEL_TOKEN
from tests.reliability.faults import (
    FAULTS,
    NOT_FORWARDED,
    OPERATIONS,
    Fault,
    FaultTransport,
    Operation,
)
from tests.support_machines_api import MachinesAPI

PATH = "/routing/pdf/"
BODY = b"pdf"
GROUP = "pdf"
MACHINES = 2


@pytest.fixture(autouse=True)
def main_role(settings: Settings) -> Iterator[None]:
    settings.MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
    with override_role(MAIN):
        yield


async def fetch_both(count: int) -> list[HttpResponseBase]:
    """`count` requests through the WSGI handler (in a thread) and `count` through the ASGI one."""
    answers: list[HttpResponseBase] = []
    for _ in range(count):
        answers.append(await asyncio.to_thread(lambda: Client().get(PATH)))
        answers.append(await AsyncClient().get(PATH))
    return answers


def expected_while_faulty(operation: str, fault: Fault, policy: str) -> Answer:
    """What requests get while `operation` fails with `fault`.

    flyfn's request path lists, then creates; it never waits for or starts a Machine (Fly Proxy
    does that), so faults there cannot reach a request. A create whose answer is lost after the
    API did the work is recovered by the re-list that follows every create.
    """
    fails = operation == "list" or (operation == "create" and fault in NOT_FORWARDED)
    if not fails:
        return "replay"
    return "view" if policy == "local" else "unavailable"


@pytest.mark.parametrize("policy", ["local", "error"])
@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("fault", FAULTS)
async def test_every_request_is_answered_while_the_api_fails(
    fault: Fault,
    operation: Operation,
    policy: str,
    sentinel_api: MachinesAPI,
    faulty_pool: tuple[PoolManager, FaultTransport],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, faults = faulty_pool
    flyfn = sentinel_api.flyfn_settings(
        API_TOKEN=SENTINEL_TOKEN,
        GROUPS={GROUP: {"fallback": policy, "machines": MACHINES, "replay_timeout": "5s"}},
    )
    caplog.set_level(logging.DEBUG)
    faults.inject(operation, fault)
    with override_settings(FLYFN=flyfn):
        during = await fetch_both(3)
        faults.heal()
        # The pool retries after a (patched, tiny) backoff: requests replay again soon.
        deadline = time.monotonic() + 60  # a safety bound, not a speed test
        after = await fetch_both(1)
        while {classify(r, BODY) for r in after} != {"replay"} and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            after = await fetch_both(1)

    answers = [classify(r, BODY) for r in during]
    assert answers == [expected_while_faulty(operation, fault, policy)] * len(during)
    if operation in ("list", "create"):
        assert faults.hits[operation] > 0  # the fault was really in the way
    else:
        assert faults.seen[operation] == 0  # the request path never waits for / starts Machines
    assert [classify(r, BODY) for r in after] == ["replay", "replay"]
    group = sentinel_api.machines(group=GROUP)
    assert len(group) == MACHINES, [(m.id, m.name, m.state) for m in group]

    # One error line per failure burst from flyfn; the client's retries are warnings. (Django's
    # own `django.request` logger adds one line per 5xx response: not flyfn's to count.)
    errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("flyfn")
    ]
    assert len(errors) <= 1, [r.getMessage() for r in errors]
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert SENTINEL_TOKEN not in logged
    assert SENTINEL_TOKEN not in caplog.text
    for response in during + after:
        assert SENTINEL_TOKEN.encode() not in getattr(response, "content", b"")
        assert all(SENTINEL_TOKEN not in value for _, value in response.items())


async def test_the_whole_api_refusing_connections_still_answers(
    faulty_pool: tuple[PoolManager, FaultTransport],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real refused connection (nothing listens), not an injected one."""
    flyfn = {
        "APP_NAME": "testapp",
        "API_HOSTNAME": "http://127.0.0.1:9",  # the discard port: nothing listens there
        "API_TOKEN": SENTINEL_TOKEN,
        "IMAGE_REF": "registry.fly.io/testapp:deployment-1",
        "GROUPS": {GROUP: {"fallback": "error"}},
    }
    caplog.set_level(logging.DEBUG)
    with override_settings(FLYFN=flyfn):
        answers = [classify(r, BODY) for r in await fetch_both(3)]
    assert answers == ["unavailable"] * 6
    assert SENTINEL_TOKEN not in caplog.text
