"""Machine time and its cost per group: seconds started, stopped and suspended and the starts of
each Machine over a window, read from the events the Machines API gives with every Machine, priced
with `flyfn.fly.pricing`, beside what the same Machines always on would cost.

Django-free and pure: Machines (as the API lists them) and a window in, figures out. Each event's
`status` is the state the Machine entered at its `timestamp` (ms); the seconds between two events
belong to the state the first one entered. Fly bills a Machine per second while it runs, so the
transitional states around `started` (starting, stopping, suspending) count as started; updating,
restarting and replacing leave the state as it was (a stopped Machine updated stays stopped);
a created, stopped or failed Machine pays for its root file system, and so (as priced here) does
a suspended one. Fly keeps a Machine's latest events only: when they do not reach back to the
window's start (or to the Machine's creation), the figure covers what they do reach and is marked
not exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from flyfn.fly.durations import DurationError, parse_go_duration
from flyfn.fly.pricing import (
    DEFAULT_ROOTFS_GB,
    Guest,
    has_price,
    preset_name,
    running_per_second,
    storage_per_second,
)
from flyfn.fly.timestamps import unix_seconds
from flyfn.machines.models import Machine

__all__ = [
    "GroupCost",
    "Lever",
    "MachineTime",
    "Window",
    "by_region",
    "group_cost",
    "guest_of",
    "machine_time",
    "parse_window",
]

Billed = Literal["started", "stopped", "suspended"]

_STARTED = frozenset({"starting", "started", "stopping", "suspending"})
# An update or restart happens to a stopped Machine as well as to a running one: the state it
# names is the one before it (started stays started, no start; stopped stays stopped).
_KEPT = frozenset({"updating", "restarting", "replacing"})
_STOPPED = frozenset({"created", "stopped", "failed", "launch_failed"})
_SUSPENDED = frozenset({"suspended"})
_GONE = frozenset({"destroying", "destroyed", "replaced", "migrated"})
_SMALLEST = Guest()
_DAYS_RE = re.compile(r"^([0-9]{1,4})d$")


def _billed(status: str | None) -> Billed | Literal["gone"] | None:
    """What a state is billed as; None for a status that is no state (e.g. an `error` event)
    or that keeps the state before it (`_KEPT`)."""
    if status in _KEPT:
        return None
    if status in _STARTED:
        return "started"
    if status in _STOPPED:
        return "stopped"
    if status in _SUSPENDED:
        return "suspended"
    if status in _GONE:
        return "gone"
    return None


@dataclass(frozen=True, slots=True)
class Window:
    """A span of wall-clock time (Unix seconds) and how it was asked for (`1h`, `deploy`)."""

    start: float
    end: float
    label: str = ""

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)


def parse_window(text: str) -> float | None:
    """Seconds of a window written as a Go duration (`1h`, `30m`) or days (`1d`, `7d`); None
    for `deploy` (since the group's current Machines were created). ValueError naming the
    accepted forms otherwise."""
    text = text.strip()
    if text == "deploy":
        return None
    days = _DAYS_RE.fullmatch(text)
    try:
        # A unit is required: Go's parser (as the API) also reads a bare number as seconds.
        seconds = (
            int(days.group(1)) * 86400.0
            if days
            else parse_go_duration(text)
            if text[-1:].isalpha()
            else 0.0
        )
    except DurationError:
        seconds = 0.0
    if seconds <= 0:
        raise ValueError(f'expected a window such as "1h", "1d" or "deploy", got {text!r}')
    return seconds


@dataclass(frozen=True, slots=True)
class MachineTime:
    """Seconds a Machine (or a group's Machines, summed) spent started, stopped and suspended in
    a window, how often it started, and whether its events covered the whole window."""

    started: float = 0.0
    stopped: float = 0.0
    suspended: float = 0.0
    starts: int = 0
    exact: bool = True

    def __add__(self, other: MachineTime) -> MachineTime:
        return MachineTime(
            self.started + other.started,
            self.stopped + other.stopped,
            self.suspended + other.suspended,
            self.starts + other.starts,
            self.exact and other.exact,
        )

    @property
    def existed(self) -> float:
        """Seconds it existed in the window (in any state)."""
        return self.started + self.stopped + self.suspended


def machine_time(machine: Machine, window: Window) -> MachineTime:
    """The Machine's time in `window`, from its events (see the module's docstring)."""
    listed = list(machine.events or [])
    # The API lists events newest first; for equal timestamps the later in the list is older.
    ordered = sorted(
        (
            (event.timestamp / 1000, -index, billed)
            for index, event in enumerate(listed)
            if event.timestamp is not None and (billed := _billed(event.status)) is not None
        ),
    )
    changes = [(at, billed) for at, _, billed in ordered]
    created_seen = any(e.type == "launch" for e in listed)
    if not changes:
        # No usable event: its state now, since it was created (or the whole window).
        now = _billed(machine.state)
        created = unix_seconds(machine.created_at) or window.start
        if now is None or now == "gone":
            return MachineTime(exact=False)
        spent = max(0.0, window.end - max(window.start, created))
        return _in_state(now, spent, starts=0, exact=False)
    # The state at the window's start: that of the last change at or before it; before the
    # first change, nothing (created then) when the events reach back to the creation.
    current: Billed | Literal["gone"] | None = None
    exact = created_seen
    for at, billed in changes:
        if at > window.start:
            break
        current = billed
        exact = True
    total = MachineTime(exact=exact)
    cursor = window.start
    for at, billed in changes:
        if at <= window.start:
            continue
        if at >= window.end:
            break
        if current is not None and current != "gone":
            total += _in_state(current, at - cursor)
        if billed == "started" and current != "started":
            total += MachineTime(starts=1)
        current, cursor = billed, at
    if current is not None and current != "gone":
        total += _in_state(current, window.end - cursor)
    return total


def _in_state(state: Billed, seconds: float, *, starts: int = 0, exact: bool = True) -> MachineTime:
    return MachineTime(
        started=seconds if state == "started" else 0.0,
        stopped=seconds if state == "stopped" else 0.0,
        suspended=seconds if state == "suspended" else 0.0,
        starts=starts,
        exact=exact,
    )


def guest_of(machine: Machine) -> Guest:
    """The Machine's size from its config (Fly's defaults for what is missing)."""
    guest = machine.config.guest if machine.config is not None else None
    if guest is None:
        return _SMALLEST
    return Guest(
        cpu_kind=guest.cpu_kind or "shared", cpus=guest.cpus or 1, memory_mb=guest.memory_mb or 256
    )


@dataclass(frozen=True, slots=True)
class Lever:
    """One change a user can make (a group setting) and the window's cost it would have given."""

    change: str
    cost: float
    note: str = ""


