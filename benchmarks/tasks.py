"""Benchmark area `tasks`: flyfn.tasks beside django-tasks-db's own worker, on the same machine.

One `flyfn dev` of benchmarks.taskssite (its app Machine enqueues; flyfn's tasks run on a
function Machine of group `bench`) and, beside it, `manage.py db_worker --backend db` (django-tasks-
db's always-on worker, default 1 s poll interval) on the same PostgreSQL database, as on Fly (a
PostgreSQL 16 server of the `pgserver` wheel, benchmarks/postgres.py, started for the run; the
Machines get its DATABASE_URL as an app secret, `flyfn dev --secrets-file`). For each side:
- enqueue_p50_ms: one `enqueue()` committed on its own, timed inside the app Machine's view;
- tasks_per_second: N no-op tasks committed at once, from the first enqueue to the last finish;
- warm_enqueue_to_start_s: a task's `started_at - enqueued_at` when the runner is idle but up
  (flyfn: its function Machine has just finished a task; db_worker: idle between polls);
- cold_enqueue_to_start_s: the same once flyfn's function Machine has stopped itself (a task
  group's Machine runs with autostop off; its keeper stops it after IDLE_EXIT seconds without
  work): a wake through the proxy and a Machine boot. db_worker has no cold state: its figure is
  its idle one.
The ratios are flyfn's figure over db_worker's.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.e2e import DevLog
from benchmarks.elastic import Api
from benchmarks.harness import JSONDict, median, percentile, ratio, rounded
from benchmarks.runner import LOOPBACK, area_main, child_env, free_port, log, require, spawned

SETTINGS = "benchmarks.taskssite.settings"
TIME_SCALE = 150.0  # autostop's pass every 300 / 150 = 2 s: an idle Machine stops within 4 s
AUTOSTOP_PASS = 300.0 / TIME_SCALE
SAFETY_BOUND = 240.0  # seconds for any batch of tasks to finish
GROUP = "bench"  # the task group of benchmarks.taskssite's flyfn backend
# flyfn.tasks.keeper.IDLE_EXIT (its module is not imported here: it needs Django set up).
IDLE_EXIT = 10.0
TOKEN = "flyfn-bench-tasks"  # the emulated API's token (FLYFN_DEV_TOKEN), to list Machines


def project_env(database_url: str) -> dict[str, str]:
    """The environment of the commands run beside the Machines (migrate, flyfn dev, db_worker)."""
    return child_env(
        {"DJANGO_SETTINGS_MODULE": SETTINGS, "DATABASE_URL": database_url, "FLYFN_DEV_TOKEN": TOKEN}
    )


def secrets_file(directory: Path, database_url: str) -> Path:
    """The app's secrets for `flyfn dev --secrets-file`: the Machines see no shell variable."""
    if {"'", "\n"} & set(database_url):
        raise ValueError("DATABASE_URL must fit in single quotes")
    path = directory / "secrets.env"
    path.write_text(f"DATABASE_URL='{database_url}'\n")
    return path


def finished(client: httpx.Client, ids: list[str]) -> list[dict[str, Any]]:
    """The tasks' results once all have finished (RuntimeError if one failed)."""
    deadline = time.monotonic() + SAFETY_BOUND
    while True:
        results: list[dict[str, Any]] = client.post("/results/", json=ids).json()["results"]
        if all(r["status"] in ("SUCCESSFUL", "FAILED") for r in results):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"tasks unfinished after {SAFETY_BOUND:g}s")
        time.sleep(0.02)
    bad = [r for r in results if r["status"] != "SUCCESSFUL"]
    if bad:
        raise RuntimeError(f"{len(bad)} tasks failed")
    return results


def enqueue(client: httpx.Client, backend: str, n: int, *, each: bool) -> JSONDict:
    response = client.post(f"/enqueue/{backend}/{n}/", params={"each": "1"} if each else {})
    if response.status_code != 200:
        raise RuntimeError(f"enqueue: {response.status_code} {response.text[:200]}")
    data: JSONDict = response.json()
    return data


def start_delay(client: httpx.Client, backend: str) -> float:
    """Seconds from enqueue to start of one task."""
    (result,) = finished(client, enqueue(client, backend, 1, each=False)["ids"])
    return float(result["started_at"] - result["enqueued_at"])


