"""Convergence through the Machines API: make a group's Machines exist on the current image and
version, observe them, prepare them at release, and find the orphans of old images and of regions
a group no longer lives in.

Plain async functions over an `AsyncMachinesClient`, shared by the pools and `manage.py flyfn`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from flyfn import events
from flyfn.conf import FlyfnSettings
from flyfn.fly.env import FLY_REGION, PRIMARY_REGION, env_value
from flyfn.fly.timestamps import unix_seconds
from flyfn.machines import (
    AsyncMachinesClient,
    CreateMachineRequest,
    Machine,
    MachineConfig,
    MachinesError,
    MachinesStatusError,
    NotFound,
    UpdateMachineRequest,
)
from flyfn.pool.choice import RANK_ORDER, MachineChoice
from flyfn.pool.placement import Placement, placement, pool_regions
from flyfn.pool.spec import (
    GROUP_METADATA_KEY,
    SCHEDULE_METADATA_KEY,
    VERSION_METADATA_KEY,
    PoolConfigError,
    PoolSpec,
    function_apps,
    is_task_group,
)

logger = logging.getLogger("flyfn.pool")

# Gone for good: never routed to, never counted.
GONE_STATES = frozenset({"destroying", "destroyed", "replaced", "migrated"})


# The process groups flyctl gives its one-off Machines (fly-go's constants): a deploy's release
# command (in the primary region, during `prepare`), `fly console`, a deploy's test command. They
# serve no request: a region where only they run is not one where the app runs.
ONE_OFF_PROCESS_GROUPS = frozenset(
    {"fly_app_release_command", "fly_app_console", "fly_app_test_machine_command"}
)


def is_app_machine(machine: Machine) -> bool:
    """Whether `fly deploy` made the Machine for a process group (an app Machine): flyfn never
    sets `fly_process_group` on function Machines; flyctl's one-off Machines are not."""
    metadata = (machine.config.metadata if machine.config is not None else None) or {}
    group = metadata.get("fly_process_group")
    return bool(group) and group not in ONE_OFF_PROCESS_GROUPS


def app_regions(machines: Iterable[Machine]) -> set[str]:
    """The regions the app runs in: those of its app Machines that are not gone (a stopped one
    counts: the app still runs there, scaled to zero)."""
    return {
        m.region for m in machines if m.region and is_app_machine(m) and m.state not in GONE_STATES
    }


# Still there but unable to serve: not routed to, destroyed when the pool converges.
BROKEN_STATES = frozenset({"failed", "launch_failed"})
# Not running: an update says `skip_launch` so that it stays so (Fly starts a stopped Machine it
# updates otherwise, and a group's every Machine would boot for a secret rotation). It gets the
# new config and the app's current secrets when Fly Proxy next starts it.
RESTING_STATES = frozenset({"created", "stopped", "suspended"})


def machine_image(machine: Machine) -> str | None:
    return machine.config.image if machine.config is not None else None


def machine_group(machine: Machine) -> str | None:
    metadata = machine.config.metadata if machine.config is not None else None
    return (metadata or {}).get(GROUP_METADATA_KEY)


def machine_schedule(machine: Machine) -> str | None:
    """The interval of one of flyfn's scheduled Machines (periodic tasks), else None: such a
    Machine is neither an app Machine nor a group's."""
    metadata = machine.config.metadata if machine.config is not None else None
    return (metadata or {}).get(SCHEDULE_METADATA_KEY)


def machine_version(machine: Machine) -> str | None:
    metadata = machine.config.metadata if machine.config is not None else None
    return (metadata or {}).get(VERSION_METADATA_KEY)


def _changed_at(machine: Machine) -> float | None:
    """When the Machine was last updated or changed state (Unix seconds), if the API says."""
    return unix_seconds(machine.updated_at or machine.created_at)


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


class GroupLister(Protocol):
    """How `converge` and `observe` list a group's Machines (not the destroyed ones); `fresh`: a
    list taken now, after our creates (the pools share lists: `flyfn.pool.listing`)."""

    async def __call__(self, spec: PoolSpec, *, fresh: bool = False) -> list[Machine]: ...


def _lister(client: AsyncMachinesClient) -> GroupLister:
    async def listed(spec: PoolSpec, *, fresh: bool = False) -> list[Machine]:
        return await list_group(client, spec)

    return listed


