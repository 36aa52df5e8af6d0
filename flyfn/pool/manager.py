"""The process's pools: `Pools`, what the request path asks of them; `PoolManager`, one pool per
group and region with one background loop and one Machines client for all of them, which sends a
group's requests to the caller's region's pool or, when it has no Machine to be had, to the
nearest other one; and the process's manager (`get_manager`, replaced by tests with
`set_manager`, forgotten in a forked child)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx

from flyfn import events, process_state
from flyfn.conf import FlyfnSettings, get_settings
from flyfn.elastic import SiblingReplay
from flyfn.fly.env import FLY_REGION, PRIMARY_REGION, env_value
from flyfn.machine_role import current_env, current_role
from flyfn.machines import AsyncMachinesClient, MachinesError
from flyfn.pool.cache import MachinePool
from flyfn.pool.choice import RANK_ORDER, MachineChoice, ReplayTarget
from flyfn.pool.converge import GONE_STATES, app_regions, is_app_machine
from flyfn.pool.listing import MachineListing
from flyfn.pool.loop import LoopThread
from flyfn.pool.placement import Route, placement, route
from flyfn.pool.spec import PoolConfigError, is_task_group, new_client, spec_for

T = TypeVar("T")


class Pools(Protocol):
    """What the middleware asks of the process's pools (tests substitute a static one)."""

    def get_target(self, group: str) -> ReplayTarget | None:
        """The hot path: the group's cached target, or None (never an API call)."""
        ...

    def wait_target(self, group: str, max_wait: float) -> ReplayTarget | None:
        """A target, waiting at most `max_wait` seconds for the API on a cold cache (sync)."""
        ...

    async def aget_target(self, group: str, max_wait: float) -> ReplayTarget | None:
        """`wait_target` for async callers: the event loop is never blocked."""
        ...

    def members(self, group: str) -> tuple[str, ...]:
        """The group's Machine ids in rank order, from the cache (refreshed behind when stale)."""
        ...

    def sibling(self, group: str, me: str | None, hop: int) -> SiblingReplay | None:
        """Where a busy function Machine sends on a replay of `group` (None: run it here)."""
        ...

    def forget(self, group: str, machine_id: str) -> bool:
        """Drop a Machine that vanished from the group's cache; False when nothing changed."""
        ...

    def refresh(self, group: str) -> None:
        """Look at the group's Machines again, behind the caller."""
        ...

    def app_machine(self) -> str | None:
        """An app Machine of this Machine's app (a started one when there is one), from the list
        the pools share; None while that list is not known (a refresh is asked then)."""
        ...

    def wait_app_machine(self, max_wait: float) -> str | None:
        """`app_machine`, waiting at most `max_wait` seconds for the list on a cold cache (sync)."""
        ...

    async def aget_app_machine(self, max_wait: float) -> str | None:
        """`wait_app_machine` for async callers: the event loop is never blocked."""
        ...


@dataclass(frozen=True, slots=True)
class Failover:
    """Where a group's requests go while their home pool has no Machine to be had: `pools`,
    nearest first, for `reason`; `creates`: whether those pools may converge (create Machines)
    for them, else only the Machines they already know are used (the API is failing)."""

    reason: events.FailoverReason
    pools: tuple[tuple[str, MachinePool], ...]
    creates: bool


