"""Fly Proxy's autostop, locally: started Machines idle for `idle_stop` seconds are stopped or
suspended per their services' `autostop`, keeping `min_machines_running` of each role."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from flyfn.emulator.logline import autostop_event
from flyfn.emulator.proxy.load import Load
from flyfn.emulator.roles import group_of
from flyfn.emulator.state import EmulatorError, MachinesEmulator
from flyfn.fly import autostop
from flyfn.machines.models import Machine

__all__ = ["DEFAULT_IDLE_STOP", "Autostop"]

DEFAULT_IDLE_STOP = 60.0


class Autostop:
    """Stops idle Machines of the apps the proxy has sent requests to."""

    def __init__(
        self,
        machines: MachinesEmulator,
        load: Load,
        *,
        apps: set[str],
        idle_stop: float = DEFAULT_IDLE_STOP,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.machines = machines
        self.load = load
        self.apps = apps  # shared with the proxy, which adds the apps it replays to
        self.idle_stop = idle_stop
        self.on_event = on_event
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run a pass every so often in the background (not when `idle_stop` is 0)."""
        if self._task is None and self.idle_stop > 0:
            self._task = asyncio.ensure_future(self._loop())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        interval = min(max(self.idle_stop / 4, 0.2), 5.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.once()
            except Exception as exc:  # the loop must survive one bad pass
                self._event(f"autostop: pass failed: {exc}")

    async def once(self, now: float | None = None) -> list[str]:
        """Stop or suspend each started Machine idle for `idle_stop` seconds; their ids."""
        now = time.monotonic() if now is None else now
        acted: list[str] = []
        for app in sorted(self.apps):
            started = [m for m in self.machines.list(app) if m.state == "started"]
            for machine in started:
                mode, keep = _autostop_of(machine)
                last = self.load.last_active(machine.id, now)
                if mode == "off" or self.load.busy(machine.id) or now - last < self.idle_stop:
                    continue
                role = group_of(machine)
                peers = [m for m in started if group_of(m) == role and m.id not in acted]
                if len(peers) <= keep:
                    continue
                try:
                    if mode == "suspend":
                        await self.machines.suspend(app, machine.id)
                    else:
                        await self.machines.stop(app, machine.id)
                except EmulatorError:
                    continue
                self.load.forget(machine.id)
                acted.append(machine.id)
                self._event(autostop_event(machine, mode, now - last))
        return acted

    def _event(self, message: str) -> None:
        if self.on_event is not None:
            self.on_event(message)


def _autostop_of(machine: Machine) -> tuple[str, int]:
    """The Machine's autostop mode and min_machines_running over its services."""
    services = (machine.config.services if machine.config is not None else None) or []
    mode = autostop.strongest(str(s.autostop) for s in services if s.autostop is not None)
    keep = max((s.min_machines_running or 0 for s in services), default=0)
    return mode, keep
