"""How a group's Machines are chosen: which ones a pool keeps, which ones the app Machines replay
to, which one each request gets, where a busy function Machine sends a replay on, and in which
order a caller tries the regions of a multi-region group.

The one file to change (or to give `PoolManager` another `MachineChoice`) to choose Machines
differently, after FLAME's `Pool.Strategy`. Pure decisions: no I/O, no state of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

from flyfn.elastic import SiblingReplay, sibling_target
from flyfn.fly.regions import nearest_first
from flyfn.machines import Machine

if TYPE_CHECKING:
    from flyfn.pool.spec import PoolSpec

__all__ = ["RANK_ORDER", "MachineChoice", "RankOrder", "ReplayTarget"]


class ReplayTarget(NamedTuple):
    """Where a replay goes: one Machine (`instance` strategy) or an app (`app` strategy)."""

    instance: str | None = None
    app: str | None = None


class MachineChoice(Protocol):
    """The decisions a pool leaves to its choice of Machines."""

    def rank(self, machines: Iterable[Machine]) -> list[Machine]:
        """The group's Machines in rank order: a pool keeps the first `count` of them and destroys
        the rest. Every process must agree on it (it may only read what the API lists)."""
        ...

    def targets(self, spec: PoolSpec, members: Sequence[str]) -> tuple[ReplayTarget, ...]:
        """Where the app Machines replay the group's requests, given its Machine ids in rank order
        (none: the group has no Machine yet)."""
        ...

    def pick(self, targets: Sequence[ReplayTarget], turn: int) -> ReplayTarget:
        """The target of one request; `turn` counts the pool's requests. `targets` is not empty."""
        ...

    def sibling(self, members: Sequence[str], me: str | None, hop: int) -> SiblingReplay | None:
        """Where a function Machine at its soft limit sends on a replay that came `hop` hops far
        (`me` is its own Machine id, `members` the group's ids in rank order), or None to run it
        here."""
        ...

    def order_regions(self, origin: str, regions: Iterable[str]) -> list[str]:
        """The order in which a caller in `origin` tries the pools of `regions` (a group's
        listed regions, or those it fails over to): the first is its home."""
        ...


class RankOrder:
    """flyfn's choice: Machines ranked by name (fixed at creation), the first `entries` of them as
    targets in turn, and elastic groups replaying along the rank order (`flyfn.elastic`)."""

    def rank(self, machines: Iterable[Machine]) -> list[Machine]:
        # Names are fixed at creation, so every process agrees on which Machines to keep.
        return sorted(machines, key=lambda m: (m.name or "", m.id))

    def targets(self, spec: PoolSpec, members: Sequence[str]) -> tuple[ReplayTarget, ...]:
        if not members:
            return ()
        if spec.strategy == "app":
            return (ReplayTarget(app=spec.app),)  # Fly Proxy balances over the app's Machines
        return tuple(ReplayTarget(instance=m) for m in members[: spec.entries or len(members)])

    def pick(self, targets: Sequence[ReplayTarget], turn: int) -> ReplayTarget:
        return targets[turn % len(targets)]

    def sibling(self, members: Sequence[str], me: str | None, hop: int) -> SiblingReplay | None:
        return sibling_target(members, me, hop)

    def order_regions(self, origin: str, regions: Iterable[str]) -> list[str]:
        # Nearest first by great-circle distance: the least latency added to a request.
        return nearest_first(origin, regions)


RANK_ORDER = RankOrder()
