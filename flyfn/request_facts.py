"""A request's routing facts (`flyfn.routing.Facts`), gathered once for the middleware: from the
role, the registry, the settings, Fly Proxy's headers, the state check, the group's in-flight count,
this Machine's record of replays, and a target from the pools' caches when `decide` asks for one
(waited for on a cold cache, in the caller's mode)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from django.http import HttpRequest, HttpResponseBase

from flyfn import events, process_state
from flyfn.conf import FlyfnSettings, get_settings
from flyfn.fly.headers import FLY_REPLAY_FAILED, FLY_REPLAY_SRC
from flyfn.fly.replay import ReplayFailed, ReplayHeaderError
from flyfn.group_settings import GroupSettings
from flyfn.in_flight import InFlight, in_flight
from flyfn.machine_role import Role, current_env, current_role
from flyfn.pool.manager import get_manager
from flyfn.registry import registry
from flyfn.replay_state import StateCheck
from flyfn.routing import (
    UNKNOWN,
    Action,
    Facts,
    FindTarget,
    Lookup,
    Target,
    Verdict,
    decide,
    reads_explained,
    replayable_body,
)
from flyfn.signed_requests import explained_fallback, request_body_binding, request_state

__all__ = ["RoutedRequest", "ViewFunc", "await_target", "gather", "wait_target"]

# The META keys of Fly Proxy's request headers (request.headers would build a dict per request).
_META_REPLAY_SRC = "HTTP_" + FLY_REPLAY_SRC.upper().replace("-", "_")
_META_REPLAY_FAILED = "HTTP_" + FLY_REPLAY_FAILED.upper().replace("-", "_")

ViewFunc = Callable[..., object]


@dataclass(slots=True)
class RoutedRequest:
    """One request being routed: its facts, and what carrying out its action needs."""

    request: HttpRequest
    role: Role
    group: str  # the view's group ("" for an ordinary view)
    settings: FlyfnSettings
    options: GroupSettings  # the group's settings (the defaults for an ordinary view)
    facts: Facts
    check: StateCheck | None  # the state check of a function Machine's own view
    # The group's in-flight count, when a place below its soft limit was taken for this request.
    counter: InFlight | None
    action: Action  # decide's answer to `facts` before any target is looked up

    def cached(self, find: FindTarget) -> Target | Lookup | None:
        """The target from the caches (no I/O); UNKNOWN when a cold cache is to be waited for."""
        manager = get_manager()
        if find.kind == "sibling":
            hop = 0 if self.check is None else self.check.hop
            sibling = manager.sibling(self.group, self.facts.me, hop)
            return None if sibling is None else Target(sibling.machine_id, hop=sibling.hop)
        if find.kind == "group":
            target = manager.get_target(self.group)
            return UNKNOWN if target is None else Target(target.instance, target.app)
        machine = manager.app_machine()
        return UNKNOWN if machine is None else Target(machine)


def _max_wait(routed: RoutedRequest, find: FindTarget) -> float:
    """How long `find` waits on a cold cache: its own wait, else the group's replay timeout."""
    return routed.options.replay_timeout_seconds if find.max_wait is None else find.max_wait


def wait_target(routed: RoutedRequest, find: FindTarget) -> Target | None:
    """A cold cache's target, waited for at most `_max_wait` seconds (sync)."""
    manager, max_wait = get_manager(), _max_wait(routed, find)
    if find.kind == "app_machine":
        machine = manager.wait_app_machine(max_wait)
        return None if machine is None else Target(machine)
    began = time.monotonic()
    target = manager.wait_target(routed.group, max_wait)
    events.cold_waited(routed.group, time.monotonic() - began, target is not None)
    return None if target is None else Target(target.instance, target.app)


async def await_target(routed: RoutedRequest, find: FindTarget) -> Target | None:
    """`wait_target` for async mode: the event loop is never blocked."""
    manager, max_wait = get_manager(), _max_wait(routed, find)
    if find.kind == "app_machine":
        machine = await manager.aget_app_machine(max_wait)
        return None if machine is None else Target(machine)
    began = time.monotonic()
    target = await manager.aget_target(routed.group, max_wait)
    events.cold_waited(routed.group, time.monotonic() - began, target is not None)
    return None if target is None else Target(target.instance, target.app)


