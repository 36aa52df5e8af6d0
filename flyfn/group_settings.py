"""A group's settings (`FLYFN["GROUPS"][g]`): its Machines' size, count, concurrency, autostop,
strategy, replay timeout and fallback, validated by pydantic models.

Every default, and why it is the default, is documented on the field it belongs to (the
documentation's settings reference is generated from these docstrings).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from flyfn.fly.autostop import AutostopMode, autostop_from_bool
from flyfn.fly.durations import DurationError, format_duration, parse_duration
from flyfn.fly.limits import (
    GUEST_MB_STEP,
    MEMORY_MB_PER_CPU,
    MEMORY_MB_STEP,
    CpuCount,
    CpuKind,
)
from flyfn.replay_state import MAX_STATE_AGE
from flyfn.settings_errors import invalid, show

__all__ = [
    "APP_NAME_RE",
    "MAX_REPLAY_TIMEOUT",
    "STATE_VALIDITY_MARGIN",
    "ConcurrencySettings",
    "GroupSettings",
    "GuestSettings",
    "HttpOptionsSettings",
    "HttpResponseSettings",
    "Section",
    "matching",
]

# Seconds a signed replay state stays valid beyond the group's replay timeout (clock skew,
# queueing).
STATE_VALIDITY_MARGIN = 30.0
# The longest replay timeout: a state then lives at most MAX_STATE_AGE (what verify_state allows).
MAX_REPLAY_TIMEOUT = MAX_STATE_AGE - STATE_VALIDITY_MARGIN

Strategy = Literal["instance", "app"]
Fallback = Literal["local", "error"]
# Where a group's Machines live (docs/multi-region.md): near the calling app Machine, in the
# primary region (near the database), in one pool for the whole app wherever it was first made
# (flyfn before regions), or in a fixed list of regions.
RegionsMode = Literal["caller", "primary", "shared"]

APP_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_REGION_RE = re.compile(r"^[a-z0-9]{2,10}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


# --------------------------------------------------------------------------- validators


def _duration(value: Any) -> str:
    """A duration string (`"10s"`) from a string or a number of seconds, at most
    `MAX_REPLAY_TIMEOUT`."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise invalid(f'must be a duration such as "10s" or "800ms" (got {show(value)})')
    try:
        text = value.strip() if isinstance(value, str) else format_duration(value)
        seconds = parse_duration(text)
    except (DurationError, ValueError, OverflowError):  # bad text, or NaN / infinity
        raise invalid(f'must be a duration such as "10s" or "800ms" (got {show(value)})') from None
    if seconds > MAX_REPLAY_TIMEOUT:
        raise invalid(
            f'must be at most "{format_duration(MAX_REPLAY_TIMEOUT)}" (got {show(value)}): a '
            "signed replay state is accepted for this long plus a margin"
        )
    return text


def matching(pattern: re.Pattern[str], what: str) -> BeforeValidator:
    """Accepting None or a string matching `pattern` (`what` it is, for the message)."""
    return BeforeValidator(functools.partial(_check_match, pattern, what))


def _check_match(pattern: re.Pattern[str], what: str, value: Any) -> Any:
    if value is None or (isinstance(value, str) and pattern.fullmatch(value)):
        return value
    raise invalid(f"must be {what} (got {show(value)})")


def _at_least(other: str, value: int | None, info: ValidationInfo) -> int | None:
    """`value` (when set) is at least the field `other` declared before it."""
    bound = info.data.get(other)
    if value is not None and bound is not None and value < bound:
        raise invalid(f"must be at least {other} ({bound}) (got {value})")
    return value


# --------------------------------------------------------------------------- models


class Section(BaseModel):
    """A settings dict: frozen, and an unknown key is an error (which lists the known ones)."""

    # The fields' docstrings become their descriptions: the documentation's settings reference.
    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, use_attribute_docstrings=True
    )


