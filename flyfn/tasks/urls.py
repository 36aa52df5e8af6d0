"""The wake URLs, one per group of every FlyMachinesBackend: `include("flyfn.tasks.urls")`.

The views are `wake_view`'s, each marked serverless where it is made (`flyfn.tasks.wake`)."""

from __future__ import annotations

from django.urls import URLPattern, path

from flyfn.tasks.configured import task_groups, wake_url_name
from flyfn.tasks.wake import wake_view

urlpatterns: list[URLPattern] = [
    path(f"_flyfn/tasks/{group}/", wake_view(group), name=wake_url_name(group))
    for group in task_groups()
]
