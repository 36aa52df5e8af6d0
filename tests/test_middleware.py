"""The routing table (docs/how-it-works.md), row by row, in each role, through the WSGI and ASGI
clients."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import pytest
from asgiref.sync import iscoroutinefunction, sync_to_async
from django.conf import settings as django_settings
from django.http import BadHeaderError, HttpRequest, HttpResponse, HttpResponseBase
from django.test import AsyncClient, Client, RequestFactory, override_settings
from django.urls import path, resolve
from pytest_django.fixtures import Settings as SettingsWrapper

import flyfn.middleware as middleware_module
from flyfn import answers, metrics, signed_requests
from flyfn.answers import NO_STORE, replay_response
from flyfn.conf import get_settings
from flyfn.fly.replay import FlyReplay, ReplayFailed, ReplaySource
from flyfn.in_flight import in_flight
from flyfn.machine_role import LOCAL, MAIN, MachineEnv, function, override_role
from flyfn.middleware import FlyReplayMiddleware
from flyfn.pool.choice import ReplayTarget
from flyfn.pool.manager import PoolManager
from flyfn.replay_record import FALLBACK_RETURN_MARGIN
from flyfn.replay_state import STATE_BODY_DIGEST_LIMIT, body_binding, sign_state, verify_state
from flyfn.routing import ORDINARY_WAIT
from flyfn.signed_requests import request_body_binding
from tests.support_machines_api import MachinesAPI
from tests.support_middleware import (
    APP_MACHINE,
    DEFAULT_MACHINE,
    PDF_MACHINE,
    issued,
    ran_here,
    routing_manager,
)
from tests.support_pools import StaticPools, installed
from tests.testapp import views as test_views

Fetch = Callable[..., Awaitable[HttpResponseBase]]
MIDDLEWARE = "flyfn.middleware.FlyReplayMiddleware"


@pytest.fixture(autouse=True)
def middleware(settings: SettingsWrapper) -> None:
    settings.MIDDLEWARE = [MIDDLEWARE]
    answers.replay_plan.cache_clear()  # each test builds the replay headers it uses


@pytest.fixture
def manager() -> Iterator[StaticPools]:
    with installed(routing_manager()) as fake:
        yield fake


@pytest.fixture(params=["wsgi", "asgi"])
def fetch(request: pytest.FixtureRequest) -> Fetch:
    """One request through Django's sync test Client (in a thread) or its AsyncClient."""
    if request.param == "wsgi":
        client = Client()

        async def sync_fetch(method: str, path: str, data: bytes = b"", **kw: Any) -> Any:
            call = sync_to_async(client.generic, thread_sensitive=False)
            return await call(method, path, data, **kw)

        return sync_fetch
    async_client = AsyncClient()

    async def async_fetch(method: str, path: str, data: bytes = b"", **kw: Any) -> Any:
        return await async_client.generic(method, path, data, **kw)

    return async_fetch


def replay_of(response: HttpResponseBase) -> FlyReplay:
    assert response.status_code == 200
    assert response.content == b""  # type: ignore[attr-defined]
    assert "no-store" in response["Cache-Control"]
    return FlyReplay.parse(response["fly-replay"])


def signed_src(method: str, path: str, group: str, secret: str | None = None) -> str:
    state = sign_state(secret or django_settings.SECRET_KEY, method, path, group)
    return ReplaySource(instance="0e1f2a3b4c5d6e", region="iad", t=1, state=state).to_header()


# ------------------------------------------------------------------------------------ local role


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/routing/pdf/", b"pdf"),
        ("GET", "/routing/report/", b"report 0"),
        ("POST", "/routing/upload/", b"upload 0"),
        ("GET", "/plain/", b"plain"),
    ],
)
async def test_local_role_runs_every_view_here(
    fetch: Fetch, manager: StaticPools, method: str, path: str, body: bytes
) -> None:
    with override_role(LOCAL):
        response = await fetch(method, path)
    assert ran_here(response, body)


# ------------------------------------------------------------------------------------- main role


@pytest.mark.parametrize(
    ("method", "path", "group", "machine"),
    [
        ("GET", "/routing/pdf/", "pdf", PDF_MACHINE),  # sync function view
        ("HEAD", "/routing/pdf/", "pdf", PDF_MACHINE),  # HEAD follows GET
        ("POST", "/routing/report/", "default", DEFAULT_MACHINE),  # async function view
        ("POST", "/routing/upload/", "pdf", PDF_MACHINE),  # class-based view
    ],
)
async def test_main_replays_serverless_views_to_their_group(
    fetch: Fetch, manager: StaticPools, method: str, path: str, group: str, machine: str
) -> None:
    with override_role(MAIN):
        response = await fetch(method, path)
    replay = replay_of(response)
    assert replay.instance == machine
    assert (replay.timeout, replay.fallback) == ("10s", "force_self")
    check = verify_state(replay.state, django_settings.SECRET_KEY, method, path, group, max_age=40)
    assert check, check.reason


async def test_main_replay_carries_the_group_timeout(
    fetch: Fetch, manager: StaticPools, settings: SettingsWrapper
) -> None:
    settings.FLYFN = {"GROUPS": {"pdf": {"replay_timeout": "800ms"}}}
    with override_role(MAIN):
        replay = replay_of(await fetch("GET", "/routing/pdf/"))
    assert replay.timeout == "800ms"


async def test_main_replay_without_signing(
    fetch: Fetch, manager: StaticPools, settings: SettingsWrapper
) -> None:
    settings.FLYFN = {"SIGN_REPLAYS": False}
    with override_role(MAIN):
        replay = replay_of(await fetch("GET", "/routing/pdf/"))
    assert replay.instance == PDF_MACHINE
    assert replay.state is None


async def test_main_app_strategy_replays_to_the_app(fetch: Fetch, manager: StaticPools) -> None:
    manager.targets["pdf"] = ReplayTarget(app="testapp-pdf")
    with override_role(MAIN):
        replay = replay_of(await fetch("GET", "/routing/pdf/"))
    assert (replay.app, replay.instance) == ("testapp-pdf", None)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/plain/", b"plain"),  # any other view
        ("GET", "/routing/upload/", b"upload form"),  # serverless view, method not marked
    ],
)
async def test_main_runs_other_views_here(
    fetch: Fetch, manager: StaticPools, method: str, path: str, body: bytes
) -> None:
    with override_role(MAIN):
        response = await fetch(method, path)
    assert ran_here(response, body)


async def test_main_never_replays_a_failed_replay_again(fetch: Fetch, manager: StaticPools) -> None:
    failed = ReplayFailed(instance=PDF_MACHINE, reason="timeout", elapsed_ms=10000).to_header()
    with override_role(MAIN):
        replay_of(await fetch("GET", "/routing/pdf/"))  # the replay that failed
        response = await fetch("GET", "/routing/pdf/", headers={"fly-replay-failed": failed})
    assert ran_here(response, b"pdf")  # the group's fallback, "local" by default
    assert manager.forgotten == [("pdf", PDF_MACHINE)]  # the Machine leaves the cache


