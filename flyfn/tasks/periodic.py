"""Periodic tasks at run time: enqueueing each due slot of the schedules exactly once (a
`ScheduledRun` row per backend, schedule and slot, unique), the ticker thread that does it on
an app Machine for schedules finer than Fly's intervals, and the rows `manage.py flyfn status`
and the live page show.

Who looks for due slots: on Fly, the scheduled Machine of each interval in use runs `manage.py
flyfn tick INTERVAL` when Fly starts it (`flyfn.tasks.scheduled_machines`); an app Machine's
ticker runs the finer ones (`every` seconds, `cron`): each process starts one with its first
request, and the one that holds the Machine's lock looks; off Fly (the local role) every
process's ticker runs them all. Whoever looks, a slot's row is inserted in the transaction that
enqueues its task: a second look at the same slot, on any Machine and at the same moment, finds
the row and enqueues nothing. The enqueued task is delivered as any other: its group is woken
after the commit.

A look runs the slot it falls in and, late, the slot just before it when that one has no row
and the schedule has run before (Fly starts a scheduled Machine once per interval from its
creation, at no stated minute: starts at 10:59:59 and 12:00:01 look at no moment of the 11:00
slot). An older slot without a row is skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from django.db import (
    Error,
    IntegrityError,
    close_old_connections,
    connections,
    router,
    transaction,
)
from django.db.models import Max
from django.utils import timezone
from django.utils.module_loading import import_string
from django_tasks_db.models import DBTaskResult

from flyfn import process_state
from flyfn.backoff import Backoff
from flyfn.machine_dir import machine_dir
from flyfn.machine_role import current_env, current_role
from flyfn.tasks.clock import db_now
from flyfn.tasks.configured import FlyfnBackend, flyfn_backends
from flyfn.tasks.models import ScheduledRun
from flyfn.tasks.runner import worker_id
from flyfn.tasks.schedules import Schedule, time_scale

__all__ = [
    "ScheduleRow",
    "SlotRun",
    "Ticker",
    "TickerLock",
    "enqueue_due",
    "enqueue_slot",
    "error_text",
    "schedule_database",
    "schedule_rows",
    "start_ticker",
    "stop_ticker",
]

logger = logging.getLogger("flyfn.tasks")

# Bounds of the ticker's sleep: it never oversleeps a slot by more than the upper one (a clock
# that jumped), and never spins.
MIN_TICK = 0.05
MAX_TICK = 60.0

# How often a process whose Machine's ticker runs in another of its processes checks whether that
# one is gone (it then takes over).
LOCK_POLL = 10.0

# The pause before a look retries a slot whose enqueue failed (doubling), well within an `every:
# 60` slot: a failed slot is not left for the next one.
RETRY_FIRST = 1.0
RETRY_CAP = 15.0

# How long a slot's row is kept once a later slot has run (a schedule every minute keeps about
# 10,000 rows).
KEPT = timedelta(days=7)

Selection = Callable[[Schedule], bool]


@dataclass(frozen=True, slots=True)
class SlotRun:
    """One look at a schedule's slot: the task enqueued for it (None: the slot already had its
    run, here or on another Machine, or the enqueue failed: `error` says why). `late`: the slot
    before the current one, caught up on."""

    backend: str
    schedule: str
    slot: datetime
    task_id: str | None
    error: str | None = None
    late: bool = False


# Modules of database drivers: their messages may name the host, the user or the database.
_DRIVER_MODULES = ("psycopg", "psycopg2", "MySQLdb", "pymysql", "sqlite3", "oracledb", "cx_Oracle")


def error_text(exc: BaseException) -> str:
    """How a failed look names its error in logs and `tick`'s output: the exception's class, and
    its message only when it cannot come from a database connection (a driver's message may
    carry the host, user and database of the DSN)."""
    kind = type(exc).__name__
    from_driver = any(
        klass.__module__.split(".")[0] in _DRIVER_MODULES for klass in type(exc).__mro__
    )
    if isinstance(exc, (Error, OSError)) or from_driver:
        return f"{kind} (database or network error; message withheld)"
    return f"{kind}: {exc}"


def schedule_database() -> str:
    """The database of the slots' rows, which must be the tasks' own: a slot's row and its task
    are committed in one transaction (`flyfn.E024` checks the routers agree)."""
    database = router.db_for_write(ScheduledRun) or "default"
    tasks = router.db_for_write(DBTaskResult) or "default"
    if database != tasks:
        raise ImproperlyConfigured(
            f"periodic tasks need ScheduledRun and DBTaskResult in one database (the router "
            f"gives {database!r} and {tasks!r}): a slot's row and its task are committed together"
        )
    return database


def enqueue_slot(
    backend: FlyfnBackend, name: str, schedule: Schedule, slot: datetime
) -> str | None:
    """Enqueue `schedule`'s task for `slot` unless the slot has its run already; the new task's
    id, or None. The slot's row and the task are committed together, or neither."""
    task = import_string(schedule.task)
    using: dict[str, object] = {"backend": backend.alias}
    if schedule.queue_name is not None:
        using["queue_name"] = schedule.queue_name
    if schedule.priority is not None:
        using["priority"] = schedule.priority
    database = schedule_database()
    with transaction.atomic(using=database):
        try:
            with transaction.atomic(using=database):  # a savepoint: the insert may lose
                run = ScheduledRun.objects.using(database).create(
                    backend_name=backend.alias,
                    schedule=name,
                    slot=slot,
                    machine_id=worker_id(),
                    enqueued_at=timezone.now(),
                )
        except IntegrityError:  # another look got there first (on PostgreSQL it waited for it)
            return None
        result = task.using(**using).enqueue(*schedule.args, **schedule.kwargs)
        run.task_id = str(result.id)
        run.save(update_fields=["task_id"])
        # Only the latest slots are ever looked up: older rows are history, kept a while (the
        # schedule's latest row always stays: it tells a catch-up the schedule ran before).
        ScheduledRun.objects.using(database).filter(
            backend_name=backend.alias, schedule=name, slot__lt=slot - KEPT
        ).delete()
    return str(result.id)