class PoolManager:
    """The pools of one process, one background loop and one Machines client for all of them.

    Settings are read live: when `get_settings()` returns another object (override_settings), the
    pools and the client are rebuilt. `listing` shares the app's Machine list between the pools and
    with the other processes of this Machine (default: by `FLY_MACHINE_ID`); `clock` (monotonic)
    and `random` time the caches and their jitter (tests inject them). `region` and
    `primary_region` are this Machine's region and the app's primary one (default: `FLY_REGION`
    and `PRIMARY_REGION`, read when the settings change): a group's requests go to the pool of
    the region its `regions` option gives, or fail over to the nearest other one.
    """

    def __init__(
        self,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        settings: Callable[[], FlyfnSettings] = get_settings,
        choice: MachineChoice = RANK_ORDER,
        listing: MachineListing | None = None,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = random.random,
        region: str | None = None,
        primary_region: str | None = None,
    ) -> None:
        self._transport = transport
        self._region = region
        self._primary_region = primary_region
        self.choice = choice
        self.listing = listing or MachineListing(current_env().machine_id)
        self.clock = clock
        self.random = random
        self._get_settings = settings
        self._lock = threading.Lock()
        self._settings: FlyfnSettings | None = None
        # Keyed by group and region (None: a group's one shared pool).
        self._pools: dict[tuple[str, str | None], MachinePool] = {}
        self._routes: dict[str, Route] = {}
        # The hot path's one lookup: each group's route and home pool.
        self._hot: dict[str, tuple[Route, MachinePool]] = {}
        # Each group's pools to fail over to, nearest first, and until when (`clock`) they hold.
        self._failovers: dict[str, tuple[float, tuple[tuple[str, MachinePool], ...]]] = {}
        # Where a group's requests went when that was reported (a failover, a region outside
        # its list), to report a change once; empty while nothing was.
        self._went: dict[str, str | None] = {}
        self._loop: LoopThread | None = None
        self._client: AsyncMachinesClient | None = None
        self._closed = False

    def pool(self, group: str) -> MachinePool:
        """The group's pool in this caller's home region, made on first use (all of them again
        when the settings change)."""
        return self.regional_pool(group, self.route(group).home)

    def regional_pool(self, group: str, region: str | None) -> MachinePool:
        """The group's pool in `region` (None: its one shared pool), made on first use."""
        settings = self._get_settings()
        pools = self._pools
        if settings is not self._settings:
            pools = self._reset(settings)
        pool = pools.get((group, region))
        if pool is None:
            with self._lock:
                pool = pools.get((group, region)) or pools.setdefault(
                    (group, region), self._new_pool(settings, group, region)
                )
        return pool

    def route(self, group: str) -> Route:
        """Where this process sends the group's requests: its home region's pool, then the
        regions to fail over to (`flyfn.pool.placement`), computed once per settings."""
        found = self._routes.get(group)
        settings = self._get_settings()
        if found is None or settings is not self._settings:
            if settings is not self._settings:
                self._reset(settings)
            where = placement(settings, group, task_group=is_task_group(group))
            caller = self._region or env_value(os.environ, FLY_REGION)
            primary = self._primary_region or env_value(os.environ, PRIMARY_REGION)
            found = route(where, caller, primary, order=self.choice.order_regions)
            self._routes[group] = found
            if found.reason is not None:  # the group's choice, said once: not per request
                self._went_to(group, found, found.home, found.reason)
        return found

    def get_target(self, group: str) -> ReplayTarget | None:
        """The hot path: the group's cached target, or None."""
        way, home = self._home(group)
        target = home.target()
        if target is not None:
            if self._went and self._went.get(group, way.home) != way.home:
                self._went_to(group, way, way.home, "recovered")
            return target
        failover = self._failover(group, way, home)
        if failover is None:
            return None
        home.refresh()  # home again once it has a Machine (not while it backs off)
        for region, pool in failover.pools:
            target = pool.target() if failover.creates else pool.cached_target()
            if target is not None:
                self._went_to(group, way, region, failover.reason)
                return target
        return None

    def wait_target(self, group: str, max_wait: float) -> ReplayTarget | None:
        deadline = self.clock() + max_wait
        way, home = self._home(group)
        target = home.wait_target(max_wait)
        if target is not None:
            return self.get_target(group) or target  # through get_target: a return is reported
        failover = self._failover(group, way, home)
        if failover is None:
            return None
        for region, pool in failover.pools:
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            target = pool.wait_target(remaining) if failover.creates else pool.cached_target()
            if target is not None:
                self._went_to(group, way, region, failover.reason)
                return target
        return None

    async def aget_target(self, group: str, max_wait: float) -> ReplayTarget | None:
        deadline = self.clock() + max_wait
        way, home = self._home(group)
        target = await home.aget_target(max_wait)
        if target is not None:
            return self.get_target(group) or target  # through get_target: a return is reported
        failover = self._failover(group, way, home)
        if failover is None:
            return None
        for region, pool in failover.pools:
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            target = await pool.aget_target(remaining) if failover.creates else pool.cached_target()
            if target is not None:
                self._went_to(group, way, region, failover.reason)
                return target
        return None

    def _home(self, group: str) -> tuple[Route, MachinePool]:
        """The group's route and its home pool: the hot path's one lookup."""
        hot = self._hot.get(group)
        if hot is None or self._settings is not self._get_settings():
            way = self.route(group)
            hot = self._hot[group] = (way, self.regional_pool(group, way.home))
        return hot

    def _failover(self, group: str, way: Route, home: MachinePool) -> Failover | None:
        """Where the group's requests go while `home` has no Machine to be had, or None when
        home failed as every region would (`MachinePool.unavailable`): the fallback answers."""
        reason = home.unavailable()
        if reason is None:
            return None
        # The API failing (5xx, unreachable) fails for every region's pool: only a Machine
        # another pool already knows takes the requests then, none is created for them.
        return Failover(reason, self._failover_pools(group, way), reason != "unavailable")

    def _failover_pools(self, group: str, way: Route) -> tuple[tuple[str, MachinePool], ...]:
        """The pools to try after home, nearest first: the route's regions, and for an open
        route every other region with an app Machine in the app's shared list (by the choice).
        Kept for the pools' cache lifetime once that list is known: a failed-over request
        neither reads the list nor sorts regions."""
        now = self.clock()
        kept = self._failovers.get(group)
        if kept is not None and now < kept[0]:
            return kept[1]
        settings = self._settings
        app = settings.app_name if settings is not None else None
        shared = self.listing.read(app) if way.open and way.home and app else None
        regions = way.failover
        if shared is not None:
            extra = app_regions(shared[1]) - {way.home, *way.failover}
            if extra:
                assert way.home is not None
                ordered = self.choice.order_regions(way.home, [*way.failover, *sorted(extra)])
                regions = tuple(ordered)
        pools = tuple((region, self.regional_pool(group, region)) for region in regions)
        if settings is not None and (shared is not None or not way.open):
            self._failovers[group] = (now + settings.cache_ttl, pools)
        return pools

    def _went_to(
        self, group: str, way: Route, region: str | None, reason: events.FailoverReason
    ) -> None:
        """Report (once per change) that the group's requests go to `region`."""
        last = way.home if way.reason is None else None
        if self._went.get(group, last) == region:  # without the lock: the failed-over hot path
            return
        with self._lock:
            if self._went.get(group, last) == region:
                return
            self._went[group] = region
        events.failed_over(group, way.home, region, reason)

    def members(self, group: str) -> tuple[str, ...]:
        return self.pool(group).members()

    def sibling(self, group: str, me: str | None, hop: int) -> SiblingReplay | None:
        return self.choice.sibling(self.members(group), me, hop)

    def forget(self, group: str, machine_id: str) -> bool:
        self.pool(group)  # the pools are this settings' ones
        forgot = False
        for (of, _), pool in list(self._pools.items()):
            if of == group:  # every pool of the group looks (a failover's target may be gone)
                forgot = pool.forget(machine_id) or forgot
        return forgot

    def refresh(self, group: str) -> None:
        self.pool(group).refresh()

    def wait_app_machine(self, max_wait: float) -> str | None:
        found = self.app_machine()
        group = current_role().group
        if found is not None or group is None:
            return found
        self.pool(group).wait_target(max_wait)  # its refresh lists the app
        return self.app_machine()

    async def aget_app_machine(self, max_wait: float) -> str | None:
        found = self.app_machine()
        group = current_role().group
        if found is not None or group is None:
            return found
        await self.pool(group).aget_target(max_wait)
        return self.app_machine()

    def app_machine(self) -> str | None:
        env = current_env()
        role = current_role()
        if not env.app_name:
            return None
        shared = self.listing.read(env.app_name)
        max_age = self._get_settings().cache_ttl
        if (shared is None or time.time() - shared[0] > max_age) and role.group is not None:
            self.refresh(role.group)  # lists the whole app, app Machines included
        if shared is None:
            return None
        candidates = [m for m in shared[1] if is_app_machine(m) and m.state not in GONE_STATES]
        # One of this region's when there is one: a request sent on should not cross the world.
        here = self._region or env.region
        candidates = [m for m in candidates if here and m.region == here] or candidates
        started = [m.id for m in candidates if m.state == "started"]
        ids = started or [m.id for m in candidates]
        return ids[int(self.random() * len(ids)) % len(ids)] if ids else None

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run a coroutine on the background loop (started on first use)."""
        with self._lock:
            if self._closed:
                coro.close()
                raise RuntimeError("the pool manager is closed")
            if self._loop is None:
                self._loop = LoopThread()
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

    def _new_pool(self, settings: FlyfnSettings, group: str, region: str | None) -> MachinePool:
        try:
            # A shared pool is made where its first creator runs: this Machine's region.
            environ = {**os.environ, FLY_REGION: self._region} if self._region else os.environ
            spec = spec_for(settings, group, environ, pool_region=region)
            problem = None
        except PoolConfigError as exc:
            spec, problem = None, str(exc)
        return MachinePool(self, spec, problem, settings.cache_ttl, self.choice)

    def _reset(self, settings: FlyfnSettings) -> dict[tuple[str, str | None], MachinePool]:
        with self._lock:
            if settings is self._settings:
                return self._pools
            old_client, self._client = self._client, None
            self._settings = settings
            self._pools = {}
            self._routes = {}
            self._hot = {}
            self._failovers = {}
            self._went = {}
            loop = self._loop
        if old_client is not None and loop is not None:
            loop.submit(old_client.aclose())
        return self._pools


_manager: Pools | None = None
_manager_lock = threading.Lock()


def get_manager() -> Pools:
    """The process's pool manager."""
    global _manager
    manager = _manager
    if manager is None:
        with _manager_lock:
            if _manager is None:
                _manager = PoolManager()
            manager = _manager
    return manager


def set_manager(manager: Pools | None) -> Pools | None:
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


process_state.register(__name__, "the pool manager", fork=_forget_manager_after_fork)
