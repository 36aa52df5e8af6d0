"""Task functions of the test project (Django requires them at module level)."""

from __future__ import annotations

import threading
from typing import Any

try:
    from django.tasks import TaskContext, task
except ImportError:  # Django 5.2: the django-tasks backport
    from django_tasks import TaskContext, task  # type: ignore[no-redef,assignment]

# What ran, in order (tests clear it): the task's name and its argument.
ran: list[tuple[str, Any]] = []


@task()
def add(a: int, b: int) -> dict[str, Any]:
    ran.append(("add", (a, b)))
    return {"sum": a + b, "thread": threading.current_thread().name}


@task()
def note(label: str) -> str:
    ran.append(("note", label))
    return label


@task(queue_name="reports")
def report(month: str) -> str:
    ran.append(("report", month))
    return f"report {month}"


@task()
def explode(message: str) -> None:
    ran.append(("explode", message))
    raise ValueError(message)


@task(takes_context=True)
def with_context(context: TaskContext[Any, Any], label: str) -> dict[str, Any]:
    ran.append(("with_context", label))
    return {"attempt": context.attempt, "id": context.task_result.id, "label": label}


@task()
async def async_double(n: int) -> int:
    ran.append(("async_double", n))
    return n * 2


@task()
def not_json() -> object:
    return object()


@task()
def parse_arguments(argv: list[str]) -> str:
    """argparse in a task: a bad argument raises SystemExit."""
    import argparse

    ran.append(("parse_arguments", argv))
    parser = argparse.ArgumentParser(prog="parse_arguments")
    parser.add_argument("--month", required=True)
    return str(parser.parse_args(argv).month)


@task()
def interrupt(label: str) -> None:
    ran.append(("interrupt", label))
    raise KeyboardInterrupt(label)
