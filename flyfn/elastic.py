"""Elastic `instance` groups: where a function Machine at its soft limit replays a request to
(docs/elastic-groups.md); its count of requests in flight is `flyfn.in_flight`.

Only for groups with a `concurrency` setting (without one, function Machines run whatever they
get, as before). The app Machines replay a group's requests to its first Machine(s) in rank order.
A function Machine runs a replay while fewer than the soft limit of its group's requests are in
flight in its process; at the limit it replays the request to the next Machine in rank order (Fly
Proxy starts it if it is stopped), with a freshly signed state one hop further (a `SiblingReplay`;
`flyfn.routing` decides when). After `sibling_hops` hops (every Machine of the group, at most
`MAX_SIBLING_HOPS`) the group is saturated: the last Machine replays it to a random other Machine
with the "run here" hop, so the overflow spreads evenly instead of piling up on the last one. Pure
decisions and counters only: no I/O.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "MAX_SIBLING_HOPS",
    "SiblingReplay",
    "sibling_hops",
    "sibling_target",
]

# Fly Proxy follows at most 10 replays per request. One brings a request to its group (two when a
# function Machine of another group sent it elsewhere, to an app Machine, first), and the "run
# here" hop takes one: at most 7 are left for the chain.
MAX_SIBLING_HOPS = 7


class SiblingReplay(NamedTuple):
    """The sibling a busy function Machine replays a request to, and the hop count of the new
    state."""

    machine_id: str
    hop: int


def sibling_hops(members: int) -> int:
    """How many times a request is replayed along a group of `members` Machines before the "run
    here" hop: once to each other Machine, at most `MAX_SIBLING_HOPS`."""
    return min(max(members - 1, 0), MAX_SIBLING_HOPS)


def sibling_target(
    members: Sequence[str], me: str | None, hop: int, rng: random.Random | None = None
) -> SiblingReplay | None:
    """Where a function Machine at its soft limit replays a request that came `hop` hops far, or
    None to run it here.

    `members` are the group's Machine ids in rank order. Below `sibling_hops`: the next Machine in
    rank order (wrapping). At it: a random other Machine, with the "run here" hop
    (`sibling_hops + 1`). Beyond it, alone, or not a known member: run here.
    """
    if me is None or me not in members or len(members) < 2:
        return None
    last = sibling_hops(len(members))
    if hop > last:
        return None
    if hop < last:
        return SiblingReplay(members[(members.index(me) + 1) % len(members)], hop + 1)
    others = [m for m in members if m != me]
    return SiblingReplay((rng or random).choice(others), last + 1)
