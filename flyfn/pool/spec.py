"""A group's pool specification from the settings: its app, Machine names, config and version.

Also the one place that says which Fly app a group's function Machines live in (`group_app`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import httpx
from django.conf import settings as django_settings

from flyfn import events
from flyfn.conf import FlyfnSettings
from flyfn.fly.api_host import clear_text_problem
from flyfn.fly.env import GROUP_ENV, HOME_APP_ENV, PRIMARY_REGION, env_value
from flyfn.machines import (
    AsyncMachinesClient,
    InsecureApiHostError,
    MachineConfig,
    MachineGuest,
    MachinePort,
    MachineRestart,
    MachineService,
    MachineServiceConcurrency,
)
from flyfn.secret_env import secret_env_message, secret_like_env

GROUP_METADATA_KEY = "flyfn_group"
# A digest of what a group's Machines depend on besides the image (SECRET_KEY, forwarded env, named
# secrets): Machines of another version are updated, which gives them the app's current secrets.
VERSION_METADATA_KEY = "flyfn_version"
# Marks flyfn's scheduled Machines (periodic tasks, flyfn.tasks.scheduled_machines): its interval.
SCHEDULE_METADATA_KEY = "flyfn_schedule"
# PBKDF2 rounds of that digest: it sits in Machine metadata, so guessable values must be slow to
# search for; computed once per process and group.
VERSION_DIGEST_ROUNDS = 100_000
# When this process read its environment (secrets included): a Machine (re)started or updated
# since then has secrets at least as new, so a different version there is never "older" than ours.
PROCESS_STARTED = time.time()


class PoolConfigError(Exception):
    """The settings lack what a pool needs (app name, image, token); the message names the key."""


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """Everything the API work for one group needs, resolved once from the settings."""

    group: str
    app: str
    strategy: str
    image: str
    count: int
    region: str | None
    config: MachineConfig
    version: str = ""
    # When the values `version` digests were read (see PROCESS_STARTED).
    started: float = PROCESS_STARTED
    # How many of the `count` Machines (the first in rank order) the app Machines replay to (0: all
    # of them); the others take what those send on (`instance` strategy) or what Fly Proxy
    # balances to them (`app` strategy).
    entries: int = 0
    # A pool of one region (`regions`): only the group's Machines in `region` are its own, and
    # their names carry the region. False: the one pool of the whole app, as before regions.
    regional: bool = False
    # How many of them are kept started (`keep_warm`; 0 outside the primary region).
    warm: int = 0

    @property
    def name_prefix(self) -> str:
        """Names are deterministic per group, image (and region), so racing creators collide on
        purpose."""
        where = f"{self.region}-" if self.regional and self.region else ""
        return f"flyfn-{name_slug(self.group)}-{image_hash(self.image)}-{where}"

    def holds(self, region: str | None) -> bool:
        """Whether a Machine of the group in `region` belongs to this pool."""
        return not self.regional or region == self.region

    def names(self) -> Iterator[str]:
        return (f"{self.name_prefix}{n}" for n in itertools.count())


def name_slug(group: str) -> str:
    """A group's part of its Machine names. Not one-to-one ('a_b' and 'a-b' give 'a-b'):
    system check flyfn.E006 refuses groups of one app whose slugs are the same."""
    return re.sub(r"[^a-z0-9]+", "-", group.lower()).strip("-") or "group"


def group_app(settings: FlyfnSettings, group: str) -> str | None:
    """The app a group's Machines live in: its own (`app` strategy) or the project's."""
    options = settings.group(group)
    return options.app if options.strategy == "app" and options.app else settings.app_name


def function_apps(settings: FlyfnSettings) -> list[str]:
    """Every app function Machines may live in: the own app, then `app`-strategy groups' apps."""
    apps = [settings.app_name] if settings.app_name else []
    for group in settings.groups:
        app = group_app(settings, group)
        if app and app not in apps:
            apps.append(app)
    return apps


def image_hash(image: str) -> str:
    return hashlib.sha256(image.encode()).hexdigest()[:8]


