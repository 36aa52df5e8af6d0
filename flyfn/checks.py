"""flyfn's system checks (`manage.py check`): `flyfn.E0xx` errors and `flyfn.W0xx` warnings.

- flyfn.E001: an invalid `FLYFN` or seed-setting value (names the key and the allowed values)
- flyfn.E002: an unknown `FLYFN` key or group option (lists the known ones)
- flyfn.E003: an unknown HTTP method in a settings-declared view
- flyfn.E004: a settings-declared url name that does not resolve
- flyfn.E005: a Fly app name (`FLY_APP_NAME` / `FLYFN["APP_NAME"]`) without an API token
- flyfn.E006: two groups of one app whose function Machines would get the same names
- flyfn.E010: a secret-like name in `GROUPS[g]["env"]` (its value would be in the Machine config)
- flyfn.E011: `API_HOSTNAME` over plain http to a host other than `_api.internal` or loopback
- flyfn.W001: `flyfn.middleware.FlyReplayMiddleware` missing from `MIDDLEWARE`
- flyfn.W002: the middleware placed after middleware that does per-request I/O
- flyfn.W003: `REPLAY_BODY_LIMIT` above Fly's 1 MB replay limit
- flyfn.W004: a class-based view marked for a method it has no handler for
- flyfn.W006: a group's `region` or `regions` names a code that is not in Fly's region list
- flyfn.W026: a group kept warm with a pool in a region other than the app's primary region
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings as django_settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.utils.module_loading import import_string
from django.views import View

from flyfn.conf import (
    SEED_SETTING,
    FlyfnSettings,
    SettingsError,
    get_settings,
)
from flyfn.fly.api_host import CLEAR_TEXT_HINT, clear_text_problem
from flyfn.fly.env import FLY_REGION, PRIMARY_REGION, env_value
from flyfn.fly.limits import REPLAY_BODY_LIMIT
from flyfn.fly.regions import REGIONS, is_fly_region
from flyfn.pool.placement import Placement, placement
from flyfn.pool.spec import group_app, is_task_group, name_slug
from flyfn.registry import iter_url_names, registry
from flyfn.secret_env import secret_env_message, secret_like_env

__all__ = ["IO_MIDDLEWARE", "MIDDLEWARE_PATH", "secret_like_env"]

MIDDLEWARE_PATH = "flyfn.middleware.FlyReplayMiddleware"

# Middleware whose per-request work (session/user loading, body parsing, cache round trips) a
# request that is only going to be replayed should not pay for on the app Machine: the function
# Machine runs the whole stack again anyway. Matched by class, so subclasses count too.
IO_MIDDLEWARE: dict[str, str] = {
    "django.contrib.sessions.middleware.SessionMiddleware": "loads the session (store I/O)",
    "django.contrib.auth.middleware.AuthenticationMiddleware": "loads the user (session + DB)",
    "django.contrib.auth.middleware.RemoteUserMiddleware": "authenticates every request (DB)",
    "django.contrib.auth.middleware.PersistentRemoteUserMiddleware": "authenticates (DB)",
    "django.contrib.auth.middleware.LoginRequiredMiddleware": "loads the user (session + DB)",
    "django.middleware.csrf.CsrfViewMiddleware": "reads and parses POST bodies",
    "django.contrib.messages.middleware.MessageMiddleware": "reads and writes message storage",
    "django.middleware.cache.FetchFromCacheMiddleware": "reads the cache",
    "django.middleware.cache.CacheMiddleware": "reads the cache",
}

_HINT_SETTINGS = "See the settings reference in flyfn's documentation (docs/settings.md)."

_ISSUE_IDS = {"value": "flyfn.E001", "unknown_key": "flyfn.E002", "method": "flyfn.E003"}


def _settings_or_errors() -> tuple[FlyfnSettings | None, list[CheckMessage]]:
    try:
        return get_settings(), []
    except SettingsError as exc:
        errors: list[CheckMessage] = []
        for issue in exc.issues:
            check_id = _ISSUE_IDS.get(issue.kind, "flyfn.E001")
            hint = _HINT_SETTINGS
            if issue.kind == "unknown_key":
                hint = "Check the spelling: FLYFN keys are upper case, group options lower case."
            elif issue.kind == "method":
                hint = "Use GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS or TRACE."
            errors.append(Error(str(issue), hint=hint, id=check_id))
        return None, errors


@register("flyfn")
def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """E001-E003: the settings validate; E005: a token for the app; W003: the body limit."""
    settings, messages = _settings_or_errors()
    if settings is None:
        return messages
    if settings.app_name and settings.api_token is None:
        messages.append(
            Error(
                f"Fly app {settings.app_name!r} is configured but no Machines API token is set, "
                "so no function Machine can be created: serverless views fall back.",
                hint='Set the FLY_API_TOKEN secret: fly secrets set FLY_API_TOKEN="$(fly tokens '
                "deploy)\" (or FLYFN['API_TOKEN']).",
                id="flyfn.E005",
            )
        )
    messages.extend(_check_group_env(settings))
    messages.extend(_check_group_regions(settings))
    problem = clear_text_problem(settings.api_hostname)
    if problem is not None:
        messages.append(
            Error(f"FLYFN['API_HOSTNAME']: {problem}.", hint=CLEAR_TEXT_HINT, id="flyfn.E011")
        )
    if settings.replay_body_limit > REPLAY_BODY_LIMIT:
        messages.append(
            Warning(
                f"FLYFN['REPLAY_BODY_LIMIT'] is {settings.replay_body_limit} bytes, above Fly's "
                f"replay limit of {REPLAY_BODY_LIMIT}: larger requests would fail at Fly Proxy "
                "instead of taking the fallback.",
                hint=f"Use at most {REPLAY_BODY_LIMIT} (the default).",
                id="flyfn.W003",
            )
        )
    return messages


def _check_group_regions(settings: FlyfnSettings) -> list[CheckMessage]:
    """W006: region codes flyfn does not know (a typo, or a region Fly added since)."""
    messages: list[CheckMessage] = []
    for group, options in sorted(settings.groups.items()):
        listed = options.regions if isinstance(options.regions, tuple) else ()
        for code in (*([options.region] if options.region else []), *listed):
            if not is_fly_region(code):
                messages.append(
                    Warning(
                        f"FLYFN['GROUPS'][{group!r}] names region {code!r}, which is not in "
                        "Fly's region list: Fly refuses to create Machines in an unknown "
                        "region, and flyfn cannot tell how far it is from the others.",
                        hint=f"Fly's regions: {', '.join(sorted(REGIONS))} (`fly platform "
                        "regions`). A newer region: silence with SILENCED_SYSTEM_CHECKS = "
                        '["flyfn.W006"].',
                        id="flyfn.W006",
                    )
                )
    return messages


def _check_group_env(settings: FlyfnSettings) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    for group, options in sorted(settings.groups.items()):
        for name in secret_like_env(options.env, os.environ):
            if options.strategy == "app":
                hint = (
                    f"Remove {name!r} from env and make it a secret of the function app: "
                    f"fly secrets set {name}=... -a {group_app(settings, group)} "
                    "(that app needs SECRET_KEY too)."
                )
            else:
                hint = (
                    f"Remove {name!r} from env: set it with fly secrets set {name}=..., and Fly "
                    "gives it to every Machine of the app, function Machines included."
                )
            messages.append(
                Error(
                    secret_env_message(group, name),
                    hint=hint,
                    id="flyfn.E010",
                )
            )
    return messages


@register("flyfn", "urls")
def check_views(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """E004: settings-declared url names resolve; W004: class-based views handle their methods."""
    messages: list[CheckMessage] = _check_class_views()
    try:
        declared = get_settings().declared_views
    except SettingsError:
        return messages  # reported by check_settings
    if not declared:
        return messages
    try:
        known = {name for name, _callback in iter_url_names()}
    except Exception as exc:  # a broken urlconf: Django's own url checks give the details
        return [
            *messages,
            Error(
                f"flyfn cannot resolve the url names of its declared views: the urlconf failed "
                f"to load ({type(exc).__name__}: {exc}).",
                hint="Fix ROOT_URLCONF first (see the urls.* checks).",
                id="flyfn.E004",
            ),
        ]
    raw = getattr(django_settings, "FLYFN", None)
    in_flyfn = raw.get("VIEWS", {}) if isinstance(raw, dict) else {}
    for name in sorted(declared):
        if name in known:
            continue
        where = 'FLYFN["VIEWS"]' if name in in_flyfn else SEED_SETTING
        messages.append(
            Error(
                f"{where} declares {name!r}, but no url pattern has that name.",
                hint="Use the name given to path(..., name=...), with its namespace "
                '("app:url_name"), as for reverse().',
                id="flyfn.E004",
            )
        )
    return messages


def _check_class_views() -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    for view, entry in registry.decorated().items():
        cls = view if isinstance(view, type) else getattr(view, "view_class", None)
        if not (isinstance(cls, type) and issubclass(cls, View)):
            continue
        handled = {m.upper() for m in cls.http_method_names if hasattr(cls, m)}
        if "GET" in handled:
            handled.add("HEAD")  # View.setup() answers HEAD with get()
        missing = sorted(entry.methods - handled)
        if missing:
            messages.append(
                Warning(
                    f"{entry.name} is marked serverless for {', '.join(missing)} but has no "
                    "handler for it: those requests are replayed only to be answered 405.",
                    hint="Drop those methods from @fly_serverless(...) or implement them.",
                    obj=cls,
                    id="flyfn.W004",
                )
            )
    return messages


def _middleware_class(path: str) -> type | None:
    try:
        found = import_string(path)
    except Exception:  # an unimportable entry: Django reports it when it loads middleware
        return None
    return found if isinstance(found, type) else None


@register("flyfn")
def check_middleware(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """W001: FlyReplayMiddleware is installed; W002: nothing doing per-request I/O runs before
    it."""
    middleware = list(getattr(django_settings, "MIDDLEWARE", None) or [])
    ours = _middleware_class(MIDDLEWARE_PATH)
    position = None
    for index, path in enumerate(middleware):
        cls = _middleware_class(path) if path != MIDDLEWARE_PATH else ours
        if path == MIDDLEWARE_PATH or (
            ours is not None and cls is not None and issubclass(cls, ours)
        ):
            position = index
            break
    if position is None:
        return [
            Warning(
                f"{MIDDLEWARE_PATH} is not in MIDDLEWARE: serverless views run on this Machine.",
                hint=f"Add {MIDDLEWARE_PATH!r} near the top of MIDDLEWARE (after "
                "SecurityMiddleware and WhiteNoise, before sessions and auth).",
                id="flyfn.W001",
            )
        ]
    io_classes = {p: _middleware_class(p) for p in IO_MIDDLEWARE}
    before: list[str] = []
    for path in middleware[:position]:
        cls = _middleware_class(path)
        for io_path, io_cls in io_classes.items():
            if path == io_path or (
                cls is not None and io_cls is not None and issubclass(cls, io_cls)
            ):
                before.append(f"{path} ({IO_MIDDLEWARE[io_path]})")
                break
    if not before:
        return []
    return [
        Warning(
            f"{MIDDLEWARE_PATH} comes after middleware that does per-request I/O: "
            + "; ".join(before)
            + ". Requests that are replayed pay for it on the app Machine for nothing.",
            hint=f"Move {MIDDLEWARE_PATH!r} above them.",
            id="flyfn.W002",
        )
    ]


@register("flyfn", "urls")
def check_machine_names(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """E006: no two groups of one app map to the same Machine names (`a_b` and `a-b`)."""
    try:
        settings = get_settings()
    except SettingsError:
        return []  # reported by check_settings
    with contextlib.suppress(Exception):  # a broken urlconf is reported by check_views
        for _name in iter_url_names():  # loads the views, which registers the decorated ones
            pass
    groups = registry.groups() | set(settings.groups) | {v.group for v in settings.views.values()}
    by_name: dict[tuple[str | None, str], list[str]] = {}
    for group in sorted(groups):
        by_name.setdefault((group_app(settings, group), name_slug(group)), []).append(group)
    return [
        Error(
            f"groups {', '.join(repr(g) for g in same)} would give their function Machines the "
            f"same names (flyfn-{slug}-...), and Machine names are unique per app: only one of "
            "them could have Machines.",
            hint="Rename all but one of them: group names differing only in '-' and '_' are the "
            "same Machine name.",
            id="flyfn.E006",
        )
        for (_app, slug), same in by_name.items()
        if len(same) > 1
    ]


@register("flyfn")
def check_keep_warm(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Warning]:
    """W026: Fly applies `min_machines_running` in the app's primary region only, so a pool
    elsewhere keeps nothing warm (`flyfn.pool.spec.spec_for` keeps none there)."""
    try:
        settings = get_settings()
    except SettingsError:
        return []  # reported by check_settings
    primary = env_value(os.environ, PRIMARY_REGION)
    if primary is None:
        return []
    here = env_value(os.environ, FLY_REGION)
    warnings: list[Warning] = []
    for group, options in sorted(settings.groups.items()):
        if not options.keep_warm or is_task_group(group):
            continue
        where = placement(settings, group)
        outside = _outside_primary(where, options.region, here, primary)
        if outside is None:
            continue
        pinned = where.mode == "shared" and options.region is not None
        warnings.append(
            Warning(
                f"group {group!r} has keep_warm {options.keep_warm}, but its pool in region "
                f"{outside!r} keeps nothing warm: Fly Proxy applies min_machines_running in the "
                f"primary region ({primary!r}) only, so its Machines there stop when idle and "
                "each first request after a quiet spell waits for a cold start. Only the "
                "primary region's pool is kept warm.",
                hint=(
                    f'Set its "region" to "{primary}"'
                    if pinned
                    else 'Set its "regions" to "primary" (one pool, in the primary region)'
                )
                + ", accept the cold starts outside the primary region, or set keep_warm to 0.",
                id="flyfn.W026",
            )
        )
    return warnings


def _outside_primary(
    where: Placement, region: str | None, here: str | None, primary: str
) -> str | None:
    """A region, other than `primary`, where the group has a pool: its `region`, the first such
    of its listed regions, or (for a pool that follows its callers) this Machine's own region:
    an app Machine there is a caller, and off the primary region it shows the app runs in
    several (without an API call, the check cannot see the others)."""
    candidates: tuple[str | None, ...] = ()
    if where.mode == "listed":
        candidates = where.listed
    elif where.mode == "shared":
        candidates = (region,)
    elif where.mode == "caller":
        candidates = (here,)
    return next((r for r in candidates if r and r != primary), None)
