"""The flyfn settings: `FLYFN` and the seed's setting, validated into a typed model.

A group's options are `flyfn.group_settings`; how errors are worded, `flyfn.settings_errors`;
the seed's setting, `flyfn.legacy_setting`.

`get_settings()` validates `settings.FLYFN` (and `FLY_MACHINES_SERVERLESS_FUNCTIONS`) into a
frozen pydantic model and caches it until Django's `setting_changed` signal
(`override_settings`) or `reset_settings()` says otherwise, so the hot path pays one attribute
read. Invalid values raise `SettingsError`, whose message names the exact key and
the allowed values (never the API token).

Every default, and why it is the default, is documented on the field it belongs to.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from typing import Annotated, Any
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
    field_validator,
)

from flyfn import process_state
from flyfn.fly.api_host import DEFAULT_API_HOSTNAME, in_clear
from flyfn.fly.env import FLY_API_HOSTNAME, FLY_API_TOKEN, FLY_APP_NAME, FLY_IMAGE_REF, env_value
from flyfn.fly.limits import REPLAY_BODY_LIMIT
from flyfn.group_settings import (
    APP_NAME_RE,
    MAX_REPLAY_TIMEOUT,
    STATE_VALIDITY_MARGIN,
    ConcurrencySettings,
    GroupSettings,
    GuestSettings,
    Section,
    matching,
)
from flyfn.legacy_setting import SEED_SETTING, seed_views
from flyfn.names import validate_group_name
from flyfn.registry import ServerlessView, normalize_methods
from flyfn.settings_errors import SettingsError, SettingsIssue, invalid, issues_of, show

__all__ = [
    "DEFAULT_GROUP",
    "MAX_REPLAY_TIMEOUT",
    "SEED_SETTING",
    "STATE_VALIDITY_MARGIN",
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

# The FLYFN keys that default to a Fly environment variable.
_ENV_DEFAULTS = {
    "APP_NAME": FLY_APP_NAME,
    "API_HOSTNAME": FLY_API_HOSTNAME,
    "API_TOKEN": FLY_API_TOKEN,
    "IMAGE_REF": FLY_IMAGE_REF,
}
_WATCHED_SETTINGS = frozenset({"FLYFN", SEED_SETTING})


# --------------------------------------------------------------------------- FLYFN


def _group_name(value: Any) -> str:
    try:
        return validate_group_name(value)
    except (TypeError, ValueError) as exc:
        raise invalid(str(exc)) from None


def _views(value: Any) -> dict[str, ServerlessView]:
    """`FLYFN["VIEWS"]`: `{"app:url_name": ["GET", ...]}` or
    `{"app:url_name": {"methods": [...], "group": "pdf"}}`."""
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


class FlyfnSettings(Section):
    """`settings.FLYFN`, validated. Attribute names are the keys in lower case."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, populate_by_name=True
    )

    app_name: Annotated[str | None, matching(APP_NAME_RE, "a Fly app name (a-z, 0-9, -)")] = Field(
        default=None, alias="APP_NAME"
    )
    """Default: env `FLY_APP_NAME`, which Fly sets on every Machine; the app the function Machines
    belong to (`instance` strategy). Does not decide the role: see `flyfn.machine_role`."""

    api_hostname: str = Field(default=DEFAULT_API_HOSTNAME, alias="API_HOSTNAME")
    """Default: env `FLY_API_HOSTNAME`, else `https://api.machines.dev` (Fly's public endpoint;
    `http://_api.internal:4280` also works inside Fly's network)."""

    api_token: SecretStr | None = Field(default=None, alias="API_TOKEN")
    """Default: env `FLY_API_TOKEN` (set it with `fly secrets set`). Never logged or shown."""

    image_ref: str | None = Field(default=None, alias="IMAGE_REF")
    """Default: env `FLY_IMAGE_REF`, which Fly sets to the running image: function Machines run
    the same image as the app Machine that created them."""

    views: Annotated[dict[str, ServerlessView], PlainValidator(_views)] = Field(
        default_factory=dict, alias="VIEWS"
    )
    """Default none: views declared by url name instead of `@fly_serverless`."""

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
    """Default off: the port serving Prometheus metrics at `/metrics` for Fly's scraper
    (`[metrics] port` in fly.toml; 9091 by convention). Never the app's own port."""

    metrics_address: str = Field(default="::", min_length=1, alias="METRICS_ADDRESS")
    """Default `::` (every address, IPv4 too): the address the metrics port listens on. Fly's
    scraper reaches each Machine over its private network (6PN), so `::` or the Machine's
    `FLY_PRIVATE_IP` is needed for Fly's metrics; either way every app of the organisation can read
    the page too (it has no authentication; see docs/security.md). `127.0.0.1` or `::1` keeps it to
    the Machine (`manage.py flyfn status` still reads it; Fly's scraper no longer can)."""

    groups: dict[Annotated[str, BeforeValidator(_group_name)], GroupSettings] = Field(
        default_factory=dict, alias="GROUPS"
    )
    """Default none: every group gets `GroupSettings()` defaults until declared here."""

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
        Fly's private network (`_api.internal`) or this computer (`localhost`, a loopback
        address). System check flyfn.E011 reports it; the Machines client refuses such a host."""
        return in_clear(self.api_hostname)

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
        """The settings of group `name`; defaults when it is not declared in `GROUPS`."""
        found = self.groups.get(name)
        return found if found is not None else _DEFAULT_GROUP_SETTINGS

    @property
    def declared_views(self) -> dict[str, ServerlessView]:
        """Views declared in settings by url name (`VIEWS` plus the seed setting)."""
        return self.views


_DEFAULT_GROUP_SETTINGS = GroupSettings()


def _url_problem(value: Any) -> str | None:
    """Why `value` is not a usable API URL (`""` when it is not even a URL), or None."""
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
    """Validate raw `FLYFN` and `FLY_MACHINES_SERVERLESS_FUNCTIONS` values.

    Raises SettingsError listing every invalid value.

    Keys missing from `FLYFN` take their env defaults from `environ` (default `os.environ`).
    Views declared in `FLYFN["VIEWS"]` win over the same url name in the seed setting.
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


process_state.register(
    __name__, "validated settings", settings=reset_settings, watched=_WATCHED_SETTINGS
)


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    # flyfn's one `setting_changed` receiver: the pieces watching `setting` reset.
    process_state.reset("settings", setting)


setting_changed.connect(_on_setting_changed, dispatch_uid="flyfn.process_state.settings")
