"""An app's Machines listed once for every group of a process and for every worker process of one
Machine, so that a deploy stays within Fly's rate limits (list: 1/s per app, burst 3).

W worker processes (gunicorn -w, uvicorn --workers) x G groups, each refreshing its pool, would make
WxG list calls per refresh. A pool refresh instead holds its app's lock (an asyncio lock in the
process, an `fcntl.flock` across the processes of one `FLY_MACHINE_ID`) and reads the app's last
list from a small file (`<temp dir>/flyfn-<machine id>/<app>.json`, replaced atomically) when it is
recent enough; only when it is not does it list the app (one call for every group: groups are
filtered here by their metadata) and write the file. Whoever holds the lock converges (creates) and
re-lists, so the others read a list that already has the new Machines. Without a Machine id (no Fly:
tests, `runserver`) the list is shared within the process only.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from flyfn.machine_dir import machine_dir, private_dir
from flyfn.machines import AsyncMachinesClient, Machine
from flyfn.pool.converge import GONE_STATES, machine_group
from flyfn.pool.spec import PoolSpec

logger = logging.getLogger("flyfn.pool")

SHARED_LIST_MAX_AGE = 5.0
"""The oldest shared list (seconds) a refresh uses instead of listing again (and at most half the
pools' `CACHE_TTL`): long enough for the WxG refreshes of one Machine to share a call."""
LOCK_POLL = 0.05
"""How often a process waiting for another's refresh of the same app looks at the lock again."""

_MACHINES = TypeAdapter(list[Machine])


class MachineListing:
    """The process's list of each app's Machines, shared with the processes of its Machine."""

    def __init__(
        self,
        machine_id: str | None,
        *,
        directory: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if directory is None:
            directory = machine_dir(machine_id, "lists")
            if directory is None and machine_id:
                logger.warning(
                    "flyfn: Machine %r has no private directory of this user; each process "
                    "lists alone",
                    machine_id,
                )
        self.directory = directory
        self.clock = clock  # wall time: comparable across processes
        self._memory: dict[str, tuple[float, list[Machine]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def session(
        self,
        client: AsyncMachinesClient,
        app: str,
        *,
        max_age: float,
        fresh_after: float = float("-inf"),
    ) -> AsyncIterator[ListingSession]:
        """Hold `app`'s lock (in the process, then across the Machine's processes) for one refresh;
        its lists are at most `max_age` seconds old and taken after `fresh_after` (`clock` time)."""
        lock = self._locks.setdefault(app, asyncio.Lock())
        async with lock:
            fd = await self._flock(app)
            try:
                yield ListingSession(self, client, app, max_age, fresh_after)
            finally:
                if fd is not None:
                    os.close(fd)  # releases the flock

    # -- storage: the file when there is a directory, else the process's memory -------------------

    def _file(self, app: str, suffix: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / (re.sub(r"[^A-Za-z0-9_-]", "_", app) + suffix)

    def _usable_directory(self) -> bool:
        directory = self.directory
        if directory is None:
            return False
        if not private_dir(directory):
            # In a shared temp dir, someone else's directory (or a symlink) is not to be trusted.
            logger.warning(
                "flyfn: %s is not a private directory of this user; each process lists alone",
                directory,
            )
            self.directory = None
            return False
        return True

    async def _flock(self, app: str) -> int | None:
        path = self._file(app, ".lock")
        if path is None or not self._usable_directory():
            return None
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    await asyncio.sleep(LOCK_POLL)  # never blocks the loop; cancellable
        except BaseException:
            os.close(fd)
            raise

    def read(self, app: str) -> tuple[float, list[Machine]] | None:
        """The app's last list and when it was taken, if any (a broken file counts as none)."""
        path = self._file(app, ".json")
        if path is None:
            return self._memory.get(app)
        try:
            data = json.loads(path.read_bytes())
            return float(data["fetched_at"]), _MACHINES.validate_python(data["machines"])
        except (OSError, ValueError, KeyError, TypeError, ValidationError):
            return None

    def write(self, app: str, fetched_at: float, machines: list[Machine]) -> None:
        path = self._file(app, ".json")
        if path is None:
            self._memory[app] = (fetched_at, machines)
            return
        payload = {
            "fetched_at": fetched_at,
            "machines": [m.model_dump(mode="json", exclude_none=True) for m in machines],
        }
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(json.dumps(payload, separators=(",", ":")).encode())
            os.replace(temporary, path)  # readers see the old list or the new one, never half
        except OSError as exc:
            logger.warning("flyfn: could not share the Machine list: %s", exc)
            with contextlib.suppress(OSError):
                temporary.unlink()

    def forget(self, app: str) -> None:
        path = self._file(app, ".json")
        if path is None:
            self._memory.pop(app, None)
            return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class ListingSession:
    """One refresh's view of an app's Machines, under the app's lock (see `MachineListing`)."""

    def __init__(
        self,
        listing: MachineListing,
        client: AsyncMachinesClient,
        app: str,
        max_age: float,
        fresh_after: float,
    ) -> None:
        self._listing = listing
        self._client = client
        self.app = app
        self._max_age = max_age
        self._fresh_after = fresh_after
        self.calls = 0  # list calls this session made (the others were read from the shared list)
        # When the oldest list this session used was taken (a pool's cache ages from then).
        self.fetched_at: float | None = None

    async def app_machines(self, *, fresh: bool = False) -> list[Machine]:
        """The app's Machines: the shared list when recent enough (never when `fresh`), else one
        list call, shared from then on."""
        if not fresh:
            shared = self._listing.read(self.app)
            if shared is not None:
                fetched_at, machines = shared
                now = self._listing.clock()
                if fetched_at >= self._fresh_after and 0 <= now - fetched_at <= self._max_age:
                    self._used(fetched_at)
                    return machines
        started = self._listing.clock()
        machines = await self._client.list_machines(app=self.app)
        self.calls += 1
        self._listing.write(self.app, started, machines)
        self._used(started)
        return machines

    def age(self) -> float:
        """How old (seconds) the oldest list this session used is."""
        if self.fetched_at is None:
            return 0.0
        return max(0.0, self._listing.clock() - self.fetched_at)

    def _used(self, fetched_at: float) -> None:
        if self.fetched_at is None or fetched_at < self.fetched_at:
            self.fetched_at = fetched_at

    async def group(self, spec: PoolSpec, *, fresh: bool = False) -> list[Machine]:
        """The group's Machines of every image (not the destroyed ones): a `GroupLister`."""
        return [
            m
            for m in await self.app_machines(fresh=fresh)
            if machine_group(m) == spec.group and m.state not in GONE_STATES
        ]

    def changed(self) -> None:
        """Machines were destroyed or updated: the next refresh lists again."""
        self._listing.forget(self.app)
