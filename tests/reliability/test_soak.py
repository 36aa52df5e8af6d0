"""Soak: 5,000 requests at concurrency 50 through `flyfn dev` while function Machines are stopped,
suspended and killed at random.

Every request is sent and every answer checked: zero lost (each answer is the right body, or a
clean 503 with Retry-After where the group's fallback allows one), exactly the configured number of
function Machines at the end, and no process left behind once the command is stopped. Randomness is
seeded. The only time limit is a generous safety bound: hitting it fails as "too slow to finish",
never as lost requests. The throughput is printed; its target lives in `make bench`.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import queue
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support_dev import DevProcess, banner_api, start_project
from tests.support_machines_api import free_loopback_port
from tests.support_postgres import Database
from tests.support_procs import Proc, alive, descendants, identity, machine_pid

PROJECT = Path(__file__).resolve().parent / "project"
TOKEN = "soak-dev-token-Vh4qM2"  # distinctive: it must never show up in the output
APP = "soakproj"
GROUPS = {"soak": 2, "strict": 1}  # as configured in soakproj/settings.py
REQUESTS = 5000
CONCURRENCY = 50
SEED = 6_2024
SAFETY_BOUND = 900.0  # seconds for the whole load: "too slow to finish", never a loss
# Where each view may run: `strict` falls back with an error, so never on the app Machine (None).
# An ordinary view may run on a function Machine, as on Fly: one bounced there by another function
# Machine runs where it is rather than go round them (Fly Proxy balances over every Machine).
ALLOWED_GROUPS: dict[str, set[str | None]] = {
    "plain": {None, "soak", "strict"},
    "soak": {"soak", None},
    "strict": {"strict"},
}
TRANSITIONAL = {"created", "starting", "stopping", "suspending", "restarting", "destroying"}

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(SAFETY_BOUND + 120)]


@dataclass
class Stack(DevProcess):
    """A running `flyfn dev` of the soak project: what it printed and every process it had."""

    seen: set[Proc] = field(default_factory=set)

    def track(self) -> None:
        self.seen |= descendants(self.process.pid)


def _start(database_url: str) -> Stack:
    port = free_loopback_port()
    lines: list[str] = []
    # Every Machine reads the same PostgreSQL database, as on Fly: the soak's serverless answers
    # are computed by it, so the chaos runs against real connections.
    shared = {"DATABASE_URL": database_url}
    process = start_project(
        PROJECT,
        "soakproj.settings",
        TOKEN,
        port=port,
        time_scale=200,
        lines=lines,
        secrets=shared,
        env=shared,
    )
    stack = Stack(process, port, lines)
    stack.api = banner_api(process, lines, cleanup=lambda: _kill(stack))
    stack.track()
    return stack


def _kill(stack: Stack) -> None:
    """Last resort: every process the stack ever had, by pid (SIGCONT first for suspended ones)."""
    stack.track()
    for proc in stack.seen | {p for p in [identity(stack.process.pid)] if p}:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            if alive(proc):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc[0], sig)
    stack.process.wait(timeout=10)


@pytest.fixture
def stack(postgres_database: Database) -> Iterator[Stack]:
    running = _start(postgres_database.url)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            _kill(running)


# ----------------------------------------------------------------------------------- the load


@dataclass(frozen=True)
class Call:
    view: str
    n: int

    @property
    def path(self) -> str:
        return f"/{self.view}/{self.n}/"

    def expected(self) -> int:
        return {"plain": self.n, "soak": self.n * 3, "strict": self.n + 7}[self.view]


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def verdict(call: Call, answer: Answer | BaseException) -> str:
    """`ok:<view>@<where>`, `refused` (a clean 503 the policy allows) or `lost:<why>`."""
    if isinstance(answer, BaseException):
        return f"lost:{type(answer).__name__}"
    if answer.status == 503 and call.view != "plain":
        if answer.headers.get("retry-after", "").isdigit():
            return "refused"
        return "lost:503 without Retry-After"
    if answer.status != 200:
        detail = answer.body.decode(errors="replace").partition("\n")[0][:160]
        return f"lost:{answer.status} {detail}"
    try:
        data: Any = json.loads(answer.body)
    except ValueError:
        return "lost:not JSON"
    if data.get("view") != call.view or data.get("value") != call.expected():
        return "lost:wrong body"
    group = data.get("group")
    allowed = ALLOWED_GROUPS[call.view]
    if group not in allowed:
        return f"lost:ran in group {group}"
    return f"ok:{call.view}@{group or 'app'}"


def load(port: int, calls: list[Call], deadline: float) -> list[str | None]:
    """Send every call from CONCURRENCY threads, one keep-alive connection each.

    A call is None when the safety bound came before it was answered: unfinished, not lost.

    Plain http.client in threads: a fraction of an async client's CPU, which on 2 cores is CPU
    taken from the stack under test.
    """
    pending: queue.SimpleQueue[tuple[int, Call]] = queue.SimpleQueue()
    for item in enumerate(calls):
        pending.put(item)
    verdicts: list[str | None] = [None] * len(calls)

    def worker() -> None:
        # No per-request time limit but the safety bound: on a loaded machine one request can
        # wait out several cold boots of a Machine the chaos keeps killing, and that is slow,
        # not lost.
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=SAFETY_BOUND)
        try:
            while time.monotonic() < deadline:
                try:
                    index, call = pending.get_nowait()
                except queue.Empty:
                    return
                try:
                    connection.request("GET", call.path)
                    response = connection.getresponse()
                    answer: Answer | BaseException = Answer(
                        response.status,
                        {k.lower(): v for k, v in response.getheaders()},
                        response.read(),
                    )
                except TimeoutError:
                    connection.close()
                    continue  # no answer within the safety bound: unfinished, not lost
                except (OSError, http.client.HTTPException) as exc:
                    answer = exc
                    connection.close()  # a fresh connection for the next call
                verdicts[index] = verdict(call, answer)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 61)
    return verdicts


# ---------------------------------------------------------------------------------- the chaos


async def function_machines(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await api.get(f"/v1/apps/{APP}/machines")
    if response.status_code != 200:
        return []
    machines: list[dict[str, Any]] = response.json()
    return [m for m in machines if (m.get("config") or {}).get("env", {}).get("FLYFN_GROUP")]


# A Machine suspended with a request in it keeps that request until it resumes (its TCP connections
# survive, as on Fly), and Fly resumes it only when a request is routed to it. Fly's autostop never
# suspends a Machine that is serving; the chaos does, so it thaws what it froze and nothing asked
# for again, as an operator would: a pause, not a Machine frozen for good.
THAW_AFTER = 10.0  # seconds


async def chaos(stack: Stack, api: httpx.AsyncClient, stop: asyncio.Event) -> Counter[str]:
    """Every 0.5 to 1.5 s: stop, suspend or SIGKILL a random started function Machine (and start
    again one the chaos suspended over `THAW_AFTER` seconds ago that is still suspended)."""
    rng = random.Random(SEED + 1)
    done: Counter[str] = Counter()
    suspended: dict[str, float] = {}  # Machine id: when the chaos suspended it
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        stack.track()
        listed = await function_machines(api)
        done["thaw"] += await thaw(api, listed, suspended, THAW_AFTER)
        machines = [m for m in listed if m["state"] == "started"]
        if not machines:
            continue
        machine = rng.choice(machines)
        action = rng.choice(["stop", "suspend", "kill"])
        if action == "kill":
            pid = machine_pid(stack.process.pid, machine["id"])
            if pid is None:
                continue
            os.kill(pid, signal.SIGKILL)
        else:
            path = f"/v1/apps/{APP}/machines/{machine['id']}/{action}"
            response = await api.post(path, json={} if action == "stop" else None)
            if response.status_code != 200:  # rate limited, or it changed state meanwhile
                continue
            if action == "suspend":
                suspended[machine["id"]] = time.monotonic()
        done[action] += 1
    done["thaw"] += await thaw(api, await function_machines(api), suspended, 0.0)
    return done


async def thaw(
    api: httpx.AsyncClient,
    machines: list[dict[str, Any]],
    suspended: dict[str, float],
    after: float,
) -> int:
    """Start the Machines the chaos suspended over `after` seconds ago that are still suspended."""
    thawed = 0
    now = time.monotonic()
    for machine in machines:
        since = suspended.get(machine["id"])
        if since is None or now - since < after:
            continue
        del suspended[machine["id"]]
        if machine["state"] == "suspended":
            response = await api.post(f"/v1/apps/{APP}/machines/{machine['id']}/start")
            thawed += response.status_code == 200
    return thawed


async def soak(stack: Stack, calls: list[Call]) -> tuple[list[str | None], Counter[str]]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=stack.api, headers=headers, timeout=10) as api:
        stop = asyncio.Event()
        chaos_task = asyncio.ensure_future(chaos(stack, api, stop))
        try:
            deadline = time.monotonic() + SAFETY_BOUND
            verdicts = await asyncio.to_thread(load, stack.port, calls, deadline)
        finally:
            stop.set()
            actions = await chaos_task
    return verdicts, actions


def settled_machines(stack: Stack, timeout: float = 120) -> dict[str, list[str]]:
    """Each group's Machines (id:state) once none is in a transitional state."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {TOKEN}"}
    while True:
        response = httpx.get(f"{stack.api}/v1/apps/{APP}/machines", headers=headers, timeout=10)
        if response.status_code == 200:
            machines = response.json()
            groups: dict[str, list[str]] = {}
            for m in machines:
                group = (m.get("config") or {}).get("env", {}).get("FLYFN_GROUP")
                if group:
                    groups.setdefault(group, []).append(f"{m['id']}:{m['state']}")
            busy = any(m["state"] in TRANSITIONAL for m in machines)
            if not busy or time.monotonic() > deadline:
                return groups
        time.sleep(0.2)


