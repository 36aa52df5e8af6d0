"""FlyReplayMiddleware: decides per request where a view runs (here, replayed, bounced or fallback).

Sync and async capable in the django-cors-headers style: the decision is one shared sync helper with
no network I/O (a replay records itself with one file create, `flyfn.replay_record`); only waiting
for a cold pool differs (blocking wait in the sync path, awaited in the async path). The routing
table (docs/how-it-works.md) is applied in `process_view`, from the resolved view.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings as django_settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, HttpResponseBase, RawPostDataException

from flyfn import events, metrics
from flyfn.conf import FlyfnSettings, SettingsError, get_settings
from flyfn.elastic import Counters, InFlight, in_flight
from flyfn.fly.headers import FLY_REPLAY, FLY_REPLAY_FAILED, FLY_REPLAY_SRC
from flyfn.fly.replay import FlyReplay, ReplayFailed, ReplayHeaderError, ReplaySource
from flyfn.pool import ReplayTarget, get_manager
from flyfn.registry import registry
from flyfn.replay_record import FALLBACK_RETURN_MARGIN, ReplayRecord, machine_record, replay_key
from flyfn.replay_state import STATE_BODY_DIGEST_LIMIT, body_binding, sign_state, verify_state
from flyfn.runtime import current_env, current_role

if TYPE_CHECKING:
    from flyfn.registry import ServerlessView

logger = logging.getLogger("flyfn.middleware")

# What clients are told to wait before retrying a request flyfn could not serve.
RETRY_AFTER_SECONDS = 5
# A request a function Machine sends on (Fly Proxy balances again, excluding it); should that fail,
# Fly Proxy brings it back here with `fly-replay-failed` and an ordinary view runs here after all.
ELSEWHERE = "elsewhere=true;fallback=force_self"
# Seconds an ordinary request that a Machine sent to a function Machine waits for the app's list
# (a function Machine just booted), before it runs there rather than wait longer.
ORDINARY_WAIT = 5.0


@functools.lru_cache(maxsize=64)
def _to_instance(machine_id: str) -> str:
    """The header sending a request to one app Machine (unsigned: it signs and routes it)."""
    return FlyReplay(instance=machine_id, fallback="force_self").to_header()


NO_STORE = "private, no-store"
# The request attribute holding a request's fallback slot, released when its response is made.
_SLOT_ATTR = "_flyfn_fallback_slot"
# The request attribute holding a function Machine's in-flight count of its group, released when
# the response is closed (after its last byte, for a streaming response too).
_INFLIGHT_ATTR = "_flyfn_in_flight"
# Replay headers kept prebuilt (without their state), by target and timeout: Machines come and go.
_MAX_PLANS = 1024
# The META keys of Fly Proxy's request headers (request.headers would build a dict per request).
_META_REPLAY_SRC = "HTTP_" + FLY_REPLAY_SRC.upper().replace("-", "_")
_META_REPLAY_FAILED = "HTTP_" + FLY_REPLAY_FAILED.upper().replace("-", "_")

ViewFunc = Callable[..., object]
ProcessView = Callable[
    [HttpRequest, ViewFunc, tuple[object, ...], dict[str, object]],
    HttpResponseBase | Awaitable[HttpResponseBase | None] | None,
]


class _Replay(NamedTuple):
    """A serverless request to replay once its group's target is known (sync or async wait)."""

    view: ServerlessView
    settings: FlyfnSettings
    max_wait: float


class _ToAppMachine(NamedTuple):
    """A request a function Machine sends to an app Machine once it knows one (sync or async
    wait for its app's list)."""

    group: str
    bouncer: str
    reason: events.BounceReason
    max_wait: float
    # Without an app Machine it runs here (an ordinary view) rather than answer 503.
    else_here: bool = False


_fallback_slots = Counters()


def fallback_slots(group: str, limit: int) -> InFlight:
    """The process's running local fallbacks of `group` (at most `limit`)."""
    return _fallback_slots.get(group, limit)


def unavailable() -> HttpResponse:
    """503 with Retry-After: what a request gets when flyfn can neither replay nor run it."""
    response = HttpResponse(
        "Service temporarily unavailable, retry shortly.\n",
        status=503,
        content_type="text/plain; charset=utf-8",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Cache-Control": NO_STORE},
    )
    # flyfn logs the cause once per failure burst; without this, django.request would log every
    # one of these 503s at ERROR (and mail ADMINS per request). Django's own flag for it.
    response._has_been_logged = True  # type: ignore[attr-defined]
    return response