@dataclass(frozen=True, slots=True)
class GroupCost:
    """A group's Machine time and cost over a window, beside the same Machines always on."""

    group: str
    window: Window
    machines: int
    time: MachineTime
    # None: unknown, a Machine's size is not in the price table (`unpriced` names its cpu_kind).
    cost: float | None
    always_on: float | None
    regions: dict[str, MachineTime] = field(default_factory=dict)
    levers: tuple[Lever, ...] = ()
    unpriced: tuple[str, ...] = ()

    @property
    def saved(self) -> float | None:
        """What scaling to zero saved against always on (negative: it cost more)."""
        if self.cost is None or self.always_on is None:
            return None
        return self.always_on - self.cost


def _cost(time: MachineTime, guest: Guest, rootfs_gb: float) -> float:
    return time.started * running_per_second(guest) + (
        time.stopped + time.suspended
    ) * storage_per_second(rootfs_gb)


def by_region(machines: Iterable[Machine]) -> dict[str, list[Machine]]:
    """The Machines per region, regions sorted, each in the order given; `-` for a Machine the
    API names no region for. The one split by region of a group's figures (status, /metrics, the
    `flyfn dev` live page)."""
    split: dict[str, list[Machine]] = {}
    for machine in machines:
        split.setdefault(machine.region or "-", []).append(machine)
    return dict(sorted(split.items()))


def group_cost(
    group: str,
    machines: Sequence[Machine],
    window: Window,
    *,
    rootfs_gb: float = DEFAULT_ROOTFS_GB,
) -> GroupCost:
    """The group's figures over `window` from its Machines (destroyed ones included, when the
    list has them: they ran and cost too), with the levers that would change them."""
    times = [(machine, machine_time(machine, window)) for machine in machines]
    total = sum((t for _, t in times), MachineTime())
    # Region by region through `by_region`, the one split of every caller, each Machine's time
    # computed once (by identity: a Machine model is not hashable).
    time_of = {id(m): t for m, t in times}
    regions = {
        region: sum((time_of[id(m)] for m in found), MachineTime())
        for region, found in by_region(machines).items()
    }
    figures = GroupCost(
        group=group,
        window=window,
        machines=sum(1 for _, t in times if t.existed > 0),
        time=total,
        cost=None,
        always_on=None,
        regions=regions,
    )
    # One Machine the table cannot price makes the group's cost unknown, not an error: the
    # seconds still stand, and a /metrics scrape or `flyfn status` must not fail on it.
    unpriced = sorted({g.cpu_kind for m, _ in times if not has_price(g := guest_of(m))})
    if unpriced:
        return replace(figures, unpriced=tuple(unpriced))
    cost = sum(_cost(t, guest_of(m), rootfs_gb) for m, t in times)
    always_on = sum(t.existed * running_per_second(guest_of(m)) for m, t in times)
    return replace(
        figures,
        cost=cost,
        always_on=always_on,
        levers=tuple(_levers(times, cost, always_on, rootfs_gb)),
    )


def _levers(
    times: Iterable[tuple[Machine, MachineTime]], cost: float, always_on: float, rootfs_gb: float
) -> Iterable[Lever]:
    times = [(m, t) for m, t in times if t.existed > 0]
    if not times:
        return
    yield Lever('autostop "off"', always_on, "every Machine always started")
    # One more Machine kept warm: the one that ran most would have run the whole window.
    machine, most = max(times, key=lambda item: item[1].started)
    idle = most.stopped + most.suspended
    extra = idle * (running_per_second(guest_of(machine)) - storage_per_second(rootfs_gb))
    yield Lever("keep_warm +1", cost + extra, "no cold start for the first request")
    if len(times) > 1:
        # One Machine fewer, its work done by the others (at their price if they are alike): the
        # least used one's root file system is saved.
        _, least = min(times, key=lambda item: item[1].started)
        stored = (least.stopped + least.suspended) * storage_per_second(rootfs_gb)
        yield Lever(f"max_machines {len(times) - 1}", cost - stored, "if the others take its load")
    if any(guest_of(m) != _SMALLEST for m, _ in times):
        smallest = sum(_cost(t, _SMALLEST, rootfs_gb) for _, t in times)
        yield Lever(f"guest {preset_name(_SMALLEST)}", smallest, "if the views fit in it")
    yield Lever(
        'autostop "suspend"',
        cost,
        "same price here (suspended pays its root file system); resumes in ~hundreds of ms",
    )