def enqueue_due(which: Selection) -> list[SlotRun]:
    """Look at the slots (on the database's clock) of every schedule `which` selects, of every
    flyfn backend: the slot just before the current one, when it has no run and the schedule
    ran before it (late), then the current slot, each enqueued unless it has its run. A slot
    whose enqueue fails is logged and reported (it has no row: the next look tries again)."""
    scale = time_scale()
    done: list[SlotRun] = []
    for backend in flyfn_backends():
        database = schedule_database()
        now = db_now(database)
        for name, schedule in sorted(backend.schedules.items()):
            if not which(schedule):
                continue
            current = schedule.slot_at(now, scale)
            slots = [(current, False)]
            try:
                previous = schedule.previous_slot(now, scale)
                last = _last_slot(database, backend.alias, name)
            except Exception as exc:  # the database is away: the current slot's look says so too
                logger.warning(
                    "flyfn tasks: schedule %r: cannot read its last slot: %s",
                    name,
                    error_text(exc),
                )
            else:
                if last is not None and last < previous:
                    slots.insert(0, (previous, True))
            for slot, late in slots:
                done.append(_look(backend, name, schedule, slot, late=late))
    return done


def _last_slot(database: str, backend: str, name: str) -> datetime | None:
    found = (
        ScheduledRun.objects.using(database)
        .filter(backend_name=backend, schedule=name)
        .aggregate(last=Max("slot"))["last"]
    )
    return found if isinstance(found, datetime) else None


def _look(
    backend: FlyfnBackend, name: str, schedule: Schedule, slot: datetime, *, late: bool
) -> SlotRun:
    try:
        task_id = enqueue_slot(backend, name, schedule, slot)
    except Exception as exc:  # one broken schedule must not hold up the others
        error = error_text(exc)
        logger.error(
            "flyfn tasks: schedule %r cannot be enqueued for its slot %s: %s",
            name,
            slot.isoformat(),
            error,
        )
        return SlotRun(backend.alias, name, slot, None, error, late)
    if task_id is not None:
        logger.info(
            "flyfn tasks: schedule %r enqueued %s for its slot %s%s",
            name,
            schedule.task,
            slot.isoformat(),
            " (late: no look in that slot)" if late else "",
        )
    return SlotRun(backend.alias, name, slot, task_id, late=late)


def runs_on_app_machines(schedule: Schedule) -> bool:
    """The schedules an app Machine's ticker runs: those finer than Fly's intervals."""
    return schedule.fly_interval is None


def _everything(schedule: Schedule) -> bool:
    return True


# -- the ticker --------------------------------------------------------------------------------


class TickerLock:
    """The one ticker of a Machine: an exclusive `flock` on a file of the Machine's directory,
    shared by its worker processes (each serves requests and starts a ticker; one looks). The
    kernel drops it with its process, so another worker takes over. No path (off Fly, no
    Machine id): every process holds it."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Whether this process holds the lock now (without waiting)."""
        if self.path is None or self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:  # no lock file to be had: look rather than never
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process of the Machine holds it
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _machine_lock() -> TickerLock:
    directory = machine_dir(current_env().machine_id, "schedules")
    return TickerLock(None if directory is None else directory / "ticker.lock")


