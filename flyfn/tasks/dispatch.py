"""The dispatcher: wakes groups that have due tasks, from a daemon thread of each process.

One per backend alias and process. It looks at the database when told (a commit enqueued a task,
a wake ended) and when the next scheduled task or lease expiry comes (or every `poll` seconds),
and opens up to `concurrency` wakes per group: on Fly a `POST` to the group's wake URL through
Fly Proxy (replayed to a function Machine, which runs due tasks while the request is open); off Fly
the same run loop in a thread of this process. At interpreter exit each dispatcher waits (at most
`exit_wait` seconds) for the wakes of what this process enqueued (`flush`).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import threading
import time
from collections import Counter
from datetime import datetime, timedelta

import httpx
from django.db import close_old_connections, connections, router
from django.db.models import Count, Min
from django.urls import reverse
from django_tasks_db.compat import TaskResultStatus
from django_tasks_db.models import DBTaskResult, get_date_max

from flyfn import process_state
from flyfn.backoff import Backoff
from flyfn.machine_role import current_env, current_role
from flyfn.tasks.clock import db_now
from flyfn.tasks.clock import due as due_rows
from flyfn.tasks.configured import flyfn_backends, wake_url_name
from flyfn.tasks.options import HORIZON, TaskOptions, home_app
from flyfn.tasks.runner import run_until_idle
from flyfn.tasks.wake import WAKE_HEADER, sign_wake

__all__ = ["Dispatcher", "dispatcher", "flush_all", "start_all", "stop_all"]

logger = logging.getLogger("flyfn.tasks")

# Back-off after a failed wake: doubling from the first to the last value.
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
# A wake's connection, and how long its answer may stay silent (the runner sends a heartbeat
# line every 10 s, so this only trips on a Machine that is gone without closing).
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 60.0
# The shortest sleep between two looks at the database.
MIN_SLEEP = 0.05
HORIZON_DELTA = timedelta(seconds=HORIZON)


class Dispatcher:
    """Wakes the groups of one backend alias that have due tasks; see the module docstring."""

    def __init__(self, alias: str, options: TaskOptions) -> None:
        self.alias = alias
        self.options = options
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._open: Counter[str] = Counter()
        self._backoff: dict[str, Backoff] = {}  # per group, after failed wakes
        self._retry_at: dict[str, float] = {}
        self._idle_backoff: dict[str, Backoff] = {}  # per group, after wakes that ran nothing
        self._stopped = False
        self._covered: dict[str, datetime] = {}  # scheduled tasks up to then have a wake
        self._notified: set[str] = set()  # groups this process enqueued tasks of
        self.wakes = 0  # wakes opened, for tests and benchmarks
        self.idle_wakes = 0  # wakes for due work that ran nothing
        self.delivered = 0  # wakes a runner answered (on Fly) or runs that ended (locally)

    def notify(self, group: str | None = None) -> None:
        """Look at the database now (a task of `group` was committed). Nothing to do while the
        group has all its wakes open: each looks again when it ends."""
        self.start()
        if group is not None:
            with self._lock:
                self._notified.add(group)
                if self._open[group] >= self.options.concurrency:
                    return
        self._event.set()

    def start(self) -> None:
        with self._lock:
            if self._stopped:
                return
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name=f"flyfn-tasks-{self.alias}", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop (wakes already open finish on their own); for tests."""
        with self._lock:
            self._stopped = True
            thread = self._thread
        self._event.set()
        if thread is not None:
            thread.join(timeout)

    def flush(self, timeout: float) -> bool:
        """Wait until the groups this process enqueued tasks of have no wake open and no due
        task left, or `timeout` seconds; whether they got there. For a process that enqueues and
        exits (a management command): its wakes are sent and answered before it goes. A wake
        still open then is cut off: its runner finishes the task it runs and claims no more;
        what is left waits for another wake (an app Machine's dispatcher, every `poll`)."""
        with self._lock:
            groups = set(self._notified)
        if not groups or timeout <= 0 or self._stopped:
            return True
        deadline = time.monotonic() + timeout
        due: set[str] = set()
        while True:
            with self._lock:
                busy = {g for g in groups if self._open[g] > 0}
            if not busy:
                due = set(self.scan()[0]) & groups
                if not due:
                    return True
                self._event.set()  # the loop opens their wakes
            if time.monotonic() >= deadline:
                break
            time.sleep(MIN_SLEEP)
        logger.warning(
            "flyfn tasks: exiting after %g s with group(s) %s still being woken or run "
            "(OPTIONS['exit_wait']): their tasks wait for the next wake",
            timeout,
            ", ".join(sorted(busy | due)),
        )
        return False

    # ----------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while not self._stopped:
            self._event.clear()
            try:
                sleep = self._look()
            except Exception as exc:  # a database hiccup: look again shortly
                logger.warning(
                    "flyfn tasks: cannot look for due tasks: %s: %s", type(exc).__name__, exc
                )
                sleep = FIRST_BACKOFF
            with contextlib.suppress(Exception):
                close_old_connections()
            self._event.wait(sleep)
        connections.close_all()

    def _look(self) -> float:
        """Open the wakes due work needs; seconds until the next look."""
        due, next_at, db_time, soon = self._scan()
        now = time.monotonic()
        sleep = self.options.poll
        if next_at is not None:
            sleep = min(sleep, (next_at - db_time).total_seconds())
        keep = set()
        for group, at in soon.items():
            # A task scheduled within the horizon: wake the group now, so a function Machine is
            # up at its time even if every app Machine is stopped by then (once per horizon).
            if group not in due and at > self._covered.get(group, at - HORIZON_DELTA):
                keep.add(group)
                due[group] = 1
        for group, count in sorted(due.items()):
            retry_at = self._retry_at.get(group, 0.0)
            if retry_at > now:
                sleep = min(sleep, retry_at - now)
                continue
            with self._lock:
                missing = min(count, self.options.concurrency) - self._open[group]
                self._open[group] += max(0, missing)
                self.wakes += max(0, missing)
            for _ in range(missing):
                thread = threading.Thread(
                    target=self._wake,
                    args=(group, db_time + HORIZON_DELTA if group in keep else None),
                    name=f"flyfn-wake-{group}",
                    daemon=True,
                )
                try:
                    thread.start()
                except RuntimeError:  # no new thread at interpreter shutdown: wake from here
                    self._wake(group, db_time + HORIZON_DELTA if group in keep else None)
        return max(MIN_SLEEP, sleep)

    def scan(self) -> tuple[dict[str, int], datetime | None]:
        """Due tasks per group (READY and due, or RUNNING with an expired lease), and when the
        next scheduled task or lease comes due; on the database's clock."""
        due, next_at, _, _ = self._scan()
        return due, next_at

    def _scan(self) -> tuple[dict[str, int], datetime | None, datetime, dict[str, datetime]]:
        """`scan()`, the database's time and, per group, its first task scheduled within the
        horizon."""
        now = db_now(router.db_for_read(DBTaskResult) or "default")
        rows = DBTaskResult.objects.filter(backend_name=self.alias).order_by()
        due: Counter[str] = Counter()
        ready = due_rows(rows).values_list("queue_name").annotate(n=Count("id"))
        lost = (
            rows.filter(status=TaskResultStatus.RUNNING, flyfn_lease__expires_at__lt=now)
            .values_list("queue_name")
            .annotate(n=Count("id"))
        )
        for queue, n in (*ready, *lost):
            due[self.options.group_of(queue)] += n
        scheduled = rows.filter(
            status=TaskResultStatus.READY, run_after__gt=now, run_after__lt=get_date_max()
        ).aggregate(at=Min("run_after"))["at"]
        leases = rows.filter(
            status=TaskResultStatus.RUNNING, flyfn_lease__expires_at__gte=now
        ).aggregate(at=Min("flyfn_lease__expires_at"))["at"]
        upcoming = [at for at in (scheduled, leases) if at is not None]
        soon: dict[str, datetime] = {}
        if scheduled is not None and scheduled <= now + HORIZON_DELTA:
            firsts = (
                rows.filter(
                    status=TaskResultStatus.READY,
                    run_after__gt=now,
                    run_after__lte=now + HORIZON_DELTA,
                )
                .values_list("queue_name")
                .annotate(at=Min("run_after"))
            )
            for queue, at in firsts:
                group = self.options.group_of(queue)
                soon[group] = min(at, soon.get(group, at))
        return dict(due), min(upcoming) if upcoming else None, now, soon

    # ----------------------------------------------------------------- wakes

    def _wake(self, group: str, keep_until: datetime | None = None) -> None:
        """One wake of `group`. `keep_until`: it was sent for a task scheduled within the horizon
        (nothing is due yet, so running nothing is expected): once it answers, the woken Machine
        stays up for every task scheduled until then."""
        ran: int | None = None
        keep = keep_until is not None
        try:
            if current_role().is_local:
                # Locally this process's thread wakes at the due time: nothing to keep up.
                ran = 0 if keep else run_until_idle(group)
                with self._lock:
                    self.delivered += 1
            else:
                ran = self._send(group)
        except Exception as exc:
            self._failed(group, f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._open[group] -= 1
            if ran is not None and keep_until is not None:
                self._covered[group] = keep_until
            if ran is not None:
                self._recovered(group)
                if ran == 0 and not keep:
                    self._idle(group)
                elif ran > 0:
                    with self._lock:
                        self._idle_backoff.pop(group, None)
            self._event.set()  # look again: a task may have come in as the wake ended

    def _send(self, group: str) -> int | None:
        """One wake through Fly Proxy; how many tasks the runner reported it ran once it ran out
        of due tasks, or None when the wake failed."""
        base = self.options.wake_url(home_app(current_env().app_name))
        if base is None:
            self._failed(group, "no address to wake it at: set OPTIONS['url']")
            return None
        url = base + reverse(wake_url_name(group))
        timeout = httpx.Timeout(CONNECT_TIMEOUT, read=READ_TIMEOUT)
        headers = {WAKE_HEADER: sign_wake(group)}
        with (
            httpx.Client(timeout=timeout) as client,
            client.stream("POST", url, headers=headers) as response,
        ):
            last = ""
            for line in response.iter_lines():
                if line.strip():
                    if not last and response.status_code == 200:
                        with self._lock:
                            self.delivered += 1  # a runner has the group's due tasks
                    last = line
        if response.status_code != 200:
            self._failed(group, f"HTTP {response.status_code} from {url}: {last[:200]}")
            return None
        try:
            summary = json.loads(last)
        except ValueError:
            summary = None
        if not isinstance(summary, dict) or summary.get("done") is not True:
            self._failed(group, f"the wake ended early ({last[:200]!r})")
            return None
        ran = summary.get("ran")
        return ran if isinstance(ran, int) else 1

    def _failed(self, group: str, why: str) -> None:
        with self._lock:
            backoff = self._backoff.setdefault(group, Backoff(FIRST_BACKOFF, MAX_BACKOFF))
            first = backoff.failed()
            self._retry_at[group] = time.monotonic() + backoff.delay
        if first:  # one line per failure burst
            logger.warning("flyfn tasks: waking group %r failed, retrying: %s", group, why)

    def _idle(self, group: str) -> None:
        """A wake for due work ran nothing (another run took it first, or clocks disagree): do
        not wake the group again at once, doubling the pause as for a failure, silently."""
        with self._lock:
            backoff = self._idle_backoff.setdefault(group, Backoff(FIRST_BACKOFF, MAX_BACKOFF))
            backoff.failed()
            self._retry_at[group] = time.monotonic() + backoff.delay
            self.idle_wakes += 1

    def _recovered(self, group: str) -> None:
        with self._lock:
            failed = self._backoff.pop(group, None) is not None  # only a failure makes one
            self._retry_at.pop(group, None)
        if failed:
            logger.warning("flyfn tasks: group %r woke again", group)


_dispatchers: dict[str, Dispatcher] = {}
_dispatchers_lock = threading.Lock()


def dispatcher(alias: str, options: TaskOptions) -> Dispatcher:
    """The process's dispatcher of backend `alias` (replaced when its options change)."""
    found = _dispatchers.get(alias)
    if found is None or found.options != options:
        with _dispatchers_lock:
            found = _dispatchers.get(alias)
            if found is None or found.options != options:
                found = _dispatchers[alias] = Dispatcher(alias, options)
                _flush_at_exit_once()
    return found


@functools.cache
def _flush_at_exit_once() -> None:
    # Called under `_dispatchers_lock`: the first call registers, the others find it cached.
    atexit.register(flush_all)


def flush_all() -> None:
    """Every dispatcher's `flush` with its `exit_wait` (registered with atexit): a process that
    enqueues and exits delivers its wakes first."""
    with _dispatchers_lock:
        found = list(_dispatchers.values())
    for each in found:
        try:
            each.flush(each.options.exit_wait)
        except Exception as exc:  # the database went first: nothing more to do
            logger.warning(
                "flyfn tasks: cannot deliver wakes at exit: %s: %s", type(exc).__name__, exc
            )


def stop_all() -> None:
    """Stop and forget every dispatcher of this process (tests)."""
    with _dispatchers_lock:
        found = list(_dispatchers.values())
        _dispatchers.clear()
    for each in found:
        each.stop()


def start_all() -> None:
    """Start the dispatcher of every flyfn backend (as a web process of an app Machine boots)."""
    if not current_role().is_main:
        return
    for backend in flyfn_backends():
        dispatcher(backend.alias, backend.flyfn).notify()


def _forget_after_fork() -> None:
    # Threads do not survive fork(): a forked worker starts its own dispatchers.
    global _dispatchers_lock
    _dispatchers.clear()
    _dispatchers_lock = threading.Lock()


process_state.register(__name__, "task dispatchers", fork=_forget_after_fork)
