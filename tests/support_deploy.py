"""One worker process of a simulated deploy (tests/test_rate_limits.py), run with multiprocessing's
spawn: the pool code of one gunicorn/uvicorn worker of one app Machine. Kept apart from the test
module so that a spawned child imports little."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

# The cold wait of a request (a group's replay timeout) and how often a worker asks for its targets.
MAX_WAIT = 5.0
REQUEST_INTERVAL = 0.25
# A safety bound for a request's retries after fallbacks, not a speed expectation.
RETRY_BOUND = 120.0


@dataclass
class WorkerReport:
    machine_id: str
    worker: int
    requests: int = 0
    fallbacks: int = 0  # requests answered by the fallback (cold pool), then retried
    unanswered: list[str] = field(default_factory=list)  # groups never given a target
    errors: list[str] = field(default_factory=list)  # exceptions out of the pool (none allowed)
    statuses: dict[int, int] = field(default_factory=dict)  # API answers this worker saw


class _Counting(httpx.AsyncBaseTransport):
    def __init__(self, report: WorkerReport) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._report = report

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        statuses = self._report.statuses
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def run_worker(
    machine_id: str,
    worker: int,
    temp_dir: str,
    flyfn: dict[str, Any],
    groups: list[str],
    ready: Any,
    go: Any,
    duration: float,
    out: Any,
) -> None:
    """Boot like a worker of app Machine `machine_id` (its FLY_MACHINE_ID, the Machine's temp dir),
    wait for `go`, then ask for every group's target as requests would, for `duration` seconds."""
    os.environ["TMPDIR"] = temp_dir
    tempfile.tempdir = None
    os.environ["FLY_MACHINE_ID"] = machine_id
    os.environ["FLY_APP_NAME"] = str(flyfn["APP_NAME"])
    from flyfn.conf import load_settings
    from flyfn.pool.manager import PoolManager

    report = WorkerReport(machine_id, worker)
    settings = load_settings(flyfn, environ={})
    manager = PoolManager(settings=lambda: settings, transport=_Counting(report))
    ready.put(worker)
    go.wait()
    try:
        end = time.monotonic() + duration
        while time.monotonic() < end:
            for group in groups:
                _request(manager, group, report)
            time.sleep(REQUEST_INTERVAL)
    finally:
        manager.close()
        out.put(report)


def _request(manager: Any, group: str, report: WorkerReport) -> None:
    """One request for `group`: a target, or the fallback and a retry later (as a client retries a
    503 with Retry-After) until a target comes."""
    report.requests += 1
    deadline = time.monotonic() + RETRY_BOUND
    while True:
        try:
            target = manager.wait_target(group, MAX_WAIT)
        except Exception as exc:  # the pool must never raise: counted, and the test fails
            report.errors.append(f"{group}: {type(exc).__name__}: {exc}")
            return
        if target is not None:
            return
        report.fallbacks += 1
        if time.monotonic() > deadline:
            report.unanswered.append(group)
            return
        time.sleep(1.0)
