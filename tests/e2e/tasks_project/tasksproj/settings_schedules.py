"""The tasks project with a periodic task: `tick` once an hour, run by a scheduled Machine (the
schedules e2e runs `flyfn dev` time-scaled, so an hour lasts seconds)."""

from __future__ import annotations

from typing import Any

from .settings import *  # noqa: F403
from .settings import TASKS

_options: dict[str, Any] = dict(TASKS["default"]["OPTIONS"])  # type: ignore[arg-type]
_options["schedules"] = {"hourly-tick": {"task": "tasksproj.tasks.tick", "every": "hourly"}}
TASKS["default"]["OPTIONS"] = _options
