"""flyfn.tasks: a Django Tasks backend that runs `@task` functions on function Machines.

`TASKS = {"default": {"BACKEND": "flyfn.tasks.FlyMachinesBackend", "OPTIONS": {...}}}` with
`"flyfn.tasks"` and `"django_tasks_db"` in INSTALLED_APPS; docs/background-tasks.md tells the
rest. Importing this package imports no model (it is an app and loads before the registry).
"""

from __future__ import annotations

from flyfn.tasks.backend import FlyMachinesBackend
from flyfn.tasks.errors import TaskLost, TaskTimeout
from flyfn.tasks.options import TaskOptions


def run_due_tasks(group: str | None = None) -> int:
    """Run every due task (of `group`, or of every group of every flyfn backend) in the
    calling thread; how many ran. For tests and scripts that want no thread."""
    from flyfn.tasks.runner import run_due_tasks as run

    return run(group)


__all__ = ["FlyMachinesBackend", "TaskLost", "TaskOptions", "TaskTimeout", "run_due_tasks"]
