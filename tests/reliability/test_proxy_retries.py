"""The local Fly Proxy sends a safe request again when a Machine's connection dies before any
response (a keep-alive connection closed by a stopping Machine, a process killed mid-request),
so the soak loses nothing; a request that may have had effects still fails with PU02.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support_proxy import Handler, Stack, echo, proxy_stack

pytestmark = pytest.mark.timeout(120)


def dies_first(times: int) -> Handler:
    """A Machine whose connection drops `times` times before it answers like `echo`."""
    calls = 0

    def handler(machine_id: str, request: httpx.Request, body: bytes) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls <= times:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return echo(machine_id, request, body)

    return handler


def replay_to(target: str) -> Handler:
    def handler(machine_id: str, request: httpx.Request, body: bytes) -> httpx.Response:
        if "fly-replay-failed" in request.headers:
            return httpx.Response(200, json={"fallback": request.headers["fly-replay-failed"]})
        return httpx.Response(
            200, headers={"fly-replay": f"instance={target};timeout=2s;fallback=force_self"}
        )

    return handler


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    # Replay semantics: the request starts at the app Machine (no balancing onto function ones).
    async with proxy_stack(balance_function_machines=False) as running:
        yield running


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_safe_request_is_sent_again_after_a_dropped_connection(
    stack: Stack, method: str
) -> None:
    app = await stack.machine()
    fn = await stack.machine(group="pdf")
    stack.fleet.handlers[app.id] = replay_to(fn.id)
    stack.fleet.handlers[fn.id] = dies_first(2)
    response = await stack.client.request(method, "/receipt/")
    assert response.status_code == 200
    assert response.headers["x-flyfn-machine"] == fn.id


async def test_a_machine_that_keeps_dropping_connections_gets_the_fallback(stack: Stack) -> None:
    app = await stack.machine()
    fn = await stack.machine(group="pdf")
    stack.fleet.handlers[app.id] = replay_to(fn.id)
    stack.fleet.handlers[fn.id] = dies_first(1000)
    response = await stack.client.get("/receipt/")
    assert response.status_code == 200
    assert response.headers["x-flyfn-machine"] == app.id
    assert "reason=retries_exhausted" in response.json()["fallback"]


async def test_an_unsafe_request_is_not_sent_twice(stack: Stack) -> None:
    app = await stack.machine()
    fn = await stack.machine(group="pdf")
    stack.fleet.handlers[app.id] = replay_to(fn.id)
    stack.fleet.handlers[fn.id] = dies_first(1)
    response = await stack.client.post("/receipt/", content=b"order")
    assert response.status_code == 502
    assert response.headers["x-flyfn-proxy-error"] == "PU02"
    assert [d.machine_id for d in stack.fleet.deliveries].count(fn.id) == 1  # sent once only
