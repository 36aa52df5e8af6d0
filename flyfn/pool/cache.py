"""One group's target cache: read on the request path without I/O, refreshed behind it, and
converged on a miss by one operation on the background loop that concurrent misses join (single
flight), with a backoff after API failures (by `Retry-After` after a 429). Refreshes are jittered
and read the app's shared Machine list (`flyfn.pool.listing`) to stay within Fly's rate limits."""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import re
import threading
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Protocol

from flyfn.backoff import Backoff
from flyfn.events import FailoverReason
from flyfn.machine_role import Role, current_role
from flyfn.machines import (
    AsyncMachinesClient,
    MachinesError,
    MachinesStatusError,
    RateLimited,
    ServerError,
)
from flyfn.pool.choice import MachineChoice, ReplayTarget
from flyfn.pool.converge import converge, observe
from flyfn.pool.listing import SHARED_LIST_MAX_AGE, MachineListing
from flyfn.pool.loop import wait_done
from flyfn.pool.spec import PoolSpec

logger = logging.getLogger("flyfn.pool")

# After an API failure, cold requests fall back at once for this long (doubling up to the cap)
# instead of queueing on an API that is down.
FAILURE_BACKOFF = 1.0
MAX_FAILURE_BACKOFF = 30.0
# `fly-replay-failed` cannot be authenticated (any client can send one): a pool drops a Machine it
# names at once, but once per interval at most, so a forged flood costs one list call per interval.
FORGET_MIN_INTERVAL = 1.0
# A cache expires between (1 - TTL_JITTER) x CACHE_TTL and CACHE_TTL after its refresh, so that the
# pools of Machines booted together (a deploy) do not refresh in step.
TTL_JITTER = 0.2
# After a 429 the pool waits the API's Retry-After plus up to this fraction of it (not all at once).
RATE_LIMIT_JITTER = 0.25
# How many 429s in a row a cold request waits out (each after its Retry-After) within its wait.
RATE_LIMIT_WAITS = 3


class PoolOwner(Protocol):
    """What a pool uses of the manager that owns it (`flyfn.pool.manager.PoolManager`), passed
    in so that this module does not import the manager."""

    listing: MachineListing
    clock: Callable[[], float]
    random: Callable[[], float]

    def submit(self, coro: Coroutine[Any, Any, None]) -> concurrent.futures.Future[None]:
        """Run `coro` on the background loop."""
        ...

    def client(self) -> AsyncMachinesClient:
        """The Machines client (on the background loop only)."""
        ...


