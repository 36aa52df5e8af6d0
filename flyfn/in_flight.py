"""Requests in flight in this process, per group: the bound of elastic groups' soft limit and of
the middleware's local fallbacks (`fallback_concurrency`). Counted for threads and tasks alike."""

from __future__ import annotations

import threading

from flyfn import process_state

__all__ = ["Counters", "InFlight", "in_flight"]


class InFlight:
    """Requests of one group running in this process (threads and tasks alike): `acquire` below
    the limit, `hold` regardless, `release` when the response is done (closed, streaming ones
    included). Also the middleware's bound on local fallbacks."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        """Count one more request if fewer than `limit` are in flight; False at the limit."""
        with self._lock:
            if self.active >= self.limit:
                return False
            self.active += 1
            return True

    def hold(self) -> None:
        """Count one more request whatever the load (it runs here anyway)."""
        with self._lock:
            self.active += 1

    def release(self) -> None:
        with self._lock:
            self.active -= 1


class Counters:
    """One `InFlight` per group and limit, made once per process (a lock only to make one)."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, int], InFlight] = {}
        self._lock = threading.Lock()

    def get(self, group: str, limit: int) -> InFlight:
        key = (group, limit)
        counter = self._counters.get(key)
        if counter is None:
            with self._lock:
                counter = self._counters.setdefault(key, InFlight(limit))
        return counter


_in_flight = Counters()
process_state.register(__name__, "in-flight counters per group")


def in_flight(group: str, limit: int) -> InFlight:
    """The process's in-flight counter of `group` (one per group and soft limit)."""
    return _in_flight.get(group, limit)
