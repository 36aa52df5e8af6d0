"""The wake URLs, one per group of every FlyMachinesBackend: `include("flyfn.tasks.urls")`."""

from __future__ import annotations

from django.conf import settings
from django.urls import URLPattern, path
from django.utils.module_loading import import_string

from flyfn.tasks.backend import FlyMachinesBackend, wake_url_name
from flyfn.tasks.options import TaskOptions
from flyfn.tasks.wake import wake_view


def task_groups() -> list[str]:
    """Every group a configured FlyMachinesBackend runs tasks in."""
    groups: set[str] = set()
    for alias, params in getattr(settings, "TASKS", {}).items():
        try:
            backend = import_string(params.get("BACKEND", ""))
        except ImportError:
            continue
        if isinstance(backend, type) and issubclass(backend, FlyMachinesBackend):
            groups |= TaskOptions.parse(alias, params.get("OPTIONS", {})).groups
    return sorted(groups)


urlpatterns: list[URLPattern] = [
    path(f"_flyfn/tasks/{group}/", wake_view(group), name=wake_url_name(group))
    for group in task_groups()
]
