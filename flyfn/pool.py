"""Machine pools: which function Machine serves each group, cached, created and converged on demand.

One `MachinePool` per group. The request path only reads the pool's cache (no Machines API call
while it is fresh); every API call runs on one background event loop thread with one
`AsyncMachinesClient`, shared by sync and async requests, and concurrent misses join the one
in-flight convergence (single flight). The API work itself (`converge`, `prepare_group`,
`find_orphans`) is plain async functions over a client, reused by `manage.py flyfn`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

import httpx
from django.conf import settings as django_settings

from flyfn import events
from flyfn.conf import FlyfnSettings, get_settings
from flyfn.machines import (
    AsyncMachinesClient,
    CreateMachineRequest,
    Machine,
    MachineConfig,
    MachineGuest,
    MachinePort,
    MachineRestart,
    MachinesError,
    MachineService,
    MachineServiceConcurrency,
    MachinesStatusError,
    NotFound,
    UpdateMachineRequest,
)
from flyfn.runtime import GROUP_ENV, Role, current_role

logger = logging.getLogger("flyfn.pool")

T = TypeVar("T")

GROUP_METADATA_KEY = "flyfn_group"
# A digest of what a group's Machines depend on besides the image (SECRET_KEY, forwarded env, named
# secrets): Machines of another version are updated, which gives them the app's current secrets.
VERSION_METADATA_KEY = "flyfn_version"
# PBKDF2 rounds of that digest: it sits in Machine metadata, so guessable values must be slow to
# search for; computed once per process and group.
VERSION_DIGEST_ROUNDS = 100_000
# When this process read its environment (secrets included): a Machine (re)started or updated
# since then has secrets at least as new, so a different version there is never "older" than ours.
PROCESS_STARTED = time.time()
# Gone for good: never routed to, never counted.
GONE_STATES = frozenset({"destroying", "destroyed", "replaced", "migrated"})
# Still there but unable to serve: not routed to, destroyed when the pool converges.
BROKEN_STATES = frozenset({"failed", "launch_failed"})
# After an API failure, cold requests fall back at once for this long (doubling up to the cap)
# instead of queueing on an API that is down.
FAILURE_BACKOFF = 1.0
MAX_FAILURE_BACKOFF = 30.0
# `fly-replay-failed` cannot be authenticated (any client can send one): a pool drops a Machine it
# names at once, but once per interval at most, so a forged flood costs one list call per interval.
FORGET_MIN_INTERVAL = 1.0


class PoolConfigError(Exception):
    """The settings lack what a pool needs (app name, image, token); the message names the key."""


class ReplayTarget(NamedTuple):
    """Where a replay goes: one Machine (`instance` strategy) or an app (`app` strategy).

    A named tuple: the middleware keys its per-second header cache by it, and a tuple hashes in C.
    """

    instance: str | None = None
    app: str | None = None


# --------------------------------------------------------------------------- pool specification


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

    @property
    def name_prefix(self) -> str:
        """Names are deterministic per group and image, so racing creators collide on purpose."""
        return f"flyfn-{name_slug(self.group)}-{image_hash(self.image)}-"

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


def spec_for(
    settings: FlyfnSettings, group: str, environ: Mapping[str, str] = os.environ
) -> PoolSpec:
    """The pool specification of `group`, or PoolConfigError naming the missing setting."""
    options = settings.group(group)
    own_app = settings.app_name
    if not own_app:
        raise PoolConfigError("no Fly app: set FLYFN['APP_NAME'] or the FLY_APP_NAME env var")
    if not settings.image_ref:
        raise PoolConfigError("no image: set FLYFN['IMAGE_REF'] or the FLY_IMAGE_REF env var")
    strategy = options.strategy
    app = own_app
    if strategy == "app":
        if not options.app:
            raise PoolConfigError(f"FLYFN['GROUPS'][{group!r}]['app']: required by strategy 'app'")
        app = options.app
    concurrency = (
        MachineServiceConcurrency(
            type="requests",
            soft_limit=options.concurrency.soft_limit,
            hard_limit=options.concurrency.hard_limit,
        )
        if options.concurrency is not None
        else None
    )
    env = {name: environ[name] for name in options.env if name in environ}
    env[GROUP_ENV] = group
    depends: dict[str, str | None] = {"SECRET_KEY": str(django_settings.SECRET_KEY)}
    depends.update((name, environ.get(name)) for name in (*options.env, *options.secrets))
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
                autostop=options.autostop,
                min_machines_running=0,
                ports=[
                    MachinePort(port=80, handlers=["http"]),
                    MachinePort(port=443, handlers=["tls", "http"]),
                ],
                concurrency=concurrency,
            )
        ],
        # Fly's own choice for Machines that autostop: come back after a crash, not after a stop.
        restart=MachineRestart(policy="on-failure", max_retries=3),
        auto_destroy=False,
    )
    return PoolSpec(
        group=group,
        app=app,
        strategy=strategy,
        image=settings.image_ref,
        count=options.machine_count,
        entries=options.machines,
        # Fly places a Machine created without a region "near the caller", not surely in its
        # region: name the creating Machine's own region, as FLAME does.
        region=options.region or environ.get("FLY_REGION") or None,
        config=config,
        version=version,
    )


def new_client(
    settings: FlyfnSettings, *, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncMachinesClient:
    """The Machines client the settings describe; PoolConfigError without a token."""
    token = settings.api_token.get_secret_value() if settings.api_token is not None else ""
    if not token:
        raise PoolConfigError("no Machines API token: set FLYFN['API_TOKEN'] or FLY_API_TOKEN")
    return AsyncMachinesClient(
        settings.app_name,
        api_token=token,
        api_hostname=settings.api_hostname,
        transport=transport,
    )


# --------------------------------------------------------------------------- API work


def machine_image(machine: Machine) -> str | None:
    return machine.config.image if machine.config is not None else None


def machine_group(machine: Machine) -> str | None:
    metadata = machine.config.metadata if machine.config is not None else None
    return (metadata or {}).get(GROUP_METADATA_KEY)


def machine_version(machine: Machine) -> str | None:
    metadata = machine.config.metadata if machine.config is not None else None
    return (metadata or {}).get(VERSION_METADATA_KEY)


def _changed_at(machine: Machine) -> float | None:
    """When the Machine was last updated or changed state (Unix seconds), if the API says."""
    stamp = machine.updated_at or machine.created_at
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def needs_new_version(machine: Machine, spec: PoolSpec) -> bool:
    """Whether to update a Machine of the spec's image to the spec's version: its version differs
    and nothing has (re)started it since this process read its secrets (then it has them at least
    as new as ours: an app Machine still on old secrets must not undo a newer one's update)."""
    if not spec.version or machine_version(machine) == spec.version:
        return False
    changed = _changed_at(machine)
    return changed is None or changed < spec.started


def is_usable(machine: Machine) -> bool:
    return machine.state not in GONE_STATES and machine.state not in BROKEN_STATES


def _rank(machine: Machine) -> tuple[str, str]:
    # Fixed at creation, so every process agrees on which Machines to keep.
    return (machine.name or "", machine.id)


@dataclass(slots=True)
class Convergence:
    """What `converge` found and did."""

    machines: list[Machine]
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)