class Ticker:
    """A daemon thread that enqueues the due slots of the schedules `which` selects, sleeping
    until the next slot of any of them (or `MAX_TICK`), once it holds its Machine's `lock`."""

    def __init__(self, which: Selection, lock: TickerLock | None = None) -> None:
        self.which = which
        self.lock = lock or TickerLock(None)
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="flyfn-schedules", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        # Another process of the Machine looks: wait, quietly, until it is gone.
        while not self._stopped and not self.lock.acquire():
            self._wake.wait(LOCK_POLL)
        retry = Backoff(RETRY_FIRST, RETRY_CAP)
        while not self._stopped:
            try:
                failed = any(run.error for run in enqueue_due(self.which))
                sleep = self._until_next()
            except Exception as exc:  # the database is away: look again soon
                logger.warning("flyfn tasks: cannot run schedules: %s", error_text(exc))
                failed, sleep = True, MAX_TICK
            if failed:  # a slot without its run: look again soon, not at the next slot
                retry.failed()
                sleep = min(sleep, retry.delay)
            else:
                retry.succeeded()
            with contextlib.suppress(Exception):
                close_old_connections()
            self._wake.wait(sleep)
        self.lock.release()
        connections.close_all()

    def _until_next(self) -> float:
        scale = time_scale()
        now = db_now(schedule_database())
        upcoming = [
            schedule.next_slot(now, scale)
            for backend in flyfn_backends()
            for schedule in backend.schedules.values()
            if self.which(schedule)
        ]
        if not upcoming:
            return MAX_TICK
        return min(MAX_TICK, max(MIN_TICK, (min(upcoming) - now).total_seconds()))


_ticker: Ticker | None = None
_ticker_lock = threading.Lock()


def start_ticker() -> bool:
    """Start this process's ticker (as a web process of an app Machine boots; the local role's
    too) when
    a flyfn backend has schedules it runs: the finer ones on an app Machine, all of them off
    Fly. Whether one runs (on a Machine, it looks once it holds the Machine's lock)."""
    global _ticker
    role = current_role()
    if role.is_function:
        return False
    which = _everything if role.is_local else runs_on_app_machines
    if not any(which(s) for b in flyfn_backends() for s in b.schedules.values()):
        return False
    with _ticker_lock:
        if _ticker is None:
            _ticker = Ticker(which, _machine_lock())
            _ticker.start()
    return True


def stop_ticker() -> None:
    """Stop and forget the process's ticker (tests)."""
    global _ticker
    with _ticker_lock:
        found, _ticker = _ticker, None
    if found is not None:
        found.stop()


def _forget_after_fork() -> None:
    # Threads do not survive fork(): a forked worker starts its own ticker. Its copy of the
    # parent's lock is closed (the parent's still holds it).
    global _ticker, _ticker_lock
    if _ticker is not None:
        _ticker.lock.release()
    _ticker = None
    _ticker_lock = threading.Lock()


process_state.register(__name__, "schedules' ticker", fork=_forget_after_fork, tests=stop_ticker)


# -- what status shows -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    """One schedule as status and the live page list it."""

    backend: str
    name: str
    task: str
    when: str
    runs_on: str  # "scheduled Machine (hourly)" or "app Machine"
    last_slot: datetime | None
    next_slot: datetime


def schedule_rows(scale: float | None = None) -> list[ScheduleRow]:
    """Every schedule of every flyfn backend, with its last enqueued slot and its next one
    (`scale`: the time scale of the Machines, default this process's)."""
    rows: list[ScheduleRow] = []
    scale = time_scale() if scale is None else scale
    for backend in flyfn_backends():
        if not backend.schedules:
            continue
        database = router.db_for_read(ScheduledRun) or "default"
        now = db_now(database)
        last = dict(
            ScheduledRun.objects.using(database)
            .filter(backend_name=backend.alias)
            .values_list("schedule")
            .annotate(last=Max("slot"))
            .order_by()
        )
        for name, schedule in sorted(backend.schedules.items()):
            interval = schedule.fly_interval
            rows.append(
                ScheduleRow(
                    backend=backend.alias,
                    name=name,
                    task=schedule.task,
                    when=schedule.when,
                    runs_on=f"scheduled Machine ({interval})" if interval else "app Machine",
                    last_slot=last.get(name),
                    next_slot=schedule.next_slot(now, scale),
                )
            )
    return rows