class MachinePool:
    """One group's cached targets, refreshed in the background, converged on a miss."""

    def __init__(
        self,
        manager: PoolOwner,
        spec: PoolSpec | None,
        problem: str | None,
        ttl: float,
        choice: MachineChoice,
    ):
        self.manager = manager
        self.spec = spec
        self.choice = choice
        self._problem = problem  # why the pool cannot work (missing settings), logged once
        self._ttl = ttl
        self._lock = threading.Lock()
        self._targets: tuple[ReplayTarget, ...] = ()
        # Every Machine of the group in rank order (the targets are chosen among them).
        self._members: tuple[str, ...] = ()
        self._expires = 0.0
        self._turn = itertools.count()
        self._inflight: concurrent.futures.Future[None] | None = None
        self._retry_at = 0.0
        # The last convergence was rate limited: `_retry_at` is the API's own `Retry-After`.
        self._rate_limited = False
        self._backoff = Backoff(FAILURE_BACKOFF, MAX_FAILURE_BACKOFF)
        self._forgot_at = float("-inf")
        # After `forget`, a shared list taken before this (listing clock) is not good enough.
        self._fresh_after = float("-inf")
        self._clock = manager.clock
        # Why another region may take the requests after the last convergence failed (None
        # after a success, or a failure every region shares): a multi-region group's requests
        # go to another region's pool while this one has no Machine.
        self._failure: FailoverReason | None = None

    def unavailable(self) -> FailoverReason | None:
        """Why another region's pool may take this one's requests now (its last convergence
        failed, for a reason another region may not share, and it has no target), or None: it
        has one, may have one soon, or failed as every region would (`_failure_reason`)."""
        return self._failure if not self._targets else None

    def cached_target(self) -> ReplayTarget | None:
        """A cached target or None, without refreshing a stale cache: no API call on this pool's
        behalf (a failover while the API fails routes to a Machine already known, never creates
        one)."""
        targets = self._targets
        return self.choice.pick(targets, next(self._turn)) if targets else None

    def members(self) -> tuple[str, ...]:
        """The group's Machine ids in rank order (`instance` strategy), from the cache: never an
        API call on the request path (a stale or empty cache is refreshed behind it)."""
        members = self._members
        if not members or self._clock() >= self._expires:
            self.refresh()
        return members

    def target(self) -> ReplayTarget | None:
        """The hot path: a cached target or None; a stale cache is served and refreshed behind."""
        if self._targets and self._clock() >= self._expires:
            self.refresh()
        return self.cached_target()

    def refresh(self, *, waited: bool = False) -> concurrent.futures.Future[None] | None:
        """Start, or join, the one in-flight convergence; None while backing off after a failure
        (unless the caller `waited` out the back-off's `Retry-After` itself)."""
        if self.spec is None:
            self._report_problem()
            return None
        with self._lock:
            # A refresh that has finished but whose callback has not cleared it yet is not
            # joined: it may have listed before whatever made the caller ask again.
            if self._inflight is not None and not self._inflight.done():
                return self._inflight
            if self._clock() < self._retry_at and not waited:
                return None
            # The role is read here, on the caller's thread: the one a refresh was asked under.
            future = self.manager.submit(self._refresh(self.spec, current_role()))
            self._inflight = future
        future.add_done_callback(self._clear_inflight)
        return future

    def wait_target(self, max_wait: float) -> ReplayTarget | None:
        """A target, waiting at most `max_wait` seconds for the API on a cold cache (sync). A 429
        is waited out (at most `RATE_LIMIT_WAITS` times) when its `Retry-After` ends within that
        time: the API is up and said when to come back (a deploy's Machines booting together list
        at once); after any other failure the cold request falls back at once."""
        steps = self._cold_wait(max_wait)
        try:
            future, timeout = next(steps)
            while True:
                try:
                    future.result(timeout)
                    ended = True
                except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                    ended = False
                future, timeout = steps.send(ended)
        except StopIteration as done:
            target: ReplayTarget | None = done.value
            return target

    async def aget_target(self, max_wait: float) -> ReplayTarget | None:
        """`wait_target` for async callers: the event loop is never blocked."""
        steps = self._cold_wait(max_wait)
        try:
            future, timeout = next(steps)
            while True:
                future, timeout = steps.send(await wait_done(future, timeout))
        except StopIteration as done:
            target: ReplayTarget | None = done.value
            return target

    def _cold_wait(
        self, max_wait: float
    ) -> Generator[tuple[concurrent.futures.Future[None], float], bool, ReplayTarget | None]:
        """The steps of `wait_target` for sync and async callers alike: each yields a future of the
        background loop and the seconds to wait for it, and is sent whether it ended in time; the
        target (or None) is what it returns."""
        deadline = self._clock() + max_wait
        waits = 0
        while (target := self.target()) is None:
            future = self.refresh()
            if future is None:
                pause = self._pause_before_asking_again(deadline, waits)
                if pause is None:
                    return None
                waits += 1
                waited = self.manager.submit(self._wait_out(pause))
                if not (yield waited, max(0.0, deadline - self._clock())):
                    return None
                future = self.refresh(waited=True)
                if future is None:
                    return None
            if not (yield future, max(0.0, deadline - self._clock())):
                return None
            if self._rate_limit_pause() is None:
                return self.target()
        return target

    def _rate_limit_pause(self) -> float | None:
        """Seconds until a pool whose last convergence was rate limited may ask again, or None
        when it was not (it succeeded, or failed otherwise)."""
        with self._lock:
            if not self._rate_limited:
                return None
            return max(0.0, self._retry_at - self._clock())

    def _pause_before_asking_again(self, deadline: float, waits: int) -> float | None:
        """How long a cold request that found the pool backing off waits before asking again
        (`_clock` time), or None when it takes the fallback now: the pool failed otherwise than
        by a 429, its `Retry-After` ends after `deadline`, or the request waited enough."""
        pause = self._rate_limit_pause()
        if pause is None or pause >= deadline - self._clock() or waits >= RATE_LIMIT_WAITS:
            return None
        return pause

    async def _wait_out(self, seconds: float) -> None:
        # On the background loop, as the client waits between its own retries.
        await self.manager.client().wait_retry_after(seconds)

    def forget(self, machine_id: str) -> bool:
        """Drop a Machine that vanished from the cache at once and look again behind the request."""
        with self._lock:
            kept = tuple(t for t in self._targets if t.instance != machine_id)
            if len(kept) == len(self._targets) and machine_id not in self._members:
                return False
            now = self._clock()
            if now - self._forgot_at < FORGET_MIN_INTERVAL:
                return False
            self._forgot_at = now
            self._fresh_after = self.manager.listing.clock()
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
            # Every group of the app, in every worker process of this Machine, reads one list.
            async with self.manager.listing.session(
                client,
                spec.app,
                max_age=min(self._ttl / 2, SHARED_LIST_MAX_AGE),
                fresh_after=self._fresh_after,
            ) as listing:
                if role.kind == "function":
                    # A function Machine only reads pools (its siblings, to send load on; the
                    # app's list, for its app Machines): the app Machines and `manage.py flyfn
                    # prepare|gc` create, update and destroy Machines, never a function Machine
                    # (its settings and secrets may be another group's, or stale).
                    machines = await observe(client, spec, self.choice, lister=listing.group)
                else:
                    done = await converge(client, spec, self.choice, lister=listing.group)
                    if done.destroyed or done.updated:
                        listing.changed()
                    machines = done.machines
                # The cache ages from when its list was taken: pools that share a list expire
                # together, and the next round shares one list again.
                age = listing.age()
        except Exception as exc:  # whatever fails, requests get the fallback, never a 500
            self._failed(exc)
            return
        members = tuple(m.id for m in machines)
        targets = self.choice.targets(spec, members)
        with self._lock:
            self._targets = targets
            self._members = members
            ttl = self._ttl * (1 - TTL_JITTER * self.manager.random())
            self._expires = self._clock() + max(0.0, ttl - age)
            recovered = self._backoff.succeeded()
            self._retry_at = 0.0
            self._rate_limited = False
            self._failure = None
        if recovered:
            logger.warning("flyfn: Machines API reachable again (group %r)", spec.group)

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            reason = _failure_reason(exc)
            if reason is None and self._failure is not None and isinstance(exc, RateLimited):
                # Rate limited while failed over (home retrying a region without capacity, say):
                # a 429 says nothing of the region, so the failover stands, on the Machines
                # other regions already know only (no API call for them until it answers).
                reason = "unavailable"
            self._failure = reason
            self._rate_limited = isinstance(exc, RateLimited)
            first = self._backoff.failed()
            delay = self._backoff.delay
            if isinstance(exc, RateLimited) and exc.retry_after is not None:
                # Rate limited (the client's own retries used up): the API said when to come back.
                retry_after = min(exc.retry_after, MAX_FAILURE_BACKOFF)
                delay = retry_after * (1 + RATE_LIMIT_JITTER * self.manager.random())
            self._retry_at = self._clock() + delay
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
            logger.error(
                "flyfn: cannot replay: %s; using the group's fallback", problem.rstrip(".")
            )


