"""Claiming and running a group's due tasks: leases and their heartbeat, attempts, outcomes.

The same loop runs on a function Machine (inside a wake request) and, off Fly, in a thread of the
process. The rows, their claiming and their outcomes are django-tasks-db's; what is added is the
lease (`TaskLease`) that lets a task whose Machine vanished run again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from traceback import format_exception
from typing import TYPE_CHECKING, Any, TypeVar

from django.core.exceptions import SuspiciousOperation
from django.db import (
    InterfaceError,
    OperationalError,
    close_old_connections,
    connections,
    router,
)
from django.db.models.functions import Now
from django.dispatch import Signal
from django.utils import timezone
from django_tasks_db.compat import (
    Task,
    TaskContext,
    TaskResultStatus,
    normalize_json,
    task_finished,
    task_started,
)
from django_tasks_db.models import DBTaskResult, DBTaskResultQuerySet
from django_tasks_db.utils import exclusive_transaction, is_locked_database_exception

from flyfn import events, process_state
from flyfn.machine_role import current_env, current_role
from flyfn.tasks.clock import due, in_seconds
from flyfn.tasks.configured import FlyfnBackend, flyfn_backends
from flyfn.tasks.errors import TaskLost, TaskTimeout
from flyfn.tasks.models import TaskFailure, TaskLease
from flyfn.tasks.options import RetryPolicy
from flyfn.tasks.results import with_earlier_errors

if TYPE_CHECKING:
    from django_tasks_db.backend import TaskResult

__all__ = ["Claim", "run_due_tasks", "run_until_idle", "worker_id"]

logger = logging.getLogger("flyfn.tasks")

T = TypeVar("T")

# Expired leases handled per claim: a burst of lost tasks is worked off over a few claims.
_REAP_BATCH = 100
# How long to wait before trying again when SQLite reports the database locked, and for how long.
_LOCKED_PAUSE = 0.05
LOCKED_WAIT = 60.0


# The columns a worker id is stored in (a lease's, a retried run's, a slot's) are this long.
WORKER_ID_MAX = 64


def worker_id() -> str:
    """What this process writes into a task's `worker_ids`: its Machine's id on Fly, else
    `local-<host>-<pid>` with the host name cut to fit `WORKER_ID_MAX` (a host name may have 253
    characters; the pid, which tells processes apart, is kept whole)."""
    machine = current_env().machine_id
    if machine and not current_role().is_local:
        return machine[:WORKER_ID_MAX]
    pid = f"-{os.getpid()}"
    return f"local-{socket.gethostname()}"[: WORKER_ID_MAX - len(pid)] + pid


def _rows(backend: FlyfnBackend, group: str) -> DBTaskResultQuerySet:
    rows = DBTaskResult.objects.filter(backend_name=backend.alias)
    return rows.filter(backend.flyfn.queue_filter(group))


def _db(backend: FlyfnBackend) -> str:
    return router.db_for_write(DBTaskResult) or "default"


# --------------------------------------------------------------------------- leases


class _LeaseKeeper:
    """Renews the leases of the tasks this process runs, every third of their lease, from a
    thread of its own (a task's code may block for any time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, float]] = {}  # token -> (database alias, lease seconds)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, token: str, using: str, lease: float) -> None:
        with self._lock:
            self._held[token] = (using, lease)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="flyfn-task-leases", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def release(self, token: str) -> None:
        with self._lock:
            self._held.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                held = dict(self._held)
            interval = min((lease for _, lease in held.values()), default=30.0) / 3
            self._wake.wait(interval)
            self._wake.clear()
            with self._lock:
                held = dict(self._held)
            if held:
                self._renew(held)

    def _renew(self, held: dict[str, tuple[str, float]]) -> None:
        by_lease: dict[tuple[str, float], list[str]] = {}
        for token, key in held.items():
            by_lease.setdefault(key, []).append(token)
        try:
            close_old_connections()
            for (using, lease), tokens in by_lease.items():
                until = in_seconds(lease)  # on the database's clock, as every lease
                TaskLease.objects.using(using).filter(token__in=tokens).update(expires_at=until)
        except Exception as exc:  # the next beat tries again; the lease has room for two misses
            logger.warning("flyfn tasks: could not renew leases: %s: %s", type(exc).__name__, exc)


_keeper = _LeaseKeeper()
process_state.register(__name__, "the keeper renewing held task leases")


# --------------------------------------------------------------------------- claiming


@dataclass(slots=True)
class Claim:
    """A task this process claimed: its row and the token of its lease."""

    backend: FlyfnBackend
    row: DBTaskResult[Any, Any]
    token: str
    group: str


def _lost(backend: FlyfnBackend, group: str) -> list[DBTaskResult[Any, Any]]:
    """Put tasks whose lease expired back to READY, or FAILED after their last attempt; the
    failed ones (for their signal)."""
    failed: list[DBTaskResult[Any, Any]] = []
    expired = _rows(backend, group).filter(
        status=TaskResultStatus.RUNNING, flyfn_lease__expires_at__lt=Now()
    )
    with exclusive_transaction(_db(backend)):
        for row in expired.select_for_update(skip_locked=True)[:_REAP_BATCH]:
            lease = TaskLease.objects.filter(task_id=row.id).first()
            where = f"Machine {lease.machine_id}" if lease else "its Machine"
            TaskLease.objects.filter(task_id=row.id).delete()
            if len(row.worker_ids) >= backend.flyfn.max_attempts:
                row.set_failed(
                    TaskLost(
                        f"task {row.id} was lost with {where} (lease expired) on attempt "
                        f"{len(row.worker_ids)} of {backend.flyfn.max_attempts}"
                    )
                )
                failed.append(row)
                events.task_changed(group, "failed", str(row.id), row.task_path)
            else:
                logger.warning(
                    "flyfn tasks: task %s was lost with %s; it runs again", row.id, where
                )
                row.status = TaskResultStatus.READY
                row.save(update_fields=["status"])
                events.task_changed(group, "retried", str(row.id), row.task_path)
    return failed


def claim_next(backend: FlyfnBackend, group: str, machine: str) -> Claim | None:
    """Claim the group's next due task (priority, then run_after, then age), or None."""
    for failed in _lost(backend, group):
        _send_finished(backend, failed)
    token = uuid.uuid4().hex
    lease = backend.flyfn.lease
    with exclusive_transaction(_db(backend)):
        row = due(_rows(backend, group)).get_locked()
        if row is None:
            return None
        row.claim(machine)
        TaskLease.objects.update_or_create(
            task=row,
            defaults={
                "token": token,
                "machine_id": machine,
                "expires_at": in_seconds(lease),
            },
        )
    return Claim(backend, row, token, group)


# --------------------------------------------------------------------------- running


def run_claim(claim: Claim) -> bool:
    """Run a claimed task and store its outcome (unless its lease was taken over meanwhile);
    whether the outcome was stored."""
    row, backend = claim.row, claim.backend
    using = _db(backend)
    _keeper.hold(claim.token, using, backend.flyfn.lease)
    error: BaseException | None = None
    value: Any = None
    try:
        task = row.task
        result: TaskResult[Any, Any] = with_earlier_errors(row.task_result)
        _send(task_started, backend, result)
        events.task_changed(claim.group, "started", str(row.id), row.task_path)
        timeout = backend.flyfn.timeout_of(row.queue_name)
        if timeout is None:
            value, error = _invoke(task, result)
        else:
            value, error = _invoke_within(task, result, timeout)
    except Exception as exc:  # the task cannot be loaded (its function is gone, ...)
        error = exc
    finally:
        # From here on the lease is not renewed: after a timeout the Machine is free of the task
        # even though its code may still run in its thread.
        _keeper.release(claim.token)
    outcome = _write_outcome(claim, using, value, error)
    if outcome is None:
        logger.warning(
            "flyfn tasks: task %s ran past its lease and another run took it over: this "
            "outcome is dropped",
            row.id,
        )
        return False
    events.task_changed(claim.group, outcome, str(row.id), row.task_path)
    if outcome == "retried":
        logger.warning(
            "flyfn tasks: task %s failed on attempt %d (%s: %s); it runs again after %s",
            row.id,
            len(row.worker_ids),
            type(error).__name__,
            error,
            f"{row.run_after:%Y-%m-%d %H:%M:%S%z}",
        )
    else:
        _send_finished(backend, row)
    return True


def _invoke(task: Task[Any, Any], result: TaskResult[Any, Any]) -> tuple[Any, BaseException | None]:
    """Call the task; its JSON-ready return value, or what it raised."""
    try:
        if task.takes_context:
            value = task.call(TaskContext(task_result=result), *result.args, **result.kwargs)
        else:
            value = task.call(*result.args, **result.kwargs)
        return normalize_json(value), None
    except KeyboardInterrupt as exc:
        # Django's immediate backend lets a Ctrl-C through; one lands only on the main thread
        # (the lease then expires and the task runs again). Elsewhere the task's own code raised
        # it: FAILED, as django-tasks-db's worker records it.
        if threading.current_thread() is threading.main_thread():
            raise
        return None, exc
    except BaseException as exc:  # SystemExit (argparse in a task) too, as Django's backends
        return None, exc


def _invoke_within(
    task: Task[Any, Any], result: TaskResult[Any, Any], timeout: float
) -> tuple[Any, BaseException | None]:
    """`_invoke` in a thread of its own, waited for `timeout` seconds at most: then the outcome
    is a `TaskTimeout`. Python cannot stop a thread: the task's code goes on until it returns
    (what it returns is dropped) or the process ends (the Machine stops once idle)."""
    outcome: list[tuple[Any, BaseException | None]] = []

    def run() -> None:
        try:
            outcome.append(_invoke(task, result))
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, name=f"flyfn-task-{result.id}", daemon=True)
    thread.start()
    thread.join(timeout)
    if outcome:
        return outcome[0]
    return None, TaskTimeout(
        f"task {result.id} ran past its timeout of {timeout:g} s (attempt {result.attempts} on "
        f"{result.worker_ids[-1] if result.worker_ids else 'this process'}); its code was not "
        "stopped and what it returns is dropped"
    )