def test_soak_under_random_stops_suspends_and_kills(stack: Stack, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    calls = [
        Call(rng.choices(("soak", "strict", "plain"), weights=(6, 2, 2))[0], rng.randrange(10**6))
        for _ in range(REQUESTS)
    ]
    begun = time.monotonic()
    verdicts, actions = asyncio.run(soak(stack, calls))
    seconds = time.monotonic() - begun
    unanswered = verdicts.count(None)
    summary = Counter(v for v in verdicts if v is not None)
    sent = REQUESTS - unanswered
    report = (
        f"{sent} requests in {seconds:.1f}s ({sent / seconds:.0f} req/s); "
        f"chaos {dict(actions)}; {dict(summary)}"
    )
    log = tmp_path / "flyfn-dev.log"
    log.write_text("\n".join(stack.lines))
    report += f"\n(the stack's output: {log})"
    print(report)

    assert unanswered == 0, (
        f"too slow to finish: {unanswered} of {REQUESTS} requests unanswered after the "
        f"{SAFETY_BOUND:.0f} s safety bound (not a loss)\n{report}"
    )
    lost = [(c.path, v) for c, v in zip(calls, verdicts, strict=True) if v and v[:2] != "ok"]
    lost = [(p, v) for p, v in lost if v != "refused"]
    routes = [line for path, _ in lost[:10] for line in stack.lines if f" {path} " in line]
    assert lost == [], f"{report}\nfirst lost: {lost[:10]}\ntheir routes:\n" + "\n".join(routes)
    assert {"stop", "suspend", "kill"} <= set(actions), report  # the chaos really happened
    # Every group served on its own Machines too, not only through fallbacks.
    assert summary["ok:soak@soak"] > 0, report
    assert summary["ok:strict@strict"] > 0, report

    groups = settled_machines(stack)
    assert {g: len(ms) for g, ms in groups.items()} == GROUPS, groups

    stack.track()
    stack.process.send_signal(signal.SIGTERM)
    assert stack.process.wait(timeout=30) == 0
    deadline = time.monotonic() + 60
    while any(alive(p) for p in stack.seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in stack.seen if alive(p)]
    assert left == [], f"processes left behind: {left}"
    assert len(stack.seen) >= 1 + sum(GROUPS.values())  # the app Machine and every function one
    output = "\n".join(stack.lines)
    assert TOKEN not in output
    assert "Traceback" not in output, json.dumps(stack.lines[-60:], indent=0)
