"""Per-group task counts for `manage.py flyfn status`: ready, scheduled, running, failed, and
the age of the oldest waiting task."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.db.models import Count, Min
from django.utils import timezone
from django_tasks_db.compat import TaskResultStatus
from django_tasks_db.models import DBTaskResult

from flyfn.tasks.configured import flyfn_backends

__all__ = ["GroupTasks", "task_status"]


@dataclass(slots=True)
class GroupTasks:
    """One group's tasks across the flyfn backends."""

    group: str
    ready: int = 0  # due now
    scheduled: int = 0  # run_after still ahead
    running: int = 0
    failed: int = 0
    oldest_waiting: timedelta | None = None  # since the oldest due task was enqueued


def task_status() -> list[GroupTasks]:
    """Every group of every flyfn backend, sorted by name."""
    now = timezone.now()
    groups: dict[str, GroupTasks] = {}
    for backend in flyfn_backends():
        options = backend.flyfn
        for name in options.groups:
            groups.setdefault(name, GroupTasks(name))
        rows = DBTaskResult.objects.filter(backend_name=backend.alias).order_by()
        due = rows.ready().values_list("queue_name").annotate(n=Count("id"), at=Min("enqueued_at"))
        for queue, n, at in due:
            entry = groups.setdefault(options.group_of(queue), GroupTasks(options.group_of(queue)))
            entry.ready += n
            age = now - at
            if entry.oldest_waiting is None or age > entry.oldest_waiting:
                entry.oldest_waiting = age
        counts = (
            rows.filter(
                status__in=[
                    TaskResultStatus.READY,
                    TaskResultStatus.RUNNING,
                    TaskResultStatus.FAILED,
                ]
            )
            .values_list("queue_name", "status")
            .annotate(n=Count("id"))
        )
        for queue, status, n in counts:
            entry = groups.setdefault(options.group_of(queue), GroupTasks(options.group_of(queue)))
            if status == TaskResultStatus.RUNNING:
                entry.running += n
            elif status == TaskResultStatus.FAILED:
                entry.failed += n
        scheduled = (
            rows.filter(status=TaskResultStatus.READY, run_after__gt=now)
            .exclude(pk__in=rows.ready().values("pk"))
            .values_list("queue_name")
            .annotate(n=Count("id"))
        )
        for queue, n in scheduled:
            groups.setdefault(options.group_of(queue), GroupTasks(options.group_of(queue)))
            groups[options.group_of(queue)].scheduled += n
    return [groups[name] for name in sorted(groups)]
