"""flyfn within Fly's Machines API rate limits: the emulator limits by default, and a deploy of
3 app Machines x 4 worker processes x 3 groups keeps every request answered.

`pytest -s tests/test_rate_limits.py` prints the deploy's API calls per minute, per action.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgiref.sync import async_to_sync
from django.test import override_settings

from flyfn.emulator.api import MachinesEmulator, create_app
from flyfn.pool.cache import RATE_LIMIT_WAITS, MachinePool
from flyfn.pool.listing import MachineListing
from flyfn.pool.manager import PoolManager
from tests.support_deploy import WorkerReport, run_worker
from tests.support_machines_api import (
    EMULATOR_APP,
    EMULATOR_BASE_URL,
    EMULATOR_TOKEN,
    serve_in_thread,
)

IMAGE = "registry.fly.io/testapp:deployment-7"
APP_MACHINES = 3
WORKERS = 4
GROUPS = ["pdf", "thumbs", "reports"]
CACHE_TTL = 6.0  # short (the default is 30), so that the run sees several refresh rounds
DURATION = 20.0  # seconds of requests after the deploy's boot
SAFETY = 240.0  # bounds on waiting for processes: generous, never a speed test


async def test_rate_limits_are_on_by_default() -> None:
    emulator = MachinesEmulator(default_app=EMULATOR_APP)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(emulator, token=EMULATOR_TOKEN)),
        base_url=EMULATOR_BASE_URL,
        headers={"Authorization": f"Bearer {EMULATOR_TOKEN}"},
    ) as http:
        answers = [await http.get(f"/v1/apps/{EMULATOR_APP}/machines") for _ in range(5)]
    await emulator.aclose()
    assert [a.status_code for a in answers[:3]] == [200, 200, 200]  # Fly's burst of 3
    limited = answers[3]
    assert limited.status_code == 429
    assert float(limited.headers["retry-after"]) >= 1


# -- a 429 on refresh -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_429_on_refresh_delays_the_next_attempt_by_retry_after() -> None:
    calls: list[str] = []

    def limited(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(
            429, json={"error": "rate limit exceeded"}, headers={"Retry-After": "2"}
        )

    clock = FakeClock()
    manager = PoolManager(
        transport=httpx.MockTransport(limited),
        listing=MachineListing(None),
        clock=clock,
        random=lambda: 0.0,
    )
    flyfn = {
        "APP_NAME": EMULATOR_APP,
        "API_HOSTNAME": EMULATOR_BASE_URL,
        "API_TOKEN": EMULATOR_TOKEN,
        "IMAGE_REF": IMAGE,
    }
    try:
        with override_settings(FLYFN=flyfn):
            pool = manager.pool("default")
            slept: list[float] = []

            async def no_sleep(seconds: float) -> None:
                slept.append(seconds)

            manager.client()._sleep = no_sleep  # the client's own retries honour Retry-After
            future = pool.refresh()
            assert future is not None
            future.result(SAFETY)
            assert slept == [2.0, 2.0]
            assert len(calls) == 3  # one call and the client's two retries
            # A cold request whose wait ends before Retry-After gets the fallback at once, with no
            # API call.
            clock.now += 1.9
            assert pool.wait_target(0.05) is None
            assert pool.refresh() is None
            assert len(calls) == 3
            clock.now += 0.2
            future = pool.refresh()
            assert future is not None
            future.result(SAFETY)
            assert len(calls) == 6
    finally:
        manager.close()


class LimitedAtFirst(httpx.AsyncBaseTransport):
    """The emulator (in process) behind a rate limit that answers the first `limited` calls with
    a 429 and `Retry-After: 1`; `events` records each call's status and each wait, in order."""

    def __init__(self, limited: int) -> None:
        emulator = MachinesEmulator(default_app=EMULATOR_APP)
        app = create_app(emulator, token=EMULATOR_TOKEN, rate_limit=None)
        self.inner = httpx.ASGITransport(app=app)
        self.limited = limited
        self.events: list[tuple[str, float]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if sum(1 for e in self.events if e == ("call", 429)) < self.limited:
            self.events.append(("call", 429))
            body = {"error": "rate limit exceeded"}
            return httpx.Response(429, json=body, headers={"retry-after": "1"}, request=request)
        response = await self.inner.handle_async_request(request)
        self.events.append(("call", response.status_code))
        return response


@contextlib.contextmanager
def pool_behind(api: LimitedAtFirst) -> Iterator[MachinePool]:
    """The `default` group's pool of a manager reaching `api`, every wait of its client (the
    client's retries, the pool's own) recorded in `api.events` instead of passing."""
    manager = PoolManager(transport=api, listing=MachineListing(None), random=lambda: 0.0)
    flyfn = {
        "APP_NAME": EMULATOR_APP,
        "API_HOSTNAME": EMULATOR_BASE_URL,
        "API_TOKEN": EMULATOR_TOKEN,
        "IMAGE_REF": IMAGE,
    }

    async def recorded_wait(seconds: float) -> None:
        api.events.append(("wait", seconds))

    try:
        with override_settings(FLYFN=flyfn):
            pool = manager.pool("default")  # made first: settings it sees anew make a new client
            manager.client()._sleep = recorded_wait
            yield pool
    finally:
        manager.close()


@pytest.mark.parametrize("waiter", ["sync", "async"])
@pytest.mark.parametrize("limited", [3, 6])  # one 429 round (a call, two retries) or two
def test_a_cold_request_waits_out_a_429_that_ends_within_its_wait(
    waiter: str, limited: int
) -> None:
    """Machines booting together (a deploy) list at once and some get a 429: a cold request
    waits the API's Retry-After when it ends in time, and gets its target, not the fallback."""
    api = LimitedAtFirst(limited)
    with pool_behind(api) as pool:
        if waiter == "sync":
            target = pool.wait_target(SAFETY)
        else:
            target = async_to_sync(pool.aget_target)(SAFETY)
    assert target is not None
    assert target.instance
    one_round = [("call", 429), ("wait", 1.0), ("call", 429), ("wait", 1.0), ("call", 429)]
    rounds = limited // 3
    events = api.events
    for n in range(rounds):
        start = n * 6
        assert events[start : start + 5] == one_round, events
        # The pool's own wait: the rest of the Retry-After, taken from its clock.
        kind, seconds = events[start + 5]
        assert kind == "wait", events
        assert 0.5 < seconds <= 1.0, events
    rest = events[rounds * 6 :]
    assert rest, events
    assert all(kind == "call" and status < 400 for kind, status in rest), events


def test_a_cold_request_waits_out_no_more_than_its_wait() -> None:
    """A 429 whose Retry-After ends after the request's wait: the fallback at once, one round of
    calls (the client's), no wait of the pool's; a wait of the pool's only so many times."""
    api = LimitedAtFirst(limited=100)
    with pool_behind(api) as pool:
        assert pool.wait_target(0.5) is None
        assert [e for e in api.events if e[0] == "call"] == [("call", 429)] * 3
        assert [e for e in api.events if e[0] == "wait"] == [("wait", 1.0)] * 2
        # With time to spare, an API that keeps answering 429: RATE_LIMIT_WAITS rounds more.
        api.events.clear()
        assert pool.wait_target(SAFETY) is None
        calls = [e for e in api.events if e[0] == "call"]
        assert calls == [("call", 429)] * 3 * RATE_LIMIT_WAITS


# -- the deploy -------------------------------------------------------------------------------


class Recorder:
    """The emulated API (Fly's limits), recording each call's method, path and status."""

    def __init__(self) -> None:
        self.app = create_app(MachinesEmulator(default_app=EMULATOR_APP), token=EMULATOR_TOKEN)
        self.calls: list[tuple[str, str, int]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [0]

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        await self.app(scope, receive, recording_send)
        self.calls.append((scope["method"], scope["path"], status[0]))


def action(method: str, path: str) -> str:
    if re.fullmatch(r"/v1/apps/[^/]+/machines", path):
        return "list" if method == "GET" else "create"
    if re.fullmatch(r"/v1/apps/[^/]+/machines/[^/]+", path):
        return {"GET": "get", "POST": "update", "DELETE": "destroy"}.get(method, method)
    return f"{method} {path.rsplit('/', 1)[-1]}"


@pytest.fixture
def deploy_api() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    with serve_in_thread(recorder) as url:
        yield url, recorder


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_deploy_stays_within_the_rate_limits(
    deploy_api: tuple[str, Recorder], tmp_path: Path
) -> None:
    url, recorder = deploy_api
    flyfn = {
        "APP_NAME": EMULATOR_APP,
        "API_HOSTNAME": url,
        "API_TOKEN": EMULATOR_TOKEN,
        "IMAGE_REF": IMAGE,
        "CACHE_TTL": CACHE_TTL,
        "GROUPS": {group: {} for group in GROUPS},
    }
    spawn = multiprocessing.get_context("spawn")
    ready: Any = spawn.Queue()
    out: Any = spawn.Queue()
    go = spawn.Event()
    # One temp dir, as the Machines share none on Fly but do here: the Machine ids keep them apart.
    workers = [
        spawn.Process(
            target=run_worker,
            args=(f"app{m}machine", w, str(tmp_path), flyfn, GROUPS, ready, go, DURATION, out),
            daemon=True,
        )
        for m in range(APP_MACHINES)
        for w in range(WORKERS)
    ]
    reports: list[WorkerReport] = []
    try:
        for process in workers:
            process.start()
        for _ in workers:  # every worker has booted: now they all start at once
            ready.get(timeout=SAFETY)
        started = time.monotonic()
        go.set()
        for _ in workers:
            reports.append(out.get(timeout=SAFETY))
        elapsed = time.monotonic() - started
        for process in workers:
            process.join(SAFETY)
    finally:
        for process in workers:
            if process.is_alive():
                process.kill()
                process.join(10)

    calls = Counter(action(method, path) for method, path, _ in recorder.calls)
    limited = Counter(action(m, p) for m, p, status in recorder.calls if status == 429)
    seen_429 = sum(r.statuses.get(429, 0) for r in reports)
    requests = sum(r.requests for r in reports)
    fallbacks = sum(r.fallbacks for r in reports)
    minutes = elapsed / 60
    print(
        f"\ndeploy: {APP_MACHINES} app Machines x {WORKERS} workers x {len(GROUPS)} groups, "
        f"CACHE_TTL {CACHE_TTL:g}s, {elapsed:.1f}s, {requests} requests "
        f"({fallbacks} fallbacks then retried)"
    )
    for name in sorted(calls):
        print(
            f"  {name:8} {calls[name]:4d} calls  {calls[name] / minutes:6.1f}/min  "
            f"429: {limited[name]}"
        )
    print(f"  429s seen by the clients: {seen_429}")

    assert len(reports) == len(workers)
    assert [e for r in reports for e in r.errors] == []
    assert [g for r in reports for g in r.unanswered] == []
    assert seen_429 == sum(limited.values())
    # Each group has its Machine (racing creators agree), and nothing else was made.
    assert calls["create"] >= len(GROUPS)
    # Sharing: the 12 workers x 3 groups list far less often than once per pool and refresh.
    refresh_rounds = elapsed / (CACHE_TTL * 0.8) + 1
    assert calls["list"] < APP_MACHINES * WORKERS * len(GROUPS) * refresh_rounds / 4
