"""Load as the local Fly Proxy counts it: requests being delivered to each Machine, requests
waiting for it to start, the peak of those since autostop's previous pass, and when each Machine
last had a request (autostop's tie-break)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

__all__ = ["Load"]


class Load:
    """Per-Machine counts of the requests the proxy is handling. `clock` is monotonic seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._inflight: defaultdict[str, int] = defaultdict(int)
        self._waiting: defaultdict[str, int] = defaultdict(int)
        self._peak: dict[str, int] = {}
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
        self._raise_peak(machine_id)
        self._last_active[machine_id] = self.clock()

    def end(self, machine_id: str) -> None:
        """A delivery to the Machine is over (answered, failed or replayed)."""
        self._inflight[machine_id] = max(0, self._inflight[machine_id] - 1)
        self._last_active[machine_id] = self.clock()

    def wait(self, machine_id: str) -> None:
        """A request waits for the Machine to start (it counts as load meanwhile)."""
        self._waiting[machine_id] += 1
        self._raise_peak(machine_id)

    def unwait(self, machine_id: str) -> None:
        self._waiting[machine_id] -= 1

    def peak(self, machine_id: str) -> int:
        """The most requests the Machine had at once since the last `new_pass` (at least what
        it has now): autostop's load of the Machine."""
        return max(self._peak.get(machine_id, 0), self.of(machine_id))

    def new_pass(self) -> None:
        """Autostop's pass is over: peaks start again from what each Machine has now."""
        self._peak = {mid: n for mid in list(self._peak) if (n := self.of(mid)) > 0}

    def last_active(self, machine_id: str, now: float) -> float:
        """When the Machine last had a request (`now` for one never seen before)."""
        return self._last_active.setdefault(machine_id, now)

    def forget(self, machine_id: str) -> None:
        """The Machine was stopped: its idle time starts again from its next request."""
        self._last_active.pop(machine_id, None)
        self._peak.pop(machine_id, None)

    def _raise_peak(self, machine_id: str) -> None:
        self._peak[machine_id] = max(self._peak.get(machine_id, 0), self.of(machine_id))
