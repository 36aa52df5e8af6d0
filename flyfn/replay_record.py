"""The record of a Machine's issued replays: each explains at most one `fly-replay-failed` fallback.

`fly-replay-failed` is a request header, so any client can send one, and it does not carry the
replay's signed state. A Machine therefore runs a fallback only for a replay it issued itself: each
replay it answers records one entry, keyed by `replay_key` (an HMAC of the request's method, path,
query string and body binding), and a fallback consumes one matching, unexpired entry. One replay
explains one fallback; a fallback nothing explains is refused.

The record is per Machine, not per process: on Fly a Machine runs several worker processes
(`gunicorn -w 4`), and Fly Proxy may hand the fallback to any of them. A Machine with an id keeps
its record in its Machine's directory (`flyfn.machine_dir`: `/dev/shm/flyfn-<machine id>/replays/`,
or under the temp dir where there is no /dev/shm this user can write to):

- issuing a replay creates one empty file, `<shard>/<key>.<expiry second>.<pid>.<n>`, with
  `O_CREAT | O_EXCL` (one `open` and one `close`);
- a fallback lists its key's shard (1/256 of the record) and `unlink`s one unexpired entry of its
  key: the kernel lets exactly one process win an `unlink`, so across the Machine's processes one
  replay explains one fallback;
- each process sweeps expired entries, one shard at a time as it issues replays (every shard
  about once a second while replays come often; a full record's shard takes about 80 µs), and
  counts the rest: at most `REPLAY_RECORD_LIMIT` entries as of its last sweep of each shard plus
  its own since (other processes' entries are seen at the shard's next sweep, so the Machine may
  briefly hold about a second's worth of its other workers' replays more). When full, a replay
  sweeps every shard first (at most once a second), and if there is still no room it goes
  unrecorded: its fallback answers 503, and a log line says so once a minute.

Without a Machine id (off Fly, the tests) the record is in-process (`MemoryRecord`), with the same
rules.

`fly-request-id` is not part of the key: whether Fly Proxy keeps it across a replay and its
fallback is not documented, and it is not confirmed, so nothing here relies on it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import itertools
import logging
import math
import os
import shutil
import stat
import sys
import threading
import time
from typing import Protocol

from flyfn import process_state
from flyfn.machine_dir import machine_dir

__all__ = [
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

# The most entries a Machine's record holds (a flood of distinct requests then goes unrecorded,
# and its fallbacks answer 503).
REPLAY_RECORD_LIMIT = 16_384
# Seconds a fallback may take to come back once the replay timed out, beyond the replay timeout.
FALLBACK_RETURN_MARGIN = 6.0
# Seconds in which a process sweeps every shard once (while it issues replays), and between two
# full sweeps when the record is full.
SWEEP_INTERVAL = 1.0
# Seconds between two log lines saying the record is full (or cannot be written), per process.
_REPORT_INTERVAL = 60.0
# Key characters that name an entry's shard: 256 shards of hex digits.
_SHARD_CHARS = 2
_SHARDS = 16**_SHARD_CHARS
_KEY_SALT = "flyfn.replay_record"


@functools.lru_cache(maxsize=16)
def _keyed_hmac(secret: str | bytes) -> hmac.HMAC:
    """The HMAC-SHA256 keyed as Django's `salted_hmac(_KEY_SALT, ..., secret=secret)` keys it,
    copied per key (cheaper than deriving the key per request)."""
    raw = secret.encode("utf-8", "surrogatepass") if isinstance(secret, str) else secret
    key = hashlib.sha256(_KEY_SALT.encode() + raw).digest()
    return hmac.new(key, digestmod=hashlib.sha256)


def replay_key(secret: str | bytes, method: str, path: str, query: str, body: str) -> str:
    """The record's key of a request: 32 hex digits of an HMAC (keyed from `secret`, i.e.
    `SECRET_KEY`) of its method, path, query string and body binding (`body_binding()`, as the
    signed state binds it). Keyed, so that no one without the key can name an entry, and the
    record's file names do not tell which URLs were requested. Every field but the last is
    length-prefixed: no two requests share a message."""
    mac = _keyed_hmac(secret).copy()
    message = f"{len(method)}:{method}\n{len(query)}:{query}\n{len(body)}:{body}\n{path}"
    mac.update(message.encode("utf-8", "surrogatepass"))
    return mac.hexdigest()[:32]


def _expiry(issued: float, ttl: float) -> int:
    """The last whole second at which an entry issued at `issued` still explains a fallback."""
    return int(issued) + math.ceil(ttl)


class ReplayRecord(Protocol):
    """What the middleware needs of a record (per Machine or in-process)."""

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

    def __init__(self, limit: int = REPLAY_RECORD_LIMIT) -> None:
        self.limit = limit
        self._entries: dict[str, list[int]] = {}
        self._count = 0
        self._next_sweep = float("-inf")
        self._lock = threading.Lock()
        self._report = _Reporter()

    def add(self, key: str, ttl: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
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
        now = time.time() if now is None else now
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


# Entry names: unique per process by its pid (reset in a forked child) and a counter.
_pid = os.getpid()
_serial = itertools.count()


def _after_fork() -> None:
    global _pid, _records_lock
    _pid = os.getpid()
    # A worker forked from a parent that opened records opens its own (a lock held at the fork
    # would never be released in the child).
    _records_lock = threading.Lock()
    _records.clear()


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _create_entry(path: str) -> None:
    """An empty file at `path`; FileExistsError if there is one."""
    os.close(os.open(path, _CREATE, 0o600))


def _mknod_entry(path: str) -> None:
    # One syscall, no descriptor to open and close (about a quarter cheaper on the request
    # path); like O_EXCL it fails on an existing name. Linux only: elsewhere it may need root.
    os.mknod(path, 0o600 | stat.S_IFREG)


make_entry = _mknod_entry if sys.platform.startswith("linux") else _create_entry


class DirectoryRecord:
    """A Machine's record shared by its processes: one empty file per issued replay, in 256
    shard directories under `root` (see the module docstring)."""

    def __init__(self, root: str, limit: int = REPLAY_RECORD_LIMIT) -> None:
        self.root = root
        self.limit = limit
        # Per shard: the Machine's live entries at this process's last sweep of it, and this
        # process's entries since; `_total` is their sum (a race between threads may miscount
        # an entry or two until the shard's next sweep).
        self._found = [0] * _SHARDS
        self._added = [0] * _SHARDS
        self._total = 0
        self._next_shard = 0
        self._next_sweep = float("-inf")  # of the next shard
        self._next_full_sweep = float("-inf")
        self._report = _Reporter()

    def add(self, key: str, ttl: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if now >= self._next_sweep:  # one shard at a time: all 256 about once a second
            self._next_sweep = now + SWEEP_INTERVAL / _SHARDS
            due, self._next_shard = self._next_shard, (self._next_shard + 1) % _SHARDS
            self._sweep_shard(due, now)
        if self._total >= self.limit and now >= self._next_full_sweep:
            self.sweep(now)  # full: only expired entries can make room for this replay
        if self._total >= self.limit:
            self._report(_FULL, self.limit)
            return False
        shard_name = key[:_SHARD_CHARS]
        shard = os.path.join(self.root, shard_name)
        stem = f"{shard}/{key}.{_expiry(now, ttl)}.{_pid}."
        for _ in range(4):
            try:
                make_entry(f"{stem}{next(_serial)}")
            except FileExistsError:  # a dead process's entry of the same pid: another number
                continue
            except FileNotFoundError:  # the shard's first entry (or /tmp was cleaned)
                try:
                    os.makedirs(shard, mode=0o700, exist_ok=True)
                except OSError as exc:
                    self._report("flyfn: cannot record issued replays in %s: %s", self.root, exc)
                    return False
                continue
            except OSError as exc:  # no space, no inode: the fallback will be refused
                self._report("flyfn: cannot record issued replays in %s: %s", self.root, exc)
                return False
            self._added[int(shard_name, 16)] += 1
            self._total += 1
            return True
        return False

    def take(self, key: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        shard = os.path.join(self.root, key[:_SHARD_CHARS])
        prefix = key + "."
        try:
            with os.scandir(shard) as entries:
                names = [entry.name for entry in entries if entry.name.startswith(prefix)]
        except OSError:  # no shard: no entry
            return False
        for name in names:
            expiry = _entry_expiry(name)
            try:
                os.unlink(os.path.join(shard, name))
            except FileNotFoundError:  # another process consumed (or swept) it first
                continue
            except OSError:
                return False
            if expiry is not None and now <= expiry:
                return True
            # An expired entry, removed on the way: it explains nothing any more.
        return False

    def _sweep_shard(self, shard: int, now: float) -> None:
        """Remove the shard's expired entries and count the others."""
        path = os.path.join(self.root, f"{shard:0{_SHARD_CHARS}x}")
        count = 0
        try:
            with os.scandir(path) as entries:
                names = [entry.name for entry in entries]
        except OSError:  # no shard yet
            names = []
        for name in names:
            expiry = _entry_expiry(name)
            if expiry is not None and now <= expiry:
                count += 1
                continue
            with contextlib.suppress(OSError):  # consumed meanwhile
                os.unlink(os.path.join(path, name))
        self._total += count - self._found[shard] - self._added[shard]
        self._found[shard], self._added[shard] = count, 0

    def sweep(self, now: float | None = None) -> int:
        """Sweep every shard now (the record is full, or a test); returns the live entries."""
        now = time.time() if now is None else now
        self._next_full_sweep = now + SWEEP_INTERVAL
        for shard in range(_SHARDS):
            self._sweep_shard(shard, now)
        return self._total

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self._found, self._added = [0] * _SHARDS, [0] * _SHARDS
        self._total, self._next_sweep, self._next_full_sweep = 0, float("-inf"), float("-inf")


