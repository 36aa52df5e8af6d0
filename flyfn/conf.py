"""The flyfn settings: ``FLYFN`` and the seed's setting, validated into a typed model.

``get_settings()`` validates ``settings.FLYFN`` (and ``FLY_MACHINES_SERVERLESS_FUNCTIONS``) into a
frozen pydantic model and caches it until Django's ``setting_changed`` signal
(``override_settings``) or ``reset_settings()`` says otherwise, so the hot path pays one attribute
read. Invalid values raise ``SettingsError``, whose message names the exact key and
the allowed values (never the API token).

Every default, and why it is the default, is documented on the field it belongs to.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from django.conf import settings as django_settings
from django.core.signals import setting_changed
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from flyfn.fly.api_host import DEFAULT_API_HOSTNAME, is_private
from flyfn.fly.autostop import AutostopMode, autostop_from_bool
from flyfn.fly.durations import DurationError, format_duration, parse_duration
from flyfn.fly.env import FLY_API_HOSTNAME, FLY_API_TOKEN, FLY_APP_NAME, FLY_IMAGE_REF, env_value
from flyfn.fly.limits import GUEST_MB_STEP, MEMORY_MB_PER_CPU, REPLAY_BODY_LIMIT, CpuCount, CpuKind
from flyfn.registry import ServerlessView, normalize_methods, validate_group_name
from flyfn.replay import MAX_STATE_AGE
from flyfn.seed import SEED_SETTING, seed_views
from flyfn.settings_errors import SettingsError, SettingsIssue, invalid, issues_of, show

__all__ = [
    "DEFAULT_GROUP",
    "SEED_SETTING",
    "ConcurrencySettings",
    "FlyfnSettings",
    "GroupSettings",
    "GuestSettings",
    "SettingsError",
    "SettingsIssue",
    "get_settings",
    "load_settings",
    "reset_settings",
]

DEFAULT_GROUP = "default"
# Seconds a signed replay state stays valid beyond the group's replay timeout (clock skew,
# queueing).
STATE_VALIDITY_MARGIN = 30.0
# The longest replay timeout: a state then lives at most MAX_STATE_AGE (what verify_state allows).
MAX_REPLAY_TIMEOUT = MAX_STATE_AGE - STATE_VALIDITY_MARGIN

# The FLYFN keys that default to a Fly environment variable.
_ENV_DEFAULTS = {
    "APP_NAME": FLY_APP_NAME,
    "API_HOSTNAME": FLY_API_HOSTNAME,
    "API_TOKEN": FLY_API_TOKEN,
    "IMAGE_REF": FLY_IMAGE_REF,
}
_WATCHED_SETTINGS = frozenset({"FLYFN", SEED_SETTING})

Strategy = Literal["instance", "app"]
Fallback = Literal["local", "error"]

_APP_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_REGION_RE = re.compile(r"^[a-z0-9]{2,10}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --------------------------------------------------------------------------- validators


def _duration(value: Any) -> str:
    """A duration string (``"10s"``) from a string or a number of seconds, at most
    ``MAX_REPLAY_TIMEOUT``."""
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


def _match(pattern: re.Pattern[str], what: str) -> BeforeValidator:
    """Accepting None or a string matching ``pattern`` (``what`` it is, for the message)."""
    return BeforeValidator(functools.partial(_check_match, pattern, what))


def _check_match(pattern: re.Pattern[str], what: str, value: Any) -> Any:
    if value is None or (isinstance(value, str) and pattern.fullmatch(value)):
        return value
    raise invalid(f"must be {what} (got {show(value)})")


def _group_name(value: Any) -> str:
    try:
        return validate_group_name(value)
    except (TypeError, ValueError) as exc:
        raise invalid(str(exc)) from None


def _at_least(other: str, value: int | None, info: ValidationInfo) -> int | None:
    """``value`` (when set) is at least the field ``other`` declared before it."""
    bound = info.data.get(other)
    if value is not None and bound is not None and value < bound:
        raise invalid(f"must be at least {other} ({bound}) (got {value})")
    return value


# --------------------------------------------------------------------------- models


class _Section(BaseModel):
    """A settings dict: frozen, and an unknown key is an error (which lists the known ones)."""

    # The fields' docstrings become their descriptions: the documentation's settings reference.
    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, use_attribute_docstrings=True
    )


class GuestSettings(_Section):
    """``GROUPS[g]["guest"]``: the function Machines' size (Fly's ``MachineGuest``)."""

    cpu_kind: CpuKind = "shared"
    """Default ``"shared"``: the cheapest kind, and what a scale-to-zero view usually needs."""

    cpus: CpuCount = 1
    """Default 1: Fly's smallest size; the counts Fly offers are 1, 2, 4, 8 and 16."""

    memory_mb: int = Field(
        default=GUEST_MB_STEP, ge=GUEST_MB_STEP, le=262_144, multiple_of=GUEST_MB_STEP
    )
    """Default 256 (MB): Fly's smallest size (Fly wants multiples of 256); raise it for heavy
    views."""

    @field_validator("memory_mb")
    @classmethod
    def _fly_sizes(cls, memory_mb: int, info: ValidationInfo) -> int:
        # Fly refuses other sizes when the Machine is created (its machine-sizing guide).
        kind, cpus = info.data.get("cpu_kind"), info.data.get("cpus")
        if kind is None or cpus is None:
            return memory_mb  # reported on their own keys
        low, high = MEMORY_MB_PER_CPU[kind]
        if not low * cpus <= memory_mb <= high * cpus:
            raise invalid(
                f"Fly refuses {memory_mb} MB for {cpus} {kind} CPU(s): "
                f"{kind} CPUs take {low}-{high} MB each, in multiples of {GUEST_MB_STEP} "
                f"({low * cpus}-{high * cpus} MB here)"
            )
        return memory_mb