def _write_outcome(
    claim: Claim, using: str, value: Any, error: BaseException | None
) -> events.TaskOutcome | None:
    """`_store`, on a connection that still works: a task can run for long, and the server may
    drop the connection meanwhile (a restart, a failover, an idle timeout, `pg_terminate_backend`).
    A connection known to be broken or too old is replaced first; a write that fails on the
    connection is tried once more, on a new connection if that one turned out unusable. Never
    inside a transaction of the caller's (`run_due_tasks` in a test's `atomic`): its connection
    is not this function's to replace."""
    connection = connections[using]
    if not connection.in_atomic_block:
        connection.close_if_unusable_or_obsolete()
    try:
        return _when_unlocked(lambda: _store(claim, using, value, error))
    except (OperationalError, InterfaceError) as exc:
        if connection.in_atomic_block:
            raise
        logger.warning(
            "flyfn tasks: task %s: its outcome could not be written (%s: %s); writing it again "
            "on a working connection",
            claim.row.id,
            type(exc).__name__,
            str(exc).strip(),
        )
        # The failed transaction was rolled back (or its connection closed): the write is whole
        # or absent. A connection left unusable is replaced by the next query.
        connection.close_if_unusable_or_obsolete()
        return _when_unlocked(lambda: _store(claim, using, value, error))


