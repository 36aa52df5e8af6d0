"""Task functions of the test project (Django requires them at module level)."""

from __future__ import annotations

import threading
import time
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


@task()
def lose_my_connection() -> str:
    """PostgreSQL: the server terminates the connection of the thread running this task (from
    another connection), as a restart or a failover would, while the task runs."""
    from django.db import connection

    connection.ensure_connection()
    pid = connection.connection.info.backend_pid

    def terminate() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
                # Gone, not only told to go (a safety bound, not a speed test).
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
                    if cursor.fetchone()[0] == 0:
                        return
                    time.sleep(0.02)
        finally:
            connection.close()

    thread = threading.Thread(target=terminate)
    thread.start()
    thread.join()
    ran.append(("lose_my_connection", pid))
    return "survived"


@task(takes_context=True)
def fail_until(context: TaskContext[Any, Any], succeed_on: int) -> dict[str, int]:
    """Raises on every attempt before `succeed_on`; what it saw of its earlier errors."""
    seen = len(context.task_result.errors)
    ran.append(("fail_until", (context.attempt, seen)))
    if context.attempt < succeed_on:
        raise ValueError(f"failed on attempt {context.attempt}")
    return {"attempt": context.attempt, "errors_seen": seen}


# Set by the tests to let `block` return.
release = threading.Event()


@task(queue_name="slow")
def block(label: str) -> str:
    ran.append(("block", label))
    release.wait()
    return label


@task()
def pause(seconds: float) -> float:
    """Takes `seconds` (a task long enough for a wake's heartbeats)."""
    time.sleep(seconds)
    return seconds