async def observe(
    client: AsyncMachinesClient,
    spec: PoolSpec,
    choice: MachineChoice = RANK_ORDER,
    *,
    lister: GroupLister | None = None,
) -> list[Machine]:
    """The group's usable Machines of the spec's image that `converge` keeps, in rank order,
    without changing anything (what a function Machine needs to know its siblings)."""
    listed = await (lister or _lister(client))(spec)
    usable = choice.rank(
        m
        for m in listed
        if machine_image(m) == spec.image and spec.holds(m.region) and is_usable(m)
    )
    return usable[: spec.count]


async def converge(
    client: AsyncMachinesClient,
    spec: PoolSpec,
    choice: MachineChoice = RANK_ORDER,
    *,
    lister: GroupLister | None = None,
) -> Convergence:
    """Make exactly `spec.count` usable Machines of the group on the spec's image exist.

    Safe to run from any number of processes at once: names are deterministic, every creator
    re-lists after creating, and every process keeps the same lowest-ranked Machines and destroys
    the rest. `lister` lists the group (default: one list call filtered by the group's metadata).
    """
    list_machines = lister or _lister(client)
    result = Convergence(machines=[])
    listed = await list_machines(spec)
    current = [m for m in listed if machine_image(m) == spec.image and spec.holds(m.region)]
    usable = [m for m in current if is_usable(m)]
    if len(usable) < spec.count:
        taken = {m.name for m in current}
        names = [
            n for n in itertools.islice(spec.names(), spec.count + len(taken)) if n not in taken
        ]
        # Machines beyond the entries are created stopped (`skip_launch`): Fly Proxy starts them
        # when load reaches them, and until then they cost only their root file system.
        # Kept-warm Machines are launched too: Fly Proxy keeps started ones started, never
        # starts one for `min_machines_running`.
        entries = max(spec.entries or spec.count, spec.warm)
        outcomes = await asyncio.gather(
            *(
                _create(client, spec, name, launch=len(usable) + n < entries)
                for n, name in enumerate(names[: spec.count - len(usable)])
            ),
            return_exceptions=True,
        )
        created = [m for m in outcomes if isinstance(m, Machine)]
        result.created = [m.id for m in created]
        listed = await list_machines(spec, fresh=True)
        # The list may lag behind a create: count what we created unless the list says otherwise.
        seen = {m.id for m in listed}
        current = [m for m in listed if machine_image(m) == spec.image and spec.holds(m.region)]
        current += [m for m in created if m.id not in seen]
        usable = [m for m in current if is_usable(m)]
        errors = [e for e in outcomes if isinstance(e, BaseException)]
        if not usable and errors:
            raise errors[0]
    usable = choice.rank(usable)
    keep, extras = usable[: spec.count], usable[spec.count :]
    doomed = extras + [m for m in current if not is_usable(m)]
    for machine in doomed:
        try:
            if await _destroy(client, spec.app, machine.id, spec.group, _pool_region(spec)):
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
    await _start_warm(client, spec, keep, result)
    result.machines = keep
    return result


async def _start_warm(
    client: AsyncMachinesClient, spec: PoolSpec, keep: Sequence[Machine], result: Convergence
) -> None:
    """Start resting Machines (stopped before `keep_warm` was set, updated while stopped, exited)
    in rank order until `spec.warm` of the pool are up: Fly's `min_machines_running` only keeps
    started Machines started. Counted, not the first `warm` by rank: Fly Proxy stops whichever
    it likes beyond them, and starting that one again would only have it stop another."""
    up = sum(1 for m in keep if m.state not in RESTING_STATES or m.id in result.created)
    resting = [m for m in keep if m.state in RESTING_STATES and m.id not in result.created]
    for machine in resting[: max(0, spec.warm - up)]:
        try:
            await client.start_machine(machine.id, app=spec.app)
        except MachinesError as exc:  # the next convergence tries again
            logger.warning("flyfn: could not start kept-warm Machine %s: %s", machine.id, exc)
            continue
        logger.info("flyfn: started Machine %s of group %s (keep_warm)", machine.id, spec.group)


