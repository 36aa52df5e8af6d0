"""A Machine's requests in flight, and when its last one began or ended, across its worker
processes: what a task group's keeper (`flyfn.tasks.keeper`) reads before it stops the Machine.

One idle worker must not stop a Machine whose other worker is answering a long request: gunicorn
takes the stop signal Fly sends (SIGINT) as "quit now", and even a server that drains its requests
refuses new ones meanwhile. So each process counts its own requests and, while it has one in
flight, holds a shared `flock` on the Machine's `busy` file; an exclusive try tells whether any
process holds one (a process that dies drops its lock). Each request's start and end touches the
`last` file, whose mtime is the Machine's last activity. Without a Machine directory (off Fly:
tests, `runserver`) the process's own count and time stand for the Machine's.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["MachineActivity"]

logger = logging.getLogger("flyfn.tasks")


class MachineActivity:
    """The requests of one Machine: `started` and `finished` by each process for its own,
    `busy` and `idle_for` for the whole Machine."""

    def __init__(self, directory: Path | None, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.clock = clock  # wall time: the files' mtimes are compared across processes
        self._lock = threading.Lock()
        self._active = 0
        self._last = clock()
        self._held: int | None = None  # the `busy` file, share-locked while requests are in flight
        if directory is not None:
            self.touch()  # a Machine that boots is active now, whatever an earlier boot left

    def started(self) -> None:
        """A request of this process began."""
        with self._lock:
            self._active += 1
            self._touch()  # before the lock: a keeper that finds none held sees this time
            if self._active == 1 and self.directory is not None:
                try:
                    self._held = _open(self.directory / "busy")
                    fcntl.flock(self._held, fcntl.LOCK_SH)
                except OSError as exc:
                    self._alone(exc)

    def finished(self) -> None:
        """A request of this process ended (its response closed); one never counted is ignored."""
        with self._lock:
            if not self._active:
                return
            self._active -= 1
            self._touch()
            if not self._active and self._held is not None:
                held, self._held = self._held, None
                os.close(held)  # drops the lock

    def touch(self) -> None:
        """Something happened that counts as activity (a run of tasks ended)."""
        with self._lock:
            self._touch()

    def busy(self) -> bool:
        """Whether any process of the Machine has a request in flight."""
        with self._lock:
            if self._active:
                return True
        if self.directory is None:
            return False
        try:
            fd = _open(self.directory / "busy")
        except OSError as exc:
            with self._lock:
                self._alone(exc)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # drops the exclusive lock if it was had
        return False

    def idle_for(self) -> float:
        """Seconds since a request of the Machine last began or ended (or a run ended)."""
        with self._lock:
            last = self._last
        if self.directory is not None:
            with contextlib.suppress(OSError):  # none yet: this process's own time stands
                last = max(last, (self.directory / "last").stat().st_mtime)
        return max(0.0, self.clock() - last)

    def _touch(self) -> None:
        now = self.clock()
        self._last = now
        if self.directory is None:
            return
        path = self.directory / "last"
        try:
            try:
                os.utime(path, (now, now))
            except FileNotFoundError:
                os.close(_open(path))
                os.utime(path, (now, now))
        except OSError as exc:
            self._alone(exc)

    def _alone(self, exc: OSError) -> None:
        """The Machine's files failed (its directory removed, a full disk): this process counts
        on its own from now on, never failing a request for it. Called under `_lock`."""
        logger.warning(
            "flyfn tasks: cannot share this Machine's activity in %s (%s); this process "
            "counts its own requests only",
            self.directory,
            exc,
        )
        self.directory = None
        if self._held is not None:
            held, self._held = self._held, None
            os.close(held)


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
