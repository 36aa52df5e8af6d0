"""The real AsyncMachinesClient against the Machines API emulator: in process (httpx ASGITransport)
and over a real loopback socket (uvicorn in a thread), within Fly's rate limits on a virtual
clock."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from flyfn.emulator.api import EmulatorApp, MachinesEmulator, RateLimit, create_app
from flyfn.machines.client import AsyncMachinesClient
from flyfn.machines.errors import (
    Conflict,
    NotFound,
    PreconditionFailed,
    RateLimited,
    Unauthorized,
    Unprocessable,
    WaitTimeout,
)
from flyfn.machines.models import (
    CreateMachineRequest,
    MachineConfig,
    MachineService,
    UpdateMachineRequest,
)
from tests.support_emulator import VirtualClock
from tests.support_machines_api import (
    EMULATOR_APP,
    EMULATOR_BASE_URL,
    EMULATOR_TOKEN,
    serve_in_thread,
)

IMAGE = "registry.fly.io/testapp:deployment-01"


def _request(name: str | None = None, **config: object) -> CreateMachineRequest:
    return CreateMachineRequest(
        name=name, config=MachineConfig.model_validate({"image": IMAGE, **config})
    )


@pytest.fixture(params=["asgi", "socket"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[AsyncMachinesClient]:
    """The client against the emulator within Fly's rate limits, whose time passes as the client
    waits out a 429 (at once)."""
    clock = VirtualClock()
    emulator = MachinesEmulator(default_app=EMULATOR_APP)
    app = create_app(emulator, token=EMULATOR_TOKEN, rate_limit=RateLimit(clock=clock.now))
    with contextlib.ExitStack() as stack:
        transport: httpx.AsyncBaseTransport | None = None
        if request.param == "asgi":
            transport = httpx.ASGITransport(app=app)
            hostname = EMULATOR_BASE_URL
        else:  # (the emulator then lives in the server thread's loop: it closes it at exit)
            hostname = stack.enter_context(serve_in_thread(app))
        try:
            async with AsyncMachinesClient(
                EMULATOR_APP, api_token=EMULATOR_TOKEN, api_hostname=hostname, transport=transport
            ) as machines:
                machines._sleep = clock.sleep
                yield machines
        finally:
            if request.param == "asgi":
                await emulator.aclose()


async def test_a_machines_whole_life(client: AsyncMachinesClient) -> None:
    assert await client.list_machines() == []
    created = await client.create_machine(
        _request(
            "fn-pdf-1",
            metadata={"flyfn_group": "pdf"},
            services=[{"protocol": "tcp", "internal_port": 8000, "autostop": True}],
        )
    )
    assert created.state == "created"
    assert created.config is not None
    assert created.config.services == [
        MachineService(protocol="tcp", internal_port=8000, autostop="stop")
    ]
    waited = await client.wait_machine(created.id, state="started", wait_timeout=5)
    assert waited.ok
    assert waited.state == "started"
    assert waited.version == created.version

    found = await client.list_machines(metadata={"flyfn_group": "pdf"}, state=["started"])
    assert [m.id for m in found] == [created.id]
    assert await client.list_machines(metadata={"flyfn_group": "other"}) == []
    got = await client.get_machine(created.id)
    assert got.name == "fn-pdf-1"
    assert got.current_version == created.version

    await client.stop_machine(created.id, signal="SIGTERM", stop_timeout="2s")
    assert (
        await client.wait_machine(created.id, state="stopped", wait_timeout=5)
    ).state == "stopped"
    started = await client.start_machine(created.id)
    assert started.previous_state == "stopped"
    await client.wait_machine(created.id, state="started", wait_timeout=5)
    await client.suspend_machine(created.id)
    await client.wait_machine(created.id, state="suspended", wait_timeout=5)
    assert (await client.start_machine(created.id)).previous_state == "suspended"
    await client.wait_machine(created.id, state="started", wait_timeout=5)

    lease = await client.acquire_lease(created.id, ttl=30, description="deploy")
    assert lease.nonce
    update = UpdateMachineRequest(config=MachineConfig(image=IMAGE.replace("01", "02")))
    with pytest.raises(Conflict):
        await client.update_machine(created.id, update)
    updated = await client.update_machine(created.id, update, lease_nonce=lease.nonce)
    assert updated.version != created.version
    assert updated.config is not None
    assert updated.config.image == IMAGE.replace("01", "02")
    refreshed = await client.refresh_lease(created.id, nonce=lease.nonce, ttl=60)
    assert refreshed.nonce == lease.nonce
    await client.release_lease(created.id, nonce=lease.nonce)

    await client.set_metadata(created.id, "owner", "pool")
    assert await client.get_metadata(created.id) == {"owner": "pool"}
    await client.delete_metadata(created.id, "owner")
    assert await client.get_metadata(created.id) == {}

    await client.wait_machine(created.id, state="started", wait_timeout=5)
    with pytest.raises(PreconditionFailed):
        await client.destroy_machine(created.id)
    await client.destroy_machine(created.id, force=True)
    gone = await client.wait_machine(created.id, state="destroyed", wait_timeout=5)
    assert gone.state == "destroyed"
    assert await client.list_machines() == []
    assert [m.id for m in await client.list_machines(include_deleted=True)] == [created.id]


async def test_errors_arrive_as_the_right_types(client: AsyncMachinesClient) -> None:
    with pytest.raises(NotFound) as missing:
        await client.get_machine("0123456789abcd")
    assert missing.value.error == "machine not found"
    assert missing.value.request_id

    with pytest.raises(Unprocessable) as no_image:
        await client.create_machine(CreateMachineRequest(config=MachineConfig()))
    assert no_image.value.error is not None
    assert "image" in no_image.value.error

    machine = await client.create_machine(_request("unique"))
    with pytest.raises(Conflict) as taken:
        await client.create_machine(_request("unique"))
    assert taken.value.error_status == "name_taken"

    with pytest.raises(WaitTimeout):
        await client.wait_machine(machine.id, state="suspended", wait_timeout=1)

    await client.acquire_lease(machine.id, ttl=30)
    with pytest.raises(Conflict):
        await client.acquire_lease(machine.id, ttl=30)


async def test_pagination_is_followed_transparently(client: AsyncMachinesClient) -> None:
    ids = [(await client.create_machine(_request(skip_launch=None))).id for _ in range(7)]
    listed = await client.list_machines(page_size=3)
    assert [m.id for m in listed] == ids


async def test_pages_are_really_requested(emulator: MachinesEmulator) -> None:
    clock = VirtualClock()
    app = create_app(emulator, token=EMULATOR_TOKEN, rate_limit=RateLimit(clock=clock.now))
    paths: list[str] = []

    async def record(request: httpx.Request) -> None:
        paths.append(str(request.url))

    transport = httpx.ASGITransport(app=app)
    async with AsyncMachinesClient(
        EMULATOR_APP, api_token=EMULATOR_TOKEN, api_hostname=EMULATOR_BASE_URL, transport=transport
    ) as machines:
        machines._http.event_hooks["request"].append(record)
        machines._sleep = clock.sleep
        for _ in range(5):
            await machines.create_machine(
                CreateMachineRequest(config=MachineConfig(image=IMAGE), skip_launch=True)
            )
        paths.clear()
        assert len(await machines.list_machines(page_size=2)) == 5
    assert len(paths) == 3
    assert "cursor=" not in paths[0]
    assert all("cursor=" in path for path in paths[1:])


async def test_wrong_token_is_unauthorized(emulator_app: EmulatorApp) -> None:
    async with AsyncMachinesClient(
        EMULATOR_APP,
        api_token="not-the-token",
        api_hostname=EMULATOR_BASE_URL,
        transport=httpx.ASGITransport(app=emulator_app),
    ) as machines:
        with pytest.raises(Unauthorized) as denied:
            await machines.list_machines()
    assert "not-the-token" not in str(denied.value)


async def test_the_client_rides_out_rate_limits(emulator: MachinesEmulator) -> None:
    now = [0.0]
    limit = RateLimit(rate=1.0, burst=1, clock=lambda: now[0])
    app = create_app(emulator, token=EMULATOR_TOKEN, rate_limit=limit)
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds  # time passes for the emulator's token bucket too

    async with AsyncMachinesClient(
        EMULATOR_APP,
        api_token=EMULATOR_TOKEN,
        api_hostname=EMULATOR_BASE_URL,
        transport=httpx.ASGITransport(app=app),
    ) as machines:
        machines._sleep = fake_sleep
        machine = await machines.create_machine(_request(skip_launch=True))
        await machines.start_machine(machine.id)
        await machines.start_machine(machine.id)  # 429 once, then retried after Retry-After
        assert slept
        assert slept[0] >= 1.0
        with pytest.raises(RateLimited) as limited:
            await machines.start_machine(machine.id, max_retries=0)
        assert limited.value.retry_after == 1.0