async def _update(client: AsyncMachinesClient, spec: PoolSpec, machine: Machine) -> bool:
    """Give a Machine the spec's config (Fly restarts a running one with the app's current
    secrets; a resting one stays stopped, `RESTING_STATES`); False when it is gone."""
    resting = machine.state in RESTING_STATES
    request = UpdateMachineRequest(
        name=machine.name, config=spec.config, skip_launch=True if resting else None
    )
    try:
        await client.update_machine(machine.id, request, app=spec.app)
    except NotFound:  # destroyed meanwhile (another process converging): nothing to update
        return False
    events.pool_changed(spec.group, "update", machine.id, _pool_region(spec))
    return True


def _pool_region(spec: PoolSpec) -> str | None:
    return spec.region if spec.regional else None


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
    events.pool_changed(spec.group, "create", created.id, _pool_region(spec))
    return created


async def _destroy(
    client: AsyncMachinesClient,
    app: str,
    machine_id: str,
    group: str | None,
    region: str | None = None,
) -> bool:
    """Destroy one Machine (of `group`, if known; of its pool in `region`, for a regional pool);
    False when it is already gone (someone else destroyed it)."""
    try:
        await client.destroy_machine(machine_id, force=True, app=app)
    except NotFound:
        return False
    events.pool_changed(group or "", "destroy", machine_id, region)
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
    region: str | None = None  # a regional pool's region (None: the group's one shared pool)


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
        region=_pool_region(spec),
    )


@dataclass(frozen=True, slots=True)
class Orphan:
    """A function Machine `gc` destroys, and why: its image no app Machine runs (`image`), or
    its group no longer lives in its region (`region`)."""

    app: str
    machine: Machine
    why: Literal["image", "region"] = "image"


async def find_orphans(
    client: AsyncMachinesClient,
    settings: FlyfnSettings,
    environ: Mapping[str, str] = os.environ,
) -> list[Orphan]:
    """Function Machines whose image no app Machine runs (nor this process: a release command),
    and those of a group with a pool per region in a region the group no longer lives in: one
    dropped from its `regions` list, other than the primary one for a group pinned there, or
    where no app Machine runs any more for a group following its callers (`pool_regions`, as
    `prepare` converges them). Off Fly (no `FLY_REGION`) no Machine is out of its region.

    A group pinned to the primary region that has no usable Machine of an image there is failed
    over: its Machines of that image where the app runs take its requests, and stay (destroyed,
    the next failover would create them again)."""
    apps = function_apps(settings)
    if not apps:
        raise PoolConfigError("no Fly app: set FLYFN['APP_NAME'] or the FLY_APP_NAME env var")
    own = await client.list_machines(app=apps[0])
    app_machines = [
        m
        for m in own
        if machine_group(m) is None and machine_schedule(m) is None and m.state not in GONE_STATES
    ]
    live_images = {machine_image(m) for m in app_machines}
    if settings.image_ref:
        live_images.add(settings.image_ref)
    caller = env_value(environ, FLY_REGION)
    primary = env_value(environ, PRIMARY_REGION)
    where_app_runs = app_regions(own)

    @functools.cache
    def where(group: str) -> Placement:
        return placement(settings, group, task_group=is_task_group(group))

    @functools.cache
    def homes(group: str) -> Collection[str | None]:
        return pool_regions(where(group), caller, primary, where_app_runs)

    functions = [
        (app, m, group)
        for app in apps
        for m in (own if app == apps[0] else await client.list_machines(app=app))
        if (group := machine_group(m)) is not None and m.state not in GONE_STATES
    ]
    # (app, group, image) of the Machines at home that can serve.
    at_home = {
        (app, group, machine_image(m))
        for app, m, group in functions
        if m.region in homes(group) and is_usable(m)
    }

    def failed_over(app: str, m: Machine, group: str) -> bool:
        return (
            where(group).mode == "primary"
            and m.region in where_app_runs
            and (app, group, machine_image(m)) not in at_home
        )

    orphans: list[Orphan] = []
    for app, m, group in functions:
        if machine_image(m) not in live_images:
            orphans.append(Orphan(app, m))
        elif (
            caller is not None
            and None not in homes(group)
            and m.region not in homes(group)
            and not failed_over(app, m, group)
        ):
            orphans.append(Orphan(app, m, "region"))
    return orphans


async def destroy_orphans(client: AsyncMachinesClient, orphans: Sequence[Orphan]) -> list[str]:
    return [
        o.machine.id
        for o in orphans
        if await _destroy(client, o.app, o.machine.id, machine_group(o.machine), o.machine.region)
    ]
