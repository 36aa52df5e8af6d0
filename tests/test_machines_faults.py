"""Fault tests of AsyncMachinesClient: retry counts and delays, error types, no token leaks."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from flyfn.machines import (
    BACKOFF_MAX,
    COMMAND_RATE_LIMIT_RETRIES,
    DEFAULT_MAX_RETRIES,
    MAX_RETRY_AFTER,
    ApiOutcome,
    AsyncMachinesClient,
    BadRequest,
    Conflict,
    CreateMachineRequest,
    InvalidResponseError,
    MachineConfig,
    MachinesConnectionError,
    MachinesError,
    MachinesStatusError,
    MachinesTimeoutError,
    NotFound,
    PreconditionFailed,
    RateLimited,
    ServerError,
    Unauthorized,
    Unprocessable,
    UpdateMachineRequest,
    WaitTimeout,
    error_for_status,
    parse_retry_after,
)

TOKEN = "FlyV1 fm2_sekrit-token-value"
CREATE = CreateMachineRequest(config=MachineConfig(image="img"))
UPDATE = UpdateMachineRequest(config=MachineConfig(image="img"))

Step = httpx.Response | Exception


class Script:
    """A MockTransport handler answering with a scripted sequence (the last step repeats)."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        step = self.steps[min(self.calls, len(self.steps) - 1)]
        self.calls += 1
        if isinstance(step, Exception):
            raise step
        return step


class FaultClient:
    """A client on a scripted transport whose sleeps are recorded instead of slept."""

    def __init__(self, script: Script, **kwargs: Any) -> None:
        self.script = script
        self.delays: list[float] = []
        self.client = AsyncMachinesClient(
            "shop", api_token=TOKEN, transport=httpx.MockTransport(script), **kwargs
        )

        async def record_sleep(seconds: float) -> None:
            self.delays.append(seconds)

        self.client._sleep = record_sleep


@pytest.fixture
async def faulty() -> AsyncIterator[Callable[..., FaultClient]]:
    made: list[FaultClient] = []

    def make(*steps: Step, **kwargs: Any) -> FaultClient:
        made.append(FaultClient(Script(*steps), **kwargs))
        return made[-1]

    yield make
    for fault_client in made:
        await fault_client.client.aclose()


def ok(body: Any = None) -> httpx.Response:
    return httpx.Response(200, json={"id": "m1"} if body is None else body)


def err(status: int, body: Any = None, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body or {"error": f"failed {status}"}, headers=headers)


def assert_no_token(exc: BaseException) -> None:
    for text in (str(exc), repr(exc), repr(exc.args), repr(vars(exc))):
        assert TOKEN not in text
        assert "sekrit" not in text


# -- 429 --------------------------------------------------------------------------------------


async def test_429_honours_retry_after_seconds(faulty: Callable[..., FaultClient]) -> None:
    fc = faulty(err(429, **{"Retry-After": "2"}), err(429, **{"Retry-After": "0.5"}), ok())
    machine = await fc.client.get_machine("m1")
    assert machine.id == "m1"
    assert fc.script.calls == 3
    assert fc.delays == [2.0, 0.5]


async def test_429_honours_retry_after_http_date(faulty: Callable[..., FaultClient]) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    fc = faulty(err(429, **{"Retry-After": when}), ok())
    await fc.client.get_machine("m1")
    assert len(fc.delays) == 1
    assert 15 <= fc.delays[0] <= 20


async def test_429_retry_after_is_capped(faulty: Callable[..., FaultClient]) -> None:
    fc = faulty(err(429, **{"Retry-After": "3600"}), ok())
    await fc.client.get_machine("m1")
    assert fc.delays == [MAX_RETRY_AFTER]


async def test_429_without_retry_after_backs_off_exponentially(
    faulty: Callable[..., FaultClient],
) -> None:
    fc = faulty(err(429), max_retries=4)
    with pytest.raises(RateLimited) as info:
        await fc.client.get_machine("m1")
    assert fc.script.calls == 5
    assert info.value.retry_after is None
    assert len(fc.delays) == 4
    # Each delay lies in [d/2, d] for d = 0.5 * 2**n (equal jitter), so they grow.
    for n, delay in enumerate(fc.delays):
        full = min(BACKOFF_MAX, 0.5 * 2**n)
        assert full / 2 <= delay <= full