async def test_main_refuses_a_failed_header_for_a_replay_it_never_issued(
    fetch: Fetch, manager: StaticPools
) -> None:
    """A client sending `fly-replay-failed` itself cannot make the app Machine run the view."""
    failed = ReplayFailed(instance=PDF_MACHINE, reason="timeout").to_header()
    with override_role(MAIN):
        replay_of(await fetch("GET", "/routing/report/"))  # a replay of another path
        forged = await fetch("GET", "/routing/pdf/", headers={"fly-replay-failed": failed})
        other_method = await fetch(
            "POST", "/routing/report/", headers={"fly-replay-failed": failed}
        )
    assert forged.status_code == other_method.status_code == 503
    assert forged["Retry-After"].isdigit()
    assert forged.content != b"pdf"  # type: ignore[attr-defined]
    assert manager.forgotten == []  # nor evict a Machine from the pool


async def test_main_believes_a_failed_header_only_within_the_replay_timeout(
    fetch: Fetch, manager: StaticPools, settings: SettingsWrapper
) -> None:
    settings.FLYFN = {"GROUPS": {"pdf": {"replay_timeout": "2s"}}}
    failed = {"fly-replay-failed": "reason=timeout"}
    with override_role(MAIN):
        issued("GET", "/routing/pdf/", ago=2, timeout=2)
        assert ran_here(await fetch("GET", "/routing/pdf/", headers=failed), b"pdf")
        # Long past the replay timeout and the way back: a fallback would have come by now.
        issued("GET", "/routing/pdf/", ago=2 + FALLBACK_RETURN_MARGIN + 2, timeout=2)
        assert (await fetch("GET", "/routing/pdf/", headers=failed)).status_code == 503


async def test_main_failed_replay_with_error_fallback_is_503(
    fetch: Fetch, manager: StaticPools, settings: SettingsWrapper
) -> None:
    settings.FLYFN = {"GROUPS": {"pdf": {"fallback": "error"}}}
    with override_role(MAIN):
        replay_of(await fetch("GET", "/routing/pdf/"))
        response = await fetch(
            "GET", "/routing/pdf/", headers={"fly-replay-failed": "reason=no_candidate"}
        )
    assert response.status_code == 503
    assert response["Retry-After"].isdigit()
    assert "fly-replay" not in response


async def test_main_failed_header_on_an_ordinary_view_just_runs(
    fetch: Fetch, manager: StaticPools
) -> None:
    with override_role(MAIN):
        response = await fetch("GET", "/plain/", headers={"fly-replay-failed": "reason=timeout"})
    assert ran_here(response, b"plain")


async def test_main_malformed_failed_header_still_falls_back(
    fetch: Fetch, manager: StaticPools
) -> None:
    with override_role(MAIN):
        replay_of(await fetch("GET", "/routing/pdf/"))
        response = await fetch("GET", "/routing/pdf/", headers={"fly-replay-failed": "==;;\x7f"})
    assert ran_here(response, b"pdf")
    assert manager.forgotten == []


async def test_main_body_over_the_limit_falls_back(
    fetch: Fetch, manager: StaticPools, settings: SettingsWrapper
) -> None:
    settings.FLYFN = {"REPLAY_BODY_LIMIT": 10}
    with override_role(MAIN):
        small = await fetch("POST", "/routing/upload/", b"x" * 10)
        large = await fetch("POST", "/routing/upload/", b"x" * 11)
    assert replay_of(small).instance == PDF_MACHINE
    assert ran_here(large, b"upload 11")


async def test_main_chunked_body_falls_back(fetch: Fetch, manager: StaticPools) -> None:
    with override_role(MAIN):
        response = await fetch("POST", "/routing/upload/", headers={"transfer-encoding": "chunked"})
    assert response.status_code == 200
    assert "fly-replay" not in response


async def test_main_without_a_target_falls_back(fetch: Fetch, manager: StaticPools) -> None:
    manager.targets.clear()  # what the pool answers when the API is down or too slow
    with override_role(MAIN):
        response = await fetch("GET", "/routing/pdf/")
    assert ran_here(response, b"pdf")


# -------------------------------------------------------------------------------- function role


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("GET", "/routing/pdf/", b"pdf"), ("POST", "/routing/upload/", b"upload 0")],
)
async def test_function_runs_its_validly_signed_views(
    fetch: Fetch, manager: StaticPools, method: str, path: str, body: bytes
) -> None:
    with override_role(function("pdf")):
        response = await fetch(
            method, path, headers={"fly-replay-src": signed_src(method, path, "pdf")}
        )
    assert ran_here(response, body)


async def test_function_bounces_requests_no_app_machine_replayed(
    fetch: Fetch, manager: StaticPools
) -> None:
    with override_role(function("pdf")):  # a client reaching the function Machine directly
        response = await fetch("GET", "/routing/pdf/")
    replay = replay_of(response)
    assert replay.elsewhere is True
    assert replay.fallback == "force_self"


async def test_function_never_bounces_a_request_a_machine_sent_it(
    fetch: Fetch, manager: StaticPools
) -> None:
    """`elsewhere` leaves out only the Machine that bounces: bounced again and again, a request
    would go round the function Machines until Fly's replay limit (PA02)."""
    bounced = {"fly-replay-src": "instance=0e1f2a3b4c5d6e;region=iad;t=1"}  # no state
    with override_role(function("pdf")):
        own = await fetch("GET", "/routing/pdf/", headers=bounced)
        ordinary = await fetch("GET", "/plain/", headers=bounced)
        other = await fetch("POST", "/routing/report/", headers=bounced)
    # Serverless views go straight to an app Machine, unsigned: it signs and routes them. A
    # function Machine never signs a request no app Machine replayed (it would sign for a
    # stranger, maybe with a stale key) nor changes another group's Machines.
    for response in (own, other, ordinary):
        replay = replay_of(response)
        assert replay.instance == APP_MACHINE
        assert replay.state is None
        assert replay.fallback == "force_self"
    assert manager.forgotten == []


async def test_function_sends_a_bounced_request_of_its_group_to_an_app_machine_unsigned(
    fetch: Fetch, manager: StaticPools
) -> None:
    manager.machines["pdf"] = (PDF_MACHINE,)  # it could sign for its own group: it does not
    bounced = {"fly-replay-src": "instance=0e1f2a3b4c5d6e;region=iad;t=1"}  # no state
    with override_role(function("pdf")):
        response = await fetch("GET", "/routing/pdf/", headers=bounced)
    replay = replay_of(response)
    assert replay.instance == APP_MACHINE
    assert replay.state is None


