"""The routing decision (`flyfn.routing.decide`): its invariants on every combination of facts, and
the routing table (docs/how-it-works.md) as named rows."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flyfn.machine_role import RoleKind
from flyfn.routing import (
    ORDINARY_WAIT,
    Action,
    Facts,
    FallBack,
    FindTarget,
    Lookup,
    Refuse,
    Replay,
    RunHere,
    SendElsewhere,
    Target,
    Verdict,
    decide,
    reads_explained,
    replayable_body,
)

ME = "me0000000000ab"
OTHER = "ot0000000000cd"
TARGETS: tuple[Target | Lookup | None, ...] = (
    Lookup.UNKNOWN,
    Lookup.UNUSABLE,
    None,
    Target(ME),
    Target(OTHER),
    Target(OTHER, hop=2),
    Target(app="fn-app"),
)
ACTIONS = (RunHere, Replay, SendElsewhere, FallBack, Refuse, FindTarget)


ROLES: tuple[RoleKind, ...] = ("local", "main", "function")
VERDICTS: tuple[Verdict, ...] = ("absent", "verified", "rejected")


def every_facts() -> Iterator[Facts]:
    """Every combination of facts a request can have (a state's verdict only for a request a
    Machine sent, a place below the soft limit only for a verified replay of an elastic group)."""
    for role, verdict, me in itertools.product(ROLES, VERDICTS, (ME, None)):
        for flags in itertools.product((False, True), repeat=11):
            (
                serverless,
                own_group,
                signing,
                body_replayable,
                sent_by_machine,
                replay_failed,
                explained,
                local_fallback,
                elastic,
                replays_on,
                below_soft_limit,
            ) = flags
            if own_group and not (serverless and role == "function"):
                continue
            if explained and not replay_failed:
                continue
            if verdict != "absent" and not (sent_by_machine and own_group and signing):
                continue
            if below_soft_limit and not (verdict == "verified" and elastic):
                continue
            yield Facts(
                role,
                serverless=serverless,
                own_group=own_group,
                signing=signing,
                body_replayable=body_replayable,
                sent_by_machine=sent_by_machine,
                replay_failed=replay_failed,
                explained=explained,
                verdict=verdict,
                local_fallback=local_fallback,
                elastic=elastic,
                replays_on=replays_on,
                below_soft_limit=below_soft_limit,
                me=me,
            )


def runs_here(action: Action) -> bool:
    """Whether the view may run on this Machine (a fallback runs it when a slot is free)."""
    return isinstance(action, RunHere | FallBack)


def may_run_here(facts: Facts, target: Target | Lookup | None) -> bool:
    """Whether the view may run here with these facts (with some target, when one is asked)."""
    action = decide(facts, target)
    if isinstance(action, FindTarget):
        return any(runs_here(decide(facts, found)) for found in TARGETS[1:])
    return runs_here(action)


def check_invariants(facts: Facts, target: Target | Lookup | None, action: Action) -> None:
    # Every request is answered: one action, and a target is asked for once, only when unknown.
    assert isinstance(action, ACTIONS)
    if isinstance(action, FindTarget):
        assert target is Lookup.UNKNOWN
        for found in TARGETS[1:]:
            assert not isinstance(decide(facts, found), FindTarget)
    # Never replay or send a request to the Machine deciding.
    if isinstance(action, Replay):
        assert action.target == target
        assert action.target.instance is None or action.target.instance != facts.me
    if isinstance(action, SendElsewhere) and action.instance is not None:
        assert action.instance != facts.me
    # Nothing is replayed or sent on that Fly Proxy cannot replay (a body it cannot hold, or a
    # request it already brought back).
    if isinstance(action, Replay | SendElsewhere):
        assert facts.body_replayable
        assert not facts.replay_failed
    # Only an app Machine (or, within its group, a function Machine with a verified replay)
    # replays; only a function Machine sends elsewhere.
    if isinstance(action, Replay):
        assert facts.role == "main" or facts.verdict == "verified"
    if isinstance(action, SendElsewhere):
        assert facts.role == "function"
    # Never run an unverified replay: a function Machine runs its own group's view for a verified
    # state (or with signing off), or as the fallback of a replay it issued itself.
    if facts.role == "function" and facts.own_group and facts.signing and runs_here(action):
        assert facts.verdict == "verified" or (facts.replay_failed and facts.explained)
    if facts.verdict == "rejected":
        assert action == Refuse("state_rejected")
    # A function Machine never runs another group's view as a fallback.
    if isinstance(action, FallBack) and facts.role == "function":
        assert facts.own_group
        assert action.in_flight
    # A fallback per issued replay: a fly-replay-failed is a fallback's reason only when a replay
    # this Machine issued explains it, and it never makes a serverless view run that would not
    # run without it (an ordinary view brought back from elsewhere, or a verified replay, runs
    # here).
    if isinstance(action, FallBack) and action.reason == "replay_failed":
        assert facts.explained
    unexplained = facts.replay_failed and not facts.explained
    if unexplained and facts.serverless and facts.verdict != "verified" and runs_here(action):
        assert may_run_here(facts._replace(replay_failed=False), target)
    # `explained` is gathered (consuming the replay's entry) only where it is decided on.
    if not reads_explained(facts):
        assert decide(facts._replace(explained=not facts.explained), target) == action
    # The group's fallback of `error` never runs the view.
    if isinstance(action, FallBack) and not action.in_flight:
        assert facts.local_fallback
        assert facts.role == "main"


def test_every_combination_of_facts_keeps_the_invariants() -> None:
    seen: set[type[Action]] = set()
    for facts in every_facts():
        for target in TARGETS:
            action = decide(facts, target)
            check_invariants(facts, target, action)
            seen.add(type(action))
    assert seen == set(ACTIONS)  # every kind of action was checked


def test_explained_is_gathered_exactly_where_some_decision_reads_it() -> None:
    # Gathering it consumes the issued replay's entry: never for nothing (the converse, that an
    # unread `explained` changes no decision, is one of the invariants above).
    for facts in every_facts():
        if reads_explained(facts):
            flipped = facts._replace(explained=not facts.explained)
            assert any(decide(facts, t) != decide(flipped, t) for t in TARGETS), facts


def test_off_fly_and_ordinary_views_on_an_app_machine_run_here() -> None:
    # The middleware skips gathering facts for these (the pass-through's cost): decide agrees.
    for facts in every_facts():
        if facts.role == "local" or (facts.role == "main" and not facts.serverless):
            assert all(decide(facts, target) == RunHere() for target in TARGETS)


MAIN = Facts("main", serverless=True, me=ME)
FUNCTION = Facts("function", me=ME)
OWN = FUNCTION._replace(serverless=True, own_group=True, sent_by_machine=True)
VERIFIED = OWN._replace(verdict="verified")
ELASTIC = VERIFIED._replace(elastic=True, replays_on=True)
OTHER_GROUP = FUNCTION._replace(serverless=True)

ROWS: list[tuple[str, Facts, Target | Lookup | None, Action]] = [
    ("local: runs here", Facts("local", serverless=True), Lookup.UNKNOWN, RunHere()),
    ("main, ordinary view: runs here", MAIN._replace(serverless=False), Lookup.UNKNOWN, RunHere()),
    ("main: asks for the group's target", MAIN, Lookup.UNKNOWN, FindTarget("group")),
    ("main: replays to it", MAIN, Target(OTHER), Replay(Target(OTHER))),
    ("main: replays to the function app", MAIN, Target(app="a"), Replay(Target(app="a"))),
    ("main: no Machine, local fallback", MAIN, None, FallBack("no_machine")),
    ("main: never replays to itself", MAIN, Target(ME), FallBack("no_machine")),
    ("main: no Machine, error fallback", MAIN._replace(local_fallback=False), None,
     Refuse("no_machine")),
    ("main: a target the header cannot carry", MAIN, Lookup.UNUSABLE, FallBack("header")),
    ("main: a body Fly cannot replay", MAIN._replace(body_replayable=False), Lookup.UNKNOWN,
     FallBack("body")),
    ("main: an explained fly-replay-failed", MAIN._replace(replay_failed=True, explained=True),
     Lookup.UNKNOWN, FallBack("replay_failed")),
    ("main: an unexplained fly-replay-failed", MAIN._replace(replay_failed=True),
     Lookup.UNKNOWN, Refuse("untrusted_failure")),
    ("function, ordinary view: sent elsewhere", FUNCTION, Lookup.UNKNOWN,
     SendElsewhere("not_serverless")),
    ("function, ordinary view a Machine sent: asks for an app Machine",
     FUNCTION._replace(sent_by_machine=True), Lookup.UNKNOWN,
     FindTarget("app_machine", ORDINARY_WAIT)),
    ("function, ordinary view a Machine sent: to an app Machine",
     FUNCTION._replace(sent_by_machine=True), Target(OTHER),
     SendElsewhere("not_serverless", OTHER)),
    ("function, ordinary view a Machine sent, no app Machine: runs here",
     FUNCTION._replace(sent_by_machine=True), None, RunHere()),
    ("function, ordinary view with a body Fly cannot replay: runs here",
     FUNCTION._replace(body_replayable=False), Lookup.UNKNOWN, RunHere()),
    ("function, ordinary view, fly-replay-failed: runs here",
     FUNCTION._replace(replay_failed=True), Lookup.UNKNOWN, RunHere()),
    ("function, another group's view: sent elsewhere", OTHER_GROUP, Lookup.UNKNOWN,
     SendElsewhere("other_group")),
    ("function, another group's view a Machine sent: asks for an app Machine",
     OTHER_GROUP._replace(sent_by_machine=True), Lookup.UNKNOWN,
     FindTarget("app_machine")),
    ("function, another group's view a Machine sent, no app Machine: 503",
     OTHER_GROUP._replace(sent_by_machine=True), None, Refuse("no_machine")),
    ("function, another group's view with a body Fly cannot replay: runs here",
     OTHER_GROUP._replace(body_replayable=False), Lookup.UNKNOWN, RunHere()),
    ("function, another group's view, fly-replay-failed: 503",
     OTHER_GROUP._replace(replay_failed=True, explained=True), Lookup.UNKNOWN,
     Refuse("untrusted_failure")),
    ("function, own view, verified: runs here", VERIFIED, Lookup.UNKNOWN, RunHere()),
    ("function, own view, signing off: runs here",
     OWN._replace(signing=False, sent_by_machine=False), Lookup.UNKNOWN, RunHere()),
    ("function, own view, rejected state: 503", OWN._replace(verdict="rejected"),
     Lookup.UNKNOWN, Refuse("state_rejected")),
    ("function, own view without a state: sent elsewhere", OWN._replace(sent_by_machine=False),
     Lookup.UNKNOWN, SendElsewhere("unsigned")),
    ("function, own view a Machine sent without a state: to an app Machine", OWN,
     Target(OTHER), SendElsewhere("unsigned", OTHER)),
    ("function, own view a Machine sent without a state, no app Machine: 503", OWN, None,
     Refuse("unsigned")),
    ("function, own view, never sent to itself", OWN, Target(ME), Refuse("unsigned")),
    ("function, own view without a state, body Fly cannot replay: 503",
     OWN._replace(sent_by_machine=False, body_replayable=False), Lookup.UNKNOWN,
     Refuse("unsigned")),
    ("elastic: below the soft limit, runs here counted",
     ELASTIC._replace(below_soft_limit=True), Lookup.UNKNOWN, RunHere(in_flight=True)),
    ("elastic: at the soft limit, asks for a sibling", ELASTIC, Lookup.UNKNOWN,
     FindTarget("sibling")),
    ("elastic: at the soft limit, replays to the sibling", ELASTIC, Target(OTHER, hop=1),
     Replay(Target(OTHER, hop=1))),
    ("elastic: no sibling, runs here counted", ELASTIC, None, RunHere(in_flight=True)),
    ("elastic: never replays to itself", ELASTIC, Target(ME), RunHere(in_flight=True)),
    ("elastic: a sibling the header cannot carry, runs here counted", ELASTIC, Lookup.UNUSABLE,
     RunHere(in_flight=True)),
    ("elastic, app strategy: runs here counted", ELASTIC._replace(replays_on=False),
     Lookup.UNKNOWN, RunHere(in_flight=True)),
    ("elastic: an explained fly-replay-failed of its own replay runs here counted",
     ELASTIC._replace(verdict="absent", sent_by_machine=False, replay_failed=True,
                      explained=True),
     Lookup.UNKNOWN, FallBack("replay_failed", in_flight=True)),
    ("elastic: an unexplained fly-replay-failed: 503",
     ELASTIC._replace(verdict="absent", sent_by_machine=False, replay_failed=True),
     Lookup.UNKNOWN, Refuse("unsigned")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("facts", "target", "expected"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS]
)
def test_the_routing_table(facts: Facts, target: Target | Lookup | None, expected: Action) -> None:
    assert decide(facts, target) == expected


def test_a_body_is_replayable_when_absent_or_declared_within_the_limit() -> None:
    assert replayable_body({}, 10)
    assert replayable_body({"CONTENT_LENGTH": ""}, 10)
    assert replayable_body({"CONTENT_LENGTH": "0"}, 10)
    assert replayable_body({"CONTENT_LENGTH": "10"}, 10)
    assert not replayable_body({"CONTENT_LENGTH": "11"}, 10)
    assert not replayable_body({"CONTENT_LENGTH": "-1"}, 10)
    assert not replayable_body({"CONTENT_LENGTH": "ten"}, 10)
    assert not replayable_body({"HTTP_TRANSFER_ENCODING": "chunked"}, 10)
    assert not replayable_body({"CONTENT_LENGTH": "1", "HTTP_TRANSFER_ENCODING": "chunked"}, 10)


@pytest.mark.e2e  # a fresh interpreter: a process
def test_the_decision_imports_no_django() -> None:
    code = "import sys, flyfn.routing; print(sorted(m for m in sys.modules if 'django' in m))"
    root = Path(__file__).resolve().parents[1]  # this checkout's flyfn, whatever is installed
    env = {**os.environ, "PYTHONPATH": str(root)}
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root, env=env
    ).stdout
    assert shown.strip() == "[]"
