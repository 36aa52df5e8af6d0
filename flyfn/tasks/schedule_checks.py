"""The system checks of a backend's periodic tasks (`OPTIONS["schedules"]`): a task that does not
import (`flyfn.E020`), arguments that cannot be stored (`flyfn.E021`), a queue the backend does not
have (`flyfn.E022`), a backend alias longer than the tasks' column (`flyfn.E023`), slots' rows
and tasks routed to different databases (`flyfn.E024`), and a schedule finer than Fly's
intervals with no app Machine kept running to run it (`flyfn.W020`)."""

from __future__ import annotations

import json

from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db.models import CharField
from django.utils.module_loading import import_string
from django_tasks_db.compat import Task

from flyfn.tasks.configured import FlyfnBackend
from flyfn.tasks.schedules import Schedule

__all__ = ["check_schedules"]


def check_schedules(backend: FlyfnBackend) -> list[checks.CheckMessage]:
    """Every problem of `backend`'s schedules, each a message with an id and a hint."""
    messages: list[checks.CheckMessage] = []
    where = f"TASKS[{backend.alias!r}]['OPTIONS']['schedules']"
    longest = _alias_limit()
    if len(backend.alias) > longest:
        messages.append(
            checks.Error(
                f"TASKS[{backend.alias!r}]: the alias has {len(backend.alias)} characters; "
                f"tasks and periodic tasks store it in a column of {longest}",
                hint=f"give the backend an alias of at most {longest} characters",
                id="flyfn.E023",
            )
        )
    if backend.schedules:
        # Models load after this module (the backend imports it while apps load).
        from flyfn.tasks.periodic import schedule_database

        try:
            schedule_database()
        except ImproperlyConfigured as exc:
            messages.append(
                checks.Error(
                    f"{where}: {exc}",
                    hint="route flyfn_tasks' ScheduledRun to the database of "
                    "django_tasks_database's DBTaskResult (DATABASE_ROUTERS)",
                    id="flyfn.E024",
                )
            )
    queues: set[str] = getattr(backend, "queues", set())
    for name, schedule in sorted(backend.schedules.items()):
        messages += _task_problems(f"{where}[{name!r}]", schedule)
        if queues and schedule.queue_name is not None and schedule.queue_name not in queues:
            messages.append(
                checks.Error(
                    f"{where}[{name!r}]['queue_name']: {schedule.queue_name!r} is not one of "
                    f"TASKS[{backend.alias!r}]['QUEUES'] ({', '.join(sorted(queues))})",
                    hint="name a queue of the backend, or add it to its QUEUES",
                    id="flyfn.E022",
                )
            )
    finer = sorted(name for name, s in backend.schedules.items() if s.fly_interval is None)
    if finer and backend.flyfn.beyond_horizon != "app_machine":
        shown = ", ".join(f"{n!r} ({backend.schedules[n].when})" for n in finer)
        messages.append(
            checks.Warning(
                f"{where}: {shown} {'is' if len(finer) == 1 else 'are'} finer than Fly's "
                "schedules (hourly, daily, weekly, monthly) and run only while an app Machine "
                "is running: with fly.toml's min_machines_running = 0 every app Machine may be "
                "stopped at a slot, and the slot is not run",
                hint="keep an app Machine running (fly.toml [http_service] "
                "min_machines_running = 1): each web process's ticker starts as it boots; say so "
                "with OPTIONS['beyond_horizon'] = 'app_machine'. Or use 'every': 'hourly' (a "
                "scheduled Machine runs it, nothing else need be up)",
                id="flyfn.W020",
            )
        )
    return messages


def _alias_limit() -> int:
    from django_tasks_db.models import DBTaskResult

    from flyfn.tasks.models import ScheduledRun

    lengths = [
        field.max_length
        for model in (DBTaskResult, ScheduledRun)
        if isinstance(field := model._meta.get_field("backend_name"), CharField)
        and field.max_length
    ]
    return min(lengths)


def _task_problems(where: str, schedule: Schedule) -> list[checks.CheckMessage]:
    try:
        task = import_string(schedule.task)
    except ImportError as exc:
        task, why = None, f"cannot be imported ({exc})"
    else:
        why = f"is a {type(task).__name__}, not a task"
    if not isinstance(task, Task):
        return [
            checks.Error(
                f"{where}['task']: {schedule.task!r} {why}",
                hint="name a function decorated with @task by its dotted path, like "
                "'myapp.tasks.nightly_report'",
                id="flyfn.E020",
            )
        ]
    try:
        json.dumps([schedule.args, schedule.kwargs])
    except (TypeError, ValueError) as exc:
        return [
            checks.Error(
                f"{where}: args and kwargs must be JSON ({exc})",
                hint="give the task strings, numbers, lists and dicts; it can look up the rest",
                id="flyfn.E021",
            )
        ]
    return []
