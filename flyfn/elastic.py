"""Elastic `instance` groups: a function Machine's count of its group's requests in flight, and
where it replays a request to once it is at its soft limit (docs/elastic-groups.md).

Only for groups with a `concurrency` setting (without one, function Machines run whatever they
get, as before). The app Machines replay a group's requests to its first Machine(s) in rank order.
A function Machine runs a replay while fewer than the soft limit of its group's requests are in
flight in its process; at the limit it replays the request to the next Machine in rank order (Fly
Proxy starts it if it is stopped), with a freshly signed state one hop further (a `Spill`;
`flyfn.routing` decides when). After `spill_hops` hops (every Machine of the group, at most
`MAX_SPILL_HOPS`) the group is saturated: the last Machine replays it to a random other Machine
with the "run here" hop, so the overflow spreads evenly instead of piling up on the last one. Pure
decisions and counters only: no I/O.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "MAX_SPILL_HOPS",
    "Counters",
    "InFlight",
    "Spill",
    "in_flight",
    "spill_hops",
    "spill_target",
]

# Fly Proxy follows at most 10 replays per request. One brings a request to its group (two when a
# function Machine of another group sent it elsewhere, to an app Machine, first), and the "run
# here" hop takes one: at most 7 are left for the chain.
MAX_SPILL_HOPS = 7


class InFlight:
    """Requests of one group running in this process (threads and tasks alike): `acquire` below
    the limit, `hold` regardless, `release` when the response is done (closed, streaming ones
    included). Also the middleware's bound on local fallbacks."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        """Count one more request if fewer than `limit` are in flight; False at the limit."""
        with self._lock:
            if self.active >= self.limit:
                return False
            self.active += 1
            return True

    def hold(self) -> None:
        """Count one more request whatever the load (it runs here anyway)."""
        with self._lock:
            self.active += 1

    def release(self) -> None:
        with self._lock:
            self.active -= 1


class Counters:
    """One `InFlight` per group and limit, made once per process (a lock only to make one)."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, int], InFlight] = {}
        self._lock = threading.Lock()

    def get(self, group: str, limit: int) -> InFlight:
        key = (group, limit)
        counter = self._counters.get(key)
        if counter is None:
            with self._lock:
                counter = self._counters.setdefault(key, InFlight(limit))
        return counter


_in_flight = Counters()


def in_flight(group: str, limit: int) -> InFlight:
    """The process's in-flight counter of `group` (one per group and soft limit)."""
    return _in_flight.get(group, limit)


class Spill(NamedTuple):
    """The sibling a busy function Machine replays a request to, and the hop count of the new
    state."""

    machine_id: str
    hop: int


def spill_hops(members: int) -> int:
    """How many times a request is replayed along a group of `members` Machines before the "run
    here" hop: once to each other Machine, at most `MAX_SPILL_HOPS`."""
    return min(max(members - 1, 0), MAX_SPILL_HOPS)


def spill_target(
    members: Sequence[str], me: str | None, hop: int, rng: random.Random | None = None
) -> Spill | None:
    """Where a function Machine at its soft limit replays a request that came `hop` hops far, or
    None to run it here.

    `members` are the group's Machine ids in rank order. Below `spill_hops`: the next Machine in
    rank order (wrapping). At it: a random other Machine, with the "run here" hop
    (`spill_hops + 1`). Beyond it, alone, or not a known member: run here.
    """
    if me is None or me not in members or len(members) < 2:
        return None
    last = spill_hops(len(members))
    if hop > last:
        return None
    if hop < last:
        return Spill(members[(members.index(me) + 1) % len(members)], hop + 1)
    others = [m for m in members if m != me]
    return Spill((rng or random).choice(others), last + 1)