async def test_function_waits_for_its_apps_list_to_send_a_bounced_request_on(
    fetch: Fetch, manager: StaticPools, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Machine just booted has no list yet: it waits for it, as for a cold pool (each mode in
    its own way), rather than refuse."""
    manager.app_machines = ()
    waited: list[float] = []

    def wait(max_wait: float) -> str:
        waited.append(max_wait)
        return APP_MACHINE

    async def await_(max_wait: float) -> str:
        return wait(max_wait)

    monkeypatch.setattr(manager, "wait_app_machine", wait)
    monkeypatch.setattr(manager, "aget_app_machine", await_)
    bounced = {"fly-replay-src": "instance=0e1f2a3b4c5d6e;region=iad;t=1"}  # no state
    with override_role(function("pdf")):
        response = await fetch("POST", "/routing/report/", headers=bounced)
    assert replay_of(response).instance == APP_MACHINE
    assert waited == [10.0]  # the group's replay timeout


async def test_an_ordinary_request_sent_to_a_function_machine_waits_for_the_app_list_then_runs(
    fetch: Fetch, manager: StaticPools, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Machine sent it here already: it goes to an app Machine once the app's list is known,
    waited for a little; a Machine that still knows none runs it rather than fail."""
    manager.app_machines = ()
    waited: list[float] = []

    def wait(max_wait: float) -> str | None:
        waited.append(max_wait)
        return None

    async def await_(max_wait: float) -> str | None:
        return wait(max_wait)

    monkeypatch.setattr(manager, "wait_app_machine", wait)
    monkeypatch.setattr(manager, "aget_app_machine", await_)
    bounced = {"fly-replay-src": "instance=0e1f2a3b4c5d6e;region=iad;t=1"}
    with override_role(function("pdf")):
        response = await fetch("GET", "/plain/", headers=bounced)
    assert ran_here(response, b"plain")
    assert waited == [ORDINARY_WAIT]


async def test_function_refuses_a_bounced_request_while_it_knows_no_app_machine(
    fetch: Fetch, manager: StaticPools
) -> None:
    manager.app_machines = ()
    bounced = {"fly-replay-src": "instance=0e1f2a3b4c5d6e;region=iad;t=1"}  # no state
    with override_role(function("pdf")):
        own = await fetch("GET", "/routing/pdf/", headers=bounced)
        other = await fetch("POST", "/routing/report/", headers=bounced)
    for response in (own, other):
        assert response.status_code == 503
        assert response["Retry-After"].isdigit()
        assert "fly-replay" not in response


@pytest.mark.parametrize(
    "src",
    [
        "instance=x;state=flyfn1.1.AAAA",  # a forged state
        "instance=x;state=a;state=b",  # a state it cannot read: it may still be a replay
        signed_src("POST", "/routing/pdf/", "pdf"),  # another method
        signed_src("GET", "/routing/report/", "pdf"),  # another path
        signed_src("GET", "/routing/pdf/", "default"),  # another group
        signed_src("GET", "/routing/pdf/", "pdf", "another-secret-key"),  # e.g. a rotated key
    ],
)
async def test_function_ends_replays_it_cannot_verify_with_503(
    fetch: Fetch, manager: StaticPools, src: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Bounced back into the proxy they would only come back (a rotated SECRET_KEY would send
    them round until Fly gives up): they end here, cleanly, and the view never runs."""
    with override_role(function("pdf")):
        response = await fetch("GET", "/routing/pdf/", headers={"fly-replay-src": src})
    assert response.status_code == 503
    assert response["Retry-After"].isdigit()
    assert "fly-replay" not in response
    assert b"pdf" not in response.content  # type: ignore[attr-defined]
    assert "another-secret-key" not in caplog.text


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"x" * 11, {}),  # over the replay limit
        (b"", {"transfer-encoding": "chunked"}),
        (b"", {"fly-replay-failed": "reason=no_candidate"}),  # a bounce that failed
    ],
)
async def test_function_refuses_unsigned_requests_it_cannot_send_on(
    fetch: Fetch,
    manager: StaticPools,
    settings: SettingsWrapper,
    body: bytes,
    headers: dict[str, str],
) -> None:
    settings.FLYFN = {"REPLAY_BODY_LIMIT": 10}
    with override_role(function("pdf")):
        response = await fetch("POST", "/routing/upload/", body, headers=headers)
    assert response.status_code == 503
    assert "fly-replay" not in response


async def test_function_runs_unsigned_requests_when_signing_is_off(
    fetch: Fetch, manager: StaticPools, settings: SettingsWrapper
) -> None:
    settings.FLYFN = {"SIGN_REPLAYS": False}
    with override_role(function("pdf")):
        response = await fetch("GET", "/routing/pdf/")
    assert ran_here(response, b"pdf")


async def test_function_sends_another_groups_view_on_to_an_app_machine(
    fetch: Fetch, manager: StaticPools
) -> None:
    """Fly Proxy balanced it here; an app Machine routes it, with the group's fallback."""
    with override_role(function("pdf")):
        response = await fetch("POST", "/routing/report/")
    replay = replay_of(response)
    assert replay.elsewhere
    assert replay.instance is None


async def test_function_runs_another_groups_view_it_cannot_send_on(
    fetch: Fetch, manager: StaticPools, settings: SettingsWrapper
) -> None:
    """A body Fly Proxy cannot replay can go neither on nor back: it runs where it landed, as an
    ordinary request would, rather than fail."""
    settings.FLYFN = {"REPLAY_BODY_LIMIT": 10}
    with override_role(function("pdf")):
        response = await fetch("POST", "/routing/report/", b"x" * 50, content_type="text/plain")
    assert ran_here(response, b"report 50")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/plain/"),  # any other view
        ("GET", "/routing/upload/"),  # own group's view, method not marked
        ("POST", "/plain/"),  # a small body Fly Proxy can replay
    ],
)
async def test_function_sends_other_views_on(
    fetch: Fetch, manager: StaticPools, method: str, path: str
) -> None:
    with override_role(function("pdf")):
        response = await fetch(method, path, b"x" * 10)
    replay = replay_of(response)
    assert replay.elsewhere is True
    assert replay.fallback == "force_self"  # should that fail, it comes back here to run


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"x" * 11, {}),  # over the replay limit: Fly Proxy could not replay it
        (b"x" * 5, {"transfer-encoding": "chunked"}),
        (b"", {"fly-replay-failed": "reason=no_candidate"}),  # the bounce failed
        (b"x" * 11, {"fly-replay-src": "instance=0e1f2a3b4c5d6e;t=1"}),  # bounced here
    ],
)
async def test_function_runs_other_views_it_cannot_send_on(
    fetch: Fetch,
    manager: StaticPools,
    settings: SettingsWrapper,
    body: bytes,
    headers: dict[str, str],
) -> None:
    """An ordinary request never fails because Fly Proxy balanced it onto a function Machine."""
    settings.FLYFN = {"REPLAY_BODY_LIMIT": 10}
    with override_role(function("pdf")):
        response = await fetch("POST", "/plain/", body, headers=headers)
    assert ran_here(response, b"plain")


# ------------------------------------------------------------------------------ middleware modes


def test_middleware_is_sync_and_async_capable() -> None:
    def sync_view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    async def async_view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    assert FlyReplayMiddleware.sync_capable
    assert FlyReplayMiddleware.async_capable
    sync_mw = FlyReplayMiddleware(sync_view)
    async_mw = FlyReplayMiddleware(async_view)
    assert not iscoroutinefunction(sync_mw)
    assert not iscoroutinefunction(sync_mw.process_view)
    # The async stack gets a native coroutine process_view (no thread hop per request).
    assert iscoroutinefunction(async_mw.process_view)
    assert iscoroutinefunction(async_mw)


# --------------------------------------------------------------- warm requests against the API


async def test_warm_serverless_requests_make_no_api_call(
    fetch: Fetch, machines_api: MachinesAPI, pool_manager: PoolManager
) -> None:
    with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=3600)), override_role(MAIN):
        first = replay_of(await fetch("GET", "/routing/pdf/")).instance
        calls = len(machines_api.calls)
        instances = {replay_of(await fetch("GET", "/routing/pdf/")).instance for _ in range(1000)}
    assert instances == {first}
    assert machines_api.list_calls == 2  # the cold convergence's list and re-list, nothing since
    assert len(machines_api.calls) == calls