async def test_429_exhausted_carries_retry_after(faulty: Callable[..., FaultClient]) -> None:
    fc = faulty(err(429, **{"Retry-After": "1", "fly-request-id": "req-9"}))
    with pytest.raises(RateLimited) as info:
        await fc.client.list_machines()
    assert fc.script.calls == 3  # 1 + DEFAULT_MAX_RETRIES
    assert info.value.retry_after == 1.0
    assert info.value.request_id == "req-9"
    assert info.value.status == 429


async def test_429s_count_apart_against_rate_limit_retries(
    faulty: Callable[..., FaultClient],
) -> None:
    # A command's client (COMMAND_RATE_LIMIT_RETRIES) outlasts a burst of 429s...
    limited = err(429, **{"Retry-After": "1"})
    fc = faulty(
        *[limited] * COMMAND_RATE_LIMIT_RETRIES,
        ok(),
        rate_limit_retries=COMMAND_RATE_LIMIT_RETRIES,
    )
    assert (await fc.client.get_machine("m1")).id == "m1"
    assert fc.delays == [1.0] * COMMAND_RATE_LIMIT_RETRIES
    # ...and one more is an error;
    fc = faulty(limited, rate_limit_retries=COMMAND_RATE_LIMIT_RETRIES)
    with pytest.raises(RateLimited):
        await fc.client.list_machines()
    assert fc.script.calls == 1 + COMMAND_RATE_LIMIT_RETRIES
    # ...while a broken API still fails it after DEFAULT_MAX_RETRIES, 429s between or not.
    fc = faulty(err(500), limited, err(500), limited, err(500), ok(), rate_limit_retries=9)
    with pytest.raises(ServerError):
        await fc.client.get_machine("m1")
    assert fc.script.calls == 1 + DEFAULT_MAX_RETRIES + 2  # the 500s, and the two 429s between
    with pytest.raises(ValueError, match="rate_limit_retries"):
        AsyncMachinesClient("shop", api_token=TOKEN, rate_limit_retries=-1)


async def test_429_retried_even_for_non_idempotent_update(
    faulty: Callable[..., FaultClient],
) -> None:
    fc = faulty(err(429, **{"Retry-After": "1"}), ok())
    await fc.client.update_machine("m1", UPDATE)
    assert fc.script.calls == 2


# -- 5xx --------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_5xx_retried_for_idempotent_calls(
    faulty: Callable[..., FaultClient], status: int
) -> None:
    fc = faulty(err(status), err(status), ok())
    assert (await fc.client.get_machine("m1")).id == "m1"
    assert fc.script.calls == 3
    assert len(fc.delays) == 2


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_5xx_exhausted_raises_server_error(
    faulty: Callable[..., FaultClient], status: int
) -> None:
    fc = faulty(
        httpx.Response(status, text="<html>bad gateway</html>", headers={"fly-request-id": "r1"})
    )
    with pytest.raises(ServerError) as info:
        await fc.client.stop_machine("m1")
    assert fc.script.calls == 3
    exc = info.value
    assert (exc.status, exc.method, exc.path) == (status, "POST", "/v1/apps/shop/machines/m1/stop")
    assert exc.error == "<html>bad gateway</html>"
    assert exc.request_id == "r1"
    assert_no_token(exc)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.create_machine(CREATE),
        lambda c: c.update_machine("m1", UPDATE),
        lambda c: c.acquire_lease("m1", ttl=10),
    ],
    ids=["create", "update", "acquire_lease"],
)
async def test_5xx_not_retried_for_non_idempotent_calls(
    faulty: Callable[..., FaultClient], call: Callable[[AsyncMachinesClient], Any]
) -> None:
    fc = faulty(err(503), ok())
    with pytest.raises(ServerError):
        await call(fc.client)
    assert fc.script.calls == 1
    assert fc.delays == []


async def test_per_call_max_retries_overrides_client(faulty: Callable[..., FaultClient]) -> None:
    fc = faulty(err(500), max_retries=5)
    with pytest.raises(ServerError):
        await fc.client.get_machine("m1", max_retries=0)
    assert fc.script.calls == 1
    with pytest.raises(ServerError):
        await fc.client.get_machine("m1", max_retries=1)
    assert fc.script.calls == 3
    with pytest.raises(ServerError):
        await fc.client.get_machine("m1")
    assert fc.script.calls == 9


