"""Machine time and cost per group as Prometheus metrics, computed when scraped from the Machine
lists the pools already hold (no API call of its own).

Gauges over the last hour (a rolling window, not counters: Fly keeps only a Machine's latest
events, and a destroyed Machine leaves the list, so totals since some start could go down):

- `flyfn_machine_seconds{group,region,state}`: seconds started, stopped and suspended;
- `flyfn_machine_starts{group,region}`: starts (resumes included);
- `flyfn_machine_cost_dollars{group,kind}`: `kind="actual"` at Fly's published prices
  (`flyfn.fly.pricing`), `kind="always_on"` what the same Machines never stopped would cost; NaN
  when a Machine's size is not in the price table.

An app Machine lists its function Machines as it routes to them: a process that has not routed to
a group yet has no figures for it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from flyfn.conf import SettingsError, get_settings
from flyfn.machine_time import Window, group_cost
from flyfn.machines.models import Machine
from flyfn.pool.converge import machine_group
from flyfn.pool.manager import PoolManager, get_manager
from flyfn.pool.spec import function_apps

__all__ = ["WINDOW_SECONDS", "MachineTimeCollector", "pool_lists"]

WINDOW_SECONDS = 3600.0

ListsOf = Callable[[str], list[Machine]]


def pool_lists(app: str) -> list[Machine]:
    """The app's Machines as this process's pools last listed them (none yet: empty)."""
    manager = get_manager()
    if not isinstance(manager, PoolManager):
        return []
    read = manager.listing.read(app)
    return read[1] if read is not None else []


class MachineTimeCollector(Collector):
    """The metrics above, from `lists(app)` (default: the pools' lists) at `clock()`."""

    def __init__(self, lists: ListsOf = pool_lists, clock: Callable[[], float] = time.time):
        self.lists = lists
        self.clock = clock

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from _families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        seconds, starts, cost = _families()
        try:
            settings = get_settings()
        except SettingsError:
            yield from (seconds, starts, cost)
            return
        groups: dict[str, list[Machine]] = {}
        for app in function_apps(settings):
            for machine in self.lists(app):
                group = machine_group(machine)
                if group is not None:
                    groups.setdefault(group, []).append(machine)
        now = self.clock()
        window = Window(now - WINDOW_SECONDS, now, "1h")
        for group, machines in sorted(groups.items()):
            figures = group_cost(group, machines, window)
            for region, spent in sorted(figures.regions.items()):
                seconds.add_metric([group, region, "started"], spent.started)
                seconds.add_metric([group, region, "stopped"], spent.stopped)
                seconds.add_metric([group, region, "suspended"], spent.suspended)
                starts.add_metric([group, region], spent.starts)
            # NaN (Prometheus's unknown) when the price table does not know a Machine's size.
            cost.add_metric([group, "actual"], _or_nan(figures.cost))
            cost.add_metric([group, "always_on"], _or_nan(figures.always_on))
        yield from (seconds, starts, cost)


def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(
            "flyfn_machine_seconds",
            "Seconds the group's Machines spent per state over the last hour (Machine events).",
            labels=["group", "region", "state"],
        ),
        GaugeMetricFamily(
            "flyfn_machine_starts",
            "Starts of the group's Machines over the last hour (Machine events).",
            labels=["group", "region"],
        ),
        GaugeMetricFamily(
            "flyfn_machine_cost_dollars",
            "The group's Machines' cost over the last hour at Fly's published prices (actual), "
            "and the same Machines always on (always_on).",
            labels=["group", "kind"],
        ),
    )


def _or_nan(dollars: float | None) -> float:
    return math.nan if dollars is None else dollars
