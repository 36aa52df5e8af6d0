"""flyfn.tasks: a Django Tasks backend that runs `@task` functions on function Machines.

`TASKS = {"default": {"BACKEND": "flyfn.tasks.FlyMachinesBackend", "OPTIONS": {...}}}` with
`"flyfn.tasks"` and `"django_tasks_db"` in INSTALLED_APPS; docs/background-tasks.md tells the
rest. Importing this package imports no model (it is an app and loads before the registry).
"""

from __future__ import annotations

from flyfn.tasks.backend import FlyMachinesBackend
from flyfn.tasks.options import TaskOptions


class TaskLost(Exception):
    """A task's Machine stopped or died while it ran, on its last attempt (its lease expired)."""


class TaskTimeout(Exception):
    """A run of a task took longer than its queue's `timeout`: its outcome is this error (its
    Python code is not stopped: it goes on in its thread until it returns or the Machine stops,
    and what it returns is dropped)."""


def run_due_tasks(group: str | None = None) -> int:
    """Run every due task (of `group`, or of every group of every flyfn backend) in the
    calling thread; how many ran. For tests and scripts that want no thread."""
    from flyfn.tasks.runner import run_due_tasks as run

    return run(group)


__all__ = ["FlyMachinesBackend", "TaskLost", "TaskOptions", "TaskTimeout", "run_due_tasks"]
