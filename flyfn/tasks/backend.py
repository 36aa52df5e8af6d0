"""`FlyMachinesBackend`: django-tasks-db's database backend, delivering tasks to function
Machines after the enqueueing transaction commits."""

from __future__ import annotations

from functools import partial
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.apps import apps
from django.core import checks
from django.db import router, transaction
from django.urls import NoReverseMatch, reverse
from django_tasks_db.backend import DatabaseBackend, TaskResult
from django_tasks_db.compat import Task

from flyfn import events
from flyfn.tasks.configured import FlyfnBackend, wake_url_name
from flyfn.tasks.options import HORIZON, TaskOptions
from flyfn.tasks.results import earlier_errors, failures_of, with_earlier_errors
from flyfn.tasks.schedule_checks import check_schedules
from flyfn.tasks.schedules import parse_schedules

__all__ = ["FlyMachinesBackend"]

T = TypeVar("T")
P = ParamSpec("P")


class FlyMachinesBackend(DatabaseBackend, FlyfnBackend):
    """Tasks stored by django-tasks-db, run on the function Machines of their queue's group.

    Enqueueing, results and priorities are django-tasks-db's; `enqueue` adds the delivery: once
    the row is committed the process's dispatcher wakes the group (see flyfn.tasks.dispatch).
    """

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.flyfn = TaskOptions.parse(alias, self.options)
        self.schedules = parse_schedules(alias, self.options)

    def enqueue(
        self,
        task: Task[P, T],
        args: P.args,  # type: ignore[valid-type]
        kwargs: P.kwargs,  # type: ignore[valid-type]
    ) -> TaskResult[P, T]:
        # Not at import: this module loads with the app, before Django's app registry, and these
        # import models.
        from django_tasks_db.models import DBTaskResult

        from flyfn.tasks.dispatch import dispatcher

        result = super().enqueue(task, args, kwargs)
        waker = dispatcher(self.alias, self.flyfn)
        group = self.flyfn.group_of(task.queue_name)
        events.task_changed(group, "enqueued", str(result.id), task.module_path)
        transaction.on_commit(partial(waker.notify, group), using=router.db_for_write(DBTaskResult))
        return result

    async def aenqueue(
        self,
        task: Task[P, T],
        args: P.args,  # type: ignore[valid-type]
        kwargs: P.kwargs,  # type: ignore[valid-type]
    ) -> TaskResult[P, T]:
        # Through the sync path: on_commit belongs to the connection of a sync thread.
        return await sync_to_async(self.enqueue, thread_sensitive=True)(task, args, kwargs)

    def get_result(self, result_id: str) -> TaskResult[Any, Any]:
        return with_earlier_errors(super().get_result(result_id))

    async def aget_result(self, result_id: str) -> TaskResult[Any, Any]:
        result = await super().aget_result(result_id)
        failures = [failure async for failure in failures_of(str(result.id))]
        result.errors[:0] = earlier_errors(failures)
        return result

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        messages = list(super().check(**kwargs))
        if not apps.is_installed("flyfn.tasks"):
            messages.append(
                checks.Error(
                    f"TASKS[{self.alias!r}] uses flyfn.tasks.FlyMachinesBackend but 'flyfn.tasks' "
                    "is not in INSTALLED_APPS (it holds the task leases)",
                    hint="INSTALLED_APPS += ['flyfn.tasks', 'django_tasks_db']",
                    id="flyfn.E012",
                )
            )
            return messages
        if self.flyfn.beyond_horizon is None:
            messages.append(
                checks.Warning(
                    f"TASKS[{self.alias!r}]: a task scheduled more than {HORIZON / 60:g} minutes "
                    "ahead runs on time only if an app Machine is running at its time (its "
                    "dispatcher wakes the group); with fly.toml's min_machines_running = 0 every "
                    "app Machine may be stopped then, and the task waits for the next wake",
                    hint="keep an app Machine running (fly.toml: min_machines_running = 1) and "
                    "set OPTIONS['beyond_horizon'] = 'app_machine', or accept that such tasks "
                    "run at the group's next wake: OPTIONS['beyond_horizon'] = 'next_wake'",
                    id="flyfn.W005",
                )
            )
        for group in sorted(self.flyfn.groups):
            try:
                reverse(wake_url_name(group))
            except NoReverseMatch:
                messages.append(
                    checks.Error(
                        f"TASKS[{self.alias!r}]: no URL wakes group {group!r}: the urlconf does "
                        "not include flyfn.tasks.urls",
                        hint="urlpatterns += [path('', include('flyfn.tasks.urls'))]",
                        id="flyfn.E013",
                    )
                )
        messages += check_schedules(self)
        return messages
