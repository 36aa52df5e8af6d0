"""Fly Proxy's choice of a Machine for one request: the load-balancing decision, pure (no I/O).

What Fly documents (fly.io/docs `reference/load-balancing`, `apps/concurrency`,
`reference/fly-proxy-autostop-autostart`), and what `choose` does:

- Every Machine of the app with a service on the request's public port is a candidate, whatever
  created it: Fly Launch Machines and Machines created through the API (function Machines of the
  `instance` strategy, old-image ones too) alike.
- Load is seen in three bands per Machine, from its service's `concurrency`: below `soft_limit`;
  at or above it (used only when every other Machine is too); at or above `hard_limit` (no new
  traffic). Defaults when absent: type `connections`, `soft_limit` 20, no `hard_limit`.
- Least loaded, closest first (the proxy's own region before others, which are used only when
  every local Machine is full, nearest region first); ties are broken at random.
- Started Machines first; a stopped or suspended one is autostarted (service `autostart` not
  false) when every started one is at its soft limit.

The proxy counts load as the requests it is delivering to (or waiting to deliver to) a Machine,
for both concurrency types: each HTTP request is one upstream connection or request.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from flyfn.fly.regions import distance_km
from flyfn.machines.models import Machine, MachineService

__all__ = [
    "DEFAULT_CONCURRENCY_TYPE",
    "DEFAULT_HARD_LIMIT",
    "DEFAULT_SOFT_LIMIT",
    "Candidate",
    "Limits",
    "Readiness",
    "candidate",
    "choose",
    "limits_of",
    "service_on_port",
]

# Fly's defaults when a service has no `concurrency` (fly.io/docs/apps/concurrency: "a soft_limit
# of 20 and no hard_limit"; older pages said hard_limit 25, the current one says none).
DEFAULT_CONCURRENCY_TYPE = "connections"
DEFAULT_SOFT_LIMIT = 20
DEFAULT_HARD_LIMIT: int | None = None

_STARTED = "started"
_WAKING_STATES = frozenset({"creating", "starting", "restarting", "updating", "replacing"})
# Fly Proxy autostarts only these: a Machine stopping or suspending (its stop may be autostop's),
# or failed, is in a "non-startable state" for a request (PM08) and is no candidate.
_STARTABLE_STATES = frozenset({"created", "stopped", "suspended"})


class Readiness(IntEnum):
    """How soon a Machine can take the request (lower is sooner)."""

    READY = 0  # started, its process answering
    WAKING = 1  # on its way to started (or started and its process not seen yet)
    STARTABLE = 2  # stopped or suspended, and autostart allows starting it


@dataclass(frozen=True)
class Limits:
    """A service's concurrency: `hard` None means no hard limit."""

    kind: str = DEFAULT_CONCURRENCY_TYPE
    soft: int = DEFAULT_SOFT_LIMIT
    hard: int | None = DEFAULT_HARD_LIMIT

    def band(self, load: int) -> int:
        """0 below the soft limit, 1 at or above it, 2 at or above the hard limit (full)."""
        if self.hard is not None and load >= self.hard:
            return 2
        return 1 if load >= self.soft else 0


@dataclass(frozen=True)
class Candidate:
    """One Machine as the balancer sees it."""

    machine_id: str
    readiness: Readiness
    load: int
    limits: Limits
    local: bool  # in the proxy's own region
    distance: float = 0.0  # km from the proxy's region (inf: not known)

    @property
    def band(self) -> int:
        return self.limits.band(self.load)


def service_on_port(machine: Machine, port: int) -> MachineService | None:
    """The Machine's service that publishes `port` (80 for http, 443 for https), if any."""
    services = (machine.config.services if machine.config is not None else None) or []
    for service in services:
        for entry in service.ports or []:
            if entry.port == port:
                return service
            start, end = entry.start_port, entry.end_port
            if start is not None and end is not None and start <= port <= end:
                return service
    return None


def limits_of(service: MachineService) -> Limits:
    """The service's concurrency limits, with Fly's defaults for what it leaves out."""
    concurrency = service.concurrency
    if concurrency is None:
        return Limits()
    soft = concurrency.soft_limit if concurrency.soft_limit else DEFAULT_SOFT_LIMIT
    hard = concurrency.hard_limit if concurrency.hard_limit else DEFAULT_HARD_LIMIT
    return Limits(kind=concurrency.type or DEFAULT_CONCURRENCY_TYPE, soft=soft, hard=hard)


def candidate(
    machine: Machine, *, port: int, load: int, answering: bool, region: str
) -> Candidate | None:
    """The Machine as a candidate for traffic on `port`, or None when it cannot take any (no
    service on the port, gone, or stopped with autostart off). `answering`: its process is up."""
    service = service_on_port(machine, port)
    if service is None:
        return None
    state = machine.state or ""
    if state == _STARTED:
        readiness = Readiness.READY if answering else Readiness.WAKING
    elif state in _WAKING_STATES:
        readiness = Readiness.WAKING
    elif state in _STARTABLE_STATES and _autostarts(machine, service):
        readiness = Readiness.STARTABLE
    else:
        return None
    return Candidate(
        machine_id=machine.id,
        readiness=readiness,
        load=load,
        limits=limits_of(service),
        local=(machine.region or region) == region,
        distance=_distance(region, machine.region or region),
    )


def _distance(here: str, there: str) -> float:
    km = distance_km(here, there)
    return float("inf") if km is None else km


def _autostarts(machine: Machine, service: MachineService) -> bool:
    config = machine.config
    if config is not None and config.disable_machine_autostart:
        return False
    # Absent means on, as for Fly Launch apps (auto_start_machines defaults to true).
    return service.autostart is not False


def choose(
    candidates: Iterable[Candidate],
    *,
    prefer: str | None = None,
    rng: random.Random | None = None,
) -> Candidate | None:
    """The Machine Fly Proxy would send the request to, or None when every candidate is at its
    hard limit (the request waits) or there is none.

    Order: the preferred Machine (`prefer_instance`) when it is not full; then local Machines
    before others; within them, running ones below their soft limit (started before waking),
    then a stopped one to autostart, then running ones at their soft limit; ties at random.
    """
    pick = rng if rng is not None else random
    usable = [c for c in candidates if c.band < 2]
    if prefer is not None:
        for c in usable:
            if c.machine_id == prefer:
                return c

    def tier(c: Candidate) -> int:
        if c.readiness is Readiness.STARTABLE:
            return 1
        return 0 if c.band == 0 else 2

    def rank(c: Candidate) -> tuple[int, float, int, int, float]:
        ready = 0 if c.readiness is Readiness.READY else 1
        return (0 if c.local else 1, c.distance, tier(c), ready, pick.random())

    return min(usable, key=rank, default=None)
