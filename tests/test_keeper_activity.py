"""A task group's Machine stops only when none of its worker processes has a request in flight:
the activity they share (`flyfn.tasks.activity`) and the keeper reading it. The tests with a
worker process of their own are end-to-end (the unit set starts no process)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.apps import apps
from django.core.signals import request_finished, request_started

from flyfn import machine_role
from flyfn.tasks import keeper as keeper_module
from flyfn.tasks.activity import MachineActivity
from flyfn.tasks.dispatch import stop_all
from tests.support_procs import child_env

SAFETY_BOUND = 60.0  # seconds for a child process to answer: "too slow", never a speed test

# Another worker process of the Machine: counts a request as begun, then as ended, on command.
WORKER = """
import sys
from pathlib import Path
from flyfn.tasks.activity import MachineActivity

activity = MachineActivity(Path(sys.argv[1]))
for line in sys.stdin:
    getattr(activity, line.strip())()
    print("ok", flush=True)
"""


class Worker:
    """A worker process of the same Machine (its own process, its own locks)."""

    def __init__(self, directory: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )

    def do(self, what: str) -> None:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(what + "\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "ok"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(SAFETY_BOUND)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    other = Worker(tmp_path)
    try:
        yield other
    finally:
        other.kill()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.e2e  # a worker process of its own
def test_a_request_in_another_worker_process_keeps_the_machine_busy(
    tmp_path: Path, worker: Worker
) -> None:
    mine = MachineActivity(tmp_path)
    assert not mine.busy()
    worker.do("started")
    assert mine.busy()
    worker.do("started")  # two in flight there
    worker.do("finished")
    assert mine.busy()
    worker.do("finished")
    assert not mine.busy()
    assert mine.idle_for() < SAFETY_BOUND  # its end was just now


@pytest.mark.e2e  # a worker process of its own
def test_a_worker_that_dies_with_a_request_in_flight_leaves_the_machine_idle(
    tmp_path: Path, worker: Worker
) -> None:
    mine = MachineActivity(tmp_path)
    worker.do("started")
    assert mine.busy()
    worker.kill()  # its lock goes with it: no Machine kept up forever by a dead count
    assert not mine.busy()


def test_idle_time_is_the_machine_s_last_request_in_any_process(tmp_path: Path) -> None:
    clock = Clock()
    keeper_process = MachineActivity(tmp_path, clock=clock)
    other_process = MachineActivity(tmp_path, clock=clock)
    clock.now += 100
    assert keeper_process.idle_for() == 100
    other_process.started()
    clock.now += 30
    other_process.finished()
    clock.now += 4
    assert keeper_process.idle_for() == 4  # the other's request ended 4 s ago
    keeper_process.finished()  # one it never counted: ignored, never below zero
    assert not keeper_process.busy()


def test_without_a_machine_directory_the_process_counts_alone() -> None:
    clock = Clock()
    activity = MachineActivity(None, clock=clock)
    activity.started()
    assert activity.busy()
    clock.now += 50
    activity.finished()
    assert not activity.busy()
    clock.now += 3
    assert activity.idle_for() == 3


def test_a_machine_directory_that_goes_away_never_fails_a_request(tmp_path: Path) -> None:
    directory = tmp_path / "activity"
    directory.mkdir()
    activity = MachineActivity(directory)
    for name in ("last", "busy"):
        (directory / name).unlink(missing_ok=True)
    directory.rmdir()
    activity.started()  # logs that it counts alone, and goes on
    assert activity.busy()
    activity.finished()
    assert not activity.busy()
    assert activity.directory is None


@pytest.mark.e2e  # a worker process of its own
def test_the_keeper_does_not_stop_the_machine_while_another_worker_answers_a_long_request(
    tmp_path: Path, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    stops: list[str] = []
    monkeypatch.setattr(keeper_module, "seconds_until_due", lambda group: None)  # nothing due
    keeper = keeper_module.Keeper(
        stop_machine=lambda: stops.append("stop"), live=True, activity=MachineActivity(tmp_path)
    )
    keeper.group = "tasks"
    worker.do("started")  # a long view, in the other worker, for longer than IDLE_EXIT
    monkeypatch.setattr(keeper_module, "IDLE_EXIT", 0.0)
    assert keeper.step() > 0  # it looks again later
    assert stops == []
    worker.do("finished")
    assert keeper.step() == float("inf")
    assert stops == ["stop"]


def test_request_signals_count_a_task_group_machine_s_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    activity = MachineActivity(tmp_path)
    keeper = keeper_module.Keeper(stop_machine=lambda: None, live=True, activity=activity)
    monkeypatch.setattr(keeper, "start", lambda group: None)  # no thread of its own here
    monkeypatch.setattr(keeper_module, "_keeper", keeper)
    monkeypatch.setattr(keeper_module, "_tracked", {"tasks": True})  # a task group's Machine
    other = MachineActivity(tmp_path)  # another process's view of the Machine
    # The receivers let themselves go at a request on any other Machine (this process's earlier
    # tests): connected again as the app is ready.
    apps.get_app_config("flyfn_tasks").ready()
    try:
        with machine_role.override_role(machine_role.function("tasks")):
            request_started.send(sender=None)
            assert other.busy()
            request_finished.send(sender=None)
            assert not other.busy()
    finally:
        stop_all()  # what the first request started (dispatchers), if this is the first


def test_the_keeper_counts_nothing_off_a_function_machine(tmp_path: Path) -> None:
    activity = MachineActivity(tmp_path)
    keeper = keeper_module.Keeper(stop_machine=lambda: None, live=False, activity=activity)
    keeper.request()
    assert not MachineActivity(tmp_path).busy()