# A create refused with these statuses may be about the region (Fly answers 409, 412 or 422 when
# it has no capacity there, or when the region takes no new Machines); a name already taken (409
# `name_taken`) is not: the convergence re-lists and finds that Machine.
_REGION_REFUSALS = frozenset({409, 412, 422})
_MACHINES_PATH = re.compile(r"/v1/apps/[^/]+/machines/?")


def _failure_reason(exc: BaseException) -> FailoverReason | None:
    """Why another region's pool may take the requests of a pool whose convergence failed with
    `exc`, or None when it may not: the failure is not the region's, and another region would
    fail the same way (a bad token, a missing app: 401, 403, 404; a settings problem) or make it
    worse (a 429: more calls to an API that asks for fewer). The group's fallback answers then."""
    if isinstance(exc, MachinesStatusError):
        if exc.insufficient_capacity:
            return "no_capacity"
        if isinstance(exc, ServerError):
            return "unavailable"
        if _refused_in_region(exc):
            return "refused"
        return None
    if isinstance(exc, MachinesError):  # unreachable, timed out, an answer that is not JSON
        return "unavailable"
    return None


def _refused_in_region(exc: MachinesStatusError) -> bool:
    """Whether a create was refused for a reason of its region: Fly's answer says so (a
    region that takes no new Machines, an unknown one: its text names the region). Other
    refusals (a bad config, a name already taken) would be the same in every region."""
    return (
        exc.status in _REGION_REFUSALS
        and exc.method == "POST"
        and _MACHINES_PATH.fullmatch(exc.path) is not None
        and exc.error_status != "name_taken"
        and "region" in (exc.error or "").lower()
    )