def gather(request: HttpRequest, view_func: ViewFunc) -> RoutedRequest | HttpResponseBase | None:
    """The request's facts; None when its view runs here without more (decide's answer for any
    request off Fly, and for an ordinary view on an app Machine: the pass-through's whole cost is
    the role and one registry lookup); a response when the view's own gate refuses it."""
    role = current_role()
    if role.kind == "local":
        return None
    match = request.resolver_match
    view = registry.lookup(view_func, None if match is None else match.view_name)
    serverless = view is not None and request.method in view.methods
    if not serverless and role.kind == "main":
        return None
    gate = getattr(view_func, "flyfn_gate", None) if serverless else None
    refused: HttpResponseBase | None = None if gate is None else gate(request)
    if refused is not None:
        return refused  # checked before any replay (an unsigned task wake: flyfn.tasks.wake)
    settings = get_settings()
    meta = request.META
    group = view.group if view is not None and serverless else ""
    options = settings.group(group)
    made = _view_facts(settings, options, role, group, serverless)
    check: StateCheck | None = None
    counter: InFlight | None = None
    source = meta.get(_META_REPLAY_SRC)
    failed = meta.get(_META_REPLAY_FAILED)
    body_replayable = replayable_body(meta, settings.replay_body_limit)
    if source is None and failed is None and body_replayable:
        facts, action = made.facts, made.action  # the common request: no body, no header
    else:
        verdict: Verdict = "absent"
        if made.facts.own_group and made.facts.signing and source:
            body = request_body_binding(request)
            check = request_state(request, source, group, options.state_max_age, body)
            if check is not None:
                verdict = "verified" if check else "rejected"
        below = False
        if verdict == "verified" and options.concurrency is not None:
            counter = in_flight(group, options.concurrency.soft_limit)
            below = counter.acquire()
            if not below:
                counter = None
        facts, action = made.variant(
            body_replayable, source is not None, failed is not None, verdict, below
        )
    if failed is not None and reads_explained(facts):
        # Consumes the issued replay's one entry on the record: gathered only when decided on.
        explained = explained_fallback(request, request_body_binding(request))
        if explained:
            _forget_failed_target(group, failed)
        facts = facts._replace(explained=explained)
        action = decide(facts)
    return RoutedRequest(request, role, group, settings, options, facts, check, counter, action)


class _ViewFacts:
    """The facts of a request for one view's group in this process (its settings, role and
    Machine) and decide's answer to them (it is pure: the same facts, the same action): for the
    common request (no body, no Fly Proxy header), and per combination of a request's own."""

    __slots__ = ("action", "facts", "settings", "variants")

    def __init__(self, settings: FlyfnSettings, facts: Facts) -> None:
        self.settings = settings
        self.facts = facts
        self.action = decide(facts)
        self.variants: dict[tuple[bool, bool, bool, Verdict, bool], tuple[Facts, Action]] = {}

    def variant(
        self,
        body_replayable: bool,
        sent_by_machine: bool,
        replay_failed: bool,
        verdict: Verdict,
        below_soft_limit: bool,
    ) -> tuple[Facts, Action]:
        """The facts of a request with a body or a Fly Proxy header, and decide's answer."""
        key = (body_replayable, sent_by_machine, replay_failed, verdict, below_soft_limit)
        made = self.variants.get(key)
        if made is None:
            facts = self.facts._replace(
                body_replayable=body_replayable,
                sent_by_machine=sent_by_machine,
                replay_failed=replay_failed,
                verdict=verdict,
                below_soft_limit=below_soft_limit,
            )
            made = self.variants.setdefault(key, (facts, decide(facts)))
        return made


# Made once per settings object (the keys are few: roles, Machines and groups).
_view_facts_made: dict[tuple[str, str | None, str | None, str, bool], _ViewFacts] = {}
process_state.register(__name__, "request facts made per view and settings")


def _view_facts(
    settings: FlyfnSettings, options: GroupSettings, role: Role, group: str, serverless: bool
) -> _ViewFacts:
    """The facts of requests for `group`'s view (serverless or not) in this process."""
    me = current_env().machine_id
    key = (role.kind, role.group, me, group, serverless)  # not `role`: its hash is Python code
    made = _view_facts_made.get(key)
    if made is not None and made.settings is settings:
        return made
    facts = Facts(
        role.kind,
        serverless=serverless,
        own_group=serverless and group == role.group,  # only on a function Machine of that group
        signing=settings.sign_replays,
        local_fallback=options.fallback == "local",
        elastic=options.concurrency is not None,
        replays_on=options.strategy == "instance",
        me=me,
    )
    made = _view_facts_made[key] = _ViewFacts(settings, facts)
    return made


def _forget_failed_target(group: str, header: str) -> None:
    """A Machine named by `fly-replay-failed` leaves the pool's cache at once."""
    try:
        instance = ReplayFailed.parse(header).instance
    except ReplayHeaderError:
        return
    if instance:
        get_manager().forget(group, instance)
