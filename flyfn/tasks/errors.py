"""The errors a task's result can hold besides its own code's: `TaskLost`, `TaskTimeout`."""

from __future__ import annotations

__all__ = ["TaskLost", "TaskTimeout"]


class TaskLost(Exception):
    """A task's Machine stopped or died while it ran, on its last attempt (its lease expired)."""

    # Results store an error's class by its path: the public one, `flyfn.tasks.TaskLost`.
    __module__ = "flyfn.tasks"


class TaskTimeout(Exception):
    """A run of a task took longer than its queue's `timeout`: its outcome is this error (its
    Python code is not stopped: it goes on in its thread until it returns or the Machine stops,
    and what it returns is dropped)."""

    __module__ = "flyfn.tasks"
