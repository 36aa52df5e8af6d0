"""Where a group's pools are: the region whose pool takes a caller's requests first (its home),
and the regions its requests fail over to, nearest first (the `regions` group option).

Pure: the caller's and the primary region are passed in. A pool region of None is the one pool a
`"shared"` group keeps for the whole app (flyfn before regions, and any group off Fly, where no
region is known).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from flyfn.conf import FlyfnSettings
from flyfn.events import FailoverReason
from flyfn.fly.regions import nearest_first

__all__ = ["Placement", "Route", "placement", "pool_regions", "route"]

PlacementMode = Literal["caller", "primary", "shared", "listed"]


@dataclass(frozen=True, slots=True)
class Placement:
    """A group's `regions` option, its default resolved (task groups live in the primary
    region, near the database their tasks are stored in)."""

    mode: PlacementMode
    listed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    """Where one caller's requests of a group go: `home` first (None: the shared pool), then
    `failover` in order when home has no Machine that can be had; `reason` is set when home is
    not the caller's own region by the group's choice (`not_listed`)."""

    home: str | None
    failover: tuple[str, ...] = ()
    reason: FailoverReason | None = None
    # Whether other regions where the app runs may take the requests too (not for a list).
    open: bool = False


def placement(settings: FlyfnSettings, group: str, *, task_group: bool = False) -> Placement:
    options = settings.group(group)
    regions = options.regions
    if options.region is not None:  # one pool in a fixed region, as before `regions`
        return Placement("shared")
    if regions is None:
        return Placement("primary" if task_group else "caller")
    if isinstance(regions, tuple):
        return Placement("listed", regions)
    return Placement(regions)


def route(
    where: Placement,
    caller: str | None,
    primary: str | None,
    *,
    order: Callable[[str, Iterable[str]], list[str]] = nearest_first,
) -> Route:
    """The route of `caller`'s requests (`primary`: the app's primary region; `order`: the pool
    choice's order of regions, nearest first). A route that follows the caller or the primary
    region is `open`: any region the app runs in may take its requests when home cannot (the
    manager knows those from the app's list). A caller's route names no other region: the primary
    one takes its requests only if app Machines run there (function Machines made there for an
    app that does not run there would serve nobody else, and `gc` would destroy them). Without a
    known caller region (off Fly) every mode but a list is the shared pool."""
    if where.mode == "shared":
        return Route(None)
    if where.mode == "listed":
        origin = caller or primary or where.listed[0]
        ordered = order(origin, where.listed)
        reason: FailoverReason | None = (
            "not_listed" if caller is not None and ordered[0] != caller else None
        )
        return Route(ordered[0], tuple(ordered[1:]), reason)
    home = (primary or caller) if where.mode == "primary" else caller
    if home is None:
        return Route(None)
    if where.mode == "primary" and caller is not None and caller != home:
        # A group pinned to the primary region may fail over to the caller's region: an app
        # Machine runs there (this one), known before the app's list is.
        return Route(home, (caller,), open=True)
    return Route(home, open=True)


def pool_regions(
    where: Placement, caller: str | None, primary: str | None, app_regions: Iterable[str]
) -> list[str | None]:
    """The regions whose pools `manage.py flyfn prepare` converges and `gc` keeps (None: the
    shared pool): a list's regions, the primary one, or where the app Machines run (the
    caller's region before any does: a first deploy's release command runs in the primary
    region, where `fly deploy` then creates the app Machines)."""
    if where.mode == "shared":
        return [None]
    if where.mode == "listed":
        return list(where.listed)
    if where.mode == "primary":
        home = primary or caller
        return [home] if home else [None]
    found = sorted(set(app_regions)) or ([caller] if caller else [])
    return list(found) or [None]
