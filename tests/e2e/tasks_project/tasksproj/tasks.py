"""The e2e task: notes each start and end in a log file (duplicates are counted from it)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

try:
    from django.tasks import task
except ImportError:  # Django 5.2: the django-tasks backport
    from django_tasks import task  # type: ignore[no-redef]


def _note(line: str) -> None:
    # One short O_APPEND write per line: lines from several processes never interleave.
    log = Path(os.environ["TASKS_E2E_DIR"]) / "runs.log"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@task()
def work(i: int) -> dict[str, object]:
    machine = os.environ.get("FLY_MACHINE_ID", "?")
    _note(f"start {i} {machine}")
    time.sleep(random.uniform(0.3, 1.0))  # long enough for the chaos to cut some runs off
    _note(f"end {i} {machine}")
    return {"i": i, "machine": machine}


@task()
def nap(i: int) -> dict[str, object]:
    """300 ms of work: the scale-to-zero e2e's task."""
    time.sleep(0.3)
    return {"i": i, "machine": os.environ.get("FLY_MACHINE_ID", "?")}


@task()
def tick() -> dict[str, object]:
    """The periodic task of the schedules e2e (settings_schedules): notes where it ran."""
    machine = os.environ.get("FLY_MACHINE_ID", "?")
    _note(f"tick {machine}")
    return {"machine": machine}
