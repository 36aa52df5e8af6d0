"""The tasks project with a periodic task: `tick` once an hour, run by a scheduled Machine (the
schedules e2e runs `flyfn dev` time-scaled, so an hour lasts seconds)."""

from __future__ import annotations

from tasksproj.settings import *  # noqa: F403
from tasksproj.settings import TASKS

TASKS["default"]["OPTIONS"] = {
    **TASKS["default"]["OPTIONS"],
    "schedules": {"hourly-tick": {"task": "tasksproj.tasks.tick", "every": "hourly"}},
}
