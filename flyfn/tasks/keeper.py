"""A task group's function Machine keeps itself up while its group has work, then stops itself.

Fly Proxy counts only inbound requests as load: a Machine running background work, or waiting for
a task scheduled a few minutes ahead, would be stopped by autostop, and with every app Machine
stopped nobody would wake it again. So a task group's Machines run with autostop off (their spec,
`flyfn.pool.spec`) and this keeper, one thread per process, decides when the Machine ends:

- while a run of the group is going on (a wake's, or its own), it waits;
- when tasks are due (READY and due, or RUNNING with an expired lease), it runs them itself,
  whether or not a wake is open (the connection that woke the Machine may be gone);
- when the group's next scheduled task or lease expiry is within `HORIZON` (on the database's
  clock), it sleeps until then;
- otherwise, once no request of the Machine (in any of its worker processes: `flyfn.tasks.activity`)
  has been in flight for `IDLE_EXIT` seconds, it sends the Machine's main process its stop signal
  (SIGINT, as Fly does): the server exits, and the Machine stops (restart policy "no"). The next
  wake starts it again through Fly Proxy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from django.db import close_old_connections, connections, router
from django.db.models import Count, Min, Q
from django_tasks_db.compat import TaskResultStatus
from django_tasks_db.models import DBTaskResult, get_date_max

from flyfn import process_state
from flyfn.machine_dir import machine_dir
from flyfn.machine_role import RoleError, current_env, current_role, detect_role
from flyfn.tasks.activity import MachineActivity
from flyfn.tasks.clock import db_now
from flyfn.tasks.configured import flyfn_backends, task_groups
from flyfn.tasks.options import HORIZON
from flyfn.tasks.runner import run_until_idle

__all__ = [
    "IDLE_EXIT",
    "Keeper",
    "keeper",
    "main_process",
    "on_request",
    "on_request_finished",
    "on_serving",
]

logger = logging.getLogger("flyfn.tasks")

# Seconds without a request or a run before a drained Machine stops itself.
IDLE_EXIT = 10.0
# The longest sleep between two looks at the database while the Machine is up.
LOOK = 30.0
# How often a keeper looks again while a request of the Machine is in flight (a lock's try).
BUSY_LOOK = 1.0


def main_process() -> int:
    """The process that stands for the Machine: the leader of this process's group (the server's
    supervisor when it runs several workers), else this process."""
    leader = os.getpgrp()
    return leader if leader > 1 else os.getpid()


def _stop_machine() -> None:
    os.kill(main_process(), signal.SIGINT)


class Keeper:
    """The keeper of one process; `start(group)` on a function Machine of a task group."""

    def __init__(
        self,
        *,
        stop_machine: Callable[[], None] = _stop_machine,
        live: bool | None = None,
        activity: MachineActivity | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._runs = 0
        # The requests of this process until the keeper goes live, then of the whole Machine
        # (its directory is the Machine's), unless a test gave its own.
        self.activity = activity or MachineActivity(None)
        self._machine_wide = activity is not None
        self._thread: threading.Thread | None = None
        self._stop_machine = stop_machine
        self.group: str | None = None
        self.stopping = False
        self.ran = 0  # tasks its own runs ran, for tests
        # Only a process that is a function Machine by its environment (not by a test's
        # override of the role) keeps itself up and stops itself.
        self._live = live

    def start(self, group: str) -> None:
        with self._lock:
            if self._live is None:
                try:
                    self._live = detect_role().is_function
                except RoleError:
                    self._live = False
            if not self._live:
                return
            if not self._machine_wide:
                directory = machine_dir(current_env().machine_id, "activity")
                self.activity = MachineActivity(directory)
                self._machine_wide = True
            self.group = group
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name=f"flyfn-tasks-keeper-{group}", daemon=True
                )
                self._thread.start()

    def request(self) -> None:
        """A request of this process began (a wake, or a view of the group)."""
        if self._live:
            self.activity.started()

    def request_finished(self) -> None:
        """A request of this process ended (its response closed)."""
        if self._live:
            self.activity.finished()

    def run(self, group: str, work: Callable[[], int]) -> int:
        """`work()` (a run of the group's tasks) with the Machine kept up meanwhile."""
        self.start(group)
        return self._counted(work)

    def _counted(self, work: Callable[[], int]) -> int:
        with self._lock:
            self._runs += 1
        try:
            return work()
        finally:
            with self._lock:
                self._runs -= 1
            self.activity.touch()
            self._event.set()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        timeout = 0.0
        while not self.stopping:
            self._event.wait(timeout)
            self._event.clear()
            try:
                timeout = self.step()
            except Exception as exc:  # a database hiccup: look again shortly
                logger.warning(
                    "flyfn tasks: the keeper cannot look for work: %s: %s", type(exc).__name__, exc
                )
                timeout = 1.0
            with contextlib.suppress(Exception):
                close_old_connections()

    def step(self) -> float:
        """One decision; seconds until the next (`inf` once the Machine is stopping)."""
        group = self.group
        assert group is not None
        with self._lock:
            if self._runs:
                return LOOK  # a run's end sets the event
        wait = seconds_until_due(group)
        if wait is not None and wait <= 0:
            self.ran += self._counted(lambda: run_until_idle(group))
            return 0.0
        if wait is not None:
            return min(LOOK, wait)
        if self.activity.busy():
            return BUSY_LOOK  # a request in flight in some process: its end is activity
        idle = self.activity.idle_for()
        if idle < IDLE_EXIT:
            return IDLE_EXIT - idle
        logger.warning(
            "flyfn tasks: group %s has nothing due within %gs: this Machine stops", group, HORIZON
        )
        self.stopping = True
        connections.close_all()
        self._stop_machine()
        return float("inf")


def seconds_until_due(group: str) -> float | None:
    """Seconds (database clock) until `group`'s next task is due or lease expires: 0 when one is
    due now, None when none is within `HORIZON`."""
    backends = [b for b in flyfn_backends() if group in b.flyfn.groups]
    if not backends:
        return None
    using = router.db_for_read(DBTaskResult) or "default"
    now = db_now(using)
    soonest: float | None = None
    for backend in backends:
        rows = DBTaskResult.objects.using(using).filter(
            backend.flyfn.queue_filter(group), backend_name=backend.alias
        )
        ready = Q(status=TaskResultStatus.READY)
        found: dict[str, Any] = rows.aggregate(
            scheduled=Min("run_after", filter=ready & Q(run_after__lt=get_date_max())),
            unscheduled=Count("id", filter=ready & Q(run_after=get_date_max())),
            lease=Min("flyfn_lease__expires_at", filter=Q(status=TaskResultStatus.RUNNING)),
        )
        if found["unscheduled"]:
            return 0.0
        for at in (found["scheduled"], found["lease"]):
            if at is not None:
                seconds = max(0.0, (at - now).total_seconds())
                soonest = seconds if soonest is None else min(soonest, seconds)
    if soonest is None or soonest > HORIZON:
        return None
    return soonest


_keeper = Keeper()
_tracked: dict[str, bool] = {}
process_state.register(__name__, "the keeper of task groups' function Machines")


def keeper() -> Keeper:
    """This process's keeper."""
    return _keeper


def _task_group() -> str | None:
    """The task group this process's function Machine belongs to, if any."""
    role = current_role()
    if not role.is_function or role.group is None:
        return None
    tracked = _tracked.get(role.group)
    if tracked is None:
        tracked = _tracked[role.group] = role.group in task_groups()
    return role.group if tracked else None


def on_serving(**kwargs: Any) -> None:
    """`flyfn.serving.serving_started` receiver: a task group's function Machine keeps itself from
    its first moment, so one launched without a request (a pool launches its entries as it
    creates them; a wake's connection may be cut before Django sees it) stops once idle too:
    its services run with autostop off, so nothing else would stop it."""
    group = _task_group()
    if group is not None:
        _keeper.start(group)


def on_request(**kwargs: Any) -> None:
    """`request_started` receiver: keeps a task group's function Machine up while requests come,
    and starts its keeper (a Machine started by any request stops itself once drained)."""
    group = _task_group()
    if group is not None:
        _keeper.start(group)
        _keeper.request()


def on_request_finished(**kwargs: Any) -> None:
    """`request_finished` receiver: the request `on_request` counted is over."""
    if _task_group() is not None:
        _keeper.request_finished()
