"""Fly Proxy's balancing decision (`flyfn.emulator.proxy.balancer`), without a proxy: which
Machine a request goes to, by service port, concurrency bands, readiness and region."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from flyfn.emulator.proxy.balancer import (
    DEFAULT_HARD_LIMIT,
    DEFAULT_SOFT_LIMIT,
    Candidate,
    Limits,
    Readiness,
    candidate,
    choose,
    limits_of,
)
from flyfn.machines.models import (
    Machine,
    MachineConfig,
    MachinePort,
    MachineService,
    MachineServiceConcurrency,
)


def one(
    machine_id: str,
    readiness: Readiness = Readiness.READY,
    load: int = 0,
    *,
    soft: int = 20,
    hard: int | None = None,
    local: bool = True,
) -> Candidate:
    return Candidate(machine_id, readiness, load, Limits(soft=soft, hard=hard), local)


def machine(
    state: str = "started",
    *,
    ports: list[MachinePort] | None = None,
    autostart: bool | None = True,
    concurrency: MachineServiceConcurrency | None = None,
    region: str = "local",
) -> Machine:
    service = MachineService(
        internal_port=8000,
        autostart=autostart,
        ports=ports if ports is not None else [MachinePort(port=80), MachinePort(port=443)],
        concurrency=concurrency,
    )
    config = MachineConfig(image="img", services=[service])
    return Machine(id="m1", state=state, region=region, config=config)


def test_flys_defaults_are_a_soft_limit_of_20_and_no_hard_limit() -> None:
    assert (DEFAULT_SOFT_LIMIT, DEFAULT_HARD_LIMIT) == (20, None)
    limits = limits_of(MachineService(internal_port=8000))
    assert (limits.kind, limits.soft, limits.hard) == ("connections", 20, None)
    assert limits.band(10_000) == 1  # never full without a hard limit
    given = MachineServiceConcurrency(type="requests", soft_limit=5, hard_limit=8)
    assert limits_of(MachineService(concurrency=given)) == Limits("requests", 5, 8)
    assert [Limits(soft=5, hard=8).band(n) for n in (4, 5, 7, 8, 9)] == [0, 1, 1, 2, 2]


def test_only_machines_with_a_service_on_the_port_are_candidates() -> None:
    assert candidate(machine(), port=80, load=0, answering=True, region="local") is not None
    assert candidate(machine(), port=8080, load=0, answering=True, region="local") is None
    ranged = machine(ports=[MachinePort(start_port=70, end_port=90)])
    assert candidate(ranged, port=80, load=0, answering=True, region="local") is not None
    assert candidate(machine(ports=[]), port=80, load=0, answering=True, region="local") is None
    bare = Machine(id="m2", state="started", config=MachineConfig(image="img"))
    assert candidate(bare, port=80, load=0, answering=True, region="local") is None


@pytest.mark.parametrize(
    ("state", "answering", "autostart", "readiness"),
    [
        ("started", True, True, Readiness.READY),
        ("started", False, True, Readiness.WAKING),
        ("starting", False, True, Readiness.WAKING),
        ("creating", False, True, Readiness.WAKING),
        ("stopped", False, True, Readiness.STARTABLE),
        ("suspended", False, None, Readiness.STARTABLE),  # absent autostart means on
        ("stopped", False, False, None),
        ("destroyed", False, True, None),
    ],
)
def test_readiness_follows_state_process_and_autostart(
    state: str, answering: bool, autostart: bool | None, readiness: Readiness | None
) -> None:
    found = candidate(
        machine(state, autostart=autostart), port=80, load=0, answering=answering, region="local"
    )
    assert (found.readiness if found is not None else None) == readiness


def test_started_below_the_soft_limit_beats_starting_a_stopped_one() -> None:
    started, stopped = one("a", load=19), one("b", Readiness.STARTABLE)
    assert choose([stopped, started]) == started


def test_a_stopped_one_is_started_once_every_started_one_is_at_its_soft_limit() -> None:
    a, b = one("a", load=20), one("b", load=25)
    stopped = one("c", Readiness.STARTABLE)
    assert choose([a, b, stopped]) == stopped
    # With nothing to start, Machines at their soft limit still take traffic.
    assert choose([a, b]) in (a, b)


def test_machines_at_their_hard_limit_get_nothing() -> None:
    full = one("a", load=2, soft=1, hard=2)
    assert choose([full]) is None
    room = one("b", load=1, soft=1, hard=2)
    assert choose([full, room]) == room


def test_local_machines_first_until_they_are_full() -> None:
    local_busy = one("a", load=30)
    remote_idle = one("b", local=False)
    assert choose([remote_idle, local_busy]) == local_busy
    local_full = one("a", load=3, soft=1, hard=3)
    assert choose([remote_idle, local_full]) == remote_idle


def test_started_before_waking_at_the_same_load() -> None:
    waking, ready = one("a", Readiness.WAKING), one("b")
    assert choose([waking, ready]) == ready


def test_the_preferred_machine_wins_unless_full() -> None:
    a, b = one("a"), one("b", Readiness.STARTABLE)
    assert choose([a, b], prefer="b") == b
    full = one("b", load=1, soft=1, hard=1)
    assert choose([a, full], prefer="b") == a


def test_ties_are_broken_at_random_over_every_candidate() -> None:
    rng = random.Random(7)
    machines = [one(name) for name in "abcd"]
    counts = Counter(choose(machines, rng=rng).machine_id for _ in range(400))  # type: ignore[union-attr]
    assert set(counts) == set("abcd")
    assert min(counts.values()) > 50  # far from any one being favoured
