"""A task's result with the errors of every failed attempt (`with_earlier_errors`): django-tasks-db
keeps only the last one; flyfn keeps the others (`TaskFailure`)."""

from __future__ import annotations

from typing import Any, ParamSpec, TypeVar
from uuid import UUID

from django_tasks_db.backend import TaskResult
from django_tasks_db.compat import TaskError

__all__ = ["earlier_errors", "failures_of", "with_earlier_errors"]

T = TypeVar("T")
P = ParamSpec("P")


def earlier_errors(failures: Any) -> list[TaskError]:
    """`TaskError`s of (exception class path, traceback) pairs, as `failures_of` gives them."""
    return [TaskError(exception_class_path=path, traceback=tb) for path, tb in failures]


def failures_of(result_id: str) -> Any:
    """The failed attempts of a task retried after them, oldest first (a query, sync or async)."""
    # Not at import: the package loads before Django's app registry, and this is a model.
    from flyfn.tasks.models import TaskFailure

    rows = TaskFailure.objects.filter(task_id=UUID(result_id)).order_by("attempt")
    return rows.values_list("exception_class_path", "traceback")


def with_earlier_errors(result: TaskResult[P, T]) -> TaskResult[P, T]:
    """`result` (django-tasks-db's, which knows only the last error) with the errors of the runs
    that were retried first: `errors` holds every failed attempt's, oldest first. A result run
    at most once has none (no query then: reading a result stays one query)."""
    if result.attempts <= 1:
        return result
    result.errors[:0] = earlier_errors(failures_of(str(result.id)))
    return result
