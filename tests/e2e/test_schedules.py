"""End-to-end: an hourly periodic task under `flyfn dev --time-scale 400` (an hour lasts 9 s).

`manage.py flyfn prepare` creates the scheduled Machine; every app Machine is stopped through the
Machines API; the emulated Fly starts the scheduled Machine once per (scaled) hour, its `flyfn
tick` enqueues the slot's task and wakes the group, and the task runs on a function Machine: one
run for each consecutive slot (a start that misses a slot is caught up by the next). Then the
whole emulated platform is frozen (SIGSTOP) for more than three intervals: the scheduled Machine
cannot start; at its next start it runs the slot before its own late and its own, and the slots
between are skipped, as documented. Every run's task ran exactly once.
The only time limits are generous safety bounds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from flyfn.tasks.schedules import parse_schedules
from tests.support_dev import DevProcess, banner_api, list_machines, project_env, start_project
from tests.support_machines_api import free_loopback_port
from tests.support_postgres import Database
from tests.support_procs import alive, descendants, identity

PROJECT = Path(__file__).resolve().parent / "tasks_project"
SETTINGS = "tasksproj.settings_schedules"
TOKEN = "e2e-schedules-token-Wc4"
APP = "tasksproj"
GROUP = "work"
# An hour lasts 9 s: a look must end within two of them for every slot to run (the one before
# its own is caught up), a generous bound for a Django process under load.
TIME_SCALE = 400.0
PERIOD = 3600.0 / TIME_SCALE
RUNS_BEFORE = 3  # runs before the freeze
# More than three intervals: the first look after it is at least three slots after the last one
# before it, so at least one slot is skipped (the one before the look's own runs late).
FREEZE = 3.5 * PERIOD
SAFETY_BOUND = 240.0

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(SAFETY_BOUND + 120)]

HOURLY = parse_schedules(
    "default", {"schedules": {"t": {"task": "tasksproj.tasks.tick", "every": "hourly"}}}
)["t"]


@pytest.fixture
def stack(tmp_path: Path, postgres_database: Database) -> Iterator[tuple[DevProcess, Path]]:
    shared = {"TASKS_E2E_DIR": str(tmp_path), "DATABASE_URL": postgres_database.url}
    environment = {**project_env(SETTINGS, TOKEN), **shared}
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "-v", "0"],
        cwd=PROJECT,
        env=environment,
        check=True,
        timeout=120,
    )
    lines: list[str] = []
    process = start_project(
        PROJECT,
        SETTINGS,
        TOKEN,
        port=free_loopback_port(),
        time_scale=TIME_SCALE,
        lines=lines,
        secrets=shared,
        env=shared,
    )
    dev = DevProcess(process, 0, lines)
    seen: set[Any] = set()

    def kill() -> None:
        seen.update(descendants(process.pid))
        for proc in seen | {p for p in [identity(process.pid)] if p}:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                if alive(proc):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc[0], sig)
        process.wait(timeout=10)

    dev.api = banner_api(process, lines, cleanup=kill)
    try:
        yield dev, tmp_path
    finally:
        kill()


def machines(dev: DevProcess) -> list[dict[str, Any]]:
    return list_machines(dev.api, APP, TOKEN)


def metadata(machine: dict[str, Any]) -> dict[str, str]:
    return dict((machine.get("config") or {}).get("metadata") or {})


def is_app_machine(machine: dict[str, Any]) -> bool:
    return not {"flyfn_group", "flyfn_schedule"} & set(metadata(machine))


def runs(database: Database) -> list[tuple[datetime, str, list[str]]]:
    """Every slot's run: its slot, its task's status and the Machines that ran it."""
    return [(slot, status, workers) for slot, status, workers, _ in enqueued(database)]


def enqueued(database: Database) -> list[tuple[datetime, str, list[str], datetime]]:
    """Every slot's run as `runs` gives it, and when it was enqueued."""
    import psycopg

    with psycopg.connect(database.url) as connection:
        found = connection.execute(
            "SELECT r.slot, t.status, t.worker_ids, r.enqueued_at FROM flyfn_tasks_scheduledrun r"
            " JOIN django_tasks_database_dbtaskresult t ON t.id = r.task_id ORDER BY r.slot"
        ).fetchall()
    return [(slot, str(status), list(workers), at) for slot, status, workers, at in found]


def wait_for_runs(dev: DevProcess, database: Database, count: int, deadline: float) -> list[Any]:
    """Once `count` slots have run and their tasks finished, every run."""
    while True:
        found = runs(database)
        if len(found) >= count and all(s in ("SUCCESSFUL", "FAILED") for _, s, _ in found):
            return found
        assert time.monotonic() < deadline, f"too slow: {found}\n" + "\n".join(dev.lines[-60:])
        time.sleep(0.2)


def ticking(pid: int) -> bool:
    """Whether a scheduled Machine's `flyfn tick` runs under the stack `pid`."""
    for child, _ in descendants(pid):
        with contextlib.suppress(psutil.Error):
            if "tick" in psutil.Process(child).cmdline():
                return True
    return False


