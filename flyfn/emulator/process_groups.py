"""Machine processes as the OS sees them: signals to a whole process group, waiting until the
kernel shows one stopped (through psutil), how a stop signal's name and an exit status read, and
the atexit net that kills every group a runtime of this process still owns."""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import threading
import time

import psutil

from flyfn import process_state

__all__ = ["exit_code", "forget_group", "kill_group", "own_group", "parse_signal", "until_stopped"]

# Process groups of every live child of every runtime in this process: the atexit net.
_LIVE: set[int] = set()
_LIVE_LOCK = threading.Lock()
process_state.register(__name__, "process groups of the runtimes' live children (the atexit net)")


def kill_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        groups = list(_LIVE)
        _LIVE.clear()
    for pgid in groups:
        kill_group(pgid, signal.SIGKILL)


atexit.register(_kill_leftovers)


async def until_stopped(pid: int, limit: float = 2.0) -> None:
    """Return once the kernel shows the process stopped (a signal is delivered asynchronously)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            status = psutil.Process(pid).status()
        except psutil.Error:
            return  # gone (or not ours to see): nothing to wait for
        if status in _HALTED:
            return
        await asyncio.sleep(0.005)


_HALTED = frozenset(
    {psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD}
)


def parse_signal(name: str | None) -> signal.Signals:
    if not name:
        return signal.SIGTERM
    text = name.strip().upper()
    if text.isdigit():
        return signal.Signals(int(text))
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return signal.Signals[text]
    except KeyError:
        return signal.SIGTERM


def exit_code(returncode: int | None) -> int | None:
    # Like Fly's exit events (and shells): death by signal N is 128 + N.
    if returncode is None:
        return None
    return 128 - returncode if returncode < 0 else returncode


def own_group(pgid: int) -> None:
    """A new child's process group, to be killed at exit if it is still alive then."""
    with _LIVE_LOCK:
        _LIVE.add(pgid)


def forget_group(pgid: int) -> None:
    """The group's leader is gone: no need to kill it at exit."""
    with _LIVE_LOCK:
        _LIVE.discard(pgid)
