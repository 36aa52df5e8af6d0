"""Where a request's view runs: `decide(facts) -> action`, the routing table as a pure function.

The middleware (`flyfn.middleware`) gathers a request's `Facts` once and carries out the one
`Action` this returns; nothing here reads Django, the environment, the pools or a clock. The table
(docs/how-it-works.md, ARCHITECTURE.md) and its invariants are tested exhaustively in
`tests/test_routing_decision.py`:

- every request is answered: run here, or a response (a replay, a send elsewhere, a 503);
- an unverified replay never runs a function Machine's own view;
- nothing is replayed or sent to the Machine deciding (`Facts.me`);
- a `fly-replay-failed` runs a view only when a replay this Machine issued explains it.

One vocabulary: an app Machine (or a busy function Machine, within its group) **replays** a
request to a function Machine, with a signed state; a function Machine **sends elsewhere** what is
not its to run (`elsewhere=true`, or straight to an app Machine), unsigned, for the app Machines
to route. Fly Proxy's `elsewhere=true` names the act; the documented event is still `bounce`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from flyfn.events import BounceReason, FallbackReason
from flyfn.machine_role import RoleKind

__all__ = [
    "ORDINARY_WAIT",
    "UNKNOWN",
    "UNUSABLE",
    "Action",
    "Facts",
    "FallBack",
    "FindTarget",
    "Lookup",
    "Refuse",
    "Replay",
    "RunHere",
    "SendElsewhere",
    "Target",
    "Verdict",
    "decide",
    "reads_explained",
    "replayable_body",
]

# Seconds an ordinary request that a Machine sent to a function Machine waits for the app's list
# (a function Machine just booted), before it runs there rather than wait longer.
ORDINARY_WAIT = 5.0

# The state check of a function Machine's own view: no state (no `fly-replay-src`, or one without
# a state), one that verifies, or one that does not (expired, forged, another key).
Verdict = Literal["absent", "verified", "rejected"]
TargetKind = Literal["group", "sibling", "app_machine"]


class Lookup(enum.Enum):
    """A target that is not a Machine: not looked up yet, or one a replay header cannot carry."""

    UNKNOWN = "unknown"
    UNUSABLE = "unusable"


# The sentinels as plain names: an enum member's lookup through its class costs 60 ns a time.
UNKNOWN = Lookup.UNKNOWN
UNUSABLE = Lookup.UNUSABLE


class Target(NamedTuple):
    """Where a request would go: a Machine (`instance`) or a function app (`app`); `hop` is the
    hop count a replay to it signs (a busy function Machine's replay to a sibling)."""

    instance: str | None = None
    app: str | None = None
    hop: int = 0


class Facts(NamedTuple):
    """What the middleware knows of a request, gathered once; the target, which only some
    decisions need, is looked up when `decide` asks for it and given beside these. A named
    tuple, immutable, made and `_replace`d at a third of a frozen dataclass's cost (the request
    path's; `make bench`'s decision ratio)."""

    role: RoleKind
    # The view is serverless for this method (registered, and the method one it replays).
    serverless: bool = False
    # A function Machine's own group's view (the Machine's group is the view's).
    own_group: bool = False
    # SIGN_REPLAYS: replays carry a signed state that function Machines verify.
    signing: bool = True
    # Fly Proxy can replay the body: none, or a declared length within the limit (never chunked).
    body_replayable: bool = True
    # `fly-replay-src` is present: a Machine already sent this request here.
    sent_by_machine: bool = False
    # `fly-replay-failed` is present: Fly Proxy could not deliver a replay and brought it back.
    replay_failed: bool = False
    # A replay this Machine issued explains that `fly-replay-failed` (its one entry consumed).
    explained: bool = False
    verdict: Verdict = "absent"
    # The group's `fallback` is `local` (else `error`: a 503).
    local_fallback: bool = True
    # The group has a `concurrency` setting (a function Machine counts its requests in flight).
    elastic: bool = False
    # The group's strategy is `instance` (a busy function Machine replays to a sibling).
    replays_on: bool = False
    # A function Machine took an in-flight place below the group's soft limit for this request.
    below_soft_limit: bool = False
    # The Machine deciding (None off Fly).
    me: str | None = None


@dataclass(frozen=True, slots=True)
class RunHere:
    """The view runs here; `in_flight`: counted in the group's in-flight requests until the
    response is closed."""

    in_flight: bool = False


@dataclass(frozen=True, slots=True)
class Replay:
    """A replay with a (signed) state to `target`, put on this Machine's record."""

    target: Target


@dataclass(frozen=True, slots=True)
class SendElsewhere:
    """Unsigned, to the app Machines: `elsewhere=true` (`instance` None), or to one app
    Machine. `reason` is the bounce event's."""

    reason: BounceReason
    instance: str | None = None


@dataclass(frozen=True, slots=True)
class FallBack:
    """The group's fallback: run here, bounded by the fallback slots (or, `in_flight`, counted
    with the group's requests); a 503 when no slot is free."""

    reason: FallbackReason
    in_flight: bool = False


@dataclass(frozen=True, slots=True)
class Refuse:
    """A 503 with `Retry-After`: `reason` is the fallback event's, or `state_rejected`."""

    reason: FallbackReason | Literal["state_rejected"]


@dataclass(frozen=True, slots=True)
class FindTarget:
    """Look up a target (`group`: the group's function Machine; `sibling`: the next Machine of a
    busy function Machine's group, never waited for; `app_machine`: an app Machine), waiting at
    most `max_wait` seconds on a cold cache (None: the group's replay timeout), then decide again
    with it."""

    kind: TargetKind
    max_wait: float | None = None


Action = RunHere | Replay | SendElsewhere | FallBack | Refuse | FindTarget

RUN_HERE = RunHere()
RUN_COUNTED = RunHere(in_flight=True)
FIND_GROUP = FindTarget("group")
FIND_SIBLING = FindTarget("sibling")
FIND_APP_MACHINE = FindTarget("app_machine")
FIND_APP_MACHINE_ORDINARY = FindTarget("app_machine", ORDINARY_WAIT)


def replayable_body(meta: Mapping[str, Any], limit: int) -> bool:
    """Whether Fly Proxy can replay a request's body (from its META): none, or a known length
    within `limit` (never chunked, whatever its Content-Length says)."""
    if "HTTP_TRANSFER_ENCODING" in meta:
        return False
    length = meta.get("CONTENT_LENGTH")
    if not length:  # the usual replayed request (GET): no body
        return True
    try:
        return 0 <= int(length) <= limit
    except ValueError:
        return False


def reads_explained(facts: Facts) -> bool:
    """Whether `decide` reads `explained` for these facts. Gathering it consumes the issued
    replay's one entry on this Machine's record (and evicts the Machine `fly-replay-failed`
    names), so the middleware gathers it only then."""
    if not (facts.replay_failed and facts.serverless):
        return False
    if facts.role == "main":
        return True
    own = facts.role == "function" and facts.own_group and facts.signing
    return own and facts.elastic and facts.verdict == "absent"


def decide(facts: Facts, target: Target | Lookup | None = UNKNOWN) -> Action:
    """The one action for a request with these facts (the routing table). `target`: where it
    would go, once looked up (`FindTarget`): a Machine, none, or one a header cannot carry."""
    if facts.role == "local":
        return RUN_HERE
    if not facts.serverless:
        if facts.role == "main":
            return RUN_HERE
        return _send_elsewhere(facts, target, "not_serverless")
    if facts.role == "function":
        if facts.own_group:
            return _own_view(facts, target)
        # Another group's view Fly Proxy balanced here: an app Machine routes it, with the
        # group's fallback if its Machines fail (a function Machine has none to offer).
        return _send_elsewhere(facts, target, "other_group")
    if facts.replay_failed:
        # Believed only for a replay this Machine issued: a client's own header (or a second
        # one for one replay) never runs the view here.
        if not facts.explained:
            return Refuse("untrusted_failure")
        return _fall_back(facts, "replay_failed")
    if not facts.body_replayable:
        return _fall_back(facts, "body")
    if isinstance(target, Target) and not _is_me(facts, target):
        return Replay(target)
    if target is UNKNOWN:
        return FIND_GROUP
    # None, this very Machine, or one a replay header cannot carry.
    return _fall_back(facts, "header" if target is UNUSABLE else "no_machine")


def _own_view(facts: Facts, target: Target | Lookup | None) -> Action:
    """A function Machine's own group's view: it runs for a verified state only; a state that
    does not verify is refused (sent elsewhere it would only come back); without a state it goes
    to the app Machines, which replay it properly."""
    if not facts.signing:
        return RUN_HERE
    if facts.verdict == "verified":
        return _run_or_replay_on(facts, target)
    if facts.verdict == "rejected":
        return Refuse("state_rejected")
    if facts.replay_failed and facts.elastic and facts.explained:
        # A replay this Machine sent to a sibling could not be delivered (the sibling is at its
        # hard limit, or gone): Fly Proxy brought it back, so it runs here.
        return FallBack("replay_failed", in_flight=True)
    return _send_elsewhere(facts, target, "unsigned")


def _run_or_replay_on(facts: Facts, target: Target | Lookup | None) -> Action:
    """A verified replay: run here below the soft limit (or without one); at it, replay it to the
    next Machine of the group (`flyfn.elastic`), or run here when there is none."""
    if not facts.elastic:
        return RUN_HERE
    if facts.below_soft_limit or not facts.replays_on:
        return RUN_COUNTED
    if not facts.body_replayable or facts.replay_failed:
        return RUN_COUNTED  # Fly Proxy could not replay it again
    if target is UNKNOWN:
        return FIND_SIBLING
    if isinstance(target, Target) and not _is_me(facts, target):
        return Replay(target)
    return RUN_COUNTED


def _send_elsewhere(facts: Facts, target: Target | Lookup | None, reason: BounceReason) -> Action:
    """What a function Machine may not run goes to the app Machines, unsigned: `elsewhere` when
    no Machine sent it here yet, else straight to an app Machine (sent `elsewhere` again it could
    go round the function Machines until Fly's replay limit, PA02). A request that cannot go (a
    `fly-replay-failed`, which cannot be replayed again; a body Fly Proxy cannot replay; no app
    Machine known) runs here when it is an ordinary view, or another group's view with a body
    that can go nowhere; else a 503."""
    can_go = facts.body_replayable and not facts.replay_failed
    if can_go and not facts.sent_by_machine:
        return SendElsewhere(reason)
    if can_go:
        if target is UNKNOWN:
            return FIND_APP_MACHINE_ORDINARY if reason == "not_serverless" else FIND_APP_MACHINE
        if isinstance(target, Target) and target.instance and not _is_me(facts, target):
            return SendElsewhere(reason, target.instance)
    if reason == "not_serverless" or (reason == "other_group" and not facts.body_replayable):
        return RUN_HERE
    if reason == "unsigned":
        return Refuse("unsigned")
    return Refuse("untrusted_failure" if facts.replay_failed else "no_machine")


def _fall_back(facts: Facts, reason: FallbackReason) -> Action:
    """The group's fallback: run here when it is `local` (only ever on an app Machine), else a
    503."""
    if facts.local_fallback and facts.role == "main":
        return FallBack(reason)
    return Refuse(reason)


def _is_me(facts: Facts, target: Target) -> bool:
    """Whether `target` is the Machine deciding: a request is never replayed to itself."""
    return target.instance is not None and target.instance == facts.me