def _store(
    claim: Claim, using: str, value: Any, error: BaseException | None
) -> events.TaskOutcome | None:
    """Write a run's outcome if its lease is still the task's: `succeeded`, `failed`, or
    `retried` (it raised, and its queue's retry policy gives it another run); None if the lease
    was not its any more.

    The task's row is locked first, as the reaper (`_lost`) and `claim_next` lock it before they
    touch its lease: a reaper that came first has deleted this lease (the outcome is dropped), one
    that comes later skips the row until the outcome is committed. Without the lock, a reaper
    could requeue the task between the check and the write, and the write would then overwrite
    the next run's RUNNING and delete its lease."""
    row = claim.row
    with exclusive_transaction(using):
        locked = DBTaskResult.objects.using(using).select_for_update().filter(pk=row.pk)
        leases = TaskLease.objects.using(using).filter(task_id=row.id, token=claim.token)
        if not locked.exists() or not leases.exists():
            return None
        outcome: events.TaskOutcome = "succeeded" if error is None else "failed"
        if error is None:
            row.set_successful(value)
        elif _retries(claim, error):
            _retry(row, using, error, claim.backend.flyfn.retries_of(row.queue_name))
            outcome = "retried"
        else:
            row.set_failed(error)
        leases.delete()
    return outcome


def _retries(claim: Claim, error: BaseException) -> bool:
    """Whether a run that raised `error` runs again: an `Exception` (not a SystemExit or a
    KeyboardInterrupt), in a queue with a retry policy, with attempts left."""
    policy = claim.backend.flyfn.retries_of(claim.row.queue_name)
    return (
        policy is not None
        and isinstance(error, Exception)
        and len(claim.row.worker_ids) < policy.max_attempts
    )


