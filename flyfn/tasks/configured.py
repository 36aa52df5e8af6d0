"""flyfn's task backends as the settings configure them: what one is (`FlyfnBackend`), every
configured one (`flyfn_backends`), every group they run tasks in (`task_groups`) and the url
name each group is woken at (`wake_url_name`).

The modules that run and wake tasks know the backends from here, not from
`flyfn.tasks.backend`, which delivers what is enqueued through them (it imports those modules).
"""

from __future__ import annotations

from django.conf import settings
from django.utils.module_loading import import_string
from django_tasks_db.compat import task_backends

from flyfn.tasks.options import TaskOptions
from flyfn.tasks.schedules import Schedule

__all__ = ["FlyfnBackend", "flyfn_backends", "task_groups", "wake_url_name"]


class FlyfnBackend:
    """A task backend whose tasks run on flyfn's function Machines (`FlyMachinesBackend`): its
    alias, its OPTIONS and its periodic tasks (`OPTIONS["schedules"]`), parsed."""

    alias: str
    flyfn: TaskOptions
    schedules: dict[str, Schedule]


def flyfn_backends() -> list[FlyfnBackend]:
    """Every configured flyfn backend."""
    return [b for b in task_backends.all() if isinstance(b, FlyfnBackend)]


def task_groups() -> list[str]:
    """Every group a configured flyfn backend runs tasks in (from the settings, without making
    the backends)."""
    groups: set[str] = set()
    for alias, params in getattr(settings, "TASKS", {}).items():
        try:
            backend = import_string(params.get("BACKEND", ""))
        except ImportError:
            continue
        if isinstance(backend, type) and issubclass(backend, FlyfnBackend):
            groups |= TaskOptions.parse(alias, params.get("OPTIONS", {})).groups
    return sorted(groups)


def wake_url_name(group: str) -> str:
    """The url name of `group`'s wake view (`flyfn.tasks.urls`)."""
    return f"flyfn-tasks-wake-{group}"
