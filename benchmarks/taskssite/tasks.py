"""The benchmark's task: does nothing, so the figures are the backends' own."""

from __future__ import annotations

try:
    from django.tasks import task
except ImportError:  # Django 5.2: the django-tasks backport
    from django_tasks import task  # type: ignore[no-redef]


@task()
def noop(n: int) -> int:
    return n