async def test_main_target_the_header_cannot_carry_falls_back(
    fetch: Fetch, manager: StaticPools
) -> None:
    manager.targets["pdf"] = ReplayTarget(instance="not;a machine id")
    with override_role(MAIN):
        response = await fetch("GET", "/routing/pdf/")
    assert ran_here(response, b"pdf")


# ------------------------------------------------------------- what a state binds (issue 16)


def bound_src(path: str, *, query: str = "", body: bytes = b"", method: str = "POST") -> str:
    state = sign_state(
        django_settings.SECRET_KEY,
        method,
        path,
        "pdf",
        query=query,
        body=body_binding(len(body), body),
    )
    return ReplaySource(instance="0e1f2a3b4c5d6e", t=1, state=state).to_header()


async def test_main_signs_the_query_string_and_the_body(fetch: Fetch, manager: StaticPools) -> None:
    with override_role(MAIN):
        replay = replay_of(await fetch("POST", "/routing/upload/?copy=2", b"first page"))
    secret = django_settings.SECRET_KEY
    body = body_binding(10, b"first page")
    path = "/routing/upload/"
    assert verify_state(
        replay.state, secret, "POST", path, "pdf", max_age=40, query="copy=2", body=body
    )
    for query, other in (("copy=3", body), ("", body), ("copy=2", body_binding(10, b"other page"))):
        assert not verify_state(
            replay.state, secret, "POST", path, "pdf", max_age=40, query=query, body=other
        )


async def test_main_binds_a_large_body_by_its_length(
    fetch: Fetch, manager: StaticPools, settings: SettingsWrapper
) -> None:
    large = b"x" * (STATE_BODY_DIGEST_LIMIT + 1)
    with override_role(MAIN):
        replay = replay_of(await fetch("POST", "/routing/upload/", large))
    assert verify_state(
        replay.state,
        django_settings.SECRET_KEY,
        "POST",
        "/routing/upload/",
        "pdf",
        max_age=40,
        body=str(len(large)),
    )


async def test_function_runs_a_request_with_the_signed_query_and_body(
    fetch: Fetch, manager: StaticPools
) -> None:
    src = bound_src("/routing/upload/", query="copy=2", body=b"first page")
    with override_role(function("pdf")):
        response = await fetch(
            "POST", "/routing/upload/?copy=2", b"first page", headers={"fly-replay-src": src}
        )
    assert ran_here(response, b"upload 10")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/routing/upload/?copy=3", b"first page"),  # another query string
        ("/routing/upload/", b"first page"),  # no query string
        ("/routing/upload/?copy=2", b"other page"),  # another body of the same length
        ("/routing/upload/?copy=2", b"first page!"),  # a longer body
        ("/routing/upload/?copy=2", b""),  # no body
    ],
)
async def test_function_refuses_a_state_signed_for_another_query_or_body(
    fetch: Fetch, manager: StaticPools, path: str, body: bytes
) -> None:
    src = bound_src("/routing/upload/", query="copy=2", body=b"first page")
    with override_role(function("pdf")):
        response = await fetch("POST", path, body, headers={"fly-replay-src": src})
    assert not ran_here(response, f"upload {len(body)}".encode())
    assert "fly-replay" in response or response.status_code == 503


async def test_function_runs_a_large_body_bound_by_its_length(
    fetch: Fetch, manager: StaticPools
) -> None:
    large = b"x" * (STATE_BODY_DIGEST_LIMIT + 1)
    state = sign_state(
        django_settings.SECRET_KEY, "POST", "/routing/upload/", "pdf", body=str(len(large))
    )
    src = ReplaySource(t=1, state=state).to_header()
    with override_role(function("pdf")):
        response = await fetch("POST", "/routing/upload/", large, headers={"fly-replay-src": src})
    assert ran_here(response, f"upload {len(large)}".encode())


def test_the_body_binding_of_requests_django_cannot_read_again(settings: SettingsWrapper) -> None:
    factory = RequestFactory()
    assert request_body_binding(factory.get("/x")) == ""
    assert request_body_binding(factory.post("/x", b"abc", content_type="text/plain")) == (
        body_binding(3, b"abc")
    )
    bad = factory.post("/x", b"abc", content_type="text/plain")
    bad.META["CONTENT_LENGTH"] = "three"
    assert request_body_binding(bad) == "?"
    streamed = factory.post("/x", {"f": "v"})  # multipart, read as a stream before
    streamed.POST  # noqa: B018
    length = int(streamed.META["CONTENT_LENGTH"])
    assert request_body_binding(streamed) == str(length)
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2  # request.body would raise: the length is bound
    assert request_body_binding(factory.post("/x", b"abc", content_type="text/plain")) == "3"


# ------------------------------------------------------------- the cold path (issue 17)


class ColdManager(StaticPools):
    """No warm target: the middleware must wait for one (blocking in sync mode, awaited in async
    mode), for at most the group's replay timeout."""

    def __init__(self, targets: dict[str, ReplayTarget]) -> None:
        super().__init__(targets)
        self.waits: list[tuple[str, str, float]] = []

    def get_target(self, group: str) -> ReplayTarget | None:
        return None

    def wait_target(self, group: str, max_wait: float) -> ReplayTarget | None:
        self.waits.append(("sync", group, max_wait))
        return self.targets.get(group)

    async def aget_target(self, group: str, max_wait: float) -> ReplayTarget | None:
        self.waits.append(("async", group, max_wait))
        return self.targets.get(group)


@pytest.mark.parametrize("mode", ["wsgi", "asgi"])
async def test_a_cold_group_is_waited_for_within_its_replay_timeout(
    settings: SettingsWrapper, mode: str
) -> None:
    settings.FLYFN = {"GROUPS": {"pdf": {"replay_timeout": "1500ms"}}}
    cold = ColdManager({"pdf": ReplayTarget(instance=PDF_MACHINE)})
    response: HttpResponseBase
    with installed(cold), override_role(MAIN):
        if mode == "wsgi":
            response = await sync_to_async(Client().get, thread_sensitive=False)("/routing/pdf/")
        else:
            response = await AsyncClient().get("/routing/pdf/")
    assert replay_of(response).instance == PDF_MACHINE
    assert cold.waits == [("sync" if mode == "wsgi" else "async", "pdf", 1.5)]


async def test_a_cold_group_without_a_target_falls_back(fetch: Fetch) -> None:
    cold = ColdManager({})
    with installed(cold), override_role(MAIN):
        response = await fetch("GET", "/routing/pdf/")
    assert ran_here(response, b"pdf")
    assert [group for _, group, _ in cold.waits] == ["pdf"]


async def test_a_function_machine_never_runs_another_groups_view_as_a_fallback(
    fetch: Fetch, manager: StaticPools
) -> None:
    failed = ReplayFailed(instance=DEFAULT_MACHINE, reason="timeout").to_header()
    issued("POST", "/routing/report/")  # a replay it did issue
    with override_role(function("pdf")):
        response = await fetch("POST", "/routing/report/", headers={"fly-replay-failed": failed})
    assert response.status_code == 503
    assert "fly-replay" not in response
    assert manager.forgotten == []  # a replay of another group's: it evicts nothing


