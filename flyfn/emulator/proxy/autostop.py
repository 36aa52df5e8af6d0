"""Fly Proxy's autostop, locally: a pass every `interval` seconds stops or suspends (per the
services' `autostop`) at most one started Machine per app, region and role, as Fly's does.

A Machine's load at a pass is the peak of the requests the proxy had in flight to it since the
previous pass (only inbound traffic through the proxy counts: a Machine's own threads,
background work and outbound connections do not). Per app, region and role (the app's Machines
by process group, each flyfn function group apart):

- a lone started Machine is stopped when its load is zero;
- with several, `excess = started - (over_soft_limit + 1)`; while it is positive the least
  loaded one (ties: the one idle longest) is stopped, possibly with requests in flight, as on Fly
  (it gets its `stop_config` signal and the timeout to finish them); a Machine to suspend that
  has requests in flight at the pass is stopped instead (suspended, they would freeze);
- `min_machines_running` keeps that many started, in the primary region only.

Autostop never creates or destroys Machines. The planning (`plan`) is pure; `Autostop` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from flyfn.emulator.logline import autostop_event
from flyfn.emulator.proxy import balancer
from flyfn.emulator.proxy.load import Load
from flyfn.emulator.roles import group_of
from flyfn.emulator.state import EmulatorError, MachinesEmulator
from flyfn.fly import autostop
from flyfn.machines.models import Machine, MachineService

__all__ = ["DEFAULT_AUTOSTOP_INTERVAL", "Autostop", "Stop", "plan"]

# Fly documents that autostop runs "every few minutes", and users observe Machines stopped 5 to
# 10 minutes after their last request: what a pass every 300 s gives (a Machine busy just before
# one pass is idle at the next, and stopped then). `flyfn dev --time-scale N` divides it.
DEFAULT_AUTOSTOP_INTERVAL = 300.0


@dataclass(frozen=True)
class Stop:
    """One Machine a pass stops (`mode` "stop") or suspends, its load at the pass, and how many
    Machines of its region and role were started then (it included)."""

    machine: Machine
    mode: autostop.AutostopMode
    load: int
    started: int = 1


def plan(
    machines: Sequence[Machine],
    *,
    load: Callable[[str], int],
    in_flight: Callable[[str], int],
    idle_since: Callable[[str], float],
    region: str,
    primary_region: str,
) -> list[Stop]:
    """What one pass does to `machines` (one app's): at most one Stop per region and role.

    `load(id)`: the Machine's peak in-flight requests since the previous pass; `in_flight(id)`:
    its requests in flight now (a Machine to suspend that has some is stopped); `idle_since(id)`:
    when it last had a request (the tie-break: the one idle longest goes first); `region`: that
    of Machines with none; `primary_region`: the only region where `min_machines_running` holds.
    """
    groups: dict[tuple[str, str, str], list[Machine]] = {}
    for machine in machines:
        if machine.state != "started" or _mode_of(machine) == "off":
            continue
        groups.setdefault((machine.region or region, *_role_of(machine)), []).append(machine)
    stops: list[Stop] = []
    for (where, _, _), started in sorted(groups.items()):
        loads = {m.id: load(m.id) for m in started}
        if len(started) == 1:
            victim = started[0] if loads[started[0].id] == 0 else None
        else:
            over_soft = sum(1 for m in started if loads[m.id] > _soft_limit(m))
            excess = len(started) - (over_soft + 1)
            victim = (
                min(started, key=lambda m: (loads[m.id], idle_since(m.id), m.id))
                if excess > 0
                else None
            )
        if victim is None:
            continue
        keep = max(_min_running(m) for m in started) if where == primary_region else 0
        if len(started) <= keep:
            continue
        mode = _mode_of(victim)
        if mode == "suspend" and in_flight(victim.id):
            # Suspended, the requests in flight would freeze until a new request happens to need
            # this Machine (with others started, maybe never): stopped, its stop_config timeout
            # lets them finish.
            mode = "stop"
        stops.append(Stop(victim, mode, loads[victim.id], len(started)))
    return stops


class Autostop:
    """Stops Machines of the apps the proxy has sent requests to, one pass every `interval`
    seconds (0: no passes; `once` still runs one)."""

    def __init__(
        self,
        machines: MachinesEmulator,
        load: Load,
        *,
        apps: set[str],
        interval: float = DEFAULT_AUTOSTOP_INTERVAL,
        region: str = "local",
        primary_region: str | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.machines = machines
        self.load = load
        self.apps = apps  # shared with the proxy, which adds the apps it replays to
        self.interval = interval
        self.region = region
        self.primary_region = primary_region or region
        self.on_event = on_event
        self.passes = 0
        self._task: asyncio.Task[None] | None = None
        # The previous pass, on the emulator's clock: a Machine started after it has not been up
        # a whole pass.
        self._previous_pass = machines.clock()

    def start(self) -> None:
        """Run a pass every `interval` seconds in the background (not when it is 0)."""
        if self._task is None and self.interval > 0:
            self._task = asyncio.ensure_future(self._loop())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.once()
            except Exception as exc:  # the loop must survive one bad pass
                self._event(f"autostop: pass failed: {exc}")

    async def once(self, now: float | None = None) -> list[str]:
        """One pass over every app: the ids of the Machines it stopped or suspended."""
        now = self.load.clock() if now is None else now
        wall = self.machines.clock()
        self.passes += 1
        acted: list[str] = []
        try:
            for app in sorted(self.apps):
                machines = self.machines.list(app)
                # A Machine started since the previous pass counts as loaded until the next one:
                # like a Machine that served, it is stopped only after a whole pass without load
                # (so a Machine booted for requests still waiting to reach it is not stopped).
                fresh = {m.id for m in machines if started_at(m) > self._previous_pass}
                stops = plan(
                    machines,
                    load=partial(self._load, fresh=fresh),
                    in_flight=self.load.of,
                    idle_since=lambda machine_id: self.load.last_active(machine_id, now),
                    region=self.region,
                    primary_region=self.primary_region,
                )
                for stop in stops:
                    machine = stop.machine
                    idle = now - self.load.last_active(machine.id, now)
                    try:
                        if stop.mode == "suspend":
                            await self.machines.suspend(app, machine.id)
                        else:  # its stop_config's signal, then SIGKILL after its timeout
                            await self.machines.stop(app, machine.id)
                    except EmulatorError:
                        continue
                    self.load.forget(machine.id)
                    acted.append(machine.id)
                    self._event(
                        autostop_event(
                            machine,
                            stop.mode,
                            idle,
                            load=stop.load,
                            at=self.passes,
                            started=stop.started,
                        )
                    )
        finally:
            self.load.new_pass()
            self._previous_pass = wall
        return acted

    def _load(self, machine_id: str, *, fresh: set[str]) -> int:
        return self.load.peak(machine_id) or int(machine_id in fresh)

    def _event(self, message: str) -> None:
        if self.on_event is not None:
            self.on_event(message)


def started_at(machine: Machine) -> float:
    """When the Machine last became `started` (the emulator's clock, from its events; 0 if
    never)."""
    times = [e.timestamp for e in machine.events or [] if e.status == "started" and e.timestamp]
    return max(times) / 1000 if times else 0.0


def _services(machine: Machine) -> list[MachineService]:
    return list((machine.config.services if machine.config is not None else None) or [])


def _mode_of(machine: Machine) -> autostop.AutostopMode:
    return autostop.strongest(str(s.autostop) for s in _services(machine) if s.autostop is not None)


def _min_running(machine: Machine) -> int:
    return max((s.min_machines_running or 0 for s in _services(machine)), default=0)


def _soft_limit(machine: Machine) -> int:
    """The soft limit of the Machine's first service that autostops (Fly's 20 without one)."""
    for service in _services(machine):
        if service.autostop is not None and autostop.strongest([str(service.autostop)]) != "off":
            return balancer.limits_of(service).soft
    return balancer.DEFAULT_SOFT_LIMIT


def _role_of(machine: Machine) -> tuple[str, str]:
    """Its role: ("function", group) for a function Machine, ("app", process group) else."""
    group = group_of(machine)
    if group is not None:
        return "function", group
    metadata = (machine.config.metadata if machine.config is not None else None) or {}
    return "app", metadata.get("fly_process_group", "app")