# -- insufficient capacity ------------------------------------------------------------------


@pytest.mark.parametrize("status", [409, 412, 422])
async def test_create_retries_insufficient_capacity(
    faulty: Callable[..., FaultClient], status: int
) -> None:
    capacity = err(status, {"error": "no capacity in ams", "status": "insufficient_capacity"})
    fc = faulty(capacity, ok({"id": "new"}))
    assert (await fc.client.create_machine(CREATE)).id == "new"
    assert fc.script.calls == 2


async def test_create_capacity_exhausted_says_so(faulty: Callable[..., FaultClient]) -> None:
    fc = faulty(err(409, {"error": "no capacity", "status": "insufficient_capacity"}))
    with pytest.raises(Conflict) as info:
        await fc.client.create_machine(CREATE)
    assert fc.script.calls == 3
    assert info.value.insufficient_capacity
    assert info.value.error_status == "insufficient_capacity"
    assert "insufficient_capacity" in str(info.value)


async def test_other_conflicts_are_not_retried(faulty: Callable[..., FaultClient]) -> None:
    fc = faulty(err(409, {"error": "name taken", "status": "name_taken"}))
    with pytest.raises(Conflict) as info:
        await fc.client.create_machine(CREATE)
    assert fc.script.calls == 1
    assert not info.value.insufficient_capacity


async def test_update_does_not_retry_capacity(faulty: Callable[..., FaultClient]) -> None:
    fc = faulty(err(412, {"error": "no capacity", "status": "insufficient_capacity"}))
    with pytest.raises(PreconditionFailed):
        await fc.client.update_machine("m1", UPDATE)
    assert fc.script.calls == 1


# -- status classes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequest),
        (401, Unauthorized),
        (404, NotFound),
        (408, WaitTimeout),
        (409, Conflict),
        (412, PreconditionFailed),
        (422, Unprocessable),
        (429, RateLimited),
        (500, ServerError),
        (504, ServerError),
        (418, MachinesStatusError),
    ],
)
def test_error_for_status_picks_the_class(status: int, cls: type[MachinesStatusError]) -> None:
    exc = error_for_status(status, method="GET", path="/v1/apps/a/machines")
    assert type(exc) is cls
    assert isinstance(exc, MachinesError)
    assert exc.status == status


@pytest.mark.parametrize("status", [400, 401, 404, 408, 409, 412, 422])
async def test_4xx_not_retried(faulty: Callable[..., FaultClient], status: int) -> None:
    fc = faulty(err(status, {"error": "nope", "status": "unknown"}))
    with pytest.raises(MachinesStatusError) as info:
        await fc.client.wait_machine("m1")
    assert fc.script.calls == 1
    assert info.value.status == status
    assert info.value.error == "nope"


async def test_unauthorized_message_has_no_token(faulty: Callable[..., FaultClient]) -> None:
    fc = faulty(err(401, {"error": f"bad token {TOKEN[:3]}"}))
    with pytest.raises(Unauthorized) as info:
        await fc.client.list_machines()
    assert_no_token(info.value)
    assert "/v1/apps/shop/machines" in str(info.value)


# -- timeouts and connection errors -----------------------------------------------------------


async def test_read_timeouts_retried_then_raised(faulty: Callable[..., FaultClient]) -> None:
    fc = faulty(httpx.ReadTimeout("timed out"))
    with pytest.raises(MachinesTimeoutError) as info:
        await fc.client.get_machine("m1")
    assert fc.script.calls == 3
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)
    assert (info.value.method, info.value.path) == ("GET", "/v1/apps/shop/machines/m1")


async def test_read_timeout_on_create_not_retried(faulty: Callable[..., FaultClient]) -> None:
    fc = faulty(httpx.ReadTimeout("timed out"), ok())
    with pytest.raises(MachinesTimeoutError):
        await fc.client.create_machine(CREATE)
    assert fc.script.calls == 1


async def test_connect_timeout_retried_even_for_create(
    faulty: Callable[..., FaultClient],
) -> None:
    fc = faulty(httpx.ConnectTimeout("connect timed out"), ok({"id": "new"}))
    assert (await fc.client.create_machine(CREATE)).id == "new"
    assert fc.script.calls == 2