async def list_group(client: AsyncMachinesClient, spec: PoolSpec) -> list[Machine]:
    """The group's Machines of every image (not the destroyed ones)."""
    machines = await client.list_machines(metadata={GROUP_METADATA_KEY: spec.group}, app=spec.app)
    return [m for m in machines if m.state not in GONE_STATES]


async def observe(client: AsyncMachinesClient, spec: PoolSpec) -> list[Machine]:
    """The group's usable Machines of the spec's image that `converge` keeps, in rank order,
    without changing anything (what a function Machine needs to know its siblings)."""
    listed = await list_group(client, spec)
    usable = sorted(
        (m for m in listed if machine_image(m) == spec.image and is_usable(m)), key=_rank
    )
    return usable[: spec.count]


async def converge(client: AsyncMachinesClient, spec: PoolSpec) -> Convergence:
    """Make exactly `spec.count` usable Machines of the group on the spec's image exist.

    Safe to run from any number of processes at once: names are deterministic, every creator
    re-lists after creating, and every process keeps the same lowest-ranked Machines and destroys
    the rest.
    """
    result = Convergence(machines=[])
    listed = await list_group(client, spec)
    current = [m for m in listed if machine_image(m) == spec.image]
    usable = [m for m in current if is_usable(m)]
    if len(usable) < spec.count:
        taken = {m.name for m in current}
        names = [
            n for n in itertools.islice(spec.names(), spec.count + len(taken)) if n not in taken
        ]
        # Machines beyond the entries are created stopped (`skip_launch`): Fly Proxy starts them
        # when load reaches them, and until then they cost only their root file system.
        entries = spec.entries or spec.count
        outcomes = await asyncio.gather(
            *(
                _create(client, spec, name, launch=len(usable) + n < entries)
                for n, name in enumerate(names[: spec.count - len(usable)])
            ),
            return_exceptions=True,
        )
        created = [m for m in outcomes if isinstance(m, Machine)]
        result.created = [m.id for m in created]
        listed = await list_group(client, spec)
        # The list may lag behind a create: count what we created unless the list says otherwise.
        seen = {m.id for m in listed}
        current = [m for m in listed if machine_image(m) == spec.image]
        current += [m for m in created if m.id not in seen]
        usable = [m for m in current if is_usable(m)]
        errors = [e for e in outcomes if isinstance(e, BaseException)]
        if not usable and errors:
            raise errors[0]
    usable.sort(key=_rank)
    keep, extras = usable[: spec.count], usable[spec.count :]
    doomed = extras + [m for m in current if not is_usable(m)]
    for machine in doomed:
        try:
            if await _destroy(client, spec.app, machine.id, spec.group):
                result.destroyed.append(machine.id)
        except MachinesError as exc:  # best effort: the next convergence tries again
            logger.warning("flyfn: could not destroy extra Machine %s: %s", machine.id, exc)
    for machine in keep:
        if machine.id not in result.created and needs_new_version(machine, spec):
            try:
                if await _update(client, spec, machine):
                    result.updated.append(machine.id)
            except MachinesError as exc:  # it keeps serving; the next convergence tries again
                logger.warning("flyfn: could not update Machine %s: %s", machine.id, exc)
    result.machines = keep
    return result