def pool_version(app: str, group: str, image: str, values: Mapping[str, str | None]) -> str:
    """The version of a group's Machines: a salted slow digest (PBKDF2-SHA256) of the image and
    the values they depend on. Never the values themselves; the same inputs give the same digest
    in every process."""
    return _pool_version(app, group, image, tuple(sorted(values.items())))


@functools.lru_cache(maxsize=64)
def _pool_version(
    app: str, group: str, image: str, values: tuple[tuple[str, str | None], ...]
) -> str:
    material = json.dumps([image, values], separators=(",", ":")).encode()
    salt = f"flyfn.pool.version\n{app}\n{group}".encode()
    return hashlib.pbkdf2_hmac("sha256", material, salt, VERSION_DIGEST_ROUNDS, dklen=12).hex()


def _task_groups() -> list[str]:
    """The groups of flyfn.tasks backends (none without the tasks extra)."""
    try:
        from flyfn.tasks.configured import task_groups
    except ImportError:
        return []
    try:
        return task_groups()
    except ImportError:
        return []


def is_task_group(group: str) -> bool:
    """Whether `group` runs a flyfn.tasks backend's tasks (their pools default to the primary
    region, near the database)."""
    return group in _task_groups()


def forwarded_env(
    settings: FlyfnSettings, group: str, environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The variables of this process's environment a group's Machines get (its `env`); a name
    that looks like a secret is refused (PoolConfigError) unless flyfn.E010 is silenced."""
    options = settings.group(group)
    if "flyfn.E010" not in getattr(django_settings, "SILENCED_SYSTEM_CHECKS", ()):
        # Checks do not run under uvicorn or gunicorn: refuse here what flyfn.E010 reports.
        secret = secret_like_env(options.env, environ)
        if secret:
            raise PoolConfigError(secret_env_message(group, secret[0]))
    return {name: environ[name] for name in options.env if name in environ}


def secret_inputs(
    settings: FlyfnSettings, group: str, environ: Mapping[str, str] = os.environ
) -> dict[str, str | None]:
    """What a group's Machines depend on besides their image and config, for their version:
    SECRET_KEY, the group's forwarded env and its named secrets (digested, never stored)."""
    options = settings.group(group)
    depends: dict[str, str | None] = {"SECRET_KEY": str(django_settings.SECRET_KEY)}
    depends.update((name, environ.get(name)) for name in (*options.env, *options.secrets))
    return depends


def spec_for(
    settings: FlyfnSettings,
    group: str,
    environ: Mapping[str, str] = os.environ,
    *,
    pool_region: str | None = None,
) -> PoolSpec:
    """The pool specification of `group` (of its pool in `pool_region`; None: the app's one
    shared pool), or PoolConfigError naming the missing setting."""
    options = settings.group(group)
    own_app = settings.app_name
    if not own_app:
        raise PoolConfigError("no Fly app: set FLYFN['APP_NAME'] or the FLY_APP_NAME env var")
    if not settings.image_ref:
        raise PoolConfigError("no image: set FLYFN['IMAGE_REF'] or the FLY_IMAGE_REF env var")
    strategy = options.strategy
    if strategy == "app" and not options.app:
        raise PoolConfigError(f"FLYFN['GROUPS'][{group!r}]['app']: required by strategy 'app'")
    app = group_app(settings, group) or own_app
    concurrency = (
        MachineServiceConcurrency(
            type="requests",
            soft_limit=options.concurrency.soft_limit,
            hard_limit=options.concurrency.hard_limit,
        )
        if options.concurrency is not None
        else None
    )
    env = forwarded_env(settings, group, environ)
    env[GROUP_ENV] = group
    if app != own_app:  # their FLY_APP_NAME is `app`: say where their requests come in
        env[HOME_APP_ENV] = own_app
    http_options = (
        options.http_options.model_dump(mode="json", exclude_none=True)
        if options.http_options is not None
        else None
    )
    # force_https on the http port (false said explicitly, so that turning it off is a change);
    # Fly's http options on both, as fly.toml's [http_service] gives them.
    ports = [
        MachinePort(
            port=80, handlers=["http"], force_https=options.force_https, http_options=http_options
        ),
        MachinePort(port=443, handlers=["tls", "http"], http_options=http_options),
    ]
    depends = secret_inputs(settings, group, environ)
    # How Fly Proxy serves the Machines: a change must reach them too, and `_contains` cannot
    # see an option that was removed (no env var name has a colon).
    depends["flyfn:ports"] = json.dumps(
        [p.to_wire() for p in ports], sort_keys=True, separators=(",", ":")
    )
    # A task group's Machines stop themselves once drained (flyfn.tasks.keeper): Fly Proxy must
    # not stop them under background work, which is not load to it.
    tasks = group in _task_groups()
    if tasks:
        depends["flyfn:tasks"] = "autostop=off;restart=no"
    # Kept warm only where Fly applies min_machines_running: not for a task group (its Machines
    # stop themselves once drained), not outside the app's primary region (Fly Proxy would stop
    # them again while the pool kept starting them; flyfn.W026).
    placed = pool_region or options.region
    primary = env_value(environ, PRIMARY_REGION)
    outside = placed is not None and primary is not None and placed != primary
    warm = 0 if tasks or outside else options.keep_warm
    if warm:  # only then: Machines of groups without it keep their version
        depends["flyfn:keep_warm"] = str(warm)
    version = pool_version(app, group, settings.image_ref, depends)
    config = MachineConfig(
        image=settings.image_ref,
        env=env,
        metadata={GROUP_METADATA_KEY: group, VERSION_METADATA_KEY: version},
        guest=MachineGuest.model_validate(options.guest.model_dump(exclude_none=True)),
        services=[
            MachineService(
                protocol="tcp",
                internal_port=options.internal_port,
                autostart=True,
                autostop="off" if tasks else options.autostop,
                min_machines_running=warm,
                ports=ports,
                concurrency=concurrency,
            )
        ],
        # Fly's own choice for Machines that autostop: come back after a crash, not after a stop.
        # A task group's Machine that exits stays stopped (FLAME's choice): its tasks' leases
        # expire and the next wake starts it again.
        restart=MachineRestart(policy="no")
        if tasks
        else MachineRestart(policy="on-failure", max_retries=3),
        auto_destroy=False,
    )
    return PoolSpec(
        group=group,
        app=app,
        strategy=strategy,
        image=settings.image_ref,
        count=max(options.machine_count, warm),
        entries=options.machines,
        warm=warm,
        # Fly places a Machine created without a region "near the caller", not surely in its
        # region: name the creating Machine's own region, as FLAME does. A pool of the whole app
        # kept warm is made in the primary region, the one where Fly applies its warmth.
        region=pool_region
        or options.region
        or (primary if warm and pool_region is None else None)
        or environ.get("FLY_REGION")
        or None,
        config=config,
        version=version,
        regional=pool_region is not None,
    )


def new_client(
    settings: FlyfnSettings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    rate_limit_retries: int | None = None,
) -> AsyncMachinesClient:
    """The Machines client the settings describe, its requests reported as `flyfn.events.api_called`
    events; PoolConfigError without a token. A command passes
    `rate_limit_retries=COMMAND_RATE_LIMIT_RETRIES`."""
    token = settings.api_token.get_secret_value() if settings.api_token is not None else ""
    if not token:
        raise PoolConfigError("no Machines API token: set FLYFN['API_TOKEN'] or FLY_API_TOKEN")
    try:
        return AsyncMachinesClient(
            settings.app_name,
            api_token=token,
            api_hostname=settings.api_hostname,
            transport=transport,
            rate_limit_retries=rate_limit_retries,
            on_api_call=events.api_called,
        )
    except InsecureApiHostError:  # the message of system check flyfn.E011
        raise PoolConfigError(
            f"FLYFN['API_HOSTNAME']: {clear_text_problem(settings.api_hostname)}"
        ) from None
