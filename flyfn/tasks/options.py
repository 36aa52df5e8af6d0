"""The OPTIONS of a `FlyMachinesBackend`, checked once: errors name the key and the bad value."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from django.core.exceptions import ImproperlyConfigured
from django.db.models import Q

from flyfn.fly.env import HOME_APP_ENV, env_value
from flyfn.registry import validate_group_name

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

_DEFAULTS: dict[str, object] = {
    "group": "tasks",
    "queue_groups": {},
    "lease": 30.0,
    "max_attempts": 3,
    "concurrency": 1,
    "url": None,
    "poll": 30.0,
    "beyond_horizon": None,
    "retries": None,
    "timeout": None,
    "queue_options": {},
    "exit_wait": 10.0,
    "id_function": None,  # django-tasks-db's own option (how task ids are made), passed through
}


_BACKOFFS = ("exponential", "constant")
_RETRY_KEYS = ("max_attempts", "backoff", "base", "max_delay")
_QUEUE_KEYS = ("retries", "timeout")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a task that raises runs again: at most `max_attempts` runs in all (counting every run
    of it, lost ones too), the n-th retry `base * 2**(n-1)` seconds after the failure
    (`exponential`) or `base` seconds (`constant`), never more than `max_delay`."""

    max_attempts: int = 3
    backoff: str = "exponential"
    base: float = 1.0
    max_delay: float = 3600.0

    def delay(self, failures: int) -> float:
        """Seconds from the `failures`-th failure (1 for the first) to the next run."""
        if self.backoff == "constant":
            return min(self.base, self.max_delay)
        return min(self.base * 2.0 ** min(failures - 1, 64), self.max_delay)


@dataclass(frozen=True, slots=True)
class QueueOptions:
    """What `queue_options[queue]` sets for one queue's tasks (None: the backend's)."""

    retries: RetryPolicy | None = None
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """What one backend alias does; see docs/background-tasks.md for each option."""

    group: str = "tasks"
    queue_groups: Mapping[str, str] = field(default_factory=dict)
    lease: float = 30.0
    max_attempts: int = 3
    concurrency: int = 1
    url: str | None = None
    poll: float = 30.0
    beyond_horizon: str | None = None
    retries: RetryPolicy | None = None
    timeout: float | None = None
    queue_options: Mapping[str, QueueOptions] = field(default_factory=dict)
    exit_wait: float = 10.0

    @classmethod
    def parse(cls, alias: str, options: Mapping[str, object]) -> TaskOptions:
        """The options of `TASKS[alias]["OPTIONS"]`; ImproperlyConfigured names a bad one."""
        where = f'TASKS[{alias!r}]["OPTIONS"]'
        unknown = sorted(set(options) - set(_DEFAULTS))
        if unknown:
            known = ", ".join(sorted(_DEFAULTS))
            raise ImproperlyConfigured(f"{where}: unknown option {unknown[0]!r}; known: {known}")
        values = {**_DEFAULTS, **options}

        def problem(key: str, expected: str) -> ImproperlyConfigured:
            return ImproperlyConfigured(
                f"{where}[{key!r}]: must be {expected} (got {values[key]!r})"
            )

        try:
            group = validate_group_name(values["group"])
        except ValueError as exc:
            raise ImproperlyConfigured(f"{where}['group']: {exc}") from None
        queue_groups = values["queue_groups"]
        if not isinstance(queue_groups, Mapping) or not all(
            isinstance(q, str) for q in queue_groups
        ):
            raise problem("queue_groups", "a dict of queue name to group")
        for queue, target in queue_groups.items():
            try:
                validate_group_name(target)
            except ValueError as exc:
                raise ImproperlyConfigured(f"{where}['queue_groups'][{queue!r}]: {exc}") from None
        numbers: dict[str, float] = {}
        for key, low in (("lease", 1.0), ("poll", 0.1)):
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
                raise problem(key, f"a number of seconds >= {low:g}")
            numbers[key] = float(value)
        for key, high in (("max_attempts", 100), ("concurrency", 64)):
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise problem(key, f"a whole number from 1 to {high}")
        url = values["url"]
        if url is not None and not (
            isinstance(url, str) and url.startswith(("http://", "https://"))
        ):
            raise problem("url", "an http:// or https:// address")
        beyond = values["beyond_horizon"]
        if beyond is not None and beyond not in BEYOND_HORIZON:
            raise problem("beyond_horizon", " or ".join(map(repr, BEYOND_HORIZON)))
        for key in ("exit_wait",):
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise problem(key, "a number of seconds >= 0")
            numbers[key] = float(value)
        retries = _retries(f"{where}['retries']", values["retries"])
        timeout = _timeout(f"{where}['timeout']", values["timeout"])
        queue_options = values["queue_options"]
        if not isinstance(queue_options, Mapping) or not all(
            isinstance(q, str) and isinstance(o, Mapping) for q, o in queue_options.items()
        ):
            raise problem("queue_options", "a dict of queue name to a dict of options")
        per_queue: dict[str, QueueOptions] = {}
        for queue, given in queue_options.items():
            at = f"{where}['queue_options'][{queue!r}]"
            unknown = sorted(set(given) - set(_QUEUE_KEYS))
            if unknown:
                raise ImproperlyConfigured(
                    f"{at}: unknown option {unknown[0]!r}; known: {', '.join(_QUEUE_KEYS)}"
                )
            per_queue[queue] = QueueOptions(
                retries=_retries(f"{at}['retries']", given.get("retries")),
                timeout=_timeout(f"{at}['timeout']", given.get("timeout")),
            )
        return cls(
            group=group,
            queue_groups=dict(queue_groups),
            lease=numbers["lease"],
            max_attempts=int(values["max_attempts"]),  # type: ignore[call-overload]
            concurrency=int(values["concurrency"]),  # type: ignore[call-overload]
            url=url,
            poll=numbers["poll"],
            beyond_horizon=beyond,
            retries=retries,
            timeout=timeout,
            queue_options=per_queue,
            exit_wait=numbers["exit_wait"],
        )

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


