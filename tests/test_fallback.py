"""Fallbacks: an unreachable API, bounded local fallbacks (a streaming one until its last byte), and
recovery from a vanished Machine."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import cast

import pytest
from django.http import HttpRequest, HttpResponseBase, StreamingHttpResponse
from django.test import AsyncClient, Client, override_settings
from django.urls import path
from pytest_django.fixtures import Settings

from flyfn.decorators import fly_serverless
from flyfn.fly.replay import FlyReplay, ReplayFailed
from flyfn.machine_role import MAIN, override_role
from flyfn.pool.manager import PoolManager
from tests.support_machines_api import EMULATOR_APP, MachinesAPI
from tests.support_pools import quick_client
from tests.testapp.routing import Hold
from tests.urls import urlpatterns as test_urlpatterns

TOKEN = "do-not-log-this-token"
DOWN = {
    "APP_NAME": EMULATOR_APP,
    "API_HOSTNAME": "http://127.0.0.1:9",  # the discard port: nothing listens there
    "API_TOKEN": TOKEN,
    "IMAGE_REF": "registry.fly.io/testapp:deployment-1",
}


@fly_serverless
def streamed(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(iter([b"one ", b"two"]))


urlpatterns = [path("streamed/", streamed), *test_urlpatterns]


@pytest.fixture(autouse=True)
def main_role(
    settings: Settings, pool_manager: PoolManager, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    settings.MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
    # What requests get while the API is down, not how long the client retries it.
    monkeypatch.setattr("flyfn.pool.manager.new_client", quick_client)
    Hold.reset()
    with override_role(MAIN):
        yield
    Hold.release.set()  # never leave a held view thread behind


def test_unreachable_api_runs_the_view_here_and_logs_once(
    caplog: pytest.LogCaptureFixture, client: Client
) -> None:
    with override_settings(FLYFN=DOWN), caplog.at_level(logging.WARNING, "flyfn"):
        responses = [client.get("/routing/pdf/") for _ in range(3)]
    assert [(r.status_code, r.content, "fly-replay" in r) for r in responses] == [
        (200, b"pdf", False)
    ] * 3
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert TOKEN not in caplog.text


async def test_unreachable_api_with_error_fallback_is_503(
    caplog: pytest.LogCaptureFixture, async_client: AsyncClient
) -> None:
    settings = {**DOWN, "GROUPS": {"pdf": {"fallback": "error"}}}
    with override_settings(FLYFN=settings), caplog.at_level(logging.WARNING, "flyfn"):
        response = await async_client.get("/routing/pdf/")
    assert response.status_code == 503
    assert int(response["Retry-After"]) > 0
    assert b"Traceback" not in response.content
    assert TOKEN not in caplog.text


def test_a_burst_of_503s_logs_one_error_line_in_all(
    caplog: pytest.LogCaptureFixture, client: Client
) -> None:
    # Not one django.request ERROR (and ADMINS mail) per 503: flyfn's own line per burst is enough.
    settings = {**DOWN, "GROUPS": {"pdf": {"fallback": "error"}}}
    with override_settings(FLYFN=settings), caplog.at_level(logging.WARNING):
        statuses = [client.get("/routing/pdf/").status_code for _ in range(5)]
    assert statuses == [503] * 5
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.name.split(".")[0] for r in errors] == ["flyfn"]


def test_local_fallbacks_are_bounded_per_process(client: Client) -> None:
    settings = {**DOWN, "GROUPS": {"default": {"fallback_concurrency": 1}}}
    held: list[int] = []
    with override_settings(FLYFN=settings):
        holder = threading.Thread(
            target=lambda: held.append(Client().get("/routing/held/").status_code)
        )
        holder.start()
        try:
            assert Hold.entered.wait(10)
            second = client.get("/routing/held/")
        finally:
            Hold.release.set()
            holder.join(10)
        third = client.get("/routing/held/")  # the slot is free again
    assert second.status_code == 503
    assert second["Retry-After"]
    assert held == [200]
    assert third.status_code == 200


def streamed_body(response: HttpResponseBase) -> bytes:
    """A streaming response's body, read to its end (which closes it, as a server does)."""
    assert isinstance(response, StreamingHttpResponse)
    return b"".join(cast(Iterator[bytes], response.streaming_content))


@pytest.mark.urls(__name__)
def test_a_streaming_fallback_holds_its_slot_until_its_response_is_closed(client: Client) -> None:
    settings = {**DOWN, "GROUPS": {"default": {"fallback_concurrency": 1}}}
    with override_settings(FLYFN=settings):
        streaming = client.get("/streamed/")  # its body not sent yet
        refused = Client().get("/streamed/")
        assert streamed_body(streaming) == b"one two"  # its last byte: closed
        again = Client().get("/streamed/")
        assert streamed_body(again) == b"one two"
    assert streaming.status_code == 200
    assert refused.status_code == 503
    assert again.status_code == 200


async def test_async_local_fallbacks_are_bounded_per_process(async_client: AsyncClient) -> None:
    settings = {**DOWN, "GROUPS": {"default": {"fallback_concurrency": 1}}}
    Hold.async_release = asyncio.Event()
    with override_settings(FLYFN=settings):
        first = asyncio.ensure_future(async_client.get("/routing/aheld/"))
        second = asyncio.ensure_future(async_client.get("/routing/aheld/"))
        done, _ = await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
        refused = done.pop().result()
        Hold.async_release.set()
        served = [(await t).status_code for t in (first, second)]
        again = await async_client.get("/routing/aheld/")
    assert refused.status_code == 503
    assert sorted(served) == [200, 503]
    assert again.status_code == 200


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
async def test_machine_destroyed_behind_the_pools_back_recovers(
    machines_api: MachinesAPI, kind: str
) -> None:
    async def get(path: str, **headers: str) -> tuple[int, bytes, str | None]:
        if kind == "asgi":
            response: HttpResponseBase = await AsyncClient().get(path, headers=headers)
        else:
            response = await asyncio.to_thread(lambda: Client().get(path, headers=headers))
        return response.status_code, response.content, response.get("fly-replay")  # type: ignore[attr-defined]

    with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=3600)):
        _, _, header = await get("/routing/pdf/")
        assert header is not None
        gone = FlyReplay.parse(header).instance
        assert gone is not None
        machines_api.destroy(gone)
        # Fly Proxy could not reach it: the fallback request names it.
        failed = ReplayFailed(instance=gone, reason="no_candidate").to_header()
        assert await get("/routing/pdf/", **{"fly-replay-failed": failed}) == (200, b"pdf", None)
        _, _, header = await get("/routing/pdf/")
    assert header is not None
    replacement = FlyReplay.parse(header).instance
    assert replacement not in (None, gone)
    assert [m.id for m in machines_api.machines(group="pdf")] == [replacement]
