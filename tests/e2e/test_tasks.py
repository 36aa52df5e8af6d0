"""End-to-end: 50 tasks enqueued on the app Machine of `flyfn dev` all end SUCCESSFUL on function
Machines while those are SIGKILLed and stopped at random.

None may be lost: every task ends SUCCESSFUL, its result names the function Machine that ran it
(never the app Machine), and its return value is its own. A run cut off by the chaos runs again
(at-least-once): such duplicates are counted from the tasks' own log and reported, not failed.
Randomness is seeded; the only time limit is a generous safety bound ("too slow to finish").
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support_dev import DevProcess, banner_api, list_machines, project_env, start_project
from tests.support_machines_api import free_loopback_port
from tests.support_postgres import Database
from tests.support_procs import Proc, alive, descendants, identity, machine_pid

PROJECT = Path(__file__).resolve().parent / "tasks_project"
SETTINGS = "tasksproj.settings"
TOKEN = "e2e-tasks-token-Qz81"
APP = "tasksproj"
GROUP = "work"
TASKS = 50
SEED = 13_2026
SAFETY_BOUND = 600.0  # seconds for every task to finish: "too slow", never a loss
CHAOS_EVENTS = 8  # kills and stops, alternating, while tasks are left

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(SAFETY_BOUND + 180)]


@dataclass
class Stack(DevProcess):
    """A running `flyfn dev` of the tasks project, its directory and every process it had."""

    directory: Path = Path()
    seen: set[Proc] = field(default_factory=set)


@pytest.fixture
def stack(tmp_path: Path, postgres_database: Database) -> Iterator[Stack]:
    # The Machines share a fresh PostgreSQL database, as on Fly; the tasks' log is a file.
    shared = {"TASKS_E2E_DIR": str(tmp_path), "DATABASE_URL": postgres_database.url}
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "-v", "0"],
        cwd=PROJECT,
        env={**project_env(SETTINGS, TOKEN), **shared},
        check=True,
        timeout=120,
    )
    port = free_loopback_port()
    lines: list[str] = []
    process = start_project(
        PROJECT,
        SETTINGS,
        TOKEN,
        port=port,
        time_scale=200,
        lines=lines,
        # The Machines see no shell variable: what they share is app secrets.
        secrets=shared,
        env=shared,
    )
    running = Stack(process, port, lines, directory=tmp_path)
    running.api = banner_api(process, lines, cleanup=lambda: _kill(running))
    try:
        yield running
    finally:
        _kill(running)


def _kill(stack: Stack) -> None:
    stack.seen |= descendants(stack.process.pid)
    for proc in stack.seen | {p for p in [identity(stack.process.pid)] if p}:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            if alive(proc):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc[0], sig)
    stack.process.wait(timeout=10)


def function_machines(stack: Stack) -> list[dict[str, Any]]:
    return list_machines(stack.api, APP, TOKEN, **{"metadata.flyfn_group": GROUP})


def chaos(stack: Stack, finished: threading.Event) -> Counter[str]:
    """While tasks are left: every 1 to 2.5 s SIGKILL or stop (alternately) a random started
    function Machine, CHAOS_EVENTS times."""
    rng = random.Random(SEED)
    done: Counter[str] = Counter()
    actions = ["kill", "stop"] * (CHAOS_EVENTS // 2)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    while actions and not finished.wait(rng.uniform(1.0, 2.5)):
        stack.seen |= descendants(stack.process.pid)
        started = [m for m in function_machines(stack) if m["state"] == "started"]
        if not started:
            continue
        machine = rng.choice(started)
        if actions[0] == "kill":
            pid = machine_pid(stack.process.pid, machine["id"])
            if pid is None:
                continue
            os.kill(pid, signal.SIGKILL)
        else:
            path = f"{stack.api}/v1/apps/{APP}/machines/{machine['id']}/stop"
            if httpx.post(path, json={}, headers=headers, timeout=10).status_code != 200:
                continue  # it changed state meanwhile
        done[actions.pop(0)] += 1
    return done


def test_fifty_tasks_all_succeed_on_function_machines_under_chaos(stack: Stack) -> None:
    began = time.monotonic()
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        enqueued = client.post(f"/enqueue/{TASKS}/")
        assert enqueued.status_code == 200, enqueued.text
        app_machine = enqueued.json()["machine"]
        assert enqueued.headers["x-flyfn-machine"] == app_machine  # the app Machine enqueued
        ids: list[str] = enqueued.json()["ids"]
        assert len(set(ids)) == TASKS

        finished = threading.Event()
        outcome: dict[str, Counter[str]] = {}
        chaos_thread = threading.Thread(
            target=lambda: outcome.setdefault("chaos", chaos(stack, finished)), daemon=True
        )
        chaos_thread.start()
        deadline = began + SAFETY_BOUND
        try:
            while True:
                answer = client.post("/results/", json=ids)
                if answer.status_code == 502 and "PU02" in answer.text:
                    # The poll itself (a POST, so never resent) landed on a function Machine the
                    # chaos killed mid-answer, as Fly Proxy may balance it: ask again.
                    assert time.monotonic() < deadline, "too slow to finish (safety bound)"
                    time.sleep(0.5)
                    continue
                assert answer.status_code == 200, answer.text
                results: list[dict[str, Any]] = answer.json()["results"]
                statuses = Counter(r["status"] for r in results)
                if statuses["SUCCESSFUL"] + statuses["FAILED"] == TASKS:
                    break
                assert time.monotonic() < deadline, f"too slow to finish: {dict(statuses)}"
                time.sleep(0.5)
        finally:
            finished.set()
            chaos_thread.join(60)
    elapsed = time.monotonic() - began

    failed = [r for r in results if r["status"] != "SUCCESSFUL"]
    assert failed == [], f"lost tasks: {failed}"
    function_ids = {m["id"] for m in function_machines(stack)}
    for i, result in enumerate(results):
        value = result["value"]
        assert value["i"] == i
        assert value["machine"] == result["worker_ids"][-1]
        assert value["machine"] != app_machine
        assert value["machine"] in function_ids
    chaos_done = outcome.get("chaos", Counter())

    log = (stack.directory / "runs.log").read_text().splitlines()
    starts = Counter(int(line.split()[1]) for line in log if line.startswith("start "))
    ends = Counter(int(line.split()[1]) for line in log if line.startswith("end "))
    assert set(starts) == set(range(TASKS))
    duplicates = sum(n - 1 for n in starts.values())
    attempts = Counter(len(r["worker_ids"]) for r in results)
    machines_used = Counter(r["worker_ids"][-1] for r in results)
    print(
        f"\ne2e tasks: {TASKS} SUCCESSFUL of {TASKS} in {elapsed:.1f}s, lost 0; chaos "
        f"{dict(chaos_done)}; runs started {sum(starts.values())}, completed "
        f"{sum(ends.values())}, duplicates {duplicates} (tasks run more than once: "
        f"{sum(1 for n in starts.values() if n > 1)}); attempts {dict(sorted(attempts.items()))}; "
        f"by Machine {dict(machines_used)}"
    )
    assert chaos_done["kill"] >= 1
    assert chaos_done["stop"] >= 1


# --------------------------------------------------------------------------- scale to zero

NAPS = 50  # tasks of 300 ms, due at once
DEFERRED = 3  # tasks due DEFER seconds after the enqueue
DEFER = 20
STOP_AFTER = 3.0  # seconds after the enqueue, every app Machine is stopped through the API
LATE_BOUND = 120.0  # a deferred task started later than this after its time is "too slow"


def _machines(stack: Stack) -> list[dict[str, Any]]:
    return list_machines(stack.api, APP, TOKEN)


def _is_function(machine: dict[str, Any]) -> bool:
    return bool((machine.get("config") or {}).get("metadata", {}).get("flyfn_group"))


def _rows(database: Database, ids: list[str]) -> list[tuple[str, str, Any, Any, Any]]:
    import psycopg

    with psycopg.connect(database.url) as connection:
        found = connection.execute(
            "SELECT id::text, status, run_after, started_at, finished_at "
            "FROM django_tasks_database_dbtaskresult WHERE id::text = ANY(%s)",
            [ids],
        ).fetchall()
    return [(str(i), str(s), r, st, f) for i, s, r, st, f in found]


def test_work_and_deferred_tasks_finish_with_every_app_machine_stopped(
    stack: Stack, postgres_database: Database
) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    answer = httpx.post(f"{stack.url}/naps/{NAPS}/{DEFERRED}/{DEFER}/", timeout=60)
    enqueued_at = time.monotonic()
    assert answer.status_code == 200, answer.text
    ids: list[str] = answer.json()["ids"] + answer.json()["deferred"]
    deferred = set(answer.json()["deferred"])

    # 3 s later every app Machine is stopped through the Machines API; no request after that.
    time.sleep(max(0.0, enqueued_at + STOP_AFTER - time.monotonic()))
    app_machines = [m for m in _machines(stack) if not _is_function(m)]
    assert app_machines
    for machine in app_machines:
        path = f"{stack.api}/v1/apps/{APP}/machines/{machine['id']}/stop"
        stopped = httpx.post(path, json={}, headers=headers, timeout=30)
        assert stopped.status_code == 200, stopped.text
    deadline = time.monotonic() + SAFETY_BOUND
    while any(m["state"] != "stopped" for m in _machines(stack) if not _is_function(m)):
        assert time.monotonic() < deadline, "the app Machines do not stop"
        time.sleep(0.5)
    stopped_at = time.monotonic()

    # Every task ends, read from the database (a request would start an app Machine).
    while True:
        rows = _rows(postgres_database, ids)
        statuses = Counter(status for _, status, *_ in rows)
        if statuses["SUCCESSFUL"] + statuses["FAILED"] == len(ids):
            break
        assert time.monotonic() < deadline, f"too slow to finish: {dict(statuses)}"
        time.sleep(0.5)
    finished_at = time.monotonic()
    assert statuses["SUCCESSFUL"] == len(ids), f"not all SUCCESSFUL: {dict(statuses)}"

    lateness = sorted(
        (started - run_after).total_seconds()
        for task_id, _, run_after, started, _ in rows
        if task_id in deferred
    )
    assert len(lateness) == DEFERRED
    assert all(late >= 0 for late in lateness), f"a deferred task ran early: {lateness}"
    assert all(late < LATE_BOUND for late in lateness), f"too late: {lateness}"
    last_end = max(end for *_, end in rows)

    # The function Machines stop themselves once drained; nothing starts an app Machine.
    while True:
        machines = _machines(stack)
        if all(m["state"] == "stopped" for m in machines):
            break
        assert time.monotonic() < deadline, f"Machines left up: {machines}"
        time.sleep(0.5)
    drained_at = time.monotonic()
    functions = [m for m in machines if _is_function(m)]
    assert functions
    stopped_lines = [line for line in stack.lines if "this Machine stops" in line]
    print(
        f"\ne2e scale to zero: {len(ids)} SUCCESSFUL of {len(ids)} ({NAPS} now, {DEFERRED} "
        f"deferred {DEFER}s); app Machines stopped {stopped_at - enqueued_at:.1f}s after the "
        f"enqueue; all done {finished_at - enqueued_at:.1f}s after it (last outcome written "
        f"{last_end:%H:%M:%S.%f}); deferred lateness {', '.join(f'{x:.2f}s' for x in lateness)}; "
        f"{len(functions)} function Machines all stopped {drained_at - finished_at:.1f}s after "
        f"the last task ({len(stopped_lines)} stopped themselves)"
    )