class ConcurrencySettings(_Section):
    """``GROUPS[g]["concurrency"]``: the requests one function Machine takes, written into its
    ``services[].concurrency`` (type ``"requests"``) for Fly Proxy's balancing."""

    soft_limit: int = Field(ge=1, le=100_000)
    """Required: at this many requests in flight a Machine counts as busy. Fly Proxy then prefers
    (or autostarts) another Machine of the service, and an ``instance``-strategy function Machine
    sends further replays on to the next Machine of its group (see docs/elastic-groups.md)."""

    hard_limit: int | None = Field(default=None, ge=1, le=100_000)
    """Default None (Fly's own default: no hard limit): at this many requests in flight Fly Proxy
    sends the Machine nothing more, and queues requests meant for it alone (replays to it)."""

    @field_validator("hard_limit")
    @classmethod
    def _hard_above_soft(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _at_least("soft_limit", value, info)


class GroupSettings(_Section):
    """``FLYFN["GROUPS"][g]``: how one group of serverless views runs. Undeclared groups get
    these."""

    guest: GuestSettings = GuestSettings()
    """Default shared-cpu-1x with 256 MB: see ``GuestSettings``."""

    machines: int = Field(default=1, ge=1, le=100)
    """Default 1: the Machines the app Machines replay to (in turn); Fly Proxy starts a stopped
    Machine per request, so one serves a trickle. Raise ``max_machines`` to let a burst spread
    further."""

    max_machines: int | None = Field(default=None, ge=1, le=100)
    """Default: ``machines``. The most Machines the group has: all are created (a stopped Machine
    costs only its root file system) and started as load needs, when the Machines before them are
    at their ``concurrency`` soft limit (docs/elastic-groups.md)."""

    concurrency: ConcurrencySettings | None = None
    """Default None: Fly's defaults (a soft limit of 20, no hard limit). The requests one Machine
    takes, e.g. ``{"soft_limit": 10, "hard_limit": 15}``; written into the Machines' services."""

    autostop: Annotated[AutostopMode, BeforeValidator(autostop_from_bool)] = "stop"
    """Default ``"stop"``: works for every Machine size; ``"suspend"`` resumes in a few hundred ms
    instead of a cold boot but needs ≤ 2 GB memory and no swap; ``"off"`` keeps Machines running.
    Booleans are accepted as in fly.toml (true = stop, false = off)."""

    internal_port: int = Field(default=8000, ge=1, le=65535)
    """Default 8000: the port Django/uvicorn/gunicorn setups on Fly conventionally listen on."""

    region: Annotated[str | None, _match(_REGION_RE, 'a Fly region code such as "iad"')] = None
    """Default None: the region of the app Machine that creates them (Fly's own default)."""

    env: tuple[str, ...] = ()
    """Default none: names of environment variables whose values (in the creating process) are
    copied to the function Machines; fly.toml ``[env]`` is not given to API-created Machines."""

    secrets: tuple[str, ...] = ()
    """Default none (``SECRET_KEY`` is always covered): names of app secrets the function Machines
    use, e.g. ``DATABASE_URL``. Fly gives secrets to every Machine of the app, but to API-created
    ones only when they (re)start or are updated: a change to one of these (a digest, never the
    value) makes the app Machines update the function Machines."""

    strategy: Strategy = "instance"
    """Default ``"instance"``: function Machines live in the same app and replays name one by id,
    which needs no second Fly app. ``"app"`` puts them in ``app`` and lets Fly Proxy balance
    them."""

    app: Annotated[str | None, _match(_APP_NAME_RE, "a Fly app name (a-z, 0-9, -)")] = None
    """Default None; required by ``strategy: "app"``: the Fly app (same org) of the function
    Machines."""

    replay_timeout: Annotated[str, BeforeValidator(_duration)] = "10s"
    """Default ``"10s"``: how long Fly Proxy tries to reach the target, which includes a cold start
    (about 2 s or more for a Django app), with room to spare before the fallback answers."""

    fallback: Fallback = "local"
    """Default ``"local"``: when a replay cannot happen, run the view on the app Machine (the user
    gets an answer); ``"error"`` answers 503 with Retry-After instead (for views too heavy to run
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
        """The Machines the group keeps created: ``max_machines``, else ``machines``."""
        return self.max_machines if self.max_machines is not None else self.machines

    # Cached (the model is frozen): read on the hot path of cold replays and of every signed check.
    @functools.cached_property
    def replay_timeout_seconds(self) -> float:
        """``replay_timeout`` in seconds."""
        return parse_duration(self.replay_timeout)

    @functools.cached_property
    def state_max_age(self) -> float:
        """Seconds a signed replay state of this group stays valid: the replay timeout plus a
        margin."""
        return self.replay_timeout_seconds + STATE_VALIDITY_MARGIN


def _views(value: Any) -> dict[str, ServerlessView]:
    """``FLYFN["VIEWS"]``: ``{"app:url_name": ["GET", ...]}`` or
    ``{"app:url_name": {"methods": [...], "group": "pdf"}}``."""
    if not isinstance(value, Mapping):
        raise invalid(f'must be a dict like {{"app:url_name": ["GET"]}} (got {show(value)})')
    views: dict[str, ServerlessView] = {}
    for name, spec in value.items():
        if not isinstance(name, str) or not name.strip():
            raise invalid(f"a view must be named by its url name (got {show(name)})")
        group: Any = DEFAULT_GROUP
        methods: Any = spec
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"methods", "group"}
            if unknown:
                raise invalid(
                    'unknown option; known options: "methods", "group"',
                    "unknown_key",
                    key=name,
                    sub=sorted(map(str, unknown))[0],
                )
            methods = spec.get("methods", ("GET",))
            group = spec.get("group", DEFAULT_GROUP)
        views[name] = _declared(name, methods, group, key=name)
    return views


def _declared(name: str, methods: Any, group: Any, *, key: Any) -> ServerlessView:
    try:
        normalized = normalize_methods(methods)
    except (TypeError, ValueError) as exc:
        raise invalid(str(exc), "method", key=key) from None
    try:
        group_name = validate_group_name(group)
    except (TypeError, ValueError) as exc:
        raise invalid(str(exc), key=key) from None
    return ServerlessView(methods=normalized, group=group_name, name=name)


class FlyfnSettings(_Section):
    """``settings.FLYFN``, validated. Attribute names are the keys in lower case."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, populate_by_name=True
    )

    app_name: Annotated[str | None, _match(_APP_NAME_RE, "a Fly app name (a-z, 0-9, -)")] = Field(
        default=None, alias="APP_NAME"
    )
    """Default: env ``FLY_APP_NAME``, which Fly sets on every Machine; the app the function Machines
    belong to (``instance`` strategy). Does not decide the role: see ``flyfn.runtime``."""

    api_hostname: str = Field(default=DEFAULT_API_HOSTNAME, alias="API_HOSTNAME")
    """Default: env ``FLY_API_HOSTNAME``, else ``https://api.machines.dev`` (Fly's public endpoint;
    ``http://_api.internal:4280`` also works inside Fly's network)."""

    api_token: SecretStr | None = Field(default=None, alias="API_TOKEN")
    """Default: env ``FLY_API_TOKEN`` (set it with ``fly secrets set``). Never logged or shown."""

    image_ref: str | None = Field(default=None, alias="IMAGE_REF")
    """Default: env ``FLY_IMAGE_REF``, which Fly sets to the running image: function Machines run
    the same image as the app Machine that created them."""

    views: Annotated[dict[str, ServerlessView], PlainValidator(_views)] = Field(
        default_factory=dict, alias="VIEWS"
    )
    """Default none: views declared by url name instead of ``@fly_serverless``."""

    replay_body_limit: int = Field(default=REPLAY_BODY_LIMIT, ge=0, alias="REPLAY_BODY_LIMIT")
    """Default 1,000,000 bytes: Fly Proxy cannot replay larger bodies; such requests take the
    fallback."""

    cache_ttl: float = Field(default=30.0, gt=0, le=86_400, alias="CACHE_TTL")
    """Default 30 (seconds): how long a group's known Machines are used without asking the API
    again; after it they are still used while one background refresh runs. A vanished Machine
    leaves the cache at once anyway, so this only bounds how late flyfn notices changes made behind
    its back."""

    sign_replays: bool = Field(default=True, alias="SIGN_REPLAYS")
    """Default true: function Machines run serverless views only for requests replayed by an app
    Machine (HMAC of SECRET_KEY), so a client cannot reach them directly."""

    metrics_port: int | None = Field(default=None, ge=1, le=65535, alias="METRICS_PORT")
    """Default off: the port serving Prometheus metrics at ``/metrics`` for Fly's scraper
    (``[metrics] port`` in fly.toml; 9091 by convention). Never the app's own port."""

    metrics_address: str = Field(default="::", min_length=1, alias="METRICS_ADDRESS")
    """Default ``::`` (every address, IPv4 too): Fly's scraper reaches each Machine over its private
    network."""

    groups: dict[Annotated[str, BeforeValidator(_group_name)], GroupSettings] = Field(
        default_factory=dict, alias="GROUPS"
    )
    """Default none: every group gets ``GroupSettings()`` defaults until declared here."""

    @field_validator("api_hostname", mode="before")
    @classmethod
    def _hostname(cls, value: Any) -> Any:
        problem = _url_problem(value)
        if problem is not None:
            raise invalid(
                f'must be an http(s) URL such as "{DEFAULT_API_HOSTNAME}"{problem} '
                f"(got {show(value)})"
            )
        return value.rstrip("/")

    @property
    def api_in_clear(self) -> bool:
        """Whether the API token would travel in clear text: plain http to a host other than
        Fly's private network (``_api.internal``) or this computer (loopback)."""
        return urlsplit(self.api_hostname).scheme == "http" and not is_private(self.api_hostname)

    @field_validator("image_ref", mode="before")
    @classmethod
    def _image(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise invalid(f"must be an image reference (got {show(value)})")
        return value

    @field_validator("api_token", mode="before")
    @classmethod
    def _token(cls, value: Any) -> Any:
        # Never echo the value: it may be a real token of the wrong type.
        if value is not None and not isinstance(value, str | SecretStr):
            raise invalid(f"must be a string (got {type(value).__name__})")
        if isinstance(value, str) and not value.strip():
            return None
        return value

    def group(self, name: str) -> GroupSettings:
        """The settings of group ``name``; defaults when it is not declared in ``GROUPS``."""
        found = self.groups.get(name)
        return found if found is not None else _DEFAULT_GROUP_SETTINGS

    @property
    def declared_views(self) -> dict[str, ServerlessView]:
        """Views declared in settings by url name (``VIEWS`` plus the seed setting)."""
        return self.views


_DEFAULT_GROUP_SETTINGS = GroupSettings()


def _url_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable API URL (``""`` when it is not even a URL), or None."""
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", value):
        return ""
    try:
        url = urlsplit(value)
        port = url.port  # ValueError when out of range or not a number
    except ValueError:
        return ": its host or port is invalid"
    if not url.hostname or (port is not None and port == 0):
        return ": its host or port is invalid"
    return None


# --------------------------------------------------------------------------- loading


class _Root(BaseModel):
    """Both settings flyfn reads, validated together so that every issue is reported at once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    flyfn: FlyfnSettings = Field(alias="FLYFN")
    seed: Annotated[dict[str, ServerlessView], PlainValidator(seed_views)] = Field(
        alias=SEED_SETTING
    )


def load_settings(
    flyfn: Any = None, seed: Any = None, environ: Mapping[str, str] | None = None
) -> FlyfnSettings:
    """Validate raw ``FLYFN`` and ``FLY_MACHINES_SERVERLESS_FUNCTIONS`` values.

    Raises SettingsError listing every invalid value.

    Keys missing from ``FLYFN`` take their env defaults from ``environ`` (default ``os.environ``).
    Views declared in ``FLYFN["VIEWS"]`` win over the same url name in the seed setting.
    """
    env = os.environ if environ is None else environ
    raw: Any = {} if flyfn is None else flyfn
    # A value that came from the environment is named as such in errors, not as FLYFN["..."].
    from_env: dict[str, str] = {}
    if isinstance(raw, Mapping):
        raw = dict(raw)
        for key, var in _ENV_DEFAULTS.items():
            value = env_value(env, var)
            if key not in raw and value is not None:
                raw[key] = value
                from_env[f"FLYFN.{key}"] = f"env {var}"
    try:
        root = _Root.model_validate({"FLYFN": raw, SEED_SETTING: seed})
    except ValidationError as exc:
        # `from None`: a pydantic error's text includes input values, which may hold the token.
        raise SettingsError(issues_of(exc, _Root, from_env)) from None
    if not root.seed:
        return root.flyfn
    return root.flyfn.model_copy(update={"views": {**root.seed, **root.flyfn.views}})


_lock = threading.Lock()
_cached: FlyfnSettings | None = None


def get_settings() -> FlyfnSettings:
    """The current flyfn settings, validated once and cached until the settings change."""
    global _cached
    cached = _cached
    if cached is not None:
        return cached
    with _lock:
        if _cached is None:
            _cached = load_settings(
                getattr(django_settings, "FLYFN", None),
                getattr(django_settings, SEED_SETTING, None),
            )
        return _cached


def reset_settings() -> None:
    """Forget the cached settings (after changing the environment in tests, for instance)."""
    global _cached
    with _lock:
        _cached = None


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in _WATCHED_SETTINGS:
        reset_settings()


setting_changed.connect(_on_setting_changed, dispatch_uid="flyfn.conf.reset_settings")
