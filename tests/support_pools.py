"""Pool managers for tests: one installed as flyfn's for a block, and `StaticPools`, a `Pools`
without any API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

import httpx

from flyfn.conf import FlyfnSettings
from flyfn.elastic import SiblingReplay
from flyfn.machines import AsyncMachinesClient
from flyfn.pool.choice import MachineChoice, RankOrder, ReplayTarget
from flyfn.pool.manager import Pools, set_manager
from flyfn.pool.spec import new_client

Manager = TypeVar("Manager", bound=Pools)


@contextmanager
def installed(manager: Manager) -> Iterator[Manager]:
    """`manager` as flyfn's pool manager inside the block; the previous one again afterwards."""
    previous = set_manager(manager)
    try:
        yield manager
    finally:
        set_manager(previous)


def quick_client(
    settings: FlyfnSettings, *, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncMachinesClient:
    """flyfn's Machines client whose retry sleeps take no time (patch it in as
    `flyfn.pool.manager.new_client`): for tests of what requests get, not how long flyfn waits."""
    client = new_client(settings, transport=transport)

    async def no_sleep(seconds: float) -> None:
        await asyncio.sleep(0)

    # On an in-process API's virtual clock (tests/support_emulator.py) its waits take no real
    # time already, and let the API's rate limits refill as if they had.
    if client._sleep is asyncio.sleep:
        client._sleep = no_sleep
    return client


class StaticPools:
    """`Pools` without any API: fixed targets and Machines per group, chosen from as flyfn does;
    records the Machines the middleware forgets and the groups it refreshes."""

    def __init__(
        self,
        targets: Mapping[str, ReplayTarget] | None = None,
        machines: Mapping[str, Sequence[str]] | None = None,
        choice: MachineChoice | None = None,
        app_machines: Sequence[str] = (),
    ) -> None:
        self.targets = dict(targets or {})
        self.app_machines = tuple(app_machines)
        self.machines = {group: tuple(ids) for group, ids in (machines or {}).items()}
        self.choice = choice or RankOrder()
        self.forgotten: list[tuple[str, str]] = []
        self.refreshed: list[str] = []

    def get_target(self, group: str) -> ReplayTarget | None:
        return self.targets.get(group)

    def wait_target(self, group: str, max_wait: float) -> ReplayTarget | None:
        return self.targets.get(group)

    async def aget_target(self, group: str, max_wait: float) -> ReplayTarget | None:
        return self.targets.get(group)

    def members(self, group: str) -> tuple[str, ...]:
        return self.machines.get(group, ())

    def sibling(self, group: str, me: str | None, hop: int) -> SiblingReplay | None:
        return self.choice.sibling(self.members(group), me, hop)

    def forget(self, group: str, machine_id: str) -> bool:
        self.forgotten.append((group, machine_id))
        return True

    def refresh(self, group: str) -> None:
        self.refreshed.append(group)

    def app_machine(self) -> str | None:
        return self.app_machines[0] if self.app_machines else None

    def wait_app_machine(self, max_wait: float) -> str | None:
        return self.app_machine()

    async def aget_app_machine(self, max_wait: float) -> str | None:
        return self.app_machine()