def _retry(
    row: DBTaskResult[Any, Any], using: str, error: BaseException, policy: RetryPolicy | None
) -> None:
    """Keep the run's error and put the task back to READY, due after its back-off."""
    assert policy is not None
    attempt = len(row.worker_ids)
    now = timezone.now()
    kind = type(error)
    TaskFailure.objects.using(using).create(
        task=row,
        attempt=attempt,
        worker_id=row.worker_ids[-1] if row.worker_ids else "",
        exception_class_path=f"{kind.__module__}.{kind.__qualname__}",
        traceback="".join(format_exception(error)),
        failed_at=now,
    )
    row.status = TaskResultStatus.READY
    row.run_after = now + timedelta(seconds=policy.delay(attempt))
    row.save(update_fields=["status", "run_after"])


def _when_unlocked(work: Callable[[], T]) -> T:
    """`work()`, tried again while SQLite reports the database locked (for `LOCKED_WAIT`
    seconds at most: an outcome is worth waiting for)."""
    deadline = time.monotonic() + LOCKED_WAIT
    while True:
        try:
            return work()
        except OperationalError as exc:
            if not is_locked_database_exception(exc) or time.monotonic() > deadline:
                raise
            time.sleep(_LOCKED_PAUSE)


def _send_finished(backend: FlyfnBackend, row: DBTaskResult[Any, Any]) -> None:
    try:
        result: TaskResult[Any, Any] = with_earlier_errors(row.task_result)
    except (ImportError, SuspiciousOperation):  # the task's function is gone: nothing to tell
        logger.exception("flyfn tasks: task %s failed and cannot be loaded", row.id)
        return
    _send(task_finished, backend, result)


def _send(signal: Signal, backend: FlyfnBackend, result: TaskResult[Any, Any]) -> None:
    """Send a task signal; a receiver that raises is logged (by Django, with its traceback, and
    here with the task) and the run goes on: it must not cost the wake its other tasks."""
    for receiver, response in signal.send_robust(sender=type(backend), task_result=result):
        if isinstance(response, Exception):
            logger.warning(
                "flyfn tasks: task %s: signal receiver %s raised %s: %s (the run goes on)",
                result.id,
                getattr(receiver, "__qualname__", repr(receiver)),
                type(response).__name__,
                response,
            )


def _claims(
    group: str, machine: str, stop: threading.Event, *, recycle: bool = True
) -> Iterator[Claim]:
    """The group's due tasks, claimed one at a time, over every flyfn backend serving it.
    `recycle`: drop this thread's broken or too old connections before each claim (never for a
    caller that may be inside a transaction of its own: it would close that connection)."""
    backends = [b for b in flyfn_backends() if group in b.flyfn.groups]
    while not stop.is_set():
        if recycle:
            close_old_connections()
        claim = None
        try:
            for backend in backends:
                claim = claim_next(backend, group, machine)
                if claim is not None:
                    break
        except OperationalError as exc:
            if not is_locked_database_exception(exc):
                raise
            time.sleep(_LOCKED_PAUSE)
            continue
        if claim is None:
            return
        yield claim


def run_until_idle(
    group: str,
    stop: threading.Event | None = None,
    *,
    machine: str | None = None,
    budget: float | None = None,
) -> int:
    """Claim and run `group`'s due tasks until none is due, `stop` is set or `budget`
    seconds have passed; how many ran. Closes this thread's database connections at the end."""
    stop = stop or threading.Event()
    machine = machine or worker_id()
    deadline = None if budget is None else time.monotonic() + budget
    ran = 0
    try:
        for claim in _claims(group, machine, stop):
            run_claim(claim)
            ran += 1
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        connections.close_all()
    return ran


def run_due_tasks(group: str | None = None) -> int:
    """Run every due task (of `group`, or of every group of every flyfn backend) in the
    calling thread; how many ran. For tests and scripts that want no thread."""
    groups = (
        [group]
        if group is not None
        else sorted({g for b in flyfn_backends() for g in b.flyfn.groups})
    )
    ran = 0
    for name in groups:
        stop = threading.Event()
        for claim in _claims(name, worker_id(), stop, recycle=False):
            run_claim(claim)
            ran += 1
    return ran