async def test_local_fallbacks_are_bounded_and_their_slots_released(
    fetch: Fetch, manager: StaticPools, settings: SettingsWrapper
) -> None:
    settings.FLYFN = {"GROUPS": {"pdf": {"fallback_concurrency": 1}}}
    failed = {"fly-replay-failed": "reason=timeout"}
    slots = middleware_module.fallback_slots("pdf", 1)
    issued("GET", "/routing/pdf/", times=2)  # fallbacks of its own replays
    with override_role(MAIN):
        first = await fetch("GET", "/routing/pdf/", headers=failed)
        assert slots.active == 0  # released with the response
        assert slots.acquire()  # another request is running its fallback now
        try:
            busy = await fetch("GET", "/routing/pdf/", headers=failed)
        finally:
            slots.release()
    assert ran_here(first, b"pdf")
    assert busy.status_code == 503
    assert busy["Retry-After"] == str(answers.RETRY_AFTER_SECONDS)


# ------------------------------------------------------------------------------------ events


def events_of(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str | None, str | None]]:
    """(event, group, reason or outcome) of the flyfn events logged so far."""
    return [
        (
            record.flyfn_event,  # type: ignore[attr-defined]
            getattr(record, "flyfn_group", None),
            getattr(record, "flyfn_reason", None),
        )
        for record in caplog.records
        if record.name.startswith("flyfn.events.")
    ]


@pytest.fixture
def debug_events(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="flyfn.events")
    return caplog


async def test_a_replay_is_an_event_naming_its_machine(
    fetch: Fetch, manager: StaticPools, debug_events: pytest.LogCaptureFixture
) -> None:
    with override_role(MAIN):
        replay_of(await fetch("GET", "/routing/pdf/"))
    (record,) = [r for r in debug_events.records if r.name == "flyfn.events.replay"]
    assert (record.flyfn_group, record.flyfn_machine) == ("pdf", PDF_MACHINE)  # type: ignore[attr-defined]


async def test_each_fallback_is_an_event_with_its_reason_and_outcome(
    fetch: Fetch,
    manager: StaticPools,
    debug_events: pytest.LogCaptureFixture,
    settings: SettingsWrapper,
) -> None:
    settings.FLYFN = {"GROUPS": {"pdf": {"fallback": "local"}}}
    failed = {"fly-replay-failed": "reason=timeout"}
    with override_role(MAIN):
        await fetch("GET", "/routing/pdf/", headers=failed)  # no replay of its own: untrusted
        issued("GET", "/routing/pdf/")
        await fetch("GET", "/routing/pdf/", headers=failed)  # its own replay failed: runs here
        await fetch("POST", "/routing/upload/", b"x" * 2_000_000, content_type="text/plain")
        manager.targets.pop("pdf")
        await fetch("GET", "/routing/pdf/")  # no Machine came
    fallbacks = [
        (r.flyfn_reason, r.flyfn_outcome)  # type: ignore[attr-defined]
        for r in debug_events.records
        if r.name == "flyfn.events.fallback"
    ]
    assert fallbacks == [
        ("untrusted_failure", "unavailable"),
        ("replay_failed", "local"),
        ("body", "local"),
        ("no_machine", "local"),
    ]
    cold = [r for r in debug_events.records if r.name == "flyfn.events.cold_wait"]
    assert [r.flyfn_found for r in cold] == [False]  # type: ignore[attr-defined]


async def test_function_machine_bounces_and_rejections_are_events(
    fetch: Fetch, manager: StaticPools, debug_events: pytest.LogCaptureFixture
) -> None:
    forged = signed_src("GET", "/routing/pdf/", "pdf", "another-secret-key")
    with override_role(function("pdf")):
        await fetch("GET", "/plain/")  # ordinary traffic Fly balanced here
        await fetch("GET", "/routing/pdf/")  # its own view, not replayed
        await fetch("GET", "/routing/pdf/", headers={"fly-replay-src": forged})
    assert events_of(debug_events) == [
        ("bounce", "pdf", "not_serverless"),
        ("bounce", "pdf", "unsigned"),
        ("state_rejected", "pdf", "signature mismatch"),
    ]


# ------------------------------------------------------------------------------ replay headers


def test_replay_response_is_an_empty_uncached_answer_carrying_the_header() -> None:
    response = replay_response("instance=abc;state=s1")
    assert (response.status_code, response.content) == (200, b"")
    assert response["fly-replay"] == "instance=abc;state=s1"
    assert response["Cache-Control"] == NO_STORE


@pytest.mark.parametrize("charset", ["utf-8", "iso-8859-1"])
def test_replay_response_has_djangos_default_content_type(
    settings: SettingsWrapper, charset: str
) -> None:
    settings.DEFAULT_CHARSET = charset
    response = replay_response("instance=abc")
    assert (
        response["Content-Type"]
        == HttpResponse()["Content-Type"]
        == f"text/html; charset={charset}"
    )
    assert response.charset == charset


@pytest.mark.parametrize("value", ["a\nb", "a\rb"])
def test_replay_response_refuses_a_header_split(value: str) -> None:
    with pytest.raises(BadHeaderError):
        replay_response(value)


def test_replay_headers_follow_targets_and_settings(
    settings: SettingsWrapper, manager: StaticPools
) -> None:
    client = Client()
    with override_role(MAIN):
        first = replay_of(client.get("/routing/pdf/"))
        manager.targets["pdf"] = ReplayTarget(app="fn-app")
        second = replay_of(client.get("/routing/pdf/"))
        settings.FLYFN = {"GROUPS": {"pdf": {"replay_timeout": "3s"}}}
        third = replay_of(client.get("/routing/pdf/"))
        settings.FLYFN = {"SIGN_REPLAYS": False}
        fourth = replay_of(client.get("/routing/pdf/"))
    assert (first.instance, first.app, first.timeout) == (PDF_MACHINE, None, "10s")
    assert (second.instance, second.app, second.timeout) == (None, "fn-app", "10s")
    assert (third.app, third.timeout, third.fallback) == ("fn-app", "3s", "force_self")
    assert first.state
    assert second.state
    assert third.state
    assert fourth.state is None
    assert fourth.timeout == "10s"


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """time.time() for the middleware and the signer, set by the test."""
    now = [1_764_302_000.25]
    monkeypatch.setattr(time, "time", lambda: now[0])
    return now


def replay_state(client: Client, path: str = "/routing/pdf/") -> str:
    state = replay_of(client.get(path)).state
    assert state is not None
    return state


@pytest.fixture
def replaying_client(manager: StaticPools) -> Iterator[Client]:
    with override_role(MAIN):
        yield Client()


def test_a_state_is_issued_with_the_current_whole_second(
    replaying_client: Client, frozen_clock: list[float]
) -> None:
    first = replay_state(replaying_client)
    assert first == sign_state(
        django_settings.SECRET_KEY, "GET", "/routing/pdf/", "pdf", frozen_clock[0]
    )
    frozen_clock[0] += 0.7  # same whole second: the same state
    assert replay_state(replaying_client) == first
    frozen_clock[0] += 0.1  # the next second: issued anew
    later = replay_state(replaying_client)
    assert later != first
    assert later.split(".")[1] == str(int(frozen_clock[0]))


def test_each_path_query_and_method_gets_its_own_state(
    replaying_client: Client, frozen_clock: list[float]
) -> None:
    pdf = replay_state(replaying_client, "/routing/pdf/")
    pdf_with_query = replay_state(replaying_client, "/routing/pdf/?page=2")
    head = replay_of(replaying_client.head("/routing/pdf/")).state
    assert pdf != pdf_with_query  # the query string is bound
    assert verify_state(
        pdf_with_query,
        django_settings.SECRET_KEY,
        "GET",
        "/routing/pdf/",
        "pdf",
        max_age=5,
        query="page=2",
    )
    assert head is not None
    assert head != pdf
    assert verify_state(head, django_settings.SECRET_KEY, "HEAD", "/routing/pdf/", "pdf", max_age=5)


