"""The middleware's answers: `fly-replay` responses (their headers prebuilt per target) and the 503
to retry, on Django's public `HttpResponse` (and its `headers`) and `log_response`."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from django.conf import settings as django_settings
from django.http import HttpRequest, HttpResponse
from django.utils.log import log_response

from flyfn import process_state
from flyfn.fly.headers import FLY_REPLAY
from flyfn.fly.replay import FlyReplay

__all__ = [
    "ELSEWHERE",
    "NO_STORE",
    "RETRY_AFTER_SECONDS",
    "ReplayPlan",
    "replay_plan",
    "replay_response",
    "to_app_machine",
    "unavailable",
]

logger = logging.getLogger("flyfn.answers")

# What clients are told to wait before retrying a request flyfn could not serve.
RETRY_AFTER_SECONDS = 5
NO_STORE = "private, no-store"
# A request a function Machine sends elsewhere (Fly Proxy balances again, leaving it out); should
# that fail, Fly Proxy brings it back here with `fly-replay-failed`.
ELSEWHERE = "elsewhere=true;fallback=force_self"
# Replay headers kept prebuilt (without their state), by target and timeout: Machines come and go.
_MAX_PLANS = 1024


def unavailable(request: HttpRequest | None = None) -> HttpResponse:
    """503 with Retry-After: what a request gets when flyfn can neither replay nor run it."""
    response = HttpResponse(
        "Service temporarily unavailable, retry shortly.\n",
        status=503,
        content_type="text/plain; charset=utf-8",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Cache-Control": NO_STORE},
    )
    # flyfn logs the cause once per failure burst; without this, django.request would log every
    # one of these 503s at ERROR (and mail ADMINS per request): a response is logged once.
    log_response(
        "flyfn: 503 to retry: %s", "" if request is None else request.path,
        response=response, request=request, logger=logger, level="debug",
    )  # fmt: skip
    return response


# Django's default content type, as last built from DEFAULT_CHARSET: a read through Django's
# lazy settings costs about a third of a microsecond, on every replay otherwise.
_content_type: str | None = None


def _forget_content_type() -> None:
    global _content_type
    _content_type = None


process_state.register(
    __name__,
    "the replay responses' content type",
    settings=_forget_content_type,
    watched={"DEFAULT_CHARSET"},
)


def replay_response(value: str) -> HttpResponse:
    """The empty response Fly Proxy acts on; never cached (it is per request, not per URL)."""
    global _content_type
    # Django's default content type, given: found missing, it costs a failed header lookup. The
    # headers set one by one: `headers=` makes the constructor a fifth slower (it unpacks any
    # mapping).
    content_type = _content_type
    if content_type is None:
        content_type = _content_type = f"text/html; charset={django_settings.DEFAULT_CHARSET}"
    response = HttpResponse(content_type=content_type)
    headers = response.headers
    headers[FLY_REPLAY] = value
    headers["Cache-Control"] = NO_STORE
    return response


@functools.lru_cache(maxsize=64)
def to_app_machine(machine_id: str) -> str:
    """The header sending a request to one app Machine (unsigned: it signs and routes it); a
    `ValueError` for an id the header cannot carry."""
    return FlyReplay(instance=machine_id, fallback="force_self").to_header()


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """A replay header to one target, prebuilt: `head + state + tail`, or `unsigned`."""

    head: str
    tail: str
    unsigned: str


@functools.lru_cache(maxsize=_MAX_PLANS)
def replay_plan(instance: str | None, app: str | None, timeout: str) -> ReplayPlan:
    """The replay header to a target without its state: built and validated once, not per
    request (it is the same for every request to that target); a `ValueError` for a target the
    header cannot carry."""
    replay = FlyReplay(instance=instance, app=app, timeout=timeout, fallback="force_self")
    head, tail = replay.to_header_around_state()
    return ReplayPlan(head, tail, replay.to_header())
