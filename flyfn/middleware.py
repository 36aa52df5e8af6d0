"""FlyReplayMiddleware: decides per request where a view runs (here, replayed, bounced or fallback).

Sync and async capable in the django-cors-headers style: the decision is one shared sync helper with
no I/O; only waiting for a cold pool differs (blocking wait in the sync path, awaited in the async
path). The routing table is DESIGN.md's, applied in `process_view` from the resolved view.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import TYPE_CHECKING

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings as django_settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase

from flyfn.conf import FlyfnSettings, get_settings
from flyfn.pool import ReplayTarget, get_manager
from flyfn.registry import registry
from flyfn.replay import (
    FLY_REPLAY,
    FLY_REPLAY_FAILED,
    FLY_REPLAY_SRC,
    FlyReplay,
    ReplayFailed,
    ReplayHeaderError,
    ReplaySource,
    sign_state,
    verify_state,
)
from flyfn.runtime import current_role

if TYPE_CHECKING:
    from flyfn.registry import ServerlessView

logger = logging.getLogger("flyfn.middleware")

# What clients are told to wait before retrying a request flyfn could not serve.
RETRY_AFTER_SECONDS = 5
ELSEWHERE = "elsewhere=true"
NO_STORE = "private, no-store"
# The request attribute holding a request's fallback slot, released when its response is made.
_SLOT_ATTR = "_flyfn_fallback_slot"

ViewFunc = Callable[..., object]


class _Decision(Enum):
    RUN = "run"
    REPLAY = "replay"
    ELSEWHERE = "elsewhere"
    FALLBACK = "fallback"


class _Slots:
    """At most `limit` fallbacks of one group at once in this process (threads and tasks alike)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self.active >= self.limit:
                return False
            self.active += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.active -= 1


_slots: dict[tuple[str, int], _Slots] = {}
_slots_lock = threading.Lock()


def fallback_slots(group: str, limit: int) -> _Slots:
    key = (group, limit)
    slots = _slots.get(key)
    if slots is None:
        with _slots_lock:
            slots = _slots.setdefault(key, _Slots(limit))
    return slots


def unavailable() -> HttpResponse:
    """503 with Retry-After: what a request gets when flyfn can neither replay nor run it."""
    return HttpResponse(
        "Service temporarily unavailable, retry shortly.\n",
        status=503,
        content_type="text/plain; charset=utf-8",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Cache-Control": NO_STORE},
    )


def replay_response(value: str) -> HttpResponse:
    """The empty response Fly Proxy acts on; never cached (it is per request, not per URL)."""
    return HttpResponse(b"", headers={FLY_REPLAY: value, "Cache-Control": NO_STORE})


def _body_replayable(request: HttpRequest, limit: int) -> bool:
    """Whether Fly Proxy can replay this body: a known length within the limit (never chunked)."""
    length = request.META.get("CONTENT_LENGTH")
    if not length:
        return "HTTP_TRANSFER_ENCODING" not in request.META
    try:
        return 0 <= int(length) <= limit
    except ValueError:
        return False