def replay_response(value: str) -> HttpResponse:
    """The empty response Fly Proxy acts on; never cached (it is per request, not per URL)."""
    return HttpResponse(b"", headers={FLY_REPLAY: value, "Cache-Control": NO_STORE})


@dataclass(frozen=True, slots=True)
class _Plan:
    """A replay header to one target, prebuilt: `head + state + tail`, or `unsigned`."""

    head: str
    tail: str
    unsigned: str


@functools.lru_cache(maxsize=_MAX_PLANS)
def _plan(instance: str | None, app: str | None, timeout: str) -> _Plan:
    """The replay header to a target without its state: built and validated once, not per
    request (it is the same for every request to that target)."""
    replay = FlyReplay(instance=instance, app=app, timeout=timeout, fallback="force_self")
    head, tail = replay.to_header_around_state()
    return _Plan(head, tail, replay.to_header())


def _request_body_binding(request: HttpRequest) -> str:
    """What a signed state binds of this request's body (`body_binding`): its digest when small,
    else its declared length. The app Machine and the function Machine compute it alike."""
    length = request.META.get("CONTENT_LENGTH")
    if not length:  # the usual replayed request (GET): no body to read
        return ""
    try:
        size = int(length)
    except ValueError:
        return "?"  # never what an app Machine signs: it does not replay such a request
    if size > STATE_BODY_DIGEST_LIMIT:
        return body_binding(size)
    try:
        return body_binding(size, request.body)
    except (RequestDataTooBig, RawPostDataException):
        # DATA_UPLOAD_MAX_MEMORY_SIZE below the body, or a middleware before this one already
        # streamed it: the length is all there is (and the same on both sides).
        return body_binding(size)


def _replayable_body(meta: Mapping[str, Any], limit: int) -> bool:
    """Whether Fly Proxy can replay this request's body (none, or a small declared one)."""
    if meta.get("CONTENT_LENGTH") or "HTTP_TRANSFER_ENCODING" in meta:
        return _body_replayable(meta, limit)
    return True


def _bounceable(meta: Mapping[str, Any], limit: int) -> bool:
    """Whether a function Machine may send a request on with `elsewhere=true`: Fly Proxy can
    replay its body, it is not already a fallback (which cannot be replayed again), and no Machine
    sent it here (`fly-replay-src`): `elsewhere` leaves out only the Machine that bounces, so
    function Machines bouncing a request among themselves would reach Fly's replay limit (PA02)."""
    if _META_REPLAY_FAILED in meta or _META_REPLAY_SRC in meta:
        return False
    return _replayable_body(meta, limit)


# A replayed request whose state does not verify is logged at most once per this many seconds.
_UNVERIFIED_LOG_INTERVAL = 60.0
_unverified_logged_at = float("-inf")


def _report_unverified(group: str, reason: str | None) -> None:
    global _unverified_logged_at
    now = time.monotonic()
    if now - _unverified_logged_at < _UNVERIFIED_LOG_INTERVAL:
        return
    _unverified_logged_at = now
    logger.warning(
        "flyfn: a replayed request of group %r carries a state this Machine cannot verify (%s): "
        "answered 503 with Retry-After. After a SECRET_KEY rotation this lasts until the app "
        "Machines update this Machine (logged once a minute at most).",
        group,
        reason,
    )


def _replay_record() -> ReplayRecord:
    """This Machine's record of issued replays (shared by its worker processes; in-process off
    Fly): a `fly-replay-failed` is only believed for one of its entries, once."""
    return machine_record(current_env().machine_id)


def _record_key(request: HttpRequest, body: str) -> str:
    """The record's key of this request (method, path, query string, body binding)."""
    return replay_key(
        django_settings.SECRET_KEY,
        request.method or "GET",
        request.path,
        request.META.get("QUERY_STRING", ""),
        body,
    )


def _record_replay(request: HttpRequest, body: str, timeout: float) -> None:
    """Record a replay of this request being issued: it explains one fallback, for the replay's
    timeout and the way back."""
    _replay_record().add(_record_key(request, body), timeout + FALLBACK_RETURN_MARGIN)


def _explained_fallback(request: HttpRequest) -> bool:
    """Whether a replay this Machine issued explains this `fly-replay-failed` request: one
    unexpired entry of the same method, path, query string and body is consumed (so it explains
    no other). `fly-replay-failed` carries no state, and `fly-request-id` is not relied on (that
    Fly Proxy keeps it across the replay is not confirmed)."""
    return _replay_record().take(_record_key(request, _request_body_binding(request)))