class GuestSettings(Section):
    """`GROUPS[g]["guest"]`: the function Machines' size (Fly's `MachineGuest`)."""

    cpu_kind: CpuKind = "shared"
    """Default `"shared"`: the cheapest kind, and what a scale-to-zero view usually needs."""

    cpus: CpuCount = 1
    """Default 1: Fly's smallest size; the counts Fly offers are 1, 2, 4, 8 and 16."""

    memory_mb: int = Field(
        default=GUEST_MB_STEP, ge=GUEST_MB_STEP, le=262_144, multiple_of=GUEST_MB_STEP
    )
    """Default 256 (MB): Fly's smallest size; raise it for heavy views. Fly accepts, per CPU,
    256-2048 MB in multiples of 256 for `shared` CPUs and 2048-8192 MB in multiples of 1024 for
    `performance` ones (e.g. 2048 or 3072 for one performance CPU, never 2304)."""

    @field_validator("cpus", mode="before")
    @classmethod
    def _cpus_is_a_whole_number(cls, value: Any) -> Any:
        # Pydantic's Literal is lax (True == 1, 2.0 == 2); Fly's API takes an integer.
        if isinstance(value, bool) or not isinstance(value, int):
            raise PydanticCustomError("literal_error", "Input should be 1, 2, 4, 8 or 16")
        return value

    @field_validator("memory_mb")
    @classmethod
    def _fly_sizes(cls, memory_mb: int, info: ValidationInfo) -> int:
        # Fly refuses other sizes when the Machine is created (its machine-sizing guide).
        kind, cpus = info.data.get("cpu_kind"), info.data.get("cpus")
        if kind is None or cpus is None:
            return memory_mb  # reported on their own keys
        low, high = MEMORY_MB_PER_CPU[kind]
        step = MEMORY_MB_STEP[kind]
        if memory_mb % step or not low * cpus <= memory_mb <= high * cpus:
            raise invalid(
                f"Fly refuses {memory_mb} MB for {cpus} {kind} CPU(s): "
                f"{kind} CPUs take {low}-{high} MB each, in multiples of {step} "
                f"({low * cpus}-{high * cpus} MB here)"
            )
        return memory_mb


