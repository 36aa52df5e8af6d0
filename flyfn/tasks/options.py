"""The OPTIONS of a `FlyMachinesBackend`, validated once by pydantic models: errors name the key
and the bad value."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

from django.core.exceptions import ImproperlyConfigured
from django.db.models import Q
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from flyfn.fly.env import HOME_APP_ENV, env_value
from flyfn.names import validate_group_name
from flyfn.settings_errors import invalid

__all__ = [
    "BEYOND_HORIZON",
    "HORIZON",
    "PUBLIC_URL_ENV",
    "QueueOptions",
    "RetryPolicy",
    "TaskOptions",
    "home_app",
]

# A woken function Machine of a task group stays up for a task scheduled this far ahead (seconds,
# on the database's clock) and runs it at its time; see docs/background-tasks.md.
HORIZON = 900.0
# How tasks scheduled beyond HORIZON get run on time (`OPTIONS["beyond_horizon"]`): an app Machine
# that is always running wakes the group at their time, or they run at the group's next wake.
BEYOND_HORIZON = ("app_machine", "next_wake")

# `flyfn dev` sets it on its Machines to its proxy's address; on Fly the app's own address is used.
PUBLIC_URL_ENV = "FLYFN_PUBLIC_URL"

_BACKOFFS = ("exponential", "constant")


def _whole(high: int) -> BeforeValidator:
    """A whole number from 1 to `high` (not a bool, not a float)."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise invalid(f"must be a whole number from 1 to {high} (got {value!r})")
        return value

    return BeforeValidator(check)


def _seconds(low: float, *, above: bool = False, optional: bool = False) -> BeforeValidator:
    """A number of seconds `>= low` (`> low` when `above`), as a float (not a bool); None too
    when `optional`."""

    def check(value: Any) -> float | None:
        if value is None and optional:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or value < low
            or (above and value == low)
        ):
            relation = ">" if above else ">="
            raise invalid(f"must be a number of seconds {relation} {low:g} (got {value!r})")
        return float(value)

    return BeforeValidator(check)


def _one_of(choices: tuple[object, ...], expected: str) -> BeforeValidator:
    """One of `choices`, else "must be `expected`"."""

    def check(value: Any) -> Any:
        if value not in choices:
            raise invalid(f"must be {expected} (got {value!r})")
        return value

    return BeforeValidator(check)


def _group_name(value: Any) -> str:
    """A group name (`flyfn.registry.validate_group_name`)."""
    try:
        return validate_group_name(value)
    except ValueError as exc:
        raise invalid(str(exc)) from None


def _dict_of(values: type, expected: str) -> BeforeValidator:
    """A dict of queue name (a string) to `values`, else "must be `expected`"."""

    def check(value: Any) -> Any:
        if not isinstance(value, Mapping) or not all(
            isinstance(q, str) and isinstance(v, values) for q, v in value.items()
        ):
            raise invalid(f"must be {expected} (got {value!r})")
        return value

    return BeforeValidator(check)


def _url(value: Any) -> Any:
    """None or an http(s) address."""
    if value is not None and not (
        isinstance(value, str) and value.startswith(("http://", "https://"))
    ):
        raise invalid(f"must be an http:// or https:// address (got {value!r})")
    return value


