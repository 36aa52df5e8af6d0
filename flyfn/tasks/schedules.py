"""Periodic tasks as a backend's `OPTIONS["schedules"]` declares them (`Schedule`, validated by
pydantic), and their slots: the times a schedule is due at, each run at most once.

A schedule's `every` is one of Fly's Machine intervals (`hourly`, `daily`, `weekly`, `monthly`:
a scheduled Machine runs it, nothing else need be up) or a number of seconds, or it has a
`cron` expression (both finer: an app Machine kept running runs them). Slots are on the UTC
calendar: `hourly` at each hour, `daily` at midnight, `weekly` on Monday at midnight, `monthly`
on the 1st at midnight; `every: 300` at each multiple of 300 s since the Unix epoch; cron at the
expression's times. A look runs the slot it falls in and catches up on the one just before it
(flyfn.tasks.periodic): Fly starts a scheduled Machine once per interval from its creation, not
on the hour. Under `flyfn dev --time-scale N` (env `FLYFN_TIME_SCALE`) a slot lasts 1/N of
its time, counted from `SCALED_ORIGIN`, as the emulated Fly starts scheduled Machines N times as
often.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar

from croniter import croniter
from django.core.exceptions import ImproperlyConfigured
from pydantic import BeforeValidator, Field, RootModel, ValidationError, model_validator

from flyfn.fly.env import TIME_SCALE_ENV, env_value
from flyfn.fly.schedule import INTERVALS
from flyfn.settings_errors import invalid
from flyfn.tasks.options import _Options, _problem

__all__ = [
    "FLY_INTERVAL_CRON",
    "MIN_EVERY",
    "SCALED_ORIGIN",
    "Schedule",
    "parse_schedules",
    "time_scale",
]

# Fly's intervals as calendar slots (UTC), in cron's words.
FLY_INTERVAL_CRON: dict[str, str] = {
    "hourly": "0 * * * *",
    "daily": "0 0 * * *",
    "weekly": "0 0 * * 1",
    "monthly": "0 0 1 * *",
}
# The shortest `every` in seconds: a task enqueued more often is a worker's job, not a schedule's.
MIN_EVERY = 60
# Scaled time (dev only) runs from here: the same instant for every process of the stack.
SCALED_ORIGIN = datetime(2026, 1, 1, tzinfo=UTC)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_MAX_NAME = 100


def time_scale(environ: Mapping[str, str] = os.environ) -> float:
    """How many times faster schedules' slots pass: `FLYFN_TIME_SCALE` (set by `flyfn dev
    --time-scale`), else 1."""
    text = env_value(environ, TIME_SCALE_ENV)
    try:
        scale = float(text) if text else 1.0
    except ValueError:
        return 1.0
    return scale if 0 < scale < math.inf else 1.0


def _every(value: Any) -> Any:
    if value is None or value in INTERVALS:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_EVERY:
        raise invalid(
            f"must be one of {', '.join(INTERVALS)} (Fly's schedules) or a whole number of "
            f"seconds >= {MIN_EVERY} (got {value!r})"
        )
    return value


def _cron(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str) or len(value.split()) != 5 or not croniter.is_valid(value):
        raise invalid(
            f"must be a cron expression of 5 fields, minute hour day month weekday, like "
            f"'*/5 * * * *' (got {value!r})"
        )
    return value


def _dotted(value: Any) -> Any:
    if not isinstance(value, str) or "." not in value.strip("."):
        raise invalid(f"must be the dotted path of a @task function (got {value!r})")
    return value


class Schedule(_Options):
    """One periodic task: `task` (the dotted path of a `@task` function) enqueued with `args`,
    `kwargs`, `queue_name` and `priority` once per slot of `every` or `cron`."""

    _key_word: ClassVar[str] = "key"
    _not_a_dict: ClassVar[str] = (
        "must be a dict like {'task': 'app.tasks.nightly', 'every': 'daily'}"
    )

    task: Annotated[str, BeforeValidator(_dotted)]
    every: Annotated[str | int | None, BeforeValidator(_every)] = None
    cron: Annotated[str | None, BeforeValidator(_cron)] = None
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    queue_name: str | None = None
    priority: int | None = None

    @model_validator(mode="after")
    def _one_when(self) -> Schedule:
        if (self.every is None) == (self.cron is None):
            raise invalid("give exactly one of 'every' and 'cron'")
        return self

    @property
    def fly_interval(self) -> str | None:
        """The Fly interval a scheduled Machine runs this schedule on, or None (finer: it needs
        an app Machine kept running)."""
        return self.every if isinstance(self.every, str) else None

    @property
    def when(self) -> str:
        """How the schedule's time reads in messages: `hourly`, `every 300 s`, `cron '...'`."""
        if isinstance(self.every, str):
            return self.every
        if self.every is not None:
            return f"every {self.every} s"
        return f"cron {self.cron!r}"

    def slot_at(self, now: datetime, scale: float = 1.0) -> datetime:
        """The slot `now` falls in: the latest time the schedule is due at, at or before `now`."""
        return self._real(self._slot(self._virtual(now, scale), previous=True), scale)

    def previous_slot(self, now: datetime, scale: float = 1.0) -> datetime:
        """The slot just before the one `now` falls in (the one a look catches up on)."""
        current = self._slot(self._virtual(now, scale), previous=True)
        # Every slot is a whole second: a second before one lies in the slot before it.
        return self._real(self._slot(current - timedelta(seconds=1), previous=True), scale)

    def next_slot(self, now: datetime, scale: float = 1.0) -> datetime:
        """The first time after `now` the schedule is due at."""
        return self._real(self._slot(self._virtual(now, scale), previous=False), scale)

    def _slot(self, at: datetime, *, previous: bool) -> datetime:
        if isinstance(self.every, int):
            step = timedelta(seconds=self.every)
            start = (
                datetime.fromtimestamp(0, UTC)
                + ((at - datetime.fromtimestamp(0, UTC)) // step) * step
            )
            return start if previous else start + step
        expression = self.cron or FLY_INTERVAL_CRON[str(self.every)]
        # croniter counts whole seconds: `at` itself is a slot when it is one to the second.
        base = at.replace(microsecond=0)
        if previous:
            found = croniter(expression, base + timedelta(seconds=1)).get_prev(datetime)
        else:
            found = croniter(expression, base).get_next(datetime)
        assert isinstance(found, datetime)
        return found.astimezone(UTC)

    @staticmethod
    def _virtual(now: datetime, scale: float) -> datetime:
        if scale == 1.0:
            return now.astimezone(UTC)
        return SCALED_ORIGIN + (now - SCALED_ORIGIN) * scale

    @staticmethod
    def _real(at: datetime, scale: float) -> datetime:
        if scale == 1.0:
            return at
        return SCALED_ORIGIN + (at - SCALED_ORIGIN) / scale


def validate_schedule_name(name: Any) -> str:
    """A schedule's name (its key in `schedules`): lowercase letters, digits, `-`, `_`, `.`."""
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME or set(name) - _NAME_CHARS:
        raise invalid(
            f"a schedule's name must be 1 to {_MAX_NAME} lowercase letters, digits, '-', '_' "
            f"or '.' (got {name!r})"
        )
    return name


class _Schedules(
    RootModel[dict[Annotated[str, BeforeValidator(validate_schedule_name)], Schedule]]
):
    """`OPTIONS["schedules"]`: schedule name to `Schedule`."""


def parse_schedules(alias: str, options: Mapping[str, object]) -> dict[str, Schedule]:
    """The schedules of `TASKS[alias]["OPTIONS"]["schedules"]` (none when absent);
    ImproperlyConfigured names each bad one."""
    given = options.get("schedules", {})
    if not isinstance(given, Mapping):
        raise ImproperlyConfigured(
            f"TASKS[{alias!r}][\"OPTIONS\"]['schedules']: must be a dict of schedule name to "
            f"a dict like {{'task': 'app.tasks.nightly', 'every': 'daily'}} (got {given!r})"
        )
    try:
        return _Schedules.model_validate(dict(given)).root
    except ValidationError as exc:
        where = f"TASKS[{alias!r}][\"OPTIONS\"]['schedules']"
        raise ImproperlyConfigured(
            "; ".join(_problem(where, item) for item in exc.errors(include_url=False))
        ) from None
