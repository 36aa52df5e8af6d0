"""The record of a Machine's issued replays: each explains at most one `fly-replay-failed` fallback.

`fly-replay-failed` is a request header, so any client can send one, and it does not carry the
replay's signed state. A Machine therefore runs a fallback only for a replay it issued itself: each
replay it answers records one entry, keyed by `replay_key` (a MAC of the request's method, path,
query string and body binding), and a fallback consumes one matching, unexpired entry. One replay
explains one fallback; a fallback nothing explains is refused.

The record is per Machine, not per process: on Fly a Machine runs several worker processes
(`gunicorn -w 4`), and Fly Proxy may hand the fallback to any of them. A Machine with an id keeps
its record in its Machine's directory (`flyfn.machine_dir`: `/dev/shm/flyfn-<machine id>/replays/`,
or under the temp dir where there is no /dev/shm this user can write to), one append-only file per
second in which entries expire, `<expiry second>.log` (an entry lives its TTL rounded up to the
next whole second: never less, less than a second more):

- issuing a replay appends one line, its key (`ENTRY_SIZE` bytes), to its expiry second's log: one
  `write` to a file the process keeps open (`O_APPEND`: the kernel puts each process's whole line
  at the end, one after the other);
- a fallback reads the logs of the seconds not yet past and claims one line of its key by
  creating `<expiry second>.taken/<offset>` with `O_CREAT | O_EXCL`: the kernel lets exactly one
  process create it, so across the Machine's processes one replay explains one fallback. Only
  the Machine's first `REPLAY_RECORD_LIMIT` unconsumed entries (the closest to their expiry
  first) explain a fallback, and a fallback reads no further: at most that many lines of
  `ENTRY_SIZE` bytes, and the consumed lines among them (each a fallback this Machine ran).
  Claims have a directory per second, and are counted only when the logs hold more lines than
  the limit, so that in a burst of fallbacks each does not list all the others' claims. Only
  replays, the frequent case, must be cheap;
- each process sweeps once a second as it issues replays: it empties and removes the past
  seconds' logs, then their claims (expiry is deleting files), and counts the Machine's
  unconsumed entries, from the logs' sizes less the claims. It records a replay while that count
  plus its own since is below `REPLAY_RECORD_LIMIT`; others' since are seen at its next sweep, so
  the workers may append up to about a second's replays beyond the limit (at most the limit
  each, 528 KiB of /dev/shm), lines that explain nothing until entries before them are consumed
  or expire. When a process finds the record full, a replay goes unrecorded: its fallback answers
  503, and a log line says so once a minute;
- a process that stops replaying stops sweeping, and keeps its logs open (one per second its
  entries expire in) until it next replays: another process's sweep removes them, emptied first,
  so they hold no data meanwhile. When no process replays, nothing is swept, and the logs stay
  as they were, bounded as above, until one does.

Without a Machine id (off Fly, the tests) the record is in-process (`MemoryRecord`), with the same
rules.

`fly-request-id` is not part of the key: whether Fly Proxy keeps it across a replay and its
fallback is not documented, and it is not confirmed, so nothing here relies on it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Protocol

from flyfn import process_state
from flyfn.machine_dir import machine_dir

__all__ = [
    "ENTRY_SIZE",
    "FALLBACK_RETURN_MARGIN",
    "REPLAY_RECORD_LIMIT",
    "DirectoryRecord",
    "MemoryRecord",
    "ReplayRecord",
    "machine_record",
    "open_record",
    "replay_key",
    "reset",
]

logger = logging.getLogger("flyfn.replay_record")

# The most unconsumed entries of a Machine's record that explain fallbacks (a flood of distinct
# requests then goes unrecorded, and its fallbacks answer 503).
REPLAY_RECORD_LIMIT = 16_384
# Seconds a fallback may take to come back once the replay timed out, beyond the replay timeout
# (at least: an entry's expiry is rounded up to a whole second).
FALLBACK_RETURN_MARGIN = 6.0
# Seconds between two sweeps of a process (while it issues replays).
SWEEP_INTERVAL = 1.0
# Seconds between two log lines saying the record is full (or cannot be written), per process.
_REPORT_INTERVAL = 60.0
_KEY_SALT = "flyfn.replay_record"


@functools.lru_cache(maxsize=16)
def _keyed_mac(secret: str | bytes) -> hashlib.blake2b:
    """A keyed BLAKE2b (a MAC by design, one pass where an HMAC takes two) keyed from `secret`,
    copied per key (cheaper than keying it per request)."""
    raw = secret.encode("utf-8", "surrogatepass") if isinstance(secret, str) else secret
    key = hashlib.sha256(_KEY_SALT.encode() + raw).digest()
    return hashlib.blake2b(key=key, digest_size=16)


def replay_key(secret: str | bytes, method: str, path: str, query: str, body: str) -> str:
    """The record's key of a request: 32 hex digits of a MAC (keyed from `secret`, i.e.
    `SECRET_KEY`) of its method, path, query string and body binding (`body_binding()`, as the
    signed state binds it). Keyed, so that no one without the key can name an entry, and the
    record does not tell which URLs were requested. Every field but the last is length-prefixed:
    no two requests share a message."""
    mac = _keyed_mac(secret).copy()
    message = f"{len(method)}:{method}\n{len(query)}:{query}\n{len(body)}:{body}\n{path}"
    mac.update(message.encode("utf-8", "surrogatepass"))
    return mac.hexdigest()


def _expiry(issued: float, ttl: float) -> int:
    """The last whole second at which an entry issued at `issued` still explains a fallback:
    rounded up, so that an entry lives at least `ttl` seconds (less than one more)."""
    return math.ceil(issued + ttl)


# Where a record reads the time when it is not given one (tests set a fixed one).
Clock = Callable[[], float]


class ReplayRecord(Protocol):
    """What the middleware needs of a record (per Machine or in-process)."""

    clock: Clock

    def add(self, key: str, ttl: float, now: float | None = None) -> bool:
        """Record one replay of `key` explaining one fallback for `ttl` seconds; False when it
        went unrecorded (the record is full, or cannot be written)."""
        ...

    def take(self, key: str, now: float | None = None) -> bool:
        """Consume one unexpired entry of `key`: True for at most one caller per entry."""
        ...

    def clear(self) -> None:
        """Forget every entry."""
        ...


class _Reporter:
    """A warning logged at most once per `_REPORT_INTERVAL` seconds (per process)."""

    def __init__(self) -> None:
        self._at = float("-inf")

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._at < _REPORT_INTERVAL:
            return
        self._at = now
        logger.warning(message + " (logged once a minute at most).", *args)


_FULL = (
    "flyfn: the record of issued replays holds %d entries, its limit: new replays go unrecorded "
    "and their fallbacks answer 503"
)


class MemoryRecord:
    """A process's own record (no Machine id): a list of expiry seconds per key, behind a lock."""

    def __init__(self, limit: int = REPLAY_RECORD_LIMIT, clock: Clock = time.time) -> None:
        self.limit = limit
        self.clock = clock
        self._entries: dict[str, list[int]] = {}
        self._count = 0
        self._next_sweep = float("-inf")
        self._lock = threading.Lock()
        self._report = _Reporter()

    def add(self, key: str, ttl: float, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            if self._count >= self.limit:
                self._report(_FULL, self.limit)
                return False
            self._entries.setdefault(key, []).append(_expiry(now, ttl))
            self._count += 1
            return True

    def take(self, key: str, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        with self._lock:
            expiries = self._entries.get(key)
            if not expiries:
                return False
            live = [e for e in expiries if now <= e]
            self._count -= len(expiries) - len(live)
            found = bool(live)
            if found:
                live.pop(0)
                self._count -= 1
            if live:
                self._entries[key] = live
            else:
                del self._entries[key]
            return found

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_INTERVAL
        kept: dict[str, list[int]] = {}
        for key, expiries in self._entries.items():
            live = [e for e in expiries if now <= e]
            if live:
                kept[key] = live
        self._entries = kept
        self._count = sum(len(live) for live in kept.values())

    def clear(self) -> None:
        with self._lock:
            self._entries, self._count, self._next_sweep = {}, 0, float("-inf")


def _after_fork() -> None:
    global _records_lock
    # A worker forked from a parent that opened records opens its own (a lock held at the fork
    # would never be released in the child); the parent's files stay the parent's.
    _records_lock = threading.Lock()
    for record in _records.values():
        if isinstance(record, DirectoryRecord):
            record.drop_files()
    _records.clear()


# One entry: the key's 32 hex digits and a newline (its expiry second is its file's name).
ENTRY_SIZE = 33
_KEY_SIZE = ENTRY_SIZE - 1
_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
# Names under the record's root: `<expiry>.log`, and the directory `<expiry>.taken` of that
# second's claims, one empty file per consumed entry, named by its line's offset.
_LOG, _TAKEN = ".log", ".taken"


class DirectoryRecord:
    """A Machine's record shared by its processes: one append-only file per expiry second under
    `root`, one line per issued replay (see the module docstring)."""

    def __init__(
        self, root: str, limit: int = REPLAY_RECORD_LIMIT, clock: Clock = time.time
    ) -> None:
        self.root = root
        self.limit = limit
        self.clock = clock
        # The Machine's live entries at this process's last sweep plus its own since (another
        # process's since then are counted at the next sweep).
        self._total = 0
        self._next_sweep = float("-inf")
        # This process's open log of each expiry second it wrote to lately.
        self._files: dict[int, int] = {}
        # Held while writing, so that a sweep never closes a file another thread writes to.
        self._lock = threading.Lock()
        self._report = _Reporter()

    def add(self, key: str, ttl: float, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        expiry = _expiry(now, ttl)
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            if self._total >= self.limit:
                self._report(_FULL, self.limit)
                return False
            try:
                fd = self._files.get(expiry)
                if fd is None:
                    fd = self._files[expiry] = self._open_log(expiry)
                written = os.write(fd, key.encode("ascii") + b"\n")
            except OSError as exc:  # no space, no inode: the fallback will be refused
                self._report("flyfn: cannot record issued replays in %s: %s", self.root, exc)
                return False
            if written != ENTRY_SIZE:  # a torn line (no space left) explains nothing
                return False
            self._total += 1
            return True

    def _open_log(self, expiry: int) -> int:
        path = os.path.join(self.root, f"{expiry}{_LOG}")
        try:
            return os.open(path, _APPEND, 0o600)
        except FileNotFoundError:  # the record's first entry (or /tmp was cleaned)
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            return os.open(path, _APPEND, 0o600)

    def take(self, key: str, now: float | None = None) -> bool:
        clock = self.clock() if now is None else now
        needle = key.encode("ascii")
        if len(needle) != _KEY_SIZE:
            return False
        try:
            names = os.listdir(self.root)
        except OSError:  # no record yet: no entry
            return False
        live = [e for e in map(_log_expiry, names) if e is not None and clock <= e]
        # The Machine's first `limit` unconsumed entries, the closest to their expiry first: its
        # workers may briefly have appended more (each counts the others' at its sweeps), and
        # those explain nothing, so a fallback never reads more than the limit's worth (and the
        # consumed lines among them).
        room = self.limit
        # Within the limit altogether (the usual case), every line is read and the claims need
        # not be counted: listing them for each fallback of a burst would cost more than reading.
        at_limit = self._entries(live) > room
        for expiry in sorted(live):
            if room <= 0:
                break
            consumed = self._claims(expiry) if at_limit else 0
            try:
                with open(os.path.join(self.root, f"{expiry}{_LOG}"), "rb") as log:
                    data = log.read((room + consumed) * ENTRY_SIZE)
            except OSError:  # swept meanwhile
                continue
            if self._take_from(data, needle, expiry, now):
                return True
            room -= len(data) // ENTRY_SIZE - consumed
        return False

    def _take_from(self, data: bytes, key: bytes, expiry: int, now: float | None) -> bool:
        """Consume one entry of `key` in `expiry`'s log (`data`)."""
        at = data.find(key)
        while at >= 0:
            # A whole entry (a key ends its line; a torn line before it, written when the
            # space ran out, leaves it whole) that this caller claims first.
            whole = data[at + _KEY_SIZE : at + ENTRY_SIZE] == b"\n"
            if whole and self._claim(expiry, at):
                # A sweep that found the entry expired may have removed its claim just before
                # this one: only a claim made by its expiry second counts.
                return (self.clock() if now is None else now) <= expiry
            at = data.find(key, at + 1)
        return False

    def _claim(self, expiry: int, offset: int) -> bool:
        """Whether this caller is the one to consume the entry at `offset` of `expiry`'s log: the
        kernel lets exactly one process create its claim (`O_CREAT | O_EXCL`)."""
        claims = os.path.join(self.root, f"{expiry}{_TAKEN}")
        claim = os.path.join(claims, str(offset))
        try:
            try:
                os.close(os.open(claim, _CREATE, 0o600))
            except FileNotFoundError:  # the second's first claim
                os.makedirs(claims, mode=0o700, exist_ok=True)
                os.close(os.open(claim, _CREATE, 0o600))
        except OSError:  # claimed by another process (or the record cannot be written)
            return False
        return True

    def _entries(self, expiries: list[int]) -> int:
        """How many lines (consumed or not) the logs of `expiries` hold."""
        total = 0
        for expiry in expiries:
            with contextlib.suppress(OSError):  # swept meanwhile
                total += os.stat(os.path.join(self.root, f"{expiry}{_LOG}")).st_size // ENTRY_SIZE
        return total

    def _claims(self, expiry: int) -> int:
        """How many entries of `expiry`'s log are consumed."""
        try:
            return len(os.listdir(os.path.join(self.root, f"{expiry}{_TAKEN}")))
        except OSError:  # none yet (or swept)
            return 0

    def _sweep(self, now: float) -> int:
        """Remove expired seconds (their logs first, then their claims) and count the live
        entries; close this process's logs of expired seconds. Called with the lock held."""
        self._next_sweep = now + SWEEP_INTERVAL
        for past in [second for second in self._files if now > second]:
            os.close(self._files.pop(past))
        try:
            entries = list(os.scandir(self.root))
        except OSError:  # no record yet
            entries = []
        live = 0
        claims: list[tuple[int, str]] = []
        for entry in entries:
            name = entry.name
            expiry = _log_expiry(name)
            if expiry is None:
                second = _claims_expiry(name)
                if second is not None:
                    claims.append((second, entry.path))
                continue
            if now > expiry:
                # Emptied first: a process that stopped replaying keeps its descriptor of the
                # log until its next replay, and with it the log's data, were it only unlinked.
                with contextlib.suppress(OSError):  # swept by another process meanwhile
                    os.truncate(entry.path, 0)
                    os.unlink(entry.path)
                continue
            with contextlib.suppress(OSError):
                live += entry.stat().st_size // ENTRY_SIZE
        for second, path in claims:
            if now > second:
                shutil.rmtree(path, ignore_errors=True)
            else:
                live -= self._claims(second)  # consumed entries
        self._total = max(live, 0)
        return self._total

    def sweep(self, now: float | None = None) -> int:
        """Sweep now (it happens once a second as replays are recorded; tests); returns the
        Machine's live entries."""
        with self._lock:
            return self._sweep(self.clock() if now is None else now)

    def drop_files(self) -> None:
        """Close this process's logs (a forked child: copies of its parent's descriptors)."""
        for fd in self._files.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._files = {}

    def clear(self) -> None:
        with self._lock:
            self.drop_files()
            shutil.rmtree(self.root, ignore_errors=True)
            self._total, self._next_sweep = 0, float("-inf")


def _log_expiry(name: str) -> int | None:
    """The expiry second a log's name (`<expiry>.log`) says, None for another name."""
    if not name.endswith(_LOG):
        return None
    stem = name[: -len(_LOG)]
    return int(stem) if stem.isdigit() else None


def _claims_expiry(name: str) -> int | None:
    """The expiry second a claims directory's name (`<expiry>.taken`) says, None for another."""
    if not name.endswith(_TAKEN):
        return None
    stem = name[: -len(_TAKEN)]
    return int(stem) if stem.isdigit() else None


def open_record(
    machine_id: str | None,
    base: str | None = None,
    limit: int = REPLAY_RECORD_LIMIT,
    clock: Clock = time.time,
) -> ReplayRecord:
    """A new record for `machine_id`: its Machine's directory `replays` (`flyfn.machine_dir`,
    under `base`), or an in-process one without a usable Machine id or directory; it reads the
    time from `clock` when `add` or `take` is not given one."""
    if not machine_id:
        return MemoryRecord(limit, clock)
    root = machine_dir(machine_id, "replays", base=base)
    if root is None:
        logger.warning(
            "flyfn: Machine %r has no private directory of this user: issued replays are "
            "recorded per process (a fallback reaching another worker process answers 503).",
            machine_id,
        )
        return MemoryRecord(limit, clock)
    return DirectoryRecord(str(root), limit, clock)


_records: dict[str | None, ReplayRecord] = {}
_records_lock = threading.Lock()


def machine_record(machine_id: str | None) -> ReplayRecord:
    """The record of the Machine `machine_id` (in-process for None), opened on first use."""
    record = _records.get(machine_id)
    if record is None:
        with _records_lock:
            record = _records.get(machine_id)
            if record is None:
                # The limit as it is when the record opens (`python -m benchmarks.middleware`
                # raises it, so that it times every replay written).
                record = _records[machine_id] = open_record(machine_id, limit=REPLAY_RECORD_LIMIT)
    return record


def reset() -> None:
    """Clear and forget every record this process opened (tests)."""
    with _records_lock:
        for record in _records.values():
            record.clear()
        _records.clear()


process_state.register(
    __name__, "issued-replay records and open logs", fork=_after_fork, tests=reset
)
