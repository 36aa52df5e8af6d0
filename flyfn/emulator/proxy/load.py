"""Load as the local Fly Proxy counts it: requests being delivered to each Machine, requests
waiting for it to start, and when it last had any (its idle time, for autostop)."""

from __future__ import annotations

import time
from collections import defaultdict

__all__ = ["Load"]


class Load:
    """Per-Machine counts of the requests the proxy is handling."""

    def __init__(self) -> None:
        self._inflight: defaultdict[str, int] = defaultdict(int)
        self._waiting: defaultdict[str, int] = defaultdict(int)
        self._last_active: dict[str, float] = {}

    def of(self, machine_id: str) -> int:
        """Requests the proxy is delivering to the Machine or waiting for it to start."""
        return self._inflight[machine_id] + self._waiting[machine_id]

    def busy(self, machine_id: str) -> bool:
        """Whether a request is being delivered to the Machine right now."""
        return self._inflight[machine_id] > 0

    def begin(self, machine_id: str) -> None:
        """A delivery to the Machine starts."""
        self._inflight[machine_id] += 1
        self._last_active[machine_id] = time.monotonic()

    def end(self, machine_id: str) -> None:
        """A delivery to the Machine is over (answered, failed or replayed)."""
        self._inflight[machine_id] = max(0, self._inflight[machine_id] - 1)
        self._last_active[machine_id] = time.monotonic()

    def wait(self, machine_id: str) -> None:
        """A request waits for the Machine to start (it counts as load meanwhile)."""
        self._waiting[machine_id] += 1

    def unwait(self, machine_id: str) -> None:
        self._waiting[machine_id] -= 1

    def last_active(self, machine_id: str, now: float) -> float:
        """When the Machine last had a request (`now` for one never seen before)."""
        return self._last_active.setdefault(machine_id, now)

    def forget(self, machine_id: str) -> None:
        """The Machine was stopped: its idle time starts again from its next request."""
        self._last_active.pop(machine_id, None)