def wait_stopped(api: Api, dev_log: DevLog, mark: int) -> None:
    """Until the function Machine has stopped itself (its keeper's line, then its state)."""
    dev_log.wait_for("this machine stops", after=mark, timeout=IDLE_EXIT * 4 + 30, also="fn:")
    deadline = time.monotonic() + 60
    while (states := api.states(GROUP)) != ["stopped"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the function Machine did not stop: {states}")
        time.sleep(0.2)


def measure(
    client: httpx.Client, backend: str, *, n: int, burst: int, warm: int, dev_log: DevLog | None
) -> JSONDict:
    log(f"tasks: {backend}: {n} enqueues, one commit each")
    timed = enqueue(client, backend, n, each=True)
    finished(client, timed["ids"])
    log(f"tasks: {backend}: {burst} tasks in one commit")
    results = finished(client, enqueue(client, backend, burst, each=False)["ids"])
    first = min(r["enqueued_at"] for r in results)
    last = max(r["finished_at"] for r in results)
    log(f"tasks: {backend}: enqueue to start x{warm}, warm")
    warm_delays = []
    for _ in range(warm):
        time.sleep(0.3)  # idle, well within an autostop pass
        warm_delays.append(start_delay(client, backend))
    cold_delays: list[float] = []
    if dev_log is not None:
        api = Api(dev_log, TOKEN)
        for _ in range(max(1, warm // 2)):
            log(f"tasks: {backend}: waiting for the function Machine to stop itself")
            wait_stopped(api, dev_log, mark=len(dev_log.lines()))
            time.sleep(0.3)
            cold_delays.append(start_delay(client, backend))
    return {
        "enqueue_p50_ms": percentile(timed["enqueue_ms"], 50),
        "tasks_per_second": burst / (last - first),
        "warm": median(warm_delays),
        "cold": median(cold_delays) if cold_delays else median(warm_delays),
    }


def run_both(
    directory: Path, database_url: str, n: int, burst: int, warm: int
) -> tuple[JSONDict, JSONDict]:
    """(flyfn's figures, db_worker's) of one `flyfn dev` and one db_worker on `database_url`."""
    env = project_env(database_url)
    migrate = [sys.executable, "-m", "django", "migrate", "-v", "0"]
    with spawned(migrate, env=env) as proc:
        if proc.wait(timeout=120) != 0:
            raise RuntimeError("migrate failed")
    port = free_port()
    argv = [sys.executable, "-m", "django", "flyfn", "dev"]
    argv += ["--port", str(port), "--time-scale", str(TIME_SCALE)]
    argv += ["--secrets-file", str(secrets_file(directory, database_url))]
    dev_log = DevLog(directory / "dev.log")
    worker = [sys.executable, "-m", "django", "db_worker", "--backend", "db"]
    worker += ["--queue-name", "default", "--no-startup-delay", "--no-reload"]
    with (
        dev_log.path.open("ab") as out,
        # In the run's directory: no fly.toml there (the repository's is the demo's), so `flyfn
        # dev` runs this project's ASGI app alone, its settings' groups for the function Machines.
        spawned(argv, env=env, cwd=directory, log_file=out) as dev,
        (directory / "worker.log").open("ab") as worker_out,
        spawned(worker, env=env, log_file=worker_out),
    ):
        base = f"http://{LOOPBACK}:{port}"
        with httpx.Client(base_url=base, timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.post("/results/", json=[]).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if dev.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "flyfn dev did not answer:\n" + "\n".join(dev_log.lines()[-8:])
                    )
                time.sleep(0.1)
            log("tasks: first flyfn task (creates and boots the function Machine)")
            start_delay(client, "default")
            worker_side = measure(client, "db", n=n, burst=burst, warm=warm, dev_log=None)
            flyfn_side = measure(client, "default", n=n, burst=burst, warm=warm, dev_log=dev_log)
    return flyfn_side, worker_side


def run(quick: bool) -> JSONDict:
    require("flyfn.tasks", "django_tasks_db", "uvicorn", "pgserver", "psycopg", "dj_database_url")
    from benchmarks.postgres import Postgres

    n, burst, warm = (30, 60, 2) if quick else (200, 300, 6)
    server = Postgres.start()
    try:
        database = server.create_database("bench_tasks")
        with tempfile.TemporaryDirectory(prefix="flyfn-bench-tasks-") as tmp:
            flyfn_side, worker_side = run_both(Path(tmp), database.url, n, burst, warm)
    finally:
        server.stop()

    def pair(key: str, digits: int = 3) -> JSONDict:
        return {
            "flyfn": rounded(flyfn_side[key], digits),
            "db_worker": rounded(worker_side[key], digits),
        }

    return {
        "enqueue_p50_ms": pair("enqueue_p50_ms"),
        "tasks_per_second": pair("tasks_per_second", 1),
        "warm_enqueue_to_start_s": pair("warm"),
        "cold_enqueue_to_start_s": pair("cold"),
        "enqueue_p50_ratio": rounded(
            ratio(flyfn_side["enqueue_p50_ms"], worker_side["enqueue_p50_ms"])
        ),
        "tasks_per_second_ratio": rounded(
            ratio(flyfn_side["tasks_per_second"], worker_side["tasks_per_second"])
        ),
        "warm_start_ratio": rounded(ratio(flyfn_side["warm"], worker_side["warm"])),
        "cold_start_ratio": rounded(ratio(flyfn_side["cold"], worker_side["cold"])),
        "enqueues": n,
        "burst": burst,
        "autostop_pass_s": AUTOSTOP_PASS,
        "keeper_idle_exit_s": IDLE_EXIT,
        "database": "PostgreSQL 16",
        "db_worker_interval_s": 1.0,
    }


if __name__ == "__main__":
    sys.exit(area_main(run))