class ConcurrencySettings(Section):
    """`GROUPS[g]["concurrency"]`: the requests one function Machine takes, written into its
    `services[].concurrency` (type `"requests"`) for Fly Proxy's balancing."""

    soft_limit: int = Field(ge=1, le=100_000)
    """Required: at this many requests in flight a Machine counts as busy. Fly Proxy then prefers
    (or autostarts) another Machine of the service, and an `instance`-strategy function Machine
    sends further replays on to the next Machine of its group (see docs/elastic-groups.md)."""

    hard_limit: int | None = Field(default=None, ge=1, le=100_000)
    """Default None (Fly's own default: no hard limit): at this many requests in flight Fly Proxy
    sends the Machine nothing more, and queues requests meant for it alone (replays to it)."""

    @field_validator("hard_limit")
    @classmethod
    def _hard_above_soft(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _at_least("soft_limit", value, info)


class HttpResponseSettings(Section):
    """`GROUPS[g]["http_options"]["response"]`: what Fly Proxy does to the function Machines'
    answers (Fly's `HTTPResponseOptions`)."""

    headers: dict[str, str | list[str] | bool] = {}
    """Default none: headers Fly Proxy sets on every answer, e.g. `{"X-Frame-Options": "DENY"}`
    (a list of values sets it several times; `false` removes it), as fly.toml's
    `[http_service.http_options.response.headers]`."""

    pristine: bool | None = None
    """Default None (Fly's default: false): `true` makes Fly Proxy add none of its own headers
    (`fly-request-id`, `via`, ...) to the answers."""

    @field_validator("headers")
    @classmethod
    def _header_names(
        cls, headers: dict[str, str | list[str] | bool]
    ) -> dict[str, str | list[str] | bool]:
        for name in headers:
            if not _HEADER_NAME_RE.fullmatch(name):
                raise invalid(f"must map HTTP header names to values (got {show(name)})")
        return headers


class HttpOptionsSettings(Section):
    """`GROUPS[g]["http_options"]`: Fly Proxy's HTTP options for the function Machines' ports
    (Fly's `HTTPOptions`; fly.toml's `[http_service.http_options]`, which API-created Machines do
    not get)."""

    compress: bool | None = None
    """Default None (Fly's default: off): `true` lets Fly Proxy compress answers."""

    h2_backend: bool | None = None
    """Default None (Fly's default: HTTP/1.1): `true` speaks HTTP/2 (h2c) to the Machine; only for
    a server that speaks it (gunicorn does not)."""

    idle_timeout: int | None = Field(default=None, ge=1, le=86_400)
    """Default None (Fly's default): seconds a connection to the Machine may stay idle."""

    headers_read_timeout: int | None = Field(default=None, ge=1, le=86_400)
    """Default None (Fly's default): seconds Fly Proxy waits for the Machine's answer headers."""

    response: HttpResponseSettings | None = None
    """Default None: see `HttpResponseSettings`."""


class GroupSettings(Section):
    """`FLYFN["GROUPS"][g]`: how one group of serverless views runs. Undeclared groups get
    these."""

    guest: GuestSettings = GuestSettings()
    """Default shared-cpu-1x with 256 MB: see `GuestSettings`."""

    machines: int = Field(default=1, ge=1, le=100)
    """Default 1: the Machines the app Machines replay to (in turn); Fly Proxy starts a stopped
    Machine per request, so one serves a trickle. Raise `max_machines` to let a burst spread
    further."""

    max_machines: int | None = Field(default=None, ge=1, le=100)
    """Default: `machines`. The most Machines the group has: all are created (a stopped Machine
    costs only its root file system) and started as load needs, when the Machines before them are
    at their `concurrency` soft limit (docs/elastic-groups.md)."""

    keep_warm: int = Field(default=0, ge=0, le=100)
    """Default 0: every Machine may stop when idle (scale to zero). N keeps N of the group's
    Machines started: Fly Proxy's own `min_machines_running` on their service (Modal's
    `min_containers`), so the first request after a quiet spell has no cold start; each costs an
    always-on Machine (`manage.py flyfn status` shows the figure). The group then has at least N
    Machines there, and flyfn starts them. Fly applies it in the app's primary region only
    (`PRIMARY_REGION`): only the pool there is kept warm. A pool elsewhere (a caller's region
    under the default `regions: "caller"`, a listed region, a `region` that is another) keeps
    nothing warm and gets no extra Machines (flyfn.W026). A task group's Machines stop themselves
    once drained: it is ignored there."""

    concurrency: ConcurrencySettings | None = None
    """Default None: Fly's defaults (a soft limit of 20, no hard limit). The requests one Machine
    takes, e.g. `{"soft_limit": 10, "hard_limit": 15}`; written into the Machines' services."""

    autostop: Annotated[AutostopMode, BeforeValidator(autostop_from_bool)] = "stop"
    """Default `"stop"`: works for every Machine size; `"suspend"` resumes in a few hundred ms
    instead of a cold boot but needs ≤ 2 GB memory and no swap; `"off"` keeps Machines running.
    Booleans are accepted as in fly.toml (true = stop, false = off)."""

    internal_port: int = Field(default=8000, ge=1, le=65535)
    """Default 8000: the port Django/uvicorn/gunicorn setups on Fly conventionally listen on."""

    force_https: bool = True
    """Default true: a request that reaches a function Machine over plain http (port 80) is
    redirected to https by Fly Proxy (301), as `fly launch` sets `force_https = true` for the app
    Machines. API-created Machines get nothing from fly.toml, so without this an ordinary request
    balanced onto a function Machine (`instance` strategy) or sent to the group's app (`app`
    strategy) would be served over plain http. Set false when the app serves plain http on
    purpose (its `[http_service] force_https` is false). Replays are never redirected."""

    http_options: HttpOptionsSettings | None = None
    """Default None (Fly's defaults): Fly Proxy's HTTP options for the function Machines' ports,
    e.g. `{"idle_timeout": 120, "response": {"headers": {"X-Frame-Options": "DENY"}}}`; see
    `HttpOptionsSettings`. Copy what fly.toml's `[http_service.http_options]` says: API-created
    Machines do not get it."""

    region: Annotated[str | None, matching(_REGION_RE, 'a Fly region code such as "iad"')] = None
    """Default None (see `regions`): one pool for the whole app, in this region (as before
    `regions` existed; the same as `regions: "shared"` placed here). Not together with
    `regions`."""

    regions: RegionsMode | tuple[str, ...] | None = None
    """Default None: `"caller"` for a group of views, `"primary"` for a task group. Where the
    group's Machines live, one pool per region (its own `max_machines` and concurrency):
    `"caller"` in the region of the app Machine that replays the request (the view runs where it
    would have run without flyfn, near the visitor; a single-region app keeps one pool there),
    `"primary"` in `PRIMARY_REGION` (near the database: for views that make many queries),
    a list of region codes (a caller outside it uses the nearest one), or `"shared"`: one pool for
    the whole app, created in the region of whichever app Machine needs it first (flyfn before
    regions). When a region's pool cannot have a Machine (creation refused, no capacity) a
    request goes to the nearest region that has one (docs/multi-region.md)."""

    env: tuple[str, ...] = ()
    """Default none: names of environment variables whose values (in the creating process) are
    copied to the function Machines; fly.toml `[env]` is not given to API-created Machines."""

    secrets: tuple[str, ...] = ()
    """Default none (`SECRET_KEY` is always covered): names of app secrets the function Machines
    use, e.g. `DATABASE_URL`. Fly gives secrets to every Machine of the app, but to API-created
    ones only when they (re)start or are updated: a change to one of these (a digest, never the
    value) makes the app Machines update the function Machines."""

    strategy: Strategy = "instance"
    """Default `"instance"`: function Machines live in the same app and replays name one by id,
    which needs no second Fly app. `"app"` puts them in `app` and lets Fly Proxy balance
    them."""

    app: Annotated[str | None, matching(APP_NAME_RE, "a Fly app name (a-z, 0-9, -)")] = None
    """Default None; required by `strategy: "app"`: the Fly app (same org) of the function
    Machines."""

    replay_timeout: Annotated[str, BeforeValidator(_duration)] = "10s"
    """Default `"10s"`: how long Fly Proxy tries to reach the target, which includes a cold start
    (about 2 s or more for a Django app), with room to spare before the fallback answers."""

    fallback: Fallback = "local"
    """Default `"local"`: when a replay cannot happen, run the view on the app Machine (the user
    gets an answer); `"error"` answers 503 with Retry-After instead (for views too heavy to run
    there)."""

    fallback_concurrency: int = Field(default=4, ge=1, le=10_000)
    """Default 4: at most this many local fallbacks run at once per process (beyond that: 503 with
    Retry-After), so a burst of failed replays of a heavy view cannot starve ordinary traffic."""

    @field_validator("env", "secrets", mode="before")
    @classmethod
    def _env_names(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise invalid(f"must be a list of environment variable names (got {show(value)})")
        names: list[str] = []
        for name in value:
            if not isinstance(name, str) or not _ENV_NAME_RE.fullmatch(name):
                raise invalid(f"must list environment variable names (got {show(name)})")
            if name not in names:
                names.append(name)
        return tuple(names)

    @field_validator("regions", mode="before")
    @classmethod
    def _region_list(cls, value: Any) -> Any:
        if value is None or value in ("caller", "primary", "shared"):
            return value
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise invalid(
                'must be "caller", "primary", "shared" or a list of Fly region codes such as '
                '["iad", "syd"] '
                f"(got {show(value)})"
            )
        codes: list[str] = []
        for code in value:
            if not isinstance(code, str) or not _REGION_RE.fullmatch(code):
                raise invalid(f'must list Fly region codes such as "iad" (got {show(code)})')
            if code not in codes:
                codes.append(code)
        if not codes:
            raise invalid("must name at least one region")
        return tuple(codes)

    @field_validator("regions")
    @classmethod
    def _not_with_region(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("region") is not None:
            raise invalid('set either "region" or "regions", not both')
        return value

    @field_validator("max_machines")
    @classmethod
    def _max_at_least_machines(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _at_least("machines", value, info)

    @field_validator("app")
    @classmethod
    def _app_for_app_strategy(cls, app: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("strategy") == "app" and not app:
            raise invalid('required when strategy is "app"')
        return app

    @property
    def machine_count(self) -> int:
        """The Machines the group keeps created: `max_machines`, else `machines` (a pool that
        keeps Machines warm has at least those: `flyfn.pool.spec.spec_for`)."""
        return self.max_machines if self.max_machines is not None else self.machines

    # Cached (the model is frozen): read on the hot path of cold replays and of every signed check.
    @functools.cached_property
    def replay_timeout_seconds(self) -> float:
        """`replay_timeout` in seconds."""
        return parse_duration(self.replay_timeout)

    @functools.cached_property
    def state_max_age(self) -> float:
        """Seconds a signed replay state of this group stays valid: the replay timeout plus a
        margin."""
        return self.replay_timeout_seconds + STATE_VALIDITY_MARGIN
