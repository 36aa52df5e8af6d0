"""Periodic tasks at run time: enqueueing each due slot of the schedules exactly once (a
`ScheduledRun` row per backend, schedule and slot, unique), the ticker thread that does it on
an app Machine for schedules finer than Fly's intervals, and the rows `manage.py flyfn status`
and the live page show.

Who looks for due slots: on Fly, the scheduled Machine of each interval in use runs `manage.py
flyfn tick INTERVAL` when Fly starts it (`flyfn.tasks.scheduled_machines`); an app Machine's
ticker runs the finer ones (`every` seconds, `cron`); off Fly (the local role) the ticker runs
them all. Whoever looks, a slot's row is inserted in the transaction that enqueues its task: a
second look at the same slot, on any Machine and at the same moment, finds the row and enqueues
nothing. The enqueued task is delivered as any other: its group is woken after the commit.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import IntegrityError, close_old_connections, connections, router, transaction
from django.db.models import Max
from django.utils import timezone
from django.utils.module_loading import import_string

from flyfn import process_state
from flyfn.machine_role import current_role
from flyfn.tasks.clock import db_now
from flyfn.tasks.configured import FlyfnBackend, flyfn_backends
from flyfn.tasks.models import ScheduledRun
from flyfn.tasks.runner import worker_id
from flyfn.tasks.schedules import Schedule, time_scale

__all__ = [
    "ScheduleRow",
    "SlotRun",
    "enqueue_due",
    "enqueue_slot",
    "schedule_rows",
    "start_ticker",
    "stop_ticker",
]

logger = logging.getLogger("flyfn.tasks")

# Bounds of the ticker's sleep: it never oversleeps a slot by more than the upper one (a clock
# that jumped), and never spins.
MIN_TICK = 0.05
MAX_TICK = 60.0

# How long a slot's row is kept once a later slot has run (a schedule every minute keeps about
# 10,000 rows).
KEPT = timedelta(days=7)

Selection = Callable[[Schedule], bool]


@dataclass(frozen=True, slots=True)
class SlotRun:
    """One look at a schedule's current slot: the task enqueued for it (None: the slot already
    had its run, here or on another Machine, or the enqueue failed: `error` says why)."""

    backend: str
    schedule: str
    slot: datetime
    task_id: str | None
    error: str | None = None


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
    database = router.db_for_write(ScheduledRun) or "default"
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
        # Only the current slot is ever looked up: older rows are history, kept a while.
        ScheduledRun.objects.using(database).filter(
            backend_name=backend.alias, schedule=name, slot__lt=slot - KEPT
        ).delete()
    return str(result.id)


def enqueue_due(which: Selection) -> list[SlotRun]:
    """Look at the current slot (on the database's clock) of every schedule `which` selects, of
    every flyfn backend, and enqueue those that have no run yet; a schedule whose enqueue fails
    is logged and reported (its slot has no row: the next look tries again)."""
    scale = time_scale()
    done: list[SlotRun] = []
    for backend in flyfn_backends():
        now = db_now(router.db_for_write(ScheduledRun) or "default")
        for name, schedule in sorted(backend.schedules.items()):
            if not which(schedule):
                continue
            slot = schedule.slot_at(now, scale)
            try:
                task_id = enqueue_slot(backend, name, schedule, slot)
            except Exception as exc:  # one broken schedule must not hold up the others
                error = f"{type(exc).__name__}: {exc}"
                logger.error("flyfn tasks: schedule %r cannot be enqueued: %s", name, error)
                done.append(SlotRun(backend.alias, name, slot, None, error))
                continue
            if task_id is not None:
                logger.info(
                    "flyfn tasks: schedule %r enqueued %s for its slot %s",
                    name,
                    schedule.task,
                    slot.isoformat(),
                )
            done.append(SlotRun(backend.alias, name, slot, task_id))
    return done


def runs_on_app_machines(schedule: Schedule) -> bool:
    """The schedules an app Machine's ticker runs: those finer than Fly's intervals."""
    return schedule.fly_interval is None


def _everything(schedule: Schedule) -> bool:
    return True


# -- the ticker --------------------------------------------------------------------------------


class Ticker:
    """A daemon thread that enqueues the due slots of the schedules `which` selects, sleeping
    until the next slot of any of them (or `MAX_TICK`)."""

    def __init__(self, which: Selection) -> None:
        self.which = which
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
        while not self._stopped:
            try:
                enqueue_due(self.which)
                sleep = self._until_next()
            except Exception as exc:  # the database is away: look again soon
                logger.warning("flyfn tasks: cannot run schedules: %s: %s", type(exc).__name__, exc)
                sleep = MAX_TICK / 6
            with contextlib.suppress(Exception):
                close_old_connections()
            self._wake.wait(sleep)
        connections.close_all()

    def _until_next(self) -> float:
        scale = time_scale()
        now = db_now(router.db_for_read(ScheduledRun) or "default")
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
    """Start this process's ticker (an app Machine's first request; the local role's too) when
    a flyfn backend has schedules it runs: the finer ones on an app Machine, all of them off
    Fly. Whether one runs."""
    global _ticker
    role = current_role()
    if role.is_function:
        return False
    which = _everything if role.is_local else runs_on_app_machines
    if not any(which(s) for b in flyfn_backends() for s in b.schedules.values()):
        return False
    with _ticker_lock:
        if _ticker is None:
            _ticker = Ticker(which)
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
    # Threads do not survive fork(): a forked worker starts its own ticker.
    global _ticker, _ticker_lock
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
        now = db_now(router.db_for_read(ScheduledRun) or "default")
        last = dict(
            ScheduledRun.objects.filter(backend_name=backend.alias)
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
