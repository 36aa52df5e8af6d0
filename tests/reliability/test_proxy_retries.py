"""The local Fly Proxy sends a safe request again when a Machine's connection dies before any
response (a keep-alive connection closed by a stopping Machine, a process killed mid-request),
so the soak loses nothing; a request that may have had effects still fails with PU02.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from flyfn.emulator.proxy import FlyProxy
from flyfn.emulator.state import MachinesEmulator
from flyfn.machines.models import CreateMachineRequest, Machine, MachineConfig, MachineService
from tests.test_proxy import APP, FakeFleet, Handler, echo

pytestmark = pytest.mark.timeout(30)


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


class Setup:
    def __init__(self, emulator: MachinesEmulator, fleet: FakeFleet, client: httpx.AsyncClient):
        self.emulator = emulator
        self.fleet = fleet
        self.client = client

    async def machine(self, group: str | None = None) -> Machine:
        service = MachineService(protocol="tcp", internal_port=8000, autostart=True, autostop="off")
        config = MachineConfig(
            image="local/p:1", env={"FLYFN_GROUP": group} if group else None, services=[service]
        )
        created = await self.emulator.create(APP, CreateMachineRequest(config=config))
        await self.emulator.settle()
        return self.emulator.get(APP, created.id)


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    fleet = FakeFleet()
    emulator = MachinesEmulator(runtime=fleet, region="local", default_app=APP)
    fleet.emulator = emulator
    proxy = FlyProxy(emulator, fleet, app_name=APP, idle_stop=0, transport=fleet)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy), base_url="http://myapp.local"
    )
    try:
        yield Setup(emulator, fleet, client)
    finally:
        await client.aclose()
        await proxy.aclose()
        await emulator.aclose()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_safe_request_is_sent_again_after_a_dropped_connection(
    setup: Setup, method: str
) -> None:
    app = await setup.machine()
    fn = await setup.machine(group="pdf")
    setup.fleet.handlers[app.id] = replay_to(fn.id)
    setup.fleet.handlers[fn.id] = dies_first(2)
    response = await setup.client.request(method, "/receipt/")
    assert response.status_code == 200
    assert response.headers["x-flyfn-machine"] == fn.id


async def test_a_machine_that_keeps_dropping_connections_gets_the_fallback(setup: Setup) -> None:
    app = await setup.machine()
    fn = await setup.machine(group="pdf")
    setup.fleet.handlers[app.id] = replay_to(fn.id)
    setup.fleet.handlers[fn.id] = dies_first(1000)
    response = await setup.client.get("/receipt/")
    assert response.status_code == 200
    assert response.headers["x-flyfn-machine"] == app.id
    assert "reason=retries_exhausted" in response.json()["fallback"]


async def test_an_unsafe_request_is_not_sent_twice(setup: Setup) -> None:
    app = await setup.machine()
    fn = await setup.machine(group="pdf")
    setup.fleet.handlers[app.id] = replay_to(fn.id)
    setup.fleet.handlers[fn.id] = dies_first(1)
    response = await setup.client.post("/receipt/", content=b"order")
    assert response.status_code == 502
    assert response.headers["x-flyfn-proxy-error"] == "PU02"
    assert [d.machine_id for d in setup.fleet.deliveries].count(fn.id) == 1  # sent once only