async def test_connection_reset_retried_only_when_idempotent(
    faulty: Callable[..., FaultClient],
) -> None:
    fc = faulty(httpx.ReadError("reset"), ok())
    await fc.client.suspend_machine("m1")
    assert fc.script.calls == 2
    fc = faulty(httpx.ReadError("reset"), ok())
    with pytest.raises(MachinesConnectionError):
        await fc.client.update_machine("m1", UPDATE)
    assert fc.script.calls == 1


async def test_real_read_timeout_on_loopback() -> None:
    """A server that accepts and never answers: the client's read timeout fires."""
    # Released in the finally below: since Python 3.12.1 wait_closed() waits for open handlers.
    release = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(65536)
            await asyncio.wait_for(release.wait(), 30)
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with AsyncMachinesClient(
            "shop", api_token=TOKEN, api_hostname=f"http://127.0.0.1:{port}", timeout=0.2
        ) as client:
            with pytest.raises(MachinesTimeoutError):
                await client.get_machine("m1", max_retries=0)
    finally:
        release.set()
        server.close()
        await server.wait_closed()


def closed_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connection_refused_on_real_closed_port() -> None:
    port = closed_loopback_port()
    delays: list[float] = []

    async def record_sleep(seconds: float) -> None:
        delays.append(seconds)

    async with AsyncMachinesClient(
        "shop", api_token=TOKEN, api_hostname=f"http://127.0.0.1:{port}", max_retries=3
    ) as client:
        client._sleep = record_sleep
        with pytest.raises(MachinesConnectionError) as info:
            # Refused connections are retried even for create: the request never left.
            await client.create_machine(CREATE)
    assert len(delays) == 3
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert info.value.path == "/v1/apps/shop/machines"
    assert_no_token(info.value)


# -- reporting each request ----------------------------------------------------------------------


async def test_on_api_call_is_told_each_attempt_and_how_it_ended(
    faulty: Callable[..., FaultClient],
) -> None:
    seen: list[tuple[str, ApiOutcome, float]] = []
    fc = faulty(
        err(503),
        httpx.ReadTimeout("timed out"),
        httpx.ConnectError("refused"),
        ok(),
        max_retries=3,
        on_api_call=lambda operation, outcome, seconds: seen.append((operation, outcome, seconds)),
    )
    await fc.client.get_machine("m1")
    assert [(operation, outcome) for operation, outcome, _ in seen] == [
        ("get_machine", 503),
        ("get_machine", "timeout"),
        ("get_machine", "connection"),
        ("get_machine", 200),
    ]
    assert all(seconds >= 0 for _, _, seconds in seen)


# -- invalid responses ------------------------------------------------------------------------


async def test_malformed_json_is_invalid_response(faulty: Callable[..., FaultClient]) -> None:
    fc = faulty(
        httpx.Response(200, content=b"{not json", headers={"content-type": "application/json"})
    )
    with pytest.raises(InvalidResponseError) as info:
        await fc.client.get_machine("m1")
    assert fc.script.calls == 1
    message = str(info.value)
    assert "get_machine" in message
    assert "not JSON" in message
    assert info.value.operation == "get_machine"


async def test_wrong_shape_says_what_was_wrong(faulty: Callable[..., FaultClient]) -> None:
    fc = faulty(ok([{"id": "a"}, {"state": "started"}]))
    with pytest.raises(InvalidResponseError) as info:
        await fc.client.list_machines()
    message = str(info.value)
    assert "list_machines" in message
    assert "1.id" in message  # the second item lacks its id


async def test_object_where_list_expected(faulty: Callable[..., FaultClient]) -> None:
    fc = faulty(ok({"machines": []}))
    with pytest.raises(InvalidResponseError, match="list of Machine"):
        await fc.client.list_machines()


async def test_error_body_not_json_keeps_text(faulty: Callable[..., FaultClient]) -> None:
    fc = faulty(httpx.Response(404, text="404 page not found"))
    with pytest.raises(NotFound) as info:
        await fc.client.get_machine("m1")
    assert info.value.error == "404 page not found"


# -- Retry-After parsing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        ("1.5", 1.5),
        ("-4", 0.0),
        ("", None),
        (None, None),
        ("soon", None),
        ("nan", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: retry now
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_future_date() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    value = format_datetime(now + timedelta(seconds=42), usegmt=True)
    assert parse_retry_after(value, now=now.timestamp()) == 42.0