class _Options(BaseModel):
    """A dict of OPTIONS: frozen; an unknown key is an error that lists the known ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # How the dict's keys are called in messages, and what a value that is not a dict is told.
    _key_word: ClassVar[str] = "option"
    _not_a_dict: ClassVar[str] = "must be a dict"
    # Keys accepted and left out: another library's options in the same dict.
    _passed_through: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, given: Any) -> Any:
        if not isinstance(given, Mapping):
            raise invalid(cls._not_a_dict)
        known = cls._known()
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise invalid(f"unknown {cls._key_word} {unknown[0]!r}; known: {', '.join(known)}")
        return {key: value for key, value in given.items() if key not in cls._passed_through}

    @classmethod
    def _known(cls) -> list[str]:
        return [*cls.model_fields, *cls._passed_through]


class RetryPolicy(_Options):
    """How a task that raises runs again: at most `max_attempts` runs in all (counting every run
    of it, lost ones too), the n-th retry `base * 2**(n-1)` seconds after the failure
    (`exponential`) or `base` seconds (`constant`), never more than `max_delay`."""

    _key_word: ClassVar[str] = "key"
    _not_a_dict: ClassVar[str] = "must be a dict like {'max_attempts': 3}"

    max_attempts: Annotated[int, _whole(100)] = 3
    backoff: Annotated[str, _one_of(_BACKOFFS, "one of " + ", ".join(_BACKOFFS))] = "exponential"
    base: Annotated[float, _seconds(0)] = 1.0
    max_delay: Annotated[float, _seconds(0)] = 3600.0

    def delay(self, failures: int) -> float:
        """Seconds from the `failures`-th failure (1 for the first) to the next run."""
        if self.backoff == "constant":
            return min(self.base, self.max_delay)
        return min(self.base * 2.0 ** min(failures - 1, 64), self.max_delay)


_Timeout = Annotated[float | None, _seconds(0, above=True, optional=True)]


class QueueOptions(_Options):
    """What `queue_options[queue]` sets for one queue's tasks (None: the backend's)."""

    retries: RetryPolicy | None = None
    timeout: _Timeout = None


class TaskOptions(_Options):
    """What one backend alias does; see docs/background-tasks.md for each option."""

    # django-tasks-db's own option (how task ids are made), passed through to it; the periodic
    # tasks, parsed on their own (flyfn.tasks.schedules).
    _passed_through: ClassVar[tuple[str, ...]] = ("id_function", "schedules")

    group: Annotated[str, BeforeValidator(_group_name)] = "tasks"
    queue_groups: Annotated[
        dict[str, Annotated[str, BeforeValidator(_group_name)]],
        _dict_of(object, "a dict of queue name to group"),
    ] = Field(default_factory=dict)
    lease: Annotated[float, _seconds(1)] = 30.0
    max_attempts: Annotated[int, _whole(100)] = 3
    concurrency: Annotated[int, _whole(64)] = 1
    url: Annotated[str | None, BeforeValidator(_url)] = None
    poll: Annotated[float, _seconds(0.1)] = 30.0
    beyond_horizon: Annotated[
        str | None, _one_of((*BEYOND_HORIZON, None), " or ".join(map(repr, BEYOND_HORIZON)))
    ] = None
    retries: RetryPolicy | None = None
    timeout: _Timeout = None
    queue_options: Annotated[
        dict[str, QueueOptions],
        _dict_of(Mapping, "a dict of queue name to a dict of options"),
    ] = Field(default_factory=dict)
    exit_wait: Annotated[float, _seconds(0)] = 10.0

    @classmethod
    def _known(cls) -> list[str]:
        return sorted(super()._known())

    @classmethod
    def parse(cls, alias: str, options: Mapping[str, object]) -> TaskOptions:
        """The options of `TASKS[alias]["OPTIONS"]`; ImproperlyConfigured names each bad one."""
        try:
            return cls.model_validate(options)
        except ValidationError as exc:
            where = f'TASKS[{alias!r}]["OPTIONS"]'
            raise ImproperlyConfigured(
                "; ".join(_problem(where, item) for item in exc.errors(include_url=False))
            ) from None

    def retries_of(self, queue_name: str) -> RetryPolicy | None:
        """The retry policy of `queue_name`'s tasks (None: a task that raises is FAILED)."""
        own = self.queue_options.get(queue_name)
        return own.retries if own is not None and own.retries is not None else self.retries

    def timeout_of(self, queue_name: str) -> float | None:
        """Seconds a run of `queue_name`'s tasks may take (None: no limit)."""
        own = self.queue_options.get(queue_name)
        return own.timeout if own is not None and own.timeout is not None else self.timeout

    def group_of(self, queue_name: str) -> str:
        """The group whose Machines run tasks of `queue_name`."""
        return self.queue_groups.get(queue_name, self.group)

    @property
    def groups(self) -> frozenset[str]:
        """Every group this backend's tasks may run in."""
        return frozenset({self.group, *self.queue_groups.values()})

    def queue_filter(self, group: str) -> Q:
        """The task rows of `group`: its mapped queues, plus every unmapped queue for the
        default group."""
        if group == self.group:
            return ~Q(queue_name__in=[q for q, g in self.queue_groups.items() if g != group])
        return Q(queue_name__in=[q for q, g in self.queue_groups.items() if g == group])

    def wake_url(self, app_name: str | None) -> str | None:
        """The address wakes are sent to (through Fly Proxy), or None when none is known:
        `url`, else env `FLYFN_PUBLIC_URL`, else `https://<app_name>.fly.dev`, where `app_name`
        is the app whose app Machines replay wakes to the group (`home_app`)."""
        base = self.url or os.environ.get(PUBLIC_URL_ENV) or None
        if base is None and app_name:
            base = f"https://{app_name}.fly.dev"
        return base.rstrip("/") if base else None


def _problem(where: str, error: Any) -> str:
    """One of pydantic's errors as `TASKS['default']["OPTIONS"]['lease']: must be ...`."""
    at = where + "".join(f"[{part!r}]" for part in error["loc"])
    custom = error["type"].startswith("flyfn_")
    return f"{at}: {error['ctx']['msg'] if custom else error['msg']}"


def home_app(own_app: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The app a wake from this process goes to: its app Machines replay it, signed, to the
    group's Machines wherever they live. That is this Machine's own app (`own_app`, its
    `FLY_APP_NAME`), except on a function Machine of the `app` strategy, which lives in the group's
    app: a wake sent there would reach a function Machine unsigned (and possibly of another group),
    so it goes to the app that created it (`FLYFN_HOME_APP`, set by flyfn)."""
    return env_value(environ, HOME_APP_ENV) or own_app
