"""Waiting until a condition holds, from sync and async tests: the suite's one poll-until helper."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# A safety bound, never an expectation: a loaded machine may take long, a broken one takes this.
SAFETY_BOUND = 60.0


def wait_for(
    predicate: Callable[[], T], timeout: float = SAFETY_BOUND, what: str = "", *, step: float = 0.1
) -> T:
    """`predicate()`'s first true value, checked every `step` s; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


async def until(
    predicate: Callable[[], T], what: str = "", *, timeout: float = SAFETY_BOUND, step: float = 0.01
) -> T:
    """`wait_for` for async tests: the event loop runs on between checks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