def _body_replayable(meta: Mapping[str, Any], limit: int) -> bool:
    """Whether Fly Proxy can replay a request's body (from its META): a known length within the
    limit (never chunked)."""
    if "HTTP_TRANSFER_ENCODING" in meta:  # chunked (it overrides any Content-Length)
        return False
    length = meta.get("CONTENT_LENGTH")
    if not length:
        return True
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
        _serve_metrics()
        _learn_siblings()
        if self.async_mode:
            markcoroutinefunction(self)

    @property
    def process_view(self) -> ProcessView:
        """Django calls `process_view` in the handler's mode and adapts one of the other mode
        through a thread: each mode gets its own (a cold pool is waited for, or awaited)."""
        return self._aprocess_view if self.async_mode else self._process_view

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.async_mode:
            return self.__acall__(request)
        try:
            response = self.get_response(request)
        except BaseException:
            _release_in_flight_now(request)
            raise
        finally:
            if _SLOT_ATTR in request.__dict__:
                _release_slot(request)
        if _INFLIGHT_ATTR in request.__dict__:
            _release_in_flight_on_close(request, response)  # type: ignore[arg-type]
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        try:
            response: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
        except BaseException:
            _release_in_flight_now(request)
            raise
        finally:
            if _SLOT_ATTR in request.__dict__:
                _release_slot(request)
        if _INFLIGHT_ATTR in request.__dict__:
            _release_in_flight_on_close(request, response)
        return response

    def _process_view(
        self,
        request: HttpRequest,
        view_func: ViewFunc,
        view_args: tuple[object, ...],
        view_kwargs: dict[str, object],
    ) -> HttpResponseBase | None:
        """`process_view` for sync mode: a cold pool's target is waited for (blocking)."""
        routed = self._route(request, view_func)
        if isinstance(routed, _ToAppMachine):
            app_machine = get_manager().wait_app_machine(routed.max_wait)
            return self._send_to_app_machine(routed, app_machine)
        if not isinstance(routed, _Replay):
            return routed
        began = time.monotonic()
        target = get_manager().wait_target(routed.view.group, routed.max_wait)
        events.cold_waited(routed.view.group, time.monotonic() - began, target is not None)
        return self._replay_or_fallback(request, routed.view, target, routed.settings)

    async def _aprocess_view(
        self,
        request: HttpRequest,
        view_func: ViewFunc,
        view_args: tuple[object, ...],
        view_kwargs: dict[str, object],
    ) -> HttpResponseBase | None:
        """`process_view` for async mode: a cold pool's target is awaited, never blocked on."""
        routed = self._route(request, view_func)
        if isinstance(routed, _ToAppMachine):
            app_machine = await get_manager().aget_app_machine(routed.max_wait)
            return self._send_to_app_machine(routed, app_machine)
        if not isinstance(routed, _Replay):
            return routed
        began = time.monotonic()
        target = await get_manager().aget_target(routed.view.group, routed.max_wait)
        events.cold_waited(routed.view.group, time.monotonic() - began, target is not None)
        return self._replay_or_fallback(request, routed.view, target, routed.settings)

    # ------------------------------------------------- shared sync helpers (no network I/O)

    def _route(
        self, request: HttpRequest, view_func: ViewFunc
    ) -> HttpResponseBase | _Replay | _ToAppMachine | None:
        """Where this request's view runs: a response (a replay, a bounce, a 503), None to run
        the view here, or a `_Replay` when the group's pool is cold (the caller waits for it in
        its own mode)."""
        # An ordinary view costs the role check and one registry lookup.
        role = current_role()
        if role.kind == "local":
            return None
        match = request.resolver_match
        view = registry.lookup(view_func, None if match is None else match.view_name)
        if view is None or request.method not in view.methods:
            if role.kind == "main":
                return None
            # Ordinary traffic Fly Proxy balanced onto a function Machine: sent on to another
            # Machine when Fly Proxy can replay it (`elsewhere`; straight to an app Machine when
            # a Machine already sent it here, as `elsewhere` could land on another function
            # Machine again), else it runs here rather than fail.
            meta = request.META
            limit = get_settings().replay_body_limit
            if _bounceable(meta, limit):
                events.bounced(role.group or "", "not_serverless")
                return replay_response(ELSEWHERE)
            if _META_REPLAY_FAILED not in meta and _replayable_body(meta, limit):
                return self._via_app_machine(
                    _ToAppMachine(
                        "", role.group or "", "not_serverless", ORDINARY_WAIT, else_here=True
                    )
                )
            return None
        gate = getattr(view_func, "flyfn_gate", None)
        refused: HttpResponseBase | None = None if gate is None else gate(request)
        if refused is not None:
            return refused  # checked before any replay (an unsigned task wake: flyfn.tasks.wake)
        settings = get_settings()
        if role.kind == "function":
            if view.group == role.group:
                return self._own_view(request, view, settings)
            # Another group's view that Fly Proxy balanced here: an app Machine routes it, with
            # the group's fallback if its Machines fail (a function Machine has none to offer).
            return self._to_app_machines(
                request, view.group, settings, "other_group", bouncer=role.group or ""
            )
        # A serverless view to replay: from main, or one a function Machine cannot send on.
        meta = request.META
        failed = meta.get(_META_REPLAY_FAILED)
        if failed is not None:  # Fly Proxy could not deliver the replay
            if not _explained_fallback(request):
                # No replay of this request that this Machine issued lately and that no other
                # fallback explained: a client's own header (or a second one for one replay).
                # Never a reason to run the view here, nor to drop a Machine from the pool.
                events.fell_back(view.group, "untrusted_failure", "unavailable")
                return unavailable()
            self._forget_failed_target(view.group, failed)
            return self._fallback(request, view.group, settings, "replay_failed")
        # Most replayed requests (GET) have no body: only one that has is looked at closely.
        has_body = meta.get("CONTENT_LENGTH") or "HTTP_TRANSFER_ENCODING" in meta
        if has_body and not _body_replayable(meta, settings.replay_body_limit):
            return self._fallback(request, view.group, settings, "body")
        target = get_manager().get_target(view.group)  # warm: cached, no I/O
        if target is not None:
            return self._replay(request, view.group, target, settings)
        return _Replay(view, settings, settings.group(view.group).replay_timeout_seconds)

    def _replay_or_fallback(
        self,
        request: HttpRequest,
        view: ServerlessView,
        target: ReplayTarget | None,
        settings: FlyfnSettings,
    ) -> HttpResponseBase | None:
        """After waiting for a cold pool: the replay, or the fallback when no target came."""
        if target is None:
            # The API is down or slow, or the settings lack something: the pool logged it.
            return self._fallback(request, view.group, settings, "no_machine")
        return self._replay(request, view.group, target, settings)

    def _replay(
        self, request: HttpRequest, group: str, target: ReplayTarget, settings: FlyfnSettings
    ) -> HttpResponseBase | None:
        """The fly-replay response sending this request to `target`, its state signed now."""
        second = int(time.time())
        body = _request_body_binding(request)
        try:
            header = self._header(settings, group, target, request, body, second)
        except ValueError as exc:  # e.g. a Machine id the header cannot carry: never a 500
            logger.error("flyfn: cannot build a replay for group %r: %s", group, exc)
            return self._fallback(request, group, settings, "header")
        _record_replay(request, body, settings.group(group).replay_timeout_seconds)
        events.replayed(group, target.instance, target.app)
        return replay_response(header)

    def _header(
        self,
        settings: FlyfnSettings,
        group: str,
        target: ReplayTarget,
        request: HttpRequest,
        body: str,
        second: int,
        hop: int = 0,
    ) -> str:
        """The replay header to `target` for this request (`body`: its body binding), its state
        (if signed) issued at `second`, `hop` function Machines far."""
        plan = _plan(target.instance, target.app, settings.group(group).replay_timeout)
        if not settings.sign_replays:
            return plan.unsigned
        state = sign_state(
            django_settings.SECRET_KEY,
            request.method or "GET",
            request.path,
            group,
            second,
            query=request.META.get("QUERY_STRING", ""),
            body=body,
            hop=hop,
        )
        return plan.head + state + plan.tail

    def _fallback(
        self,
        request: HttpRequest,
        group: str,
        settings: FlyfnSettings,
        reason: events.FallbackReason,
    ) -> HttpResponseBase | None:
        """The group's fallback for `reason`: run here (bounded per process) or 503."""
        options = settings.group(group)
        # A function Machine only falls back for another group's view (its own group's views run
        # or bounce before this): it never runs that view, whatever headers a client forges.
        if options.fallback != "local" or current_role().kind == "function":
            events.fell_back(group, reason, "unavailable")
            return unavailable()
        slots = fallback_slots(group, options.fallback_concurrency)
        if not slots.acquire():
            events.fell_back(group, reason, "unavailable")
            return unavailable()
        setattr(request, _SLOT_ATTR, slots)
        events.fell_back(group, reason, "local")
        return None

    def _own_view(
        self, request: HttpRequest, view: ServerlessView, settings: FlyfnSettings
    ) -> HttpResponseBase | _ToAppMachine | None:
        """A function Machine's own group's view: run if an app Machine replayed it (a valid
        state); a replay whose state does not verify ends here with a 503, never bounced back into
        the proxy (it would only come back); anything else is sent on, or refused when it cannot
        be."""
        if not settings.sign_replays:
            return None
        meta = request.META
        source = meta.get(_META_REPLAY_SRC)
        if source:
            try:
                state = ReplaySource.parse(source).state
            except ReplayHeaderError:
                state = ""  # unreadable: treated as a state that does not verify
            if state is not None:
                check = verify_state(
                    state,
                    django_settings.SECRET_KEY,
                    request.method or "GET",
                    request.path,
                    view.group,
                    max_age=settings.group(view.group).state_max_age,
                    fallback_secrets=django_settings.SECRET_KEY_FALLBACKS,
                    query=meta.get("QUERY_STRING", ""),
                    body=_request_body_binding(request),
                )
                if check:
                    return self._run_or_send_on(request, view, settings, check.hop)
                events.state_rejected(view.group, check.reason or "invalid")
                _report_unverified(view.group, check.reason)
                return unavailable()
        failed = meta.get(_META_REPLAY_FAILED)
        concurrency = settings.group(view.group).concurrency
        if failed is not None and concurrency is not None and _explained_fallback(request):
            # A replay this Machine sent on could not be delivered (the next Machine is at its
            # hard limit, or gone): Fly Proxy brought it back, so it runs here.
            self._forget_failed_target(view.group, failed)
            events.fell_back(view.group, "replay_failed", "local")
            counter = in_flight(view.group, concurrency.soft_limit)
            counter.hold()
            setattr(request, _INFLIGHT_ATTR, counter)
            return None
        # Not replayed by an app Machine (a client Fly Proxy balanced here, or another Machine's
        # bounce): the app Machines replay it properly. Never run unsigned.
        return self._to_app_machines(request, view.group, settings, "unsigned", view.group)

    def _to_app_machines(
        self,
        request: HttpRequest,
        group: str,
        settings: FlyfnSettings,
        reason: events.BounceReason,
        bouncer: str,
    ) -> HttpResponseBase | _ToAppMachine | None:
        """A serverless view a function Machine may not run (not its group's, or not replayed by
        an app Machine) goes to the app Machines, which sign and route it: `elsewhere` when no
        Machine sent it here yet, else straight to an app Machine (bounced `elsewhere` again it
        could go round the function Machines until Fly's replay limit). A function Machine never
        signs it itself (it may hold a stale key, and it would sign for a stranger) nor changes
        the group's Machines. When it cannot go (a fallback, which cannot be replayed; no app
        Machine known once the app's list came, waited for as a cold pool is) the answer is a 503
        with `Retry-After`; a body Fly Proxy cannot replay at all runs here when it is another
        group's view, as any other view would. `bouncer`: the group a bounce is an event of."""
        meta = request.META
        limit = settings.replay_body_limit
        if _bounceable(meta, limit):
            events.bounced(bouncer, reason)
            return replay_response(ELSEWHERE)
        replayable = _replayable_body(meta, limit)
        if replayable and _META_REPLAY_FAILED not in meta:
            return self._via_app_machine(
                _ToAppMachine(group, bouncer, reason, settings.group(group).replay_timeout_seconds)
            )
        if not replayable and reason == "other_group":
            return None  # it can go nowhere: it runs here rather than fail
        why: events.FallbackReason = "no_machine"
        if reason == "unsigned":
            why = "unsigned"
        elif _META_REPLAY_FAILED in meta:
            why = "untrusted_failure"  # a function Machine never falls back for another group
        events.fell_back(group, why, "unavailable")
        return unavailable()

    def _via_app_machine(self, routed: _ToAppMachine) -> HttpResponseBase | _ToAppMachine | None:
        """Send `routed` to a known app Machine now, or hand it back for the caller to wait for
        the app's list in its own mode (sync or async)."""
        app_machine = get_manager().app_machine()
        if app_machine is None:
            return routed
        return self._send_to_app_machine(routed, app_machine)

    def _send_to_app_machine(
        self, routed: _ToAppMachine, app_machine: str | None
    ) -> HttpResponseBase | None:
        """The replay to `app_machine`; when none is known (or its id cannot be sent), None (run
        here) for an ordinary view, else a 503."""
        if app_machine is not None:
            try:
                header = _to_instance(app_machine)
            except ValueError as exc:  # a Machine id the header cannot carry
                logger.error("flyfn: cannot send a request of group %r on: %s", routed.group, exc)
            else:
                events.bounced(routed.bouncer, routed.reason)
                return replay_response(header)
        if routed.else_here:
            return None
        why: events.FallbackReason = "unsigned" if routed.reason == "unsigned" else "no_machine"
        events.fell_back(routed.group, why, "unavailable")
        return unavailable()

    def _run_or_send_on(
        self, request: HttpRequest, view: ServerlessView, settings: FlyfnSettings, hop: int
    ) -> HttpResponseBase | None:
        """A verified replay of this Machine's group: run here (None) while fewer than the soft
        limit of the group's requests are in flight in this process, else send it on to another
        Machine of the group (`flyfn.elastic`); it runs here when there is none to send it to.
        Without a `concurrency` setting it just runs here, uncounted."""
        concurrency = settings.group(view.group).concurrency
        if concurrency is None:
            return None
        counter = in_flight(view.group, concurrency.soft_limit)
        if counter.acquire():
            setattr(request, _INFLIGHT_ATTR, counter)
            return None
        if settings.group(view.group).strategy == "instance":
            spill = get_manager().spill(view.group, current_env().machine_id, hop)  # cached
            if spill is not None:
                try:
                    return self._send_on(request, view.group, settings, spill.machine_id, spill.hop)
                except ValueError as exc:  # a Machine id the header cannot carry: run here
                    logger.error("flyfn: cannot send a replay of group %r on: %s", view.group, exc)
        counter.hold()
        setattr(request, _INFLIGHT_ATTR, counter)
        return None

    def _send_on(
        self, request: HttpRequest, group: str, settings: FlyfnSettings, machine_id: str, hop: int
    ) -> HttpResponseBase:
        """The replay sending this request on to `machine_id`, its state signed `hop` hops far;
        should it fail, Fly Proxy brings it back here with `fly-replay-failed`."""
        second = int(time.time())
        target = ReplayTarget(instance=machine_id)
        body = _request_body_binding(request)
        header = self._header(settings, group, target, request, body, second, hop)
        _record_replay(request, body, settings.group(group).replay_timeout_seconds)
        events.replayed(group, machine_id, None)
        return replay_response(header)

    def _forget_failed_target(self, group: str, header: str) -> None:
        """A Machine named by `fly-replay-failed` leaves the pool's cache at once."""
        try:
            instance = ReplayFailed.parse(header).instance
        except ReplayHeaderError:
            return
        if instance:
            get_manager().forget(group, instance)