async def _update(client: AsyncMachinesClient, spec: PoolSpec, machine: Machine) -> bool:
    """Give a Machine the spec's config (Fly restarts it with the app's current secrets); False
    when it is gone."""
    request = UpdateMachineRequest(name=machine.name, config=spec.config)
    try:
        await client.update_machine(machine.id, request, app=spec.app)
    except NotFound:  # destroyed meanwhile (another process converging): nothing to update
        return False
    events.pool_changed(spec.group, "update", machine.id)
    return True


async def _create(
    client: AsyncMachinesClient, spec: PoolSpec, name: str, *, launch: bool = True
) -> Machine:
    request = CreateMachineRequest(
        name=name, region=spec.region, config=spec.config, skip_launch=None if launch else True
    )
    try:
        created = await client.create_machine(request, app=spec.app)
    except MachinesStatusError as exc:
        if exc.status in (409, 422) and not exc.insufficient_capacity:
            logger.debug("Machine %s already exists (another process created it)", name)
        raise
    events.pool_changed(spec.group, "create", created.id)
    return created


async def _destroy(
    client: AsyncMachinesClient, app: str, machine_id: str, group: str | None
) -> bool:
    """Destroy one Machine (of `group`, if known); False when it is already gone (someone else
    destroyed it)."""
    try:
        await client.destroy_machine(machine_id, force=True, app=app)
    except NotFound:
        return False
    events.pool_changed(group or "", "destroy", machine_id)
    return True


def _is_zero(value: object) -> bool:
    """A value Fly's API leaves out of its answers (fly-go's `omitempty`)."""
    return value is None or value is False or value == 0 or value in ("", {}, [])


