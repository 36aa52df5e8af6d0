"""`Backoff`: the doubling pause after failures in a row, which also tells its caller when a burst
of failures begins and ends (so that a burst logs one line, not one per failure)."""

from __future__ import annotations

__all__ = ["Backoff"]


class Backoff:
    """`first` seconds after the first failure of a burst, doubling after each further one up to
    `cap`; a success ends the burst. Not locked: its owner holds its own lock around it."""

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self.delay = 0.0  # the pause after the last failure; 0 outside a burst

    def failed(self) -> bool:
        """Count a failure (`delay` is the pause it calls for); whether it began a burst."""
        began = self.delay == 0.0
        self.delay = min(self.cap, max(self.first, self.delay * 2))
        return began

    def succeeded(self) -> bool:
        """End the burst; whether there was one."""
        ended = self.delay > 0.0
        self.delay = 0.0
        return ended