class FlyReplayMiddleware:
    """Routes serverless views to their function Machines with `fly-replay`."""

    sync_capable = True
    async_capable = True

    def __init__(
        self,
        get_response: Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]],
    ) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
            # Django adapts process_view to the handler's mode; give it the native async one.
            self.process_view = self._aprocess_view  # type: ignore[method-assign,assignment]

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.async_mode:
            return self.__acall__(request)
        try:
            return self.get_response(request)
        finally:
            _release_slot(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        try:
            return await self.get_response(request)  # type: ignore[no-any-return,misc]
        finally:
            _release_slot(request)

    def process_view(
        self,
        request: HttpRequest,
        view_func: ViewFunc,
        view_args: tuple[object, ...],
        view_kwargs: dict[str, object],
    ) -> HttpResponseBase | None:
        settings = get_settings()
        decision, view = self._decide(request, view_func, settings)
        if decision is not _Decision.REPLAY or view is None:
            return self._respond(request, decision, view, settings)
        manager = get_manager()
        timeout = settings.group(view.group).replay_timeout_seconds
        target = manager.get_target(view.group) or manager.wait_target(view.group, timeout)
        return self._replay_or_fallback(request, view, target, settings)

    async def _aprocess_view(
        self,
        request: HttpRequest,
        view_func: ViewFunc,
        view_args: tuple[object, ...],
        view_kwargs: dict[str, object],
    ) -> HttpResponseBase | None:
        settings = get_settings()
        decision, view = self._decide(request, view_func, settings)
        if decision is not _Decision.REPLAY or view is None:
            return self._respond(request, decision, view, settings)
        manager = get_manager()
        timeout = settings.group(view.group).replay_timeout_seconds
        target = manager.get_target(view.group) or await manager.aget_target(view.group, timeout)
        return self._replay_or_fallback(request, view, target, settings)

    # ------------------------------------------------------------ shared sync helpers (no I/O)

    def _decide(
        self, request: HttpRequest, view_func: ViewFunc, settings: FlyfnSettings
    ) -> tuple[_Decision, ServerlessView | None]:
        role = current_role()
        if role.kind == "local":
            return _Decision.RUN, None
        match = request.resolver_match
        view = registry.lookup(view_func, match.view_name if match is not None else None)
        serverless = view is not None and request.method in view.methods
        if role.kind == "function":
            if view is None or not serverless:
                return _Decision.ELSEWHERE, view
            if view.group == role.group:
                signed = self._validly_signed(request, view, settings)
                return (_Decision.RUN if signed else _Decision.ELSEWHERE), view
        elif view is None or not serverless:
            return _Decision.RUN, view
        # A serverless view to replay: from main, or from a function Machine of another group.
        failed = request.headers.get(FLY_REPLAY_FAILED)
        if failed is not None:
            self._forget_failed_target(view.group, failed)
            return _Decision.FALLBACK, view
        if not _body_replayable(request, settings.replay_body_limit):
            return _Decision.FALLBACK, view
        return _Decision.REPLAY, view

    def _respond(
        self,
        request: HttpRequest,
        decision: _Decision,
        view: ServerlessView | None,
        settings: FlyfnSettings,
    ) -> HttpResponseBase | None:
        if decision is _Decision.ELSEWHERE:
            return replay_response(ELSEWHERE)
        if decision is _Decision.FALLBACK and view is not None:
            return self._fallback(request, view.group, settings)
        return None

    def _replay_or_fallback(
        self,
        request: HttpRequest,
        view: ServerlessView,
        target: ReplayTarget | None,
        settings: FlyfnSettings,
    ) -> HttpResponseBase | None:
        if target is None:
            # The API is down or slow, or the settings lack something: the pool logged it.
            return self._fallback(request, view.group, settings)
        options = settings.group(view.group)
        try:
            state = None
            if settings.sign_replays:
                state = sign_state(
                    django_settings.SECRET_KEY, request.method or "GET", request.path, view.group
                )
            replay = FlyReplay(
                instance=target.instance,
                app=target.app,
                timeout=options.replay_timeout,
                fallback="force_self",
                state=state,
            )
        except ValueError as exc:  # e.g. a Machine id the header cannot carry: never a 500
            logger.error("flyfn: cannot build a replay for group %r: %s", view.group, exc)
            return self._fallback(request, view.group, settings)
        return replay_response(replay.to_header())

    def _fallback(
        self, request: HttpRequest, group: str, settings: FlyfnSettings
    ) -> HttpResponseBase | None:
        """The group's fallback: run here (bounded per process) or 503."""
        options = settings.group(group)
        # A function Machine only falls back for another group's view (its own group's views run
        # or bounce before this): it never runs that view, whatever headers a client forges.
        if options.fallback != "local" or current_role().kind == "function":
            return unavailable()
        slots = fallback_slots(group, options.fallback_concurrency)
        if not slots.acquire():
            return unavailable()
        setattr(request, _SLOT_ATTR, slots)
        return None

    def _validly_signed(
        self, request: HttpRequest, view: ServerlessView, settings: FlyfnSettings
    ) -> bool:
        if not settings.sign_replays:
            return True
        source = request.headers.get(FLY_REPLAY_SRC)
        if not source:
            return False
        try:
            state = ReplaySource.parse(source).state
        except ReplayHeaderError:
            return False
        return bool(
            verify_state(
                state,
                django_settings.SECRET_KEY,
                request.method or "GET",
                request.path,
                view.group,
                max_age=settings.group(view.group).state_max_age,
                fallback_secrets=django_settings.SECRET_KEY_FALLBACKS,
            )
        )

    def _forget_failed_target(self, group: str, header: str) -> None:
        """A Machine named by `fly-replay-failed` leaves the pool's cache at once."""
        try:
            instance = ReplayFailed.parse(header).instance
        except ReplayHeaderError:
            return
        if instance:
            get_manager().forget(group, instance)


def _release_slot(request: HttpRequest) -> None:
    slots = request.__dict__.pop(_SLOT_ATTR, None)
    if slots is not None:
        slots.release()
