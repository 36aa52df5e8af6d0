"""The middleware's hot-path shortcuts give exactly what the plain code paths give.

Prebuilt replay responses equal constructor-built ones, the cached-key MAC equals Django's
salted_hmac, prebuilt headers equal FlyReplay.to_header(), and each cache follows settings changes.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.http import BadHeaderError, HttpResponse
from django.test import Client, RequestFactory, override_settings
from django.utils.crypto import salted_hmac
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pytest_django.fixtures import Settings as SettingsWrapper

import flyfn.middleware as middleware
from flyfn.conf import get_settings
from flyfn.middleware import NO_STORE, replay_response
from flyfn.pool import ReplayTarget, set_manager
from flyfn.replay import (
    FLY_REPLAY,
    FlyReplay,
    ReplayHeaderError,
    _mac,
    _message,
    sign_state,
    verify_state,
)
from flyfn.runtime import MAIN, override_role
from tests.support_middleware import FakeManager

SALT = "flyfn.replay.state"


def django_mac(secret: str | bytes, message: str) -> str:
    digest = salted_hmac(SALT, message, secret=secret, algorithm="sha256").digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


# ------------------------------------------------------------------------------ signed state


@pytest.mark.parametrize("secret", ["s", "x" * 300, b"\xff\x00raw bytes", "ünïcödé-secret"])
@pytest.mark.parametrize("path", ["/fn/", "/ü/a b", "", "/" + "p" * 5000])
def test_mac_is_djangos_salted_hmac(secret: str | bytes, path: str) -> None:
    message = _message(1_732_761_234, "get", path, "pdf", "a=1", "")
    assert _mac(secret, message) == django_mac(secret, message)


@hypothesis_settings(max_examples=60, deadline=None)
@given(
    secret=st.text(min_size=1, max_size=80),
    path=st.text(max_size=200),
    issued=st.integers(min_value=0, max_value=10**12),
)
def test_mac_matches_salted_hmac_for_any_input(secret: str, path: str, issued: int) -> None:
    message = _message(issued, "POST", path, "default", "", "")
    try:
        expected = django_mac(secret, message)
    except UnicodeEncodeError:  # lone surrogates: both refuse them
        with pytest.raises(UnicodeEncodeError):
            _mac(secret, message)
        return
    assert _mac(secret, message) == expected


def test_verify_uses_each_secret_its_own_key() -> None:
    old = sign_state("old-secret", "GET", "/fn/", "pdf", now=1000)
    new = sign_state("new-secret", "GET", "/fn/", "pdf", now=1000)
    assert old != new
    check = verify_state
    assert check(new, "new-secret", "GET", "/fn/", "pdf", max_age=40, now=1001)
    assert not check(old, "new-secret", "GET", "/fn/", "pdf", max_age=40, now=1001)
    assert check(
        old,
        "new-secret",
        "GET",
        "/fn/",
        "pdf",
        max_age=40,
        now=1001,
        fallback_secrets=["old-secret"],
    )
    assert not check(new, "old-secret", "GET", "/fn/", "pdf", max_age=40, now=1001)


# ------------------------------------------------------------------------------ header building


@pytest.mark.parametrize(
    "replay",
    [
        FlyReplay(instance="e286de4f711e86", timeout="10s", fallback="force_self"),
        FlyReplay(app="fn-app", timeout="800ms", fallback="force_self"),
        FlyReplay(instance="e286de4f711e86"),
        FlyReplay(region=("iad", "ord"), extra=(("note", "x y"),)),
    ],
)
def test_header_around_state_is_to_header_with_the_state(replay: FlyReplay) -> None:
    head, tail = replay.to_header_around_state()
    state = sign_state("secret", "GET", "/fn/", "pdf")
    assert head + state + tail == replace(replay, state=state).to_header()


def test_header_around_state_refuses_an_ambiguous_header() -> None:
    replay = FlyReplay(instance="abc", extra=(("note", "state=flyfn-state-slot"),))
    with pytest.raises(ReplayHeaderError):
        replay.to_header_around_state()


# ------------------------------------------------------------------------------ responses


def constructed(value: str) -> HttpResponse:
    return HttpResponse(b"", headers={FLY_REPLAY: value, "Cache-Control": NO_STORE})


def test_prebuilt_replay_response_equals_the_constructed_one() -> None:
    fast, slow = replay_response("instance=abc;state=s1"), constructed("instance=abc;state=s1")
    assert type(fast) is type(slow)
    assert vars(fast).keys() == vars(slow).keys()
    assert list(fast.items()) == list(slow.items())
    assert fast.content == slow.content == b""
    assert fast.status_code == slow.status_code == 200
    assert fast.reason_phrase == slow.reason_phrase
    assert fast.charset == slow.charset
    assert fast.serialize() == slow.serialize()


def test_prebuilt_replay_responses_share_no_mutable_state() -> None:
    first, second = replay_response("instance=a"), replay_response("instance=b")
    first["Vary"] = "Cookie"
    first.set_cookie("k", "v")
    first.write(b"body")
    first._resource_closers.append(lambda: None)  # type: ignore[attr-defined]
    first.close()
    third = replay_response("instance=c")
    for response in (second, third):
        assert "Vary" not in response
        assert not response.cookies
        assert response.content == b""
        assert response._resource_closers == []  # type: ignore[attr-defined]
        assert not response.closed
    assert second[FLY_REPLAY] == "instance=b"
    assert third[FLY_REPLAY] == "instance=c"


@pytest.mark.parametrize("value", ["a\nb", "a\rb"])
def test_replay_response_refuses_what_the_constructor_refuses(value: str) -> None:
    with pytest.raises(BadHeaderError):
        constructed(value)
    with pytest.raises(BadHeaderError):
        replay_response(value)


def test_non_ascii_values_are_encoded_by_the_constructor() -> None:
    assert replay_response("é")[FLY_REPLAY] == constructed("é")[FLY_REPLAY]


def test_replay_response_follows_default_charset() -> None:
    replay_response("x")  # the template exists before the change
    with override_settings(DEFAULT_CHARSET="iso-8859-1"):
        assert replay_response("x")["Content-Type"] == constructed("x")["Content-Type"]
        assert "iso-8859-1" in replay_response("x")["Content-Type"]
    assert replay_response("x")["Content-Type"] == "text/html; charset=utf-8"


@pytest.fixture
def fresh_template() -> Iterator[None]:
    saved = middleware._template, middleware._template_unsupported
    middleware._template, middleware._template_unsupported = None, False
    try:
        yield
    finally:
        middleware._template, middleware._template_unsupported = saved


def test_an_unknown_response_attribute_falls_back_to_the_constructor(
    monkeypatch: pytest.MonkeyPatch, fresh_template: None
) -> None:
    original = HttpResponse.__init__

    def init(self: HttpResponse, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._future_django = {"mutable": True}  # type: ignore[attr-defined]

    monkeypatch.setattr(HttpResponse, "__init__", init)
    first, second = replay_response("instance=a"), replay_response("instance=b")
    assert first._future_django is not second._future_django  # type: ignore[attr-defined]
    assert middleware._template is None
    assert middleware._template_unsupported
    assert first[FLY_REPLAY] == "instance=a"
    assert first["Cache-Control"] == NO_STORE


# ------------------------------------------------------------------------------ prebuilt headers


@pytest.fixture
def manager() -> Iterator[FakeManager]:
    fake = FakeManager({"pdf": ReplayTarget(instance="e286de4f711e86")})
    previous = set_manager(fake)
    try:
        yield fake
    finally:
        set_manager(previous)


def test_prebuilt_headers_follow_targets_and_settings(
    settings: SettingsWrapper, manager: FakeManager
) -> None:
    settings.MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
    client = Client()
    with override_role(MAIN):
        first = FlyReplay.parse(client.get("/routing/pdf/")[FLY_REPLAY])
        manager.targets["pdf"] = ReplayTarget(app="fn-app")
        second = FlyReplay.parse(client.get("/routing/pdf/")[FLY_REPLAY])
        settings.FLYFN = {"GROUPS": {"pdf": {"replay_timeout": "3s"}}}
        third = FlyReplay.parse(client.get("/routing/pdf/")[FLY_REPLAY])
        settings.FLYFN = {"SIGN_REPLAYS": False}
        fourth = FlyReplay.parse(client.get("/routing/pdf/")[FLY_REPLAY])
    assert (first.instance, first.app, first.timeout) == ("e286de4f711e86", None, "10s")
    assert (second.instance, second.app, second.timeout) == (None, "fn-app", "10s")
    assert (third.app, third.timeout, third.fallback) == ("fn-app", "3s", "force_self")
    assert first.state
    assert second.state
    assert third.state
    assert fourth.state is None
    assert fourth.timeout == "10s"


# ------------------------------------------------------------------------------ per-second headers


def replay_state(client: Client, path: str = "/routing/pdf/") -> str:
    state = FlyReplay.parse(client.get(path)[FLY_REPLAY]).state
    assert state is not None
    return state


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """time.time() for the middleware and the signer, set by the test."""
    now = [1_764_302_000.25]
    monkeypatch.setattr(time, "time", lambda: now[0])
    return now


@pytest.fixture
def replaying_client(settings: SettingsWrapper, manager: FakeManager) -> Iterator[Client]:
    settings.MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
    with override_role(MAIN):
        yield Client()


def test_a_header_is_reused_within_its_second_only(
    replaying_client: Client, frozen_clock: list[float]
) -> None:
    first = replay_state(replaying_client)
    frozen_clock[0] += 0.7  # same whole second
    assert replay_state(replaying_client) == first
    frozen_clock[0] += 0.1  # the next second: issued anew
    later = replay_state(replaying_client)
    assert later != first
    assert later.split(".")[1] == str(int(frozen_clock[0]))


def test_reused_headers_are_the_ones_signing_would_give(
    replaying_client: Client, frozen_clock: list[float]
) -> None:
    for _ in range(3):
        state = replay_state(replaying_client)
        expected = sign_state(
            django_settings.SECRET_KEY, "GET", "/routing/pdf/", "pdf", frozen_clock[0]
        )
        assert state == expected


def test_each_path_and_method_gets_its_own_state(
    replaying_client: Client, frozen_clock: list[float]
) -> None:
    pdf = replay_state(replaying_client, "/routing/pdf/")
    pdf_with_query = replay_state(replaying_client, "/routing/pdf/?page=2")
    head = FlyReplay.parse(replaying_client.head("/routing/pdf/")[FLY_REPLAY]).state
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


def test_many_distinct_requests_in_one_second_stay_bounded(
    frozen_clock: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(middleware, "_MAX_HEADERS", 4)
    mw = middleware.FlyReplayMiddleware(lambda request: HttpResponse())
    target = ReplayTarget(instance="e286de4f711e86")
    for n in range(10):
        path = f"/fn/{n}"
        response = mw._replay(RequestFactory().get(path), "pdf", target, get_settings())
        assert response is not None
        state = FlyReplay.parse(response[FLY_REPLAY]).state
        assert verify_state(state, django_settings.SECRET_KEY, "GET", path, "pdf", max_age=5)
        assert len(mw._headers[3]) <= 4