def prepare(dev: DevProcess, database: Database, image: str) -> str:
    """`manage.py flyfn prepare` as a release command would run it against the stack."""
    env = {
        **project_env(SETTINGS, TOKEN),
        "DATABASE_URL": database.url,
        "FLY_APP_NAME": APP,
        "FLY_API_TOKEN": TOKEN,
        "FLY_API_HOSTNAME": dev.api,
        "FLY_IMAGE_REF": image,
    }
    done = subprocess.run(
        [sys.executable, "-m", "django", "flyfn", "prepare"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_an_hourly_schedule_runs_once_per_slot_on_function_machines_with_app_machines_stopped(
    stack: tuple[DevProcess, Path], postgres_database: Database
) -> None:
    dev, directory = stack
    deadline = time.monotonic() + SAFETY_BOUND
    (app_machine,) = [m for m in machines(dev) if is_app_machine(m)]
    image = app_machine["config"]["image"]

    # Every app Machine stopped through the Machines API before the schedule exists.
    headers = {"Authorization": f"Bearer {TOKEN}"}
    path = f"{dev.api}/v1/apps/{APP}/machines/{app_machine['id']}/stop"
    assert httpx.post(path, json={}, headers=headers, timeout=30).status_code == 200
    while any(m["state"] != "stopped" for m in machines(dev) if is_app_machine(m)):
        assert time.monotonic() < deadline, "the app Machine does not stop"
        time.sleep(0.2)
    stopped_at_ms = time.time() * 1000

    out = prepare(dev, postgres_database, image)
    assert "schedule hourly: scheduled Machine" in out
    (scheduled,) = [m for m in machines(dev) if "flyfn_schedule" in metadata(m)]
    assert scheduled["config"]["schedule"] == "hourly"

    before = wait_for_runs(dev, postgres_database, RUNS_BEFORE, deadline)

    # Freeze the emulated platform between two runs: nothing starts the scheduled Machine.
    while True:
        state = next(m["state"] for m in machines(dev) if m["id"] == scheduled["id"])
        if state == "stopped":
            os.kill(dev.process.pid, signal.SIGSTOP)
            if not ticking(dev.process.pid):  # it did not start again meanwhile
                break
            os.kill(dev.process.pid, signal.SIGCONT)
        assert time.monotonic() < deadline, "the scheduled Machine does not stop"
        time.sleep(0.05)
    before = runs(postgres_database)
    try:
        time.sleep(FREEZE)
    finally:
        os.kill(dev.process.pid, signal.SIGCONT)
    thawed_at = datetime.now().astimezone()

    # The first look after the thaw enqueues two slots: the one before its own (late), its own.
    after = wait_for_runs(dev, postgres_database, len(before) + 2, deadline)
    new = after[len(before) :]
    functions = {
        m["id"] for m in list_machines(dev.api, APP, TOKEN, **{"metadata.flyfn_group": GROUP})
    }

    assert all(status == "SUCCESSFUL" for _, status, _ in after), after
    assert all(workers and workers[-1] in functions for _, _, workers in after), after
    # Exactly once: each slot's task ran one time (the task notes every run).
    ticks = [line for line in (directory / "runs.log").read_text().splitlines() if "tick" in line]
    assert len(ticks) == len(after)
    # Before the freeze, every slot from the first on ran: consecutive slots.
    hours = [round((slot - before[0][0]).total_seconds() / PERIOD) for slot, _, _ in before]
    assert hours == list(range(len(before))), before
    # After it: the first look's slot is at or after the thaw's, the slot before it ran late with
    # it, and the slots between the last run before the freeze and that one were skipped.
    late, own = new[0][0], new[1][0]
    assert own >= HOURLY.slot_at(thawed_at, TIME_SCALE)
    assert late == HOURLY.previous_slot(own, TIME_SCALE)
    # `late` was enqueued after its slot had passed (by the look that enqueued `own`): a look
    # that ran only its own slot would have enqueued it within it.
    when = {slot: at for slot, _, _, at in enqueued(postgres_database)}
    assert HOURLY.slot_at(when[late], TIME_SCALE) >= own
    skipped = round((late - before[-1][0]).total_seconds() / PERIOD) - 1
    assert skipped >= 1
    # And on from there, consecutive slots again.
    hours = [round((slot - late).total_seconds() / PERIOD) for slot, _, _ in new]
    assert hours == list(range(len(new))), new
    # Each wake goes through Fly Proxy to an app Machine, which it starts, and autostop stops.
    app_starts = sum(
        1
        for m in machines(dev)
        if is_app_machine(m)
        for event in m.get("events") or []
        if event.get("type") == "start" and (event.get("timestamp") or 0) > stopped_at_ms
    )
    print(
        f"\ne2e schedules: {len(after)} runs, one per slot, on function Machine(s) "
        f"{sorted({w[-1] for _, _, w in after})}; {skipped} slot(s) skipped during a "
        f"{FREEZE:g}s freeze, then slot {late:%H:%M:%S} late and {own:%H:%M:%S}; "
        f"the app Machine was started {app_starts} time(s) by the wakes (Fly Proxy), and "
        "stopped again by autostop"
    )
