"""Fly's scheduled Machines (`config.schedule`): the platform starts each one once per interval
(`hourly`, `daily`, `weekly`, `monthly`), counted from its creation, divided by `flyfn dev
--time-scale`. A Machine still running at its time is left alone (Fly starts only what is not
running), and intervals missed while nothing could start it (the emulator itself was held up)
come to one start, not several.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from flyfn.emulator.state import EmulatorError, MachinesEmulator
from flyfn.fly.schedule import INTERVALS
from flyfn.fly.timestamps import unix_seconds
from flyfn.machines.models import Machine

__all__ = ["FlySchedules", "scaled_period"]

# States Fly's scheduler starts a scheduled Machine from.
_STARTABLE = frozenset({"created", "stopped", "suspended"})
# How often the loop looks, at most (a scaled hourly period may be a few seconds).
_MAX_LOOK = 1.0


def scaled_period(interval: str, time_scale: float = 1.0) -> float:
    """Seconds between two starts of a Machine scheduled `interval` under `time_scale`."""
    return INTERVALS[interval] / time_scale


class FlySchedules:
    """Starts the emulator's scheduled Machines at their times; `once(now)` is one look (the
    loop's, or a test's on a virtual clock)."""

    def __init__(
        self,
        machines: MachinesEmulator,
        *,
        time_scale: float = 1.0,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        if not 0 < time_scale < float("inf"):
            raise ValueError(f"time_scale must be a positive number, got {time_scale!r}")
        self.machines = machines
        self.time_scale = time_scale
        self.on_event = on_event
        self.starts = 0  # scheduled starts made, for tests
        self._due: dict[tuple[str, str], float] = {}  # (app, Machine) -> its next start
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def next_start(self, app: str, machine_id: str) -> float | None:
        """When the Machine is next started (the emulator's clock), once a look has seen it."""
        return self._due.get((app, machine_id))

    async def _loop(self) -> None:
        while True:
            try:
                await self.once()
            except Exception as exc:  # the loop must survive one bad look
                self._event(f"schedule: look failed: {exc}")
            await asyncio.sleep(self._sleep())

    def _sleep(self) -> float:
        now = self.machines.clock()
        upcoming = [at - now for at in self._due.values()]
        return min([_MAX_LOOK, *upcoming]) if upcoming else _MAX_LOOK

    async def once(self, now: float | None = None) -> list[str]:
        """Start every scheduled Machine whose time has come; their ids."""
        now = self.machines.clock() if now is None else now
        started: list[str] = []
        seen: set[tuple[str, str]] = set()
        for app in self.machines.app_names():
            for machine in self.machines.list(app):
                interval = machine.config.schedule if machine.config is not None else None
                if interval not in INTERVALS:
                    continue
                key = (app, machine.id)
                seen.add(key)
                period = scaled_period(interval, self.time_scale)
                due = self._due.setdefault(key, _created(machine, now) + period)
                if due > now:
                    continue
                # Missed intervals come to one start: the next is one period after this one.
                while due <= now:
                    due += period
                self._due[key] = due
                if machine.state not in _STARTABLE:
                    self._event(f"schedule: {machine.id} still {machine.state}, not started")
                    continue
                try:
                    await self.machines.start(app, machine.id)
                except EmulatorError as exc:
                    self._event(f"schedule: {machine.id} could not start: {exc.error}")
                    continue
                self.starts += 1
                started.append(machine.id)
                self._event(f"schedule: started {machine.id} ({interval})")
        for gone in set(self._due) - seen:
            del self._due[gone]
        return started

    def _event(self, message: str) -> None:
        if self.on_event is not None:
            self.on_event(message)


def _created(machine: Machine, default: float) -> float:
    created = unix_seconds(machine.created_at)
    return default if created is None else created