def _contains(actual: object, desired: object) -> bool:
    """Whether `actual` has every value of `desired` (the API adds defaults of its own, and
    leaves out zero values: a missing `auto_destroy` is `false`, a missing map is empty)."""
    if actual is None and _is_zero(desired):
        return True
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(
            _contains(actual.get(k), v) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(_contains(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return actual == desired


def is_outdated(machine: Machine, config: MachineConfig) -> bool:
    """Whether the Machine's config lacks something of the desired config."""
    actual = machine.config.model_dump(mode="json", exclude_none=True) if machine.config else {}
    return not _contains(actual, config.model_dump(mode="json", exclude_none=True))


@dataclass(slots=True)
class PrepareReport:
    group: str
    app: str
    machines: list[str]
    created: list[str]
    updated: list[str]
    destroyed: list[str]


async def prepare_group(client: AsyncMachinesClient, spec: PoolSpec) -> PrepareReport:
    """Converge the group for the current image and update Machines whose config drifted."""
    done = await converge(client, spec)
    updated = list(done.updated)
    for machine in done.machines:
        if machine.id in done.created or machine.id in updated:
            continue
        if is_outdated(machine, spec.config) and await _update(client, spec, machine):
            updated.append(machine.id)
    return PrepareReport(
        group=spec.group,
        app=spec.app,
        machines=[m.id for m in done.machines],
        created=done.created,
        updated=updated,
        destroyed=done.destroyed,
    )


@dataclass(frozen=True, slots=True)
class Orphan:
    app: str
    machine: Machine


def function_apps(settings: FlyfnSettings) -> list[str]:
    """Every app function Machines may live in: the own app, then `app`-strategy groups' apps."""
    apps = [settings.app_name] if settings.app_name else []
    for options in settings.groups.values():
        if options.strategy == "app" and options.app and options.app not in apps:
            apps.append(options.app)
    return apps


async def find_orphans(client: AsyncMachinesClient, settings: FlyfnSettings) -> list[Orphan]:
    """Function Machines whose image no app Machine runs (nor this process: a release command)."""
    apps = function_apps(settings)
    if not apps:
        raise PoolConfigError("no Fly app: set FLYFN['APP_NAME'] or the FLY_APP_NAME env var")
    own = await client.list_machines(app=apps[0])
    live_images = {
        machine_image(m) for m in own if machine_group(m) is None and m.state not in GONE_STATES
    }
    if settings.image_ref:
        live_images.add(settings.image_ref)
    orphans: list[Orphan] = []
    for app in apps:
        machines = own if app == apps[0] else await client.list_machines(app=app)
        orphans += [
            Orphan(app, m)
            for m in machines
            if machine_group(m) is not None
            and m.state not in GONE_STATES
            and machine_image(m) not in live_images
        ]
    return orphans


async def destroy_orphans(client: AsyncMachinesClient, orphans: Sequence[Orphan]) -> list[str]:
    return [
        o.machine.id
        for o in orphans
        if await _destroy(client, o.app, o.machine.id, machine_group(o.machine))
    ]


# --------------------------------------------------------------------------- the background loop


class _LoopThread:
    """A daemon thread running one event loop; every Machines API call of the process runs here."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="flyfn-pool", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 5.0) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


async def _wait_done(future: concurrent.futures.Future[Any], max_wait: float) -> bool:
    """Await a future of the background loop from another loop, for at most `max_wait` seconds.

    Never cancels the shared operation (other requests wait on it too) and tolerates the waiting
    loop being closed before the operation ends.
    """
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not woken.done():
            woken.set_result(None)

    def on_done(_: concurrent.futures.Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the waiting loop is closed: nobody to wake
            loop.call_soon_threadsafe(wake)

    future.add_done_callback(on_done)
    try:
        await asyncio.wait_for(woken, max_wait)
    except TimeoutError:
        return False
    return True


# --------------------------------------------------------------------------- pools


class MachinePool:
    """One group's cached targets, refreshed in the background, converged on a miss."""

    def __init__(
        self, manager: PoolManager, spec: PoolSpec | None, problem: str | None, ttl: float
    ):
        self.manager = manager
        self.spec = spec
        self._problem = problem  # why the pool cannot work (missing settings), logged once
        self._ttl = ttl
        self._lock = threading.Lock()
        self._targets: tuple[ReplayTarget, ...] = ()
        # Every Machine of an `instance` group in rank order (the targets are the first ones).
        self._members: tuple[str, ...] = ()
        self._expires = 0.0
        self._turn = itertools.count()
        self._inflight: concurrent.futures.Future[None] | None = None
        self._retry_at = 0.0
        self._backoff = 0.0
        self._forgot_at = float("-inf")

    @property
    def machine_ids(self) -> tuple[str, ...]:
        return tuple(t.instance for t in self._targets if t.instance is not None)

    def members(self) -> tuple[str, ...]:
        """The group's Machine ids in rank order (`instance` strategy), from the cache: never an
        API call on the request path (a stale or empty cache is refreshed behind it)."""
        members = self._members
        if not members or time.monotonic() >= self._expires:
            self.refresh()
        return members

    def target(self) -> ReplayTarget | None:
        """The hot path: a cached target or None; a stale cache is served and refreshed behind."""
        targets = self._targets
        if not targets:
            return None
        if time.monotonic() >= self._expires:
            self.refresh()
        return targets[next(self._turn) % len(targets)]

    def refresh(self) -> concurrent.futures.Future[None] | None:
        """Start, or join, the one in-flight convergence; None while backing off after a failure."""
        if self.spec is None:
            self._report_problem()
            return None
        with self._lock:
            if self._inflight is not None:
                return self._inflight
            if time.monotonic() < self._retry_at:
                return None
            # The role is read here, on the caller's thread: the one a refresh was asked under.
            future = self.manager.submit(self._refresh(self.spec, current_role()))
            self._inflight = future
        future.add_done_callback(self._clear_inflight)
        return future

    def wait_target(self, max_wait: float) -> ReplayTarget | None:
        """A target, waiting at most `max_wait` seconds for the API on a cold cache (sync)."""
        target = self.target()
        if target is not None:
            return target
        future = self.refresh()
        if future is None:
            return None
        try:
            future.result(max_wait)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            return None
        return self.target()

    async def aget_target(self, max_wait: float) -> ReplayTarget | None:
        """`wait_target` for async callers: the event loop is never blocked."""
        target = self.target()
        if target is not None:
            return target
        future = self.refresh()
        if future is None or not await _wait_done(future, max_wait):
            return None
        return self.target()

    def forget(self, machine_id: str) -> bool:
        """Drop a Machine that vanished from the cache at once and look again behind the request."""
        with self._lock:
            kept = tuple(t for t in self._targets if t.instance != machine_id)
            if len(kept) == len(self._targets) and machine_id not in self._members:
                return False
            now = time.monotonic()
            if now - self._forgot_at < FORGET_MIN_INTERVAL:
                return False
            self._forgot_at = now
            self._targets = kept
            self._members = tuple(m for m in self._members if m != machine_id)
            self._expires = 0.0
        self.refresh()
        return True

    async def _refresh(self, spec: PoolSpec, role: Role) -> None:
        # Runs on the background loop; applies its outcome to the cache before the future completes,
        # so a waiter woken by the future reads the new cache.
        try:
            client = self.manager.client()
            if role.kind == "function" and role.group == spec.group:
                # A function Machine only reads its own group (to send load on): the app Machines
                # create, update and destroy it. (Another group's view it replays like them.)
                machines = await observe(client, spec)
            else:
                machines = (await converge(client, spec)).machines
        except Exception as exc:  # whatever fails, requests get the fallback, never a 500
            self._failed(exc)
            return
        members = tuple(m.id for m in machines)
        if spec.strategy == "app":
            targets: tuple[ReplayTarget, ...] = (ReplayTarget(app=spec.app),) if machines else ()
        else:
            entries = members[: spec.entries or len(members)]
            targets = tuple(ReplayTarget(instance=m) for m in entries)
        with self._lock:
            self._targets = targets
            self._members = members
            self._expires = time.monotonic() + self._ttl
            recovered = self._backoff > 0
            self._backoff = 0.0
            self._retry_at = 0.0
        if recovered:
            logger.warning("flyfn: Machines API reachable again (group %r)", spec.group)

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            first = self._backoff == 0
            self._backoff = min(MAX_FAILURE_BACKOFF, max(FAILURE_BACKOFF, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff
        if first:  # one line per failure burst
            group = self.spec.group if self.spec else "?"
            logger.error(
                "flyfn: Machines API failed for group %r, using the group's fallback: %s: %s",
                group,
                type(exc).__name__,
                exc,
            )

    def _clear_inflight(self, future: concurrent.futures.Future[None]) -> None:
        with self._lock:
            if self._inflight is future:
                self._inflight = None

    def _report_problem(self) -> None:
        with self._lock:
            problem, self._problem = self._problem, None
        if problem:
            logger.error("flyfn: cannot replay: %s; using the group's fallback", problem)


class PoolManager:
    """The pools of one process, one background loop and one Machines client for all of them.

    Settings are read live: when `get_settings()` returns another object (override_settings), the
    pools and the client are rebuilt.
    """

    def __init__(
        self,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        settings: Callable[[], FlyfnSettings] = get_settings,
    ) -> None:
        self._transport = transport
        self._get_settings = settings
        self._lock = threading.Lock()
        self._settings: FlyfnSettings | None = None
        self._pools: dict[str, MachinePool] = {}
        self._loop: _LoopThread | None = None
        self._client: AsyncMachinesClient | None = None
        self._closed = False

    def pool(self, group: str) -> MachinePool:
        settings = self._get_settings()
        pools = self._pools
        if settings is not self._settings:
            pools = self._reset(settings)
        pool = pools.get(group)
        if pool is None:
            with self._lock:
                pool = pools.get(group) or pools.setdefault(group, self._new_pool(settings, group))
        return pool

    def get_target(self, group: str) -> ReplayTarget | None:
        """The hot path: the group's cached target, or None."""
        pool = self._pools.get(group)
        if pool is None or self._settings is not self._get_settings():
            pool = self.pool(group)
        return pool.target()

    def wait_target(self, group: str, max_wait: float) -> ReplayTarget | None:
        return self.pool(group).wait_target(max_wait)

    async def aget_target(self, group: str, max_wait: float) -> ReplayTarget | None:
        return await self.pool(group).aget_target(max_wait)

    def forget(self, group: str, machine_id: str) -> bool:
        return self.pool(group).forget(machine_id)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run a coroutine on the background loop (started on first use)."""
        with self._lock:
            if self._closed:
                coro.close()
                raise RuntimeError("the pool manager is closed")
            if self._loop is None:
                self._loop = _LoopThread()
            loop = self._loop
        return loop.submit(coro)

    def client(self) -> AsyncMachinesClient:
        """The Machines client; only call it on the background loop."""
        if self._client is None:
            settings = self._settings or self._get_settings()
            self._client = new_client(settings, transport=self._transport)
        return self._client

    def close(self) -> None:
        """Close the client and stop the loop thread (tests; process exit needs nothing)."""
        with self._lock:
            self._closed = True
            loop, self._loop = self._loop, None
            client, self._client = self._client, None
            self._pools = {}
        if loop is None:
            return
        if client is not None:
            with contextlib.suppress(
                concurrent.futures.TimeoutError, MachinesError, httpx.HTTPError
            ):
                loop.submit(client.aclose()).result(5)
        loop.stop()

    def _new_pool(self, settings: FlyfnSettings, group: str) -> MachinePool:
        try:
            spec, problem = spec_for(settings, group), None
        except PoolConfigError as exc:
            spec, problem = None, str(exc)
        return MachinePool(self, spec, problem, settings.cache_ttl)

    def _reset(self, settings: FlyfnSettings) -> dict[str, MachinePool]:
        with self._lock:
            if settings is self._settings:
                return self._pools
            old_client, self._client = self._client, None
            self._settings = settings
            self._pools = {}
            loop = self._loop
        if old_client is not None and loop is not None:
            loop.submit(old_client.aclose())
        return self._pools


_manager: PoolManager | None = None
_manager_lock = threading.Lock()


def get_manager() -> PoolManager:
    """The process's pool manager."""
    global _manager
    manager = _manager
    if manager is None:
        with _manager_lock:
            if _manager is None:
                _manager = PoolManager()
            manager = _manager
    return manager


def set_manager(manager: PoolManager | None) -> PoolManager | None:
    """Install another manager (tests); returns the previous one, which the caller closes."""
    global _manager
    with _manager_lock:
        previous, _manager = _manager, manager
    return previous


def _forget_manager_after_fork() -> None:
    # The loop thread does not survive fork(): a forked worker starts its own manager.
    global _manager, _manager_lock
    _manager = None
    _manager_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_manager_after_fork)
