"""What each group's Machines cost over a window, as `manage.py flyfn status` and the `flyfn dev`
live page show it: the window from its text, the figures per group (`flyfn.machine_time`), and
their table rows (per group, or per group and region: `region_cost_rows`).

Django-free: the callers list the Machines (destroyed ones included: they ran too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from flyfn.fly.timestamps import unix_seconds
from flyfn.machine_time import GroupCost, Window, by_region, group_cost, parse_window
from flyfn.machines.models import Machine

__all__ = [
    "COST_HEADER",
    "DEFAULT_WINDOW",
    "REGION_COST_HEADER",
    "UNKNOWN",
    "cost_row",
    "group_costs",
    "money",
    "region_cost_rows",
    "seconds_text",
    "window_for",
]

DEFAULT_WINDOW = "1h"
COST_HEADER = (
    "GROUP",
    "MACHINES",
    "STARTED",
    "STOPPED",
    "SUSPENDED",
    "STARTS",
    "COST",
    "ALWAYS ON",
    "SAVED",
)
# The same columns with the region after the group: a row per group and region.
REGION_COST_HEADER = (COST_HEADER[0], "REGION", *COST_HEADER[1:])


def window_for(text: str, machines: Sequence[Machine], image: str | None, now: float) -> Window:
    """The window `text` names (`parse_window`), ending `now`; `deploy` starts when the first of
    `machines` on `image` (the deploy's) was created (an empty window without one)."""
    seconds = parse_window(text)
    if seconds is not None:
        return Window(now - seconds, now, text)
    created = [
        at
        for m in machines
        if m.config is not None
        and m.config.image == image
        and (at := unix_seconds(m.created_at)) is not None
    ]
    return Window(min(created, default=now), now, "deploy")


def group_costs(
    machines: Mapping[str, Sequence[Machine]], text: str, image: str | None, now: float
) -> list[GroupCost]:
    """Each group's figures over the window `text` (per group for `deploy`), by group name."""
    return [
        group_cost(group, found, window_for(text, found, image, now))
        for group, found in sorted(machines.items())
    ]


UNKNOWN = "unknown"


def money(dollars: float | None) -> str:
    """Dollars to a tenth of a cent; smaller figures to three significant digits (`$0.000123`),
    down to a millionth of a cent (below that, float noise: `$0`); `unknown` for None (a size
    the price table does not know)."""
    if dollars is None:
        return UNKNOWN
    size = abs(dollars)
    if size >= 0.01:
        return f"${dollars:,.3f}"
    if size < 1e-8:
        return "$0"
    decimals = 2 - math.floor(math.log10(size))
    return f"${dollars:.{decimals}f}"


def seconds_text(seconds: float) -> str:
    """`42s`, `12m05s`, `3h07m`: what a reader compares at a glance."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def cost_row(cost: GroupCost) -> tuple[str, ...]:
    """One row under `COST_HEADER`; a figure whose events did not reach back far enough is
    marked `~`."""
    approx = "" if cost.time.exact else "~"
    return (
        cost.group,
        str(cost.machines),
        approx + seconds_text(cost.time.started),
        approx + seconds_text(cost.time.stopped),
        approx + seconds_text(cost.time.suspended),
        str(cost.time.starts),
        (approx if cost.cost is not None else "") + money(cost.cost),
        money(cost.always_on),
        money(cost.saved),
    )


def region_cost_rows(
    group: str, machines: Sequence[Machine], window: Window
) -> list[tuple[str, ...]]:
    """The group's rows under `REGION_COST_HEADER`, one per region (`by_region`), each priced
    from that region's Machines alone."""
    rows = []
    for region, found in by_region(machines).items():
        name, *cells = cost_row(group_cost(group, found, window))
        rows.append((name, region, *cells))
    return rows
