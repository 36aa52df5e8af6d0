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

from tests.conftest import free_loopback_port
from tests.support_dev import DevProcess, banner_api, list_machines, project_env, start_project
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
