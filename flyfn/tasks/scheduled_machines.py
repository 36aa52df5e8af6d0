"""The scheduled Machines that run periodic tasks on Fly: one per interval in use (`hourly`,
`daily`, `weekly`, `monthly`), created with Fly's `config.schedule` so that Fly starts it on
that interval with nothing else up. It runs `manage.py flyfn tick INTERVAL`, which enqueues the
due slots (flyfn.tasks.periodic), delivers their wakes and exits: the Machine stops.

`manage.py flyfn prepare` creates and updates them (`prepare_scheduled`), `gc` destroys those no
schedule needs any more (`find_unneeded`), `status` lists them (`list_scheduled`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from django.conf import settings as django_settings

from flyfn.conf import FlyfnSettings
from flyfn.fly.schedule import INTERVALS
from flyfn.machines import AsyncMachinesClient, Machine
from flyfn.machines.models import (
    CreateMachineRequest,
    MachineConfig,
    MachineGuest,
    MachineInit,
    MachineRestart,
    UpdateMachineRequest,
)
from flyfn.pool.converge import GONE_STATES, RESTING_STATES, is_outdated, machine_schedule
from flyfn.pool.spec import (
    SCHEDULE_METADATA_KEY,
    VERSION_METADATA_KEY,
    PoolConfigError,
    forwarded_env,
    pool_version,
    secret_inputs,
)
from flyfn.tasks.configured import flyfn_backends

__all__ = [
    "ScheduledReport",
    "find_unneeded",
    "intervals_in_use",
    "list_scheduled",
    "machine_name",
    "prepare_scheduled",
    "scheduled_config",
]

# A tick enqueues a few rows and sends a wake: the smallest Machine Fly has does it.
_GUEST = MachineGuest(cpu_kind="shared", cpus=1, memory_mb=256)
# A tick that fails (the database away a moment) runs again; its slots' rows keep it once.
_RESTART = MachineRestart(policy="on-failure", max_retries=3)


def intervals_in_use() -> list[str]:
    """Fly's intervals that some flyfn backend's schedule runs on, in Fly's order."""
    used = {
        s.fly_interval for b in flyfn_backends() for s in b.schedules.values() if s.fly_interval
    }
    return [interval for interval in INTERVALS if interval in used]


def machine_name(interval: str) -> str:
    """The scheduled Machine's name: one per interval and app (Fly's names are unique)."""
    return f"flyfn-schedule-{interval}"


def _groups_of(interval: str) -> list[str]:
    """The task groups of the backends that have a schedule on `interval`: a tick enqueues into
    them and runs the same settings as their Machines."""
    groups: set[str] = set()
    for backend in flyfn_backends():
        if any(s.fly_interval == interval for s in backend.schedules.values()):
            groups |= backend.flyfn.groups
    return sorted(groups)


def scheduled_config(
    settings: FlyfnSettings, interval: str, environ: Mapping[str, str] = os.environ
) -> MachineConfig:
    """The scheduled Machine of `interval`: the current image running `python -m django flyfn
    --settings <this process's> tick INTERVAL`, no services (nothing is sent to it), with the env
    its task groups' Machines get and a version digest of what they depend on (SECRET_KEY, that
    env, their named secrets): a rotated secret makes it outdated, and its update gives it the
    app's current secrets (an API-created Machine keeps the old ones until then, and would sign
    its wakes with an old SECRET_KEY)."""
    if not settings.image_ref:
        raise PoolConfigError(
            "no image for the scheduled Machines: set FLYFN['IMAGE_REF'] or FLY_IMAGE_REF "
            "(Fly sets it on the release command's Machine)"
        )
    settings_module = os.environ.get("DJANGO_SETTINGS_MODULE") or django_settings.SETTINGS_MODULE
    # The image's Python (this process runs in the same image on Fly: the release command), in
    # its WORKDIR, with this process's settings.
    command = [sys.executable, "-m", "django", "flyfn", "--settings", settings_module]
    env: dict[str, str] = {}
    depends: dict[str, str | None] = {}
    # An interval in use has a backend, so at least its default group: SECRET_KEY always counts.
    for group in _groups_of(interval):
        env.update(forwarded_env(settings, group, environ))
        depends.update(secret_inputs(settings, group, environ))
    version = pool_version(
        settings.app_name or "", machine_name(interval), settings.image_ref, depends
    )
    return MachineConfig(
        image=settings.image_ref,
        env=env or None,
        metadata={SCHEDULE_METADATA_KEY: interval, VERSION_METADATA_KEY: version},
        schedule=interval,
        init=MachineInit(cmd=[*command, "tick", interval]),
        guest=_GUEST,
        restart=_RESTART,
        auto_destroy=False,
    )


@dataclass(slots=True)
class ScheduledReport:
    """What `prepare_scheduled` found and did, per interval."""

    machines: dict[str, str] = field(default_factory=dict)  # interval -> Machine id
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)


async def list_scheduled(client: AsyncMachinesClient, app: str | None = None) -> list[Machine]:
    """The app's scheduled Machines that flyfn made (gone ones left out)."""
    machines = await client.list_machines(app=app)
    return [m for m in machines if machine_schedule(m) and m.state not in GONE_STATES]


async def prepare_scheduled(
    client: AsyncMachinesClient, settings: FlyfnSettings, intervals: Sequence[str]
) -> ScheduledReport:
    """One scheduled Machine per interval in `intervals`, on the current config: created (Fly
    starts it at once, a first tick), updated when its config drifted (left stopped: Fly starts
    it at its time), duplicates destroyed. Those of other intervals are `gc`'s."""
    report = ScheduledReport()
    existing = await list_scheduled(client)
    for interval in intervals:
        config = scheduled_config(settings, interval)
        mine = [m for m in existing if machine_schedule(m) == interval]
        if not mine:
            created = await client.create_machine(
                CreateMachineRequest(
                    name=machine_name(interval),
                    region=os.environ.get("FLY_REGION") or None,
                    config=config,
                )
            )
            report.machines[interval] = created.id
            report.created.append(created.id)
            continue
        keep, *extra = mine
        report.machines[interval] = keep.id
        if is_outdated(keep, config):
            await client.update_machine(
                keep.id,
                UpdateMachineRequest(
                    name=keep.name,
                    config=config,
                    skip_launch=True if keep.state in RESTING_STATES else None,
                ),
            )
            report.updated.append(keep.id)
        for machine in extra:
            await client.destroy_machine(machine.id, force=True)
            report.destroyed.append(machine.id)
    return report


async def find_unneeded(client: AsyncMachinesClient, intervals: Sequence[str]) -> list[Machine]:
    """Scheduled Machines of an interval no schedule uses any more (`gc` destroys them)."""
    return [m for m in await list_scheduled(client) if machine_schedule(m) not in intervals]