def test_a_new_secret_key_signs_at_once(
    replaying_client: Client, frozen_clock: list[float], settings: SettingsWrapper
) -> None:
    old = replay_state(replaying_client)
    settings.SECRET_KEY = "rotated-" + "k" * 50
    new = replay_state(replaying_client)
    assert new != old
    assert verify_state(new, settings.SECRET_KEY, "GET", "/routing/pdf/", "pdf", max_age=5)


# ------------------------------------------------------- verdicts of the helpers (mutation run)

ELASTIC_PDF = {"max_machines": 3, "concurrency": {"soft_limit": 1, "hard_limit": 3}}
UNSTATED_SRC = "instance=0e1f2a3b4c5d6e;region=iad;t=1"  # another Machine bounced it: no state


def fallback_events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    return [
        (r.flyfn_group, r.flyfn_reason, r.flyfn_outcome)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "flyfn.events.fallback"
    ]


class Clock:
    """The replay checks' `time` module, with a wall clock and a monotonic clock the test sets."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock(1000.0)
    monkeypatch.setattr(signed_requests, "time", fake)
    return fake


def run_view(request: HttpRequest) -> HttpResponseBase | None:
    """`process_view` of a fresh middleware for `request` (the view resolved from its path)."""
    match = resolve(request.path)
    request.resolver_match = match
    mw = FlyReplayMiddleware(lambda r: HttpResponse(b"ran"))
    return mw.process_view(request, match.func, (), {})  # type: ignore[return-value]


def test_unavailable_is_a_plain_503_to_retry_that_django_does_not_log_again(
    manager: StaticPools, caplog: pytest.LogCaptureFixture
) -> None:
    response = answers.unavailable()
    assert response.status_code == 503
    assert response.content == b"Service temporarily unavailable, retry shortly.\n"
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response["Retry-After"] == "5"
    assert response["Cache-Control"] == NO_STORE
    caplog.set_level(logging.WARNING, logger="django.request")
    with override_role(MAIN):  # a fly-replay-failed for no replay of its own: 503
        got = Client().get("/routing/pdf/", headers={"fly-replay-failed": "reason=timeout"})
    assert got.status_code == 503
    assert not [r for r in caplog.records if r.name == "django.request"]


def test_each_fallback_event_names_its_group_reason_and_outcome(
    manager: StaticPools, debug_events: pytest.LogCaptureFixture, settings: SettingsWrapper
) -> None:
    client = Client()
    failed = {"fly-replay-failed": "reason=timeout"}
    issued("GET", "/routing/pdf/", times=3)  # three replays, three fallbacks
    with override_role(MAIN):
        settings.FLYFN = {"GROUPS": {"pdf": {"fallback": "error"}}}
        assert client.get("/routing/pdf/", headers=failed).status_code == 503
        settings.FLYFN = {"GROUPS": {"pdf": {"fallback_concurrency": 1}}}
        slots = middleware_module.fallback_slots("pdf", 1)
        assert slots.acquire()
        try:
            assert client.get("/routing/pdf/", headers=failed).status_code == 503
        finally:
            slots.release()
        assert ran_here(client.get("/routing/pdf/", headers=failed), b"pdf")
        manager.targets["pdf"] = ReplayTarget(instance="not;a machine id")
        assert ran_here(client.get("/routing/pdf/"), b"pdf")
    assert fallback_events(debug_events) == [
        ("pdf", "replay_failed", "unavailable"),
        ("pdf", "replay_failed", "unavailable"),
        ("pdf", "replay_failed", "local"),
        ("pdf", "header", "local"),
    ]
    (error,) = [r for r in debug_events.records if r.name == "flyfn.middleware"]
    assert error.getMessage().startswith("flyfn: ")
    group, cause = cast(tuple[object, ...], error.args)
    assert group == "pdf"
    assert isinstance(cause, ValueError)


def test_a_cold_group_without_a_target_falls_back_by_its_own_setting(
    settings: SettingsWrapper,
) -> None:
    settings.FLYFN = {"GROUPS": {"pdf": {"fallback": "error"}}}
    with installed(ColdManager({})), override_role(MAIN):
        assert Client().get("/routing/pdf/").status_code == 503


def test_a_replay_to_the_function_app_is_an_event_naming_the_app(
    manager: StaticPools, debug_events: pytest.LogCaptureFixture
) -> None:
    manager.targets["pdf"] = ReplayTarget(app="fn-app")
    with override_role(MAIN):
        replay_of(Client().get("/routing/pdf/"))
    (record,) = [r for r in debug_events.records if r.name == "flyfn.events.replay"]
    assert record.flyfn_app == "fn-app"  # type: ignore[attr-defined]


def test_a_failed_replay_of_a_post_runs_its_fallback_here(manager: StaticPools) -> None:
    client = Client()
    with override_role(MAIN):
        replay_of(client.post("/routing/upload/", b"x", content_type="text/plain"))
        back = client.post(
            "/routing/upload/",
            b"x",
            content_type="text/plain",
            headers={"fly-replay-failed": "reason=timeout"},
        )
    assert ran_here(back, b"upload 1")


def test_a_request_without_a_query_string_binds_an_empty_one(manager: StaticPools) -> None:
    request = RequestFactory().get("/routing/pdf/")
    del request.META["QUERY_STRING"]  # a WSGI server may leave it out
    with override_role(MAIN):
        state = replay_of(run_view(request)).state  # type: ignore[arg-type]
    assert verify_state(state, django_settings.SECRET_KEY, "GET", "/routing/pdf/", "pdf", max_age=5)
    src = signed_src("GET", "/routing/pdf/", "pdf")
    request = RequestFactory().get("/routing/pdf/", headers={"fly-replay-src": src})
    del request.META["QUERY_STRING"]
    with override_role(function("pdf")):
        assert run_view(request) is None  # verified: runs here


def test_function_runs_a_replay_signed_with_a_fallback_secret(
    manager: StaticPools, settings: SettingsWrapper
) -> None:
    old = settings.SECRET_KEY
    settings.SECRET_KEY = "rotated-" + "k" * 50
    settings.SECRET_KEY_FALLBACKS = [old]
    src = signed_src("GET", "/routing/pdf/", "pdf", old)
    with override_role(function("pdf")):
        assert ran_here(Client().get("/routing/pdf/", headers={"fly-replay-src": src}), b"pdf")


def test_function_checks_a_states_age_against_its_groups_timeout(
    manager: StaticPools, settings: SettingsWrapper
) -> None:
    settings.FLYFN = {"GROUPS": {"pdf": {"replay_timeout": "1s"}}}
    own, default = get_settings().group("pdf"), get_settings().group("default")
    age = (own.state_max_age + default.state_max_age) / 2  # too old for pdf only
    state = sign_state(django_settings.SECRET_KEY, "GET", "/routing/pdf/", "pdf", time.time() - age)
    src = ReplaySource(instance="0e1f2a3b4c5d6e", region="iad", t=1, state=state).to_header()
    with override_role(function("pdf")):
        assert Client().get("/routing/pdf/", headers={"fly-replay-src": src}).status_code == 503


@pytest.mark.parametrize("src", ['state="unterminated', "instance=x;state=a b"])
def test_function_refuses_a_src_it_cannot_read_as_a_state_that_is_missing(
    manager: StaticPools, debug_events: pytest.LogCaptureFixture, src: str
) -> None:
    with override_role(function("pdf")):
        assert Client().get("/routing/pdf/", headers={"fly-replay-src": src}).status_code == 503
    rejected = [r for r in debug_events.records if r.name.startswith("flyfn.events.state")]
    assert [r.flyfn_reason for r in rejected] == ["no signed state"]  # type: ignore[attr-defined]


def test_unverifiable_replays_are_logged_once_a_minute_with_group_and_reason(
    manager: StaticPools,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(signed_requests, "_unverified_logged_at", float("-inf"))
    forged = signed_src("GET", "/routing/pdf/", "pdf", "another-secret-key")
    clock.now = time.time()  # the state's clock: a fresh state
    with override_role(function("pdf")):
        for advance in (0.0, 59.0, 1.0):  # logged, not again within the minute, then again
            clock.now += advance
            request = RequestFactory().get("/routing/pdf/", headers={"fly-replay-src": forged})
            response = run_view(request)
            assert response is not None
            assert response.status_code == 503
    warnings = [r for r in caplog.records if r.name == "flyfn.middleware"]
    assert [r.args for r in warnings] == [("pdf", "signature mismatch")] * 2


def test_an_app_machine_never_replays_a_request_to_itself(manager: StaticPools) -> None:
    # A pool that lists this very Machine (a misconfigured group): the group's fallback, never a
    # replay that would only come back here.
    manager.targets["pdf"] = ReplayTarget(instance="self0000000001")
    with override_role(MAIN, MachineEnv(machine_id="self0000000001")):
        response = Client().get("/routing/pdf/")
    assert ran_here(response, b"pdf")


def test_fallback_slots_are_per_group() -> None:
    first = middleware_module.fallback_slots("slots-a", 1)
    assert first.acquire()
    try:
        other = middleware_module.fallback_slots("slots-b", 1)
        assert other.acquire()  # another group's fallback is not held up
        other.release()
    finally:
        first.release()


def test_a_view_that_raises_leaves_the_in_flight_count_with_its_own_error() -> None:
    def failing(request: HttpRequest) -> HttpResponse:
        raise RuntimeError("view failed")

    mw = FlyReplayMiddleware(failing)
    counter = in_flight("raises", 1)
    assert counter.acquire()
    request = RequestFactory().get("/x")
    setattr(request, middleware_module._HOLD_ATTR, counter)
    with pytest.raises(RuntimeError, match="view failed"):
        mw(request)
    assert counter.active == 0
    with pytest.raises(RuntimeError, match="view failed"):  # nothing held: nothing else raised
        mw(RequestFactory().get("/x"))


def test_a_response_django_does_not_close_leaves_the_count_at_once() -> None:
    counter = in_flight("not-closed", 1)
    assert counter.acquire()
    request = RequestFactory().get("/x")
    setattr(request, middleware_module._HOLD_ATTR, counter)
    middleware_module._release_on_close(request, object())  # type: ignore[arg-type]
    assert counter.active == 0


def test_function_bounces_an_unsigned_request_for_a_path_it_replayed_lately(
    manager: StaticPools, settings: SettingsWrapper
) -> None:
    settings.FLYFN = {"GROUPS": {"pdf": ELASTIC_PDF}}
    issued("GET", "/routing/pdf/")  # no fly-replay-failed here
    with override_role(function("pdf")):
        response = Client().get("/routing/pdf/")
    assert response["fly-replay"] == answers.ELSEWHERE


def test_a_send_on_that_failed_runs_here_counted_within_its_groups_timeout(
    manager: StaticPools, settings: SettingsWrapper, debug_events: pytest.LogCaptureFixture
) -> None:
    settings.FLYFN = {"GROUPS": {"pdf": {**ELASTIC_PDF, "replay_timeout": "2s"}}}
    failed = ReplayFailed(instance="0e1f2a3b4c5d6e", reason="timeout").to_header()
    issued("GET", "/routing/pdf/", ago=10, timeout=2)  # within 10 s, not within 2 s + the way back
    issued("POST", "/routing/upload/", body=body_binding(1, b"x"), timeout=2)
    counter = in_flight("pdf", 1)
    with override_role(function("pdf")):
        request = RequestFactory().post(
            "/routing/upload/",
            b"x",
            content_type="text/plain",
            headers={"fly-replay-failed": failed},
        )
        assert run_view(request) is None  # runs here, counted in the group's in-flight
        assert counter.active == 1
        counter.release()
        late = Client().get("/routing/pdf/", headers={"fly-replay-failed": failed})
    assert late.status_code == 503
    assert manager.forgotten == [("pdf", "0e1f2a3b4c5d6e")]
    assert fallback_events(debug_events) == [
        ("pdf", "replay_failed", "local"),
        ("pdf", "unsigned", "unavailable"),
    ]


def test_function_refuses_a_bounced_request_whose_body_it_cannot_replay(
    manager: StaticPools, settings: SettingsWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.FLYFN = {"REPLAY_BODY_LIMIT": 2}
    manager.machines["pdf"] = (PDF_MACHINE,)  # one to send to
    with override_role(function("pdf")):
        response = Client().post(
            "/routing/upload/",
            b"abc",
            content_type="text/plain",
            headers={"fly-replay-src": UNSTATED_SRC},
        )
    assert response.status_code == 503


def test_a_view_declared_by_url_name_is_routed(
    manager: StaticPools, settings: SettingsWrapper
) -> None:
    settings.FLYFN = {"VIEWS": {"plain": {"methods": ["GET"], "group": "pdf"}}}
    with override_role(MAIN):
        assert replay_of(Client().get("/plain/")).instance == PDF_MACHINE


def test_bounces_and_untrusted_failures_are_events_of_their_group(
    manager: StaticPools, debug_events: pytest.LogCaptureFixture, settings: SettingsWrapper
) -> None:
    client = Client()
    with override_role(function("pdf")):
        client.get("/plain/")  # not serverless: sent on
        client.post("/routing/report/")  # another group's view: sent on
    with override_role(MAIN):
        client.get("/routing/pdf/", headers={"fly-replay-failed": "reason=timeout"})
        settings.FLYFN = {"REPLAY_BODY_LIMIT": 2}
        client.post("/routing/upload/", b"abc", content_type="text/plain")  # body too large
    events = [
        (r.flyfn_event, r.flyfn_group, r.flyfn_reason)  # type: ignore[attr-defined]
        for r in debug_events.records
        if r.name.startswith("flyfn.events.")
    ]
    assert events == [
        ("bounce", "pdf", "not_serverless"),
        ("bounce", "pdf", "other_group"),
        ("fallback", "pdf", "untrusted_failure"),
        ("fallback", "pdf", "body"),
    ]


@pytest.mark.parametrize("mode", ["wsgi", "asgi"])
async def test_a_cold_wait_is_an_event_of_its_group_with_its_duration(
    debug_events: pytest.LogCaptureFixture, mode: str
) -> None:
    cold = ColdManager({"pdf": ReplayTarget(instance=PDF_MACHINE)})
    with installed(cold), override_role(MAIN):
        if mode == "wsgi":
            await sync_to_async(Client().get, thread_sensitive=False)("/routing/pdf/")
        else:
            await AsyncClient().get("/routing/pdf/")
    (record,) = [r for r in debug_events.records if r.name.startswith("flyfn.events.cold")]
    assert record.flyfn_group == "pdf"  # type: ignore[attr-defined]
    assert 0 <= record.flyfn_seconds < 5  # type: ignore[attr-defined]


def test_a_warm_replay_waits_for_nothing(
    manager: StaticPools, debug_events: pytest.LogCaptureFixture
) -> None:
    with override_role(MAIN):
        replay_of(Client().get("/routing/pdf/"))
    assert not [r for r in debug_events.records if r.name.startswith("flyfn.events.cold")]


async def test_async_mode_releases_the_in_flight_count_on_close_or_error() -> None:
    async def respond(request: HttpRequest) -> HttpResponse:
        return HttpResponse(b"ran")

    async def fail(request: HttpRequest) -> HttpResponse:
        raise RuntimeError("view failed")

    counter = in_flight("async-count", 1)
    assert counter.acquire()
    request = RequestFactory().get("/x")
    setattr(request, middleware_module._HOLD_ATTR, counter)
    response = await FlyReplayMiddleware(respond)(request)  # type: ignore[misc]
    assert counter.active == 1  # until the server is done with the response
    response.close()
    assert counter.active == 0
    assert counter.acquire()
    request = RequestFactory().get("/x")
    setattr(request, middleware_module._HOLD_ATTR, counter)
    with pytest.raises(RuntimeError, match="view failed"):
        await FlyReplayMiddleware(fail)(request)  # type: ignore[misc]
    assert counter.active == 0
    with pytest.raises(RuntimeError, match="view failed"):  # nothing held: nothing else raised
        await FlyReplayMiddleware(fail)(RequestFactory().get("/x"))  # type: ignore[misc]


@pytest.mark.parametrize(
    ("role", "groups", "learns"),
    [
        (function("pdf"), {"pdf": ELASTIC_PDF}, ["pdf"]),
        # Any function Machine of the instance strategy lists its app: the app Machines are where
        # it sends what it may not run.
        (function("pdf"), {"default": ELASTIC_PDF}, ["pdf"]),
        (MAIN, {"pdf": ELASTIC_PDF}, []),
        (function("pdf"), {"pdf": {**ELASTIC_PDF, "strategy": "app"}}, []),  # another app
        (function("pdf"), {"pdf": {"max_machines": 3}}, ["pdf"]),
    ],
)
def test_a_function_machine_of_the_instance_strategy_lists_its_app_as_it_boots(
    settings: SettingsWrapper,
    monkeypatch: pytest.MonkeyPatch,
    role: Any,
    groups: dict[str, Any],
    learns: list[str],
) -> None:
    settings.FLYFN = {"GROUPS": groups}
    pools = StaticPools()
    monkeypatch.setattr(middleware_module, "get_manager", lambda: pools)
    with override_role(role):
        FlyReplayMiddleware(lambda request: HttpResponse())
    assert pools.refreshed == learns


def test_the_metrics_port_is_served_as_the_middleware_loads(
    settings: SettingsWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[tuple[int, str]] = []
    monkeypatch.setattr(metrics, "serve", lambda port, address, **_: served.append((port, address)))
    settings.FLYFN = {"METRICS_PORT": 9191, "METRICS_ADDRESS": "127.0.0.1"}
    FlyReplayMiddleware(lambda request: HttpResponse())
    assert served == [(9191, "127.0.0.1")]


def elastic_src(method: str, path: str) -> dict[str, str]:
    state = sign_state(django_settings.SECRET_KEY, method, path, "pdf")
    return {"fly-replay-src": ReplaySource(instance="a", region="iad", state=state).to_header()}


def test_a_busy_machine_sends_a_post_on_to_its_groups_next_and_runs_it_when_that_fails(
    manager: StaticPools, settings: SettingsWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.FLYFN = {"GROUPS": {"pdf": ELASTIC_PDF}}
    manager.machines["pdf"] = ("m0", "m1")
    counter = in_flight("pdf", 1)
    assert counter.acquire()  # at its soft limit
    client = Client()
    try:
        with override_role(function("pdf"), MachineEnv(machine_id="m0")):
            sent = client.post(
                "/routing/upload/",
                b"x",
                content_type="text/plain",
                headers={"fly-replay-src": bound_src("/routing/upload/", body=b"x")},
            )
            assert replay_of(sent).instance == "m1"
            failed = ReplayFailed(instance="m1", reason="no_candidate").to_header()
            back = client.post(
                "/routing/upload/",
                b"x",
                content_type="text/plain",
                headers={"fly-replay-failed": failed},
            )
    finally:
        counter.active = 0
    assert ran_here(back, b"upload 1")


def test_a_busy_machine_that_cannot_name_its_next_logs_it_and_runs_the_request(
    manager: StaticPools,
    settings: SettingsWrapper,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings.FLYFN = {"GROUPS": {"pdf": ELASTIC_PDF}}
    manager.machines["pdf"] = ("m0", "not;an id")
    counter = in_flight("pdf", 1)
    assert counter.acquire()
    try:
        with override_role(function("pdf"), MachineEnv(machine_id="m0")):
            response = Client().get("/routing/pdf/", headers=elastic_src("GET", "/routing/pdf/"))
    finally:
        counter.active = 0
    assert ran_here(response, b"pdf")
    (error,) = [r for r in caplog.records if r.name == "flyfn.middleware"]
    assert error.getMessage().startswith("flyfn: ")
    group, cause = cast(tuple[object, ...], error.args)
    assert group == "pdf"
    assert isinstance(cause, ValueError)


def test_a_bounced_request_for_a_machine_id_no_header_can_carry_is_logged_and_refused(
    manager: StaticPools, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    manager.app_machines = ("not;an id",)
    with override_role(function("pdf")):
        response = Client().get("/routing/pdf/", headers={"fly-replay-src": UNSTATED_SRC})
    assert response.status_code == 503
    (error,) = [r for r in caplog.records if r.name == "flyfn.middleware"]
    assert error.getMessage().startswith("flyfn: ")
    group, cause = cast(tuple[object, ...], error.args)
    assert group == "pdf"
    assert isinstance(cause, ValueError)


# One view under two url names (the routing test below declares only the first serverless).
urlpatterns = [
    path("named/", test_views.plain, name="named"),
    path("other-name/", test_views.plain, name="other-name"),
]


def test_a_view_declared_by_url_name_is_routed_under_that_name_only(
    manager: StaticPools, settings: SettingsWrapper
) -> None:
    settings.ROOT_URLCONF = __name__
    settings.FLYFN = {"VIEWS": {"named": {"methods": ["GET"], "group": "pdf"}}}
    client = Client()
    with override_role(MAIN):
        assert replay_of(client.get("/named/")).instance == PDF_MACHINE
        assert ran_here(client.get("/other-name/"), b"plain")


def test_a_body_of_exactly_the_digest_limit_is_bound_by_its_digest() -> None:
    body = b"x" * STATE_BODY_DIGEST_LIMIT
    request = RequestFactory().post("/x", body, content_type="text/plain")
    assert request_body_binding(request) == body_binding(len(body), body)
    assert request_body_binding(request).startswith("sha256:")