def _entry_expiry(name: str) -> int | None:
    """The expiry second in an entry's name (`<key>.<expiry>.<pid>.<n>`), None if malformed."""
    parts = name.split(".")
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    return int(parts[1])


def open_record(
    machine_id: str | None, base: str | None = None, limit: int = REPLAY_RECORD_LIMIT
) -> ReplayRecord:
    """A new record for `machine_id`: its Machine's directory `replays` (`flyfn.machine_dir`,
    under `base`), or an in-process one without a usable Machine id or directory."""
    if not machine_id:
        return MemoryRecord(limit)
    root = machine_dir(machine_id, "replays", base=base)
    if root is None:
        logger.warning(
            "flyfn: Machine %r has no private directory of this user: issued replays are "
            "recorded per process (a fallback reaching another worker process answers 503).",
            machine_id,
        )
        return MemoryRecord(limit)
    return DirectoryRecord(str(root), limit)


_records: dict[str | None, ReplayRecord] = {}
_records_lock = threading.Lock()


def machine_record(machine_id: str | None) -> ReplayRecord:
    """The record of the Machine `machine_id` (in-process for None), opened on first use."""
    record = _records.get(machine_id)
    if record is None:
        with _records_lock:
            record = _records.get(machine_id)
            if record is None:
                record = _records[machine_id] = open_record(machine_id)
    return record


def reset() -> None:
    """Clear and forget every record this process opened (tests)."""
    with _records_lock:
        for record in _records.values():
            record.clear()
        _records.clear()


process_state.register(
    __name__, "issued-replay records and entry names", fork=_after_fork, tests=reset
)
