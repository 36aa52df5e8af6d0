"""FlyReplayMiddleware: gathers a request's routing facts once (`flyfn.request_facts`), asks
`flyfn.routing.decide` where its view runs, and carries out that one action on Django's public API.

Sync and async capable in the django-cors-headers style: gathering and carrying out are shared sync
helpers with no network I/O (a replay records itself with one file write, `flyfn.replay_record`);
only looking up a target on a cold cache differs (a blocking wait in the sync path, awaited in the
async path). A request that runs here holding a place (its group's in-flight count, or a fallback
slot) holds it until its response is closed: after its last byte, a streaming response's too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

from flyfn import events, metrics, process_state
from flyfn.answers import ELSEWHERE, replay_plan, replay_response, to_app_machine, unavailable
from flyfn.conf import SettingsError, get_settings
from flyfn.in_flight import Counters, InFlight, in_flight
from flyfn.machine_metrics import MachineTimeCollector
from flyfn.machine_role import current_role
from flyfn.pool.manager import get_manager
from flyfn.request_facts import RoutedRequest, ViewFunc, await_target, gather, wait_target
from flyfn.routing import (
    UNKNOWN,
    UNUSABLE,
    Action,
    FallBack,
    FindTarget,
    Refuse,
    Replay,
    RunHere,
    SendElsewhere,
    Target,
    decide,
)
from flyfn.serving import serving_started
from flyfn.signed_requests import issue_replay, report_unverified, request_body_binding

logger = logging.getLogger("flyfn.middleware")

# The request attribute holding the place a request that runs here holds (its group's in-flight
# count, or a fallback slot), released when its response is closed.
__all__ = ["FlyReplayMiddleware"]

_HOLD_ATTR = "_flyfn_hold"

ProcessView = Callable[
    [HttpRequest, ViewFunc, tuple[object, ...], dict[str, object]],
    HttpResponseBase | Awaitable[HttpResponseBase | None] | None,
]

_fallback_slots = Counters()
process_state.register(__name__, "local fallback slots per group")


def fallback_slots(group: str, limit: int) -> InFlight:
    """The process's running local fallbacks of `group` (at most `limit`)."""
    return _fallback_slots.get(group, limit)


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
        _serve_metrics()
        _learn_siblings()
        serving_started.send(sender=FlyReplayMiddleware)
        if self.async_mode:
            markcoroutinefunction(self)

    @property
    def process_view(self) -> ProcessView:
        """Django calls `process_view` in the handler's mode and adapts one of the other mode
        through a thread: each mode gets its own (a cold cache is waited for, or awaited)."""
        return self._aprocess_view if self.async_mode else self._process_view

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.async_mode:
            return self.__acall__(request)
        try:
            response = self.get_response(request)
        except BaseException:
            _release_now(request)
            raise
        if _HOLD_ATTR in request.__dict__:
            _release_on_close(request, response)  # type: ignore[arg-type]
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        try:
            response: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
        except BaseException:
            _release_now(request)
            raise
        if _HOLD_ATTR in request.__dict__:
            _release_on_close(request, response)
        return response

    def _process_view(
        self,
        request: HttpRequest,
        view_func: ViewFunc,
        view_args: tuple[object, ...],
        view_kwargs: dict[str, object],
    ) -> HttpResponseBase | None:
        """`process_view` for sync mode: a cold cache's target is waited for (blocking)."""
        routed = gather(request, view_func)
        if not isinstance(routed, RoutedRequest):
            return routed
        action = routed.action
        if isinstance(action, FindTarget):
            target = routed.cached(action)
            if target is UNKNOWN:
                target = wait_target(routed, action)
            action = decide(routed.facts, target)
        return _carry_out(routed, action)

    async def _aprocess_view(
        self,
        request: HttpRequest,
        view_func: ViewFunc,
        view_args: tuple[object, ...],
        view_kwargs: dict[str, object],
    ) -> HttpResponseBase | None:
        """`process_view` for async mode: a cold cache's target is awaited, never blocked on."""
        routed = gather(request, view_func)
        if not isinstance(routed, RoutedRequest):
            return routed
        action = routed.action
        if isinstance(action, FindTarget):
            target = routed.cached(action)
            if target is UNKNOWN:
                target = await await_target(routed, action)
            action = decide(routed.facts, target)
        return _carry_out(routed, action)