def _serve_metrics() -> None:
    """Metrics are served by web processes only: this runs when a handler loads its middleware,
    never for management commands."""
    try:
        settings = get_settings()
    except SettingsError:
        return  # the system checks report it; requests will fail with the same message
    if settings.metrics_port is not None:
        metrics.serve(settings.metrics_port, settings.metrics_address)


def _learn_siblings() -> None:
    """A function Machine of the `instance` strategy lists its app as it boots (one call, shared
    by its worker processes): its siblings, so that a burst reaching it cold can be sent on, and
    the app Machines, where it sends what is not its to run."""
    role = current_role()
    if role.kind != "function" or role.group is None:
        return
    try:
        options = get_settings().group(role.group)
    except SettingsError:
        return
    if options.strategy == "instance":
        get_manager().refresh(role.group)


def _release_in_flight_on_close(request: HttpRequest, response: HttpResponseBase) -> None:
    """The request leaves the in-flight count when its response is closed: after the server sent
    its last byte (a streaming response's too), or at once for a response that is not an object
    Django closes."""
    counter: InFlight | None = request.__dict__.pop(_INFLIGHT_ATTR, None)
    if counter is None:
        return
    closers = getattr(response, "_resource_closers", None)
    if isinstance(closers, list):
        closers.append(counter.release)
    else:
        counter.release()


def _release_in_flight_now(request: HttpRequest) -> None:
    counter: InFlight | None = request.__dict__.pop(_INFLIGHT_ATTR, None)
    if counter is not None:
        counter.release()


def _release_slot(request: HttpRequest) -> None:
    slots = request.__dict__.pop(_SLOT_ATTR, None)
    if slots is not None:
        slots.release()