def _retries(where: str, given: object) -> RetryPolicy | None:
    if given is None:
        return None
    if not isinstance(given, Mapping):
        raise ImproperlyConfigured(f"{where}: must be a dict like {{'max_attempts': 3}}")
    unknown = sorted(set(given) - set(_RETRY_KEYS))
    if unknown:
        known = ", ".join(_RETRY_KEYS)
        raise ImproperlyConfigured(f"{where}: unknown key {unknown[0]!r}; known: {known}")
    values = {**_RETRY_DEFAULTS, **given}
    attempts = values["max_attempts"]
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100:
        raise ImproperlyConfigured(
            f"{where}['max_attempts']: must be a whole number from 1 to 100 (got {attempts!r})"
        )
    if values["backoff"] not in _BACKOFFS:
        raise ImproperlyConfigured(
            f"{where}['backoff']: must be one of {', '.join(_BACKOFFS)} (got {values['backoff']!r})"
        )
    seconds: dict[str, float] = {}
    for key in ("base", "max_delay"):
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ImproperlyConfigured(
                f"{where}[{key!r}]: must be a number of seconds >= 0 (got {value!r})"
            )
        seconds[key] = float(value)
    return RetryPolicy(attempts, str(values["backoff"]), seconds["base"], seconds["max_delay"])


_RETRY_DEFAULTS: dict[str, object] = {
    "max_attempts": 3,
    "backoff": "exponential",
    "base": 1.0,
    "max_delay": 3600.0,
}


def _timeout(where: str, given: object) -> float | None:
    if given is None:
        return None
    if isinstance(given, bool) or not isinstance(given, int | float) or given <= 0:
        raise ImproperlyConfigured(f"{where}: must be a number of seconds > 0 (got {given!r})")
    return float(given)


def home_app(own_app: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The app a wake from this process goes to: its app Machines replay it, signed, to the
    group's Machines wherever they live. That is this Machine's own app (`own_app`, its
    `FLY_APP_NAME`), except on a function Machine of the `app` strategy, which lives in the group's
    app: a wake sent there would reach a function Machine unsigned (and possibly of another group),
    so it goes to the app that created it (`FLYFN_HOME_APP`, set by flyfn)."""
    return env_value(environ, HOME_APP_ENV) or own_app
