"""Waiting until a condition holds, from sync and async tests: the suite's one poll-until helper."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

# A safety bound, never an expectation: a loaded machine may take long, a broken one takes this.
SAFETY_BOUND = 60.0


class _Poll(Generic[T]):
    """One wait: `check()` is the predicate's true value, None while it is false (AssertionError
    once `timeout` seconds have passed)."""

    def __init__(self, predicate: Callable[[], T], timeout: float, what: str) -> None:
        self.predicate = predicate
        self.timeout = timeout
        self.what = what or repr(predicate)
        self.deadline = time.monotonic() + timeout

    def check(self) -> T | None:
        value = self.predicate()
        if value:
            return value
        if time.monotonic() >= self.deadline:
            raise AssertionError(f"timed out after {self.timeout}s waiting for {self.what}")
        return None


def wait_for(
    predicate: Callable[[], T], timeout: float = SAFETY_BOUND, what: str = "", *, step: float = 0.1
) -> T:
    """`predicate()`'s first true value, checked every `step` s; AssertionError after `timeout`."""
    poll = _Poll(predicate, timeout, what)
    while (value := poll.check()) is None:
        time.sleep(step)
    return value


async def until(
    predicate: Callable[[], T], what: str = "", *, timeout: float = SAFETY_BOUND, step: float = 0.01
) -> T:
    """`wait_for` for async tests: the event loop runs on between checks."""
    poll = _Poll(predicate, timeout, what)
    while (value := poll.check()) is None:
        await asyncio.sleep(step)
    return value