def _carry_out(routed: RoutedRequest, action: Action) -> HttpResponseBase | None:
    """The response for `action`, or None to run the view here."""
    counter, routed.counter = routed.counter, None
    if isinstance(action, RunHere):
        if action.in_flight:
            _hold(routed, counter or _in_flight(routed), taken=counter is not None)
        return None
    if counter is not None:  # a place taken for a request that does not run here
        counter.release()
    try:
        if isinstance(action, Replay):
            return _replay(routed, action.target)
        if isinstance(action, SendElsewhere):
            header = ELSEWHERE if action.instance is None else to_app_machine(action.instance)
            events.bounced(routed.role.group or "", action.reason)
            return replay_response(header)
    except ValueError as exc:  # a Machine id the header cannot carry: never a 500
        logger.error("flyfn: cannot build a replay for group %r: %s", routed.group, exc)
        return _carry_out(routed, decide(routed.facts, UNUSABLE))
    if isinstance(action, FallBack):
        return _fall_back(routed, action)
    if isinstance(action, Refuse):
        if action.reason == "state_rejected":
            reason = None if routed.check is None else routed.check.reason
            events.state_rejected(routed.group, reason or "invalid")
            report_unverified(routed.group, reason)
        else:
            events.fell_back(routed.group, action.reason, "unavailable")
        return unavailable(routed.request)
    raise RuntimeError(f"flyfn: decide asked for a target twice ({action})")


def _replay(routed: RoutedRequest, target: Target) -> HttpResponseBase:
    """The replay to `target`, its state signed now, put on this Machine's record."""
    request, options = routed.request, routed.options
    plan = replay_plan(target.instance, target.app, options.replay_timeout)
    body = request_body_binding(request)
    timeout, signed = options.replay_timeout_seconds, routed.settings.sign_replays
    state = issue_replay(request, routed.group, body, target.hop, timeout, signed=signed)
    header = plan.unsigned if state is None else plan.head + state + plan.tail
    events.replayed(routed.group, target.instance, target.app)
    return replay_response(header)


def _fall_back(routed: RoutedRequest, action: FallBack) -> HttpResponseBase | None:
    """Run here as the group's fallback, holding a place, or a 503 when none is free."""
    if action.in_flight:
        _hold(routed, _in_flight(routed), taken=False)
    else:
        slots = fallback_slots(routed.group, routed.options.fallback_concurrency)
        if not slots.acquire():
            events.fell_back(routed.group, action.reason, "unavailable")
            return unavailable(routed.request)
        _hold(routed, slots, taken=True)
    events.fell_back(routed.group, action.reason, "local")
    return None


def _hold(routed: RoutedRequest, place: InFlight, *, taken: bool) -> None:
    """The request holds `place` until its response is closed (`taken`: already counted)."""
    if not taken:
        place.hold()  # it runs here whatever the load
    setattr(routed.request, _HOLD_ATTR, place)


def _in_flight(routed: RoutedRequest) -> InFlight:
    concurrency = routed.options.concurrency
    assert concurrency is not None  # decide counts a request only for an `elastic` group
    return in_flight(routed.group, concurrency.soft_limit)


def _serve_metrics() -> None:
    """Metrics are served by web processes only: this runs when a handler loads its middleware,
    never for management commands."""
    try:
        settings = get_settings()
    except SettingsError:
        return  # the system checks report it; requests will fail with the same message
    if settings.metrics_port is not None:
        metrics.serve(settings.metrics_port, settings.metrics_address, extra=MachineTimeCollector())


def _learn_siblings() -> None:
    """A function Machine of the `instance` strategy lists its app as it boots (one call, shared
    by its worker processes): its siblings, so that a burst reaching it cold can be replayed on,
    and the app Machines, where it sends what is not its to run."""
    role = current_role()
    if role.kind != "function" or role.group is None:
        return
    try:
        options = get_settings().group(role.group)
    except SettingsError:
        return
    if options.strategy == "instance":
        get_manager().refresh(role.group)


def _release_on_close(request: HttpRequest, response: HttpResponseBase) -> None:
    """The request's place is released when its response is closed (servers and Django's
    handlers call `close()` after the last byte, a streaming response's too), or at once for a
    response that is not Django's."""
    place: InFlight | None = request.__dict__.pop(_HOLD_ATTR, None)
    if place is None:
        return
    if not isinstance(response, HttpResponseBase):
        place.release()
        return
    close = response.close
    released = False

    def close_and_release() -> None:
        nonlocal released
        try:
            close()
        finally:
            if not released:  # a response may be closed twice
                released = True
                place.release()

    response.close = close_and_release  # type: ignore[method-assign]


def _release_now(request: HttpRequest) -> None:
    place: InFlight | None = request.__dict__.pop(_HOLD_ATTR, None)
    if place is not None:
        place.release()
