"""Periodic tasks: their declaration (`OPTIONS["schedules"]`), slots, the one run per slot (also
under concurrency, on PostgreSQL), the checks, `manage.py flyfn tick | prepare | gc | status`, and
the emulated Fly's starts of scheduled Machines on a virtual clock."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import OperationalError, connection
from django.test import modify_settings, override_settings
from django.utils import timezone
from django_tasks_db.compat import task_backends
from django_tasks_db.models import DBTaskResult

from flyfn import machine_role
from flyfn.emulator.dev import _task_figures
from flyfn.emulator.live import LivePage
from flyfn.emulator.schedule import FlySchedules, scaled_period
from flyfn.emulator.state import MachinesEmulator
from flyfn.machine_role import MachineEnv
from flyfn.machines.models import CreateMachineRequest, Machine, MachineConfig
from flyfn.tasks import FlyMachinesBackend, periodic
from flyfn.tasks.dispatch import Dispatcher, stop_all
from flyfn.tasks.models import ScheduledRun
from flyfn.tasks.periodic import (
    Ticker,
    TickerLock,
    enqueue_due,
    enqueue_slot,
    error_text,
    runs_on_app_machines,
    schedule_rows,
    start_ticker,
    stop_ticker,
)
from flyfn.tasks.runner import WORKER_ID_MAX, worker_id
from flyfn.tasks.schedule_checks import check_schedules
from flyfn.tasks.schedules import SCALED_ORIGIN, Schedule, parse_schedules, time_scale
from tests.support_machines_api import EMULATOR_APP, MachinesAPI

SAFETY_BOUND = 60.0
SCHEDULES = {
    "hourly-note": {"task": "tests.testapp.tasks.note", "every": "hourly", "args": ["tick"]},
    "daily-sum": {
        "task": "tests.testapp.tasks.add",
        "every": "daily",
        "kwargs": {"a": 1, "b": 2},
        "queue_name": "reports",
        "priority": 5,
    },
    "five-minutes": {"task": "tests.testapp.tasks.note", "cron": "*/5 * * * *", "args": ["c"]},
}


SCHEDULES_PARSED = parse_schedules("default", {"schedules": SCHEDULES})


def tasks_setting(schedules: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {
        "default": {
            "BACKEND": "flyfn.tasks.FlyMachinesBackend",
            "QUEUES": [],
            "OPTIONS": {"group": "tasks", "schedules": schedules, **options},
        }
    }


def backend() -> FlyMachinesBackend:
    found = task_backends["default"]
    assert isinstance(found, FlyMachinesBackend)
    return found


@pytest.fixture
def scheduled(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlyMachinesBackend]:
    """The test project with SCHEDULES; enqueued tasks are not delivered (no dispatcher runs)."""
    settings.TASKS = tasks_setting(SCHEDULES)
    monkeypatch.setattr(Dispatcher, "notify", lambda self, group=None: None)
    yield backend()
    stop_ticker()
    stop_all()


def parse(schedules: Any) -> dict[str, Schedule]:
    return parse_schedules("default", {"schedules": schedules})


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --------------------------------------------------------------------------- declaring


def test_schedules_parse_with_their_defaults() -> None:
    found = parse(SCHEDULES)
    assert found["hourly-note"].fly_interval == "hourly"
    assert found["hourly-note"].args == ["tick"]
    assert found["daily-sum"].queue_name == "reports"
    assert found["five-minutes"].fly_interval is None
    assert found["five-minutes"].when == "cron '*/5 * * * *'"
    assert parse({"n": {"task": "a.b", "every": 300}})["n"].when == "every 300 s"
    assert parse_schedules("default", {}) == {}


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ({"n": {"task": "a.b"}}, r"\['n'\]: give exactly one of 'every' and 'cron'"),
        (
            {"n": {"task": "a.b", "every": "hourly", "cron": "* * * * *"}},
            "give exactly one of 'every' and 'cron'",
        ),
        ({"n": {"task": "a.b", "every": "yearly"}}, r"\['every'\]: must be one of hourly, daily"),
        ({"n": {"task": "a.b", "every": 59}}, r"whole number of seconds >= 60 \(got 59\)"),
        ({"n": {"task": "a.b", "every": True}}, r"\(got True\)"),
        ({"n": {"task": "a.b", "cron": "61 * * * *"}}, r"\['cron'\]: must be a cron expression"),
        ({"n": {"task": "a.b", "cron": "* * * * * *"}}, "5 fields"),
        ({"n": {"task": "nodots", "every": "daily"}}, r"\['task'\]: must be the dotted path"),
        ({"n": {"task": "a.b", "every": "daily", "when": 1}}, "unknown key 'when'; known: task"),
        ({"Bad Name": {"task": "a.b", "every": "daily"}}, "a schedule's name must be"),
        ({"n": "daily"}, r"\['n'\]: must be a dict like"),
        (["daily"], r"\['schedules'\]: must be a dict of schedule name"),
    ],
)
def test_bad_schedules_name_the_key_and_the_problem(given: Any, problem: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"TASKS\['default'\]\[\"OPTIONS\"\]") as caught:
        parse(given)
    assert caught.match(problem)


# --------------------------------------------------------------------------- slots


@pytest.mark.parametrize(
    ("when", "now", "slot", "following"),
    [
        ({"every": "hourly"}, "2026-12-07 02:41:30", "2026-12-07 02:00", "2026-12-07 03:00"),
        ({"every": "hourly"}, "2026-12-07 03:00:00", "2026-12-07 03:00", "2026-12-07 04:00"),
        ({"every": "daily"}, "2026-12-07 02:41:30", "2026-12-07 00:00", "2026-12-08 00:00"),
        ({"every": "weekly"}, "2026-12-09 10:00:00", "2026-12-07 00:00", "2026-12-14 00:00"),
        ({"every": "monthly"}, "2026-12-07 02:41:30", "2026-12-01 00:00", "2027-01-01 00:00"),
        ({"every": 300}, "2026-12-07 02:41:30", "2026-12-07 02:40", "2026-12-07 02:45"),
        ({"cron": "30 4 * * *"}, "2026-12-07 02:41:30", "2026-12-06 04:30", "2026-12-07 04:30"),
    ],
)
def test_a_slot_is_the_latest_due_time_at_or_before_now(
    when: dict[str, Any], now: str, slot: str, following: str
) -> None:
    schedule = parse({"n": {"task": "a.b", **when}})["n"]
    assert schedule.slot_at(at(now)) == at(slot)
    assert schedule.next_slot(at(now)) == at(following)


def test_a_time_scale_makes_slots_that_much_shorter() -> None:
    hourly = parse({"n": {"task": "a.b", "every": "hourly"}})["n"]
    now = SCALED_ORIGIN + timedelta(seconds=1000.5)
    # At 360 times the speed an hour lasts 10 s, counted from SCALED_ORIGIN.
    assert hourly.slot_at(now, 360) == SCALED_ORIGIN + timedelta(seconds=1000)
    assert hourly.next_slot(now, 360) == SCALED_ORIGIN + timedelta(seconds=1010)
    assert time_scale({"FLYFN_TIME_SCALE": "360"}) == 360
    for unset in ({}, {"FLYFN_TIME_SCALE": " "}, {"FLYFN_TIME_SCALE": "-2"}):
        assert time_scale(unset) == 1


@pytest.mark.parametrize(
    ("when", "now", "previous"),
    [
        ({"every": "hourly"}, "2026-12-07 12:00:01", "2026-12-07 11:00"),
        ({"every": "hourly"}, "2026-12-07 12:00:00", "2026-12-07 11:00"),
        ({"every": "daily"}, "2026-12-07 02:41:30", "2026-12-06 00:00"),
        ({"every": "weekly"}, "2026-12-09 10:00:00", "2026-11-30 00:00"),
        ({"every": "monthly"}, "2026-03-02 10:00:00", "2026-02-01 00:00"),
        ({"every": 300}, "2026-12-07 02:41:30", "2026-12-07 02:35"),
        ({"cron": "30 4 * * *"}, "2026-12-07 02:41:30", "2026-12-05 04:30"),
    ],
)
def test_the_previous_slot_is_the_one_just_before_now_s(
    when: dict[str, Any], now: str, previous: str
) -> None:
    schedule = parse({"n": {"task": "a.b", **when}})["n"]
    assert schedule.previous_slot(at(now)) == at(previous)
    hourly = parse({"n": {"task": "a.b", "every": "hourly"}})["n"]
    scaled = SCALED_ORIGIN + timedelta(seconds=1000.5)  # an hour lasts 10 s
    assert hourly.previous_slot(scaled, 360) == SCALED_ORIGIN + timedelta(seconds=990)


# --------------------------------------------------------------------------- one run per slot


@pytest.mark.django_db(transaction=True)
def test_a_slot_is_enqueued_once_with_the_schedules_arguments(
    scheduled: FlyMachinesBackend,
) -> None:
    daily = scheduled.schedules["daily-sum"]
    slot = at("2026-12-07 00:00")
    first = enqueue_slot(scheduled, "daily-sum", daily, slot)
    again = enqueue_slot(scheduled, "daily-sum", daily, slot)
    following = enqueue_slot(scheduled, "daily-sum", daily, slot + timedelta(days=1))
    assert first is not None
    assert again is None
    assert following not in (None, first)
    row = DBTaskResult.objects.get(id=first)
    assert row.task_path == "tests.testapp.tasks.add"
    assert row.queue_name == "reports"
    assert row.priority == 5
    assert row.args_kwargs == {"args": [], "kwargs": {"a": 1, "b": 2}}
    runs = ScheduledRun.objects.order_by("slot")
    assert [(r.schedule, r.slot, str(r.task_id)) for r in runs] == [
        ("daily-sum", slot, first),
        ("daily-sum", slot + timedelta(days=1), following),
    ]


@pytest.mark.django_db(transaction=True)
def test_a_slot_s_record_is_kept_a_week_after_later_slots_ran(
    scheduled: FlyMachinesBackend,
) -> None:
    hourly = scheduled.schedules["hourly-note"]
    start = at("2026-12-01 00:00")
    for hours in (0, 1, 24 * 7, 24 * 7 + 1, 24 * 7 + 2):
        assert enqueue_slot(scheduled, "hourly-note", hourly, start + timedelta(hours=hours))
    kept = [run.slot - start for run in ScheduledRun.objects.order_by("slot")]
    assert kept == [timedelta(hours=h) for h in (24 * 7, 24 * 7 + 1, 24 * 7 + 2)]


@pytest.mark.django_db(transaction=True)
def test_a_slot_whose_task_cannot_be_enqueued_keeps_no_record(
    scheduled: FlyMachinesBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(FlyMachinesBackend, "enqueue", refuse)
    with pytest.raises(RuntimeError):
        enqueue_slot(scheduled, "hourly-note", scheduled.schedules["hourly-note"], at("2026-12-07"))
    assert not ScheduledRun.objects.exists()
    monkeypatch.undo()
    monkeypatch.setattr(Dispatcher, "notify", lambda self, group=None: None)
    # The next look at the slot enqueues it: nothing was lost with the failed one.
    assert enqueue_slot(
        scheduled, "hourly-note", scheduled.schedules["hourly-note"], at("2026-12-07")
    )


# Two scheduled Machines at once: two connections, the same slot, both transactions open when
# either inserts the slot's row. Only PostgreSQL makes the second insert wait for the first
# transaction (SQLite serialises whole transactions). Without the unique constraint both looks
# enqueue the slot, and the test fails.
@pytest.mark.django_db(transaction=True)
def test_two_looks_at_the_same_slot_at_once_enqueue_once(scheduled: FlyMachinesBackend) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("concurrent transactions: PostgreSQL only")
    hourly = scheduled.schedules["hourly-note"]
    slot = at("2026-12-07 02:00")
    table = ScheduledRun._meta.db_table
    at_insert = threading.Barrier(2, timeout=SAFETY_BOUND)
    met: list[bool] = []
    results: list[str | None] = []
    errors: list[BaseException] = []

    def insert_together(
        execute: Any, sql: str, params: Any, many: bool, context: dict[str, Any]
    ) -> Any:
        if sql.startswith(f'INSERT INTO "{table}"'):
            assert connection.in_atomic_block  # this look's transaction is open ...
            at_insert.wait()  # ... and so is the other's: the race itself
            met.append(True)
        return execute(sql, params, many, context)

    def machine() -> None:
        try:
            with connection.execute_wrapper(insert_together):
                results.append(enqueue_slot(scheduled, "hourly-note", hourly, slot))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=machine) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SAFETY_BOUND)
        assert not thread.is_alive(), "a look blocked: too slow (safety bound)"
    assert errors == []
    assert met == [True, True]  # both inserts were sent with both transactions in flight
    (enqueued,) = [r for r in results if r is not None]
    assert results.count(None) == 1  # the other look found the slot's row and did nothing
    assert [str(i) for i in DBTaskResult.objects.values_list("id", flat=True)] == [enqueued]
    assert str(ScheduledRun.objects.get().task_id) == enqueued


@pytest.mark.django_db(transaction=True)
def test_enqueue_due_runs_the_selected_schedules_current_slots_once(
    scheduled: FlyMachinesBackend,
) -> None:
    hourly = enqueue_due(lambda s: s.fly_interval == "hourly")
    assert [(r.schedule, r.task_id is not None) for r in hourly] == [("hourly-note", True)]
    again = enqueue_due(lambda s: s.fly_interval == "hourly")
    assert [(r.schedule, r.task_id) for r in again] == [("hourly-note", None)]
    assert again[0].slot == hourly[0].slot
    assert hourly[0].slot.minute == hourly[0].slot.second == 0
    assert DBTaskResult.objects.count() == 1


def looks_at(monkeypatch: pytest.MonkeyPatch, now: datetime) -> None:
    monkeypatch.setattr(periodic, "db_now", lambda using="default": now)


def slots_run(name: str) -> list[datetime]:
    return list(
        ScheduledRun.objects.filter(schedule=name).order_by("slot").values_list("slot", flat=True)
    )


@pytest.mark.django_db(transaction=True)
def test_a_look_catches_up_on_the_slot_just_before_its_own_and_skips_older_ones(
    scheduled: FlyMachinesBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def look(now: str) -> list[tuple[str, bool, bool]]:
        looks_at(monkeypatch, at(now))
        found = enqueue_due(lambda s: s.fly_interval == "hourly")
        return [(f"{r.slot:%H:%M}", r.late, r.task_id is not None) for r in found]

    # A new schedule: only its current slot, nothing before it.
    assert look("2026-12-07 10:59:59") == [("10:00", False, True)]
    # Fly's next start a little more than an hour later: the 11:00 slot had no look in it.
    assert look("2026-12-07 12:00:01") == [("11:00", True, True), ("12:00", False, True)]
    assert look("2026-12-07 12:30:00") == [("12:00", False, False)]
    # Two starts lost (13:00, 14:00): 14:00 runs late, 13:00 is skipped.
    assert look("2026-12-07 15:10:00") == [("14:00", True, True), ("15:00", False, True)]
    assert [f"{s:%H:%M}" for s in slots_run("hourly-note")] == [
        "10:00",
        "11:00",
        "12:00",
        "14:00",
        "15:00",
    ]
    assert DBTaskResult.objects.count() == 5


@pytest.mark.django_db(transaction=True)
def test_monthly_starts_thirty_days_apart_miss_no_month(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.TASKS = tasks_setting({"m": {"task": "tests.testapp.tasks.note", "every": "monthly"}})
    monkeypatch.setattr(Dispatcher, "notify", lambda self, group=None: None)
    enqueued: list[str] = []
    for now in ("2026-01-31 10:00", "2026-03-02 10:00", "2026-04-01 10:00"):
        looks_at(monkeypatch, at(now))
        enqueued += [f"{r.slot:%m-%d}" for r in enqueue_due(lambda s: True) if r.task_id]
    # February had no start in it (31 January, then 2 March): it runs late, on 2 March.
    assert enqueued == ["01-01", "02-01", "03-01", "04-01"]
    assert DBTaskResult.objects.count() == 4
    stop_all()


@pytest.mark.django_db(transaction=True)
def test_a_failed_catch_up_is_reported_and_the_current_slot_still_runs(
    scheduled: FlyMachinesBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    hourly = scheduled.schedules["hourly-note"]
    assert enqueue_slot(scheduled, "hourly-note", hourly, at("2026-12-07 09:00"))
    original = periodic.enqueue_slot

    def refuse_late(backend: Any, name: str, schedule: Schedule, slot: datetime) -> str | None:
        if slot == at("2026-12-07 10:00"):
            raise OperationalError('connection to server at "db.internal", user "admin" failed')
        return original(backend, name, schedule, slot)

    monkeypatch.setattr(periodic, "enqueue_slot", refuse_late)
    looks_at(monkeypatch, at("2026-12-07 11:05"))
    late, current = enqueue_due(lambda s: s.fly_interval == "hourly")
    assert (late.late, late.task_id, late.error) == (
        True,
        None,
        "OperationalError (database or network error; message withheld)",
    )
    assert (current.late, current.task_id is not None) == (False, True)


# --------------------------------------------------------------------------- errors


def test_error_text_withholds_what_a_database_driver_says() -> None:
    import psycopg

    said = (
        'connection to server at "db.internal" (10.0.0.1), port 5432 failed: password for "admin"'
    )
    for exc in (
        OperationalError(said),
        psycopg.OperationalError(said),
        ConnectionRefusedError(said),
    ):
        text = error_text(exc)
        assert text.startswith(type(exc).__name__)
        assert "db.internal" not in text
        assert "admin" not in text
    assert error_text(ImportError("No module named 'app.nowhere'")) == (
        "ImportError: No module named 'app.nowhere'"
    )


@pytest.mark.django_db(transaction=True)
def test_a_failed_look_logs_the_schedule_and_the_error_class_only(
    scheduled: FlyMachinesBackend,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError(
            'could not connect to "db.internal" as user "admin" password=hunter2'
        )

    monkeypatch.setattr(FlyMachinesBackend, "enqueue", refuse)
    (run,) = enqueue_due(lambda s: s.fly_interval == "daily")
    assert run.error
    assert run.error.startswith("OperationalError")
    assert "'daily-sum'" in caplog.text
    assert "OperationalError" in caplog.text
    assert "db.internal" not in caplog.text
    assert "hunter2" not in caplog.text


# --------------------------------------------------------------------------- checks


@pytest.mark.django_db
def test_checks_name_a_task_that_is_not_one_and_arguments_that_are_not_json(settings: Any) -> None:
    settings.TASKS = tasks_setting(
        {
            "missing": {"task": "tests.testapp.tasks.nowhere", "every": "daily"},
            "not-a-task": {"task": "tests.testapp.tasks.ran", "every": "daily"},
            "bad-args": {"task": "tests.testapp.tasks.note", "every": "daily", "args": [{1, 2}]},
            "fine": {"task": "tests.testapp.tasks.note", "every": "daily", "args": ["x"]},
        },
        beyond_horizon="next_wake",
    )
    messages = check_schedules(backend())
    assert [(m.id, m.msg.split(":")[0]) for m in messages] == [
        ("flyfn.E021", "TASKS['default']['OPTIONS']['schedules']['bad-args']"),
        ("flyfn.E020", "TASKS['default']['OPTIONS']['schedules']['missing']['task']"),
        ("flyfn.E020", "TASKS['default']['OPTIONS']['schedules']['not-a-task']['task']"),
    ]
    assert "cannot be imported" in messages[1].msg
    assert "is a list, not a task" in messages[2].msg
    assert all(m.hint for m in messages)


@pytest.mark.django_db
def test_a_schedule_s_queue_must_be_one_of_the_backend_s(settings: Any) -> None:
    found: dict[str, list[str]] = {}
    for queues in (["default"], ["default", "reports"]):
        setting = tasks_setting(SCHEDULES, beyond_horizon="app_machine")
        setting["default"]["QUEUES"] = queues
        settings.TASKS = setting
        found[",".join(queues)] = [f"{m.id} {m.msg}" for m in check_schedules(backend())]
    (error,) = found["default"]
    assert error.startswith("flyfn.E022 TASKS['default']['OPTIONS']['schedules']['daily-sum']")
    assert "['queue_name']: 'reports' is not one of TASKS['default']['QUEUES'] (default)" in error
    assert found["default,reports"] == []


@pytest.mark.django_db
def test_a_schedule_finer_than_fly_s_warns_unless_an_app_machine_is_kept_running(
    settings: Any,
) -> None:
    settings.TASKS = tasks_setting(SCHEDULES, beyond_horizon="next_wake")
    (warning,) = check_schedules(backend())
    assert warning.id == "flyfn.W020"
    assert "'five-minutes' (cron '*/5 * * * *') is finer than Fly's schedules" in warning.msg
    assert "min_machines_running = 1" in (warning.hint or "")
    settings.TASKS = tasks_setting(SCHEDULES, beyond_horizon="app_machine")
    assert check_schedules(backend()) == []
    settings.TASKS = tasks_setting({"h": SCHEDULES["hourly-note"]}, beyond_horizon="next_wake")
    assert check_schedules(backend()) == []


@pytest.mark.django_db
def test_a_backend_alias_longer_than_its_column_is_an_error(settings: Any) -> None:
    alias = "a" * 33
    settings.TASKS = {alias: tasks_setting({})["default"]}
    found = task_backends[alias]
    assert isinstance(found, FlyMachinesBackend)
    (error,) = [m for m in check_schedules(found) if m.id == "flyfn.E023"]
    assert "has 33 characters" in error.msg
    assert "of 32" in error.msg
    settings.TASKS = {"a" * 32: tasks_setting({})["default"]}
    assert [m.id for m in check_schedules(task_backends["a" * 32])] == []  # type: ignore[arg-type]


class SlotsElsewhere:
    """A router that puts the slots' rows in another database than the tasks."""

    def db_for_write(self, model: type, **hints: Any) -> str | None:
        return "other" if model is ScheduledRun else None

    db_for_read = db_for_write


@pytest.mark.django_db
def test_slots_and_tasks_must_share_a_database(
    scheduled: FlyMachinesBackend, settings: Any
) -> None:
    settings.DATABASE_ROUTERS = [SlotsElsewhere()]
    (error,) = [m for m in check_schedules(backend()) if m.id == "flyfn.E024"]
    assert "ScheduledRun and DBTaskResult in one database" in error.msg
    assert "'other' and 'default'" in error.msg
    with pytest.raises(ImproperlyConfigured, match="committed together"):
        enqueue_slot(backend(), "hourly-note", SCHEDULES_PARSED["hourly-note"], at("2026-12-07"))


def test_a_worker_id_fits_its_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import socket

    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 253)
    with machine_role.override_role(machine_role.LOCAL):
        long = worker_id()
    assert len(long) == WORKER_ID_MAX
    assert long.startswith("local-hhh")
    assert long.endswith(f"-{os.getpid()}")
    monkeypatch.setattr(socket, "gethostname", lambda: "laptop")
    with machine_role.override_role(machine_role.LOCAL):
        assert worker_id() == f"local-laptop-{os.getpid()}"


def test_the_backend_refuses_bad_schedules_when_it_is_made(settings: Any) -> None:
    settings.TASKS = tasks_setting({"n": {"task": "a.b", "every": "yearly"}})
    with pytest.raises(ImproperlyConfigured, match="'every'"):
        task_backends["default"]


# --------------------------------------------------------------------------- commands


def flyfn(*args: str) -> str:
    out = StringIO()
    call_command("flyfn", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_tick_enqueues_its_interval_s_due_slots_once(scheduled: FlyMachinesBackend) -> None:
    first = flyfn("tick", "hourly")
    second = flyfn("tick", "hourly")
    assert "hourly-note: slot " in first
    assert "enqueued task" in first
    assert "already run, nothing to do" in second
    assert "daily-sum" not in first
    assert "no schedule runs weekly" in flyfn("tick", "weekly")
    assert list(DBTaskResult.objects.values_list("task_path", flat=True)) == [
        "tests.testapp.tasks.note"
    ]


@pytest.mark.django_db(transaction=True)
def test_tick_enqueues_the_other_schedules_when_one_fails_and_exits_non_zero(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.TASKS = tasks_setting(
        {
            "broken": {"task": "tests.testapp.tasks.nowhere", "every": "daily"},
            "fine": {"task": "tests.testapp.tasks.note", "every": "daily", "args": ["x"]},
        }
    )
    monkeypatch.setattr(Dispatcher, "notify", lambda self, group=None: None)
    out = StringIO()
    with pytest.raises(CommandError, match=r"schedule\(s\) not enqueued: broken"):
        call_command("flyfn", "tick", "daily", stdout=out, stderr=StringIO())
    assert "broken: slot " in out.getvalue()
    assert "cannot be enqueued: ImportError" in out.getvalue()
    assert list(ScheduledRun.objects.values_list("schedule", flat=True)) == ["fine"]
    stop_all()


@pytest.mark.django_db(transaction=True)
def test_status_lists_schedules_with_their_last_and_next_slots(
    scheduled: FlyMachinesBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLY_APP_NAME", raising=False)
    flyfn("tick", "hourly")
    rows = {row.name: row for row in schedule_rows()}
    assert rows["hourly-note"].last_slot is not None
    assert rows["hourly-note"].next_slot == rows["hourly-note"].last_slot + timedelta(hours=1)
    assert rows["daily-sum"].last_slot is None
    assert rows["five-minutes"].runs_on == "app Machine"
    assert rows["daily-sum"].runs_on == "scheduled Machine (daily)"
    with override_settings(FLYFN={}):
        out = flyfn("status")
    assert "Schedules" in out
    line = next(line for line in out.splitlines() if "hourly-note" in line)
    assert f"{rows['hourly-note'].last_slot:%Y-%m-%d %H:%M:%S}" in line
    assert f"{rows['hourly-note'].next_slot:%Y-%m-%d %H:%M:%S}" in line


def scheduled_only(api: MachinesAPI) -> list[Machine]:
    return [
        m
        for m in api.machines()
        if m.config is not None and (m.config.metadata or {}).get("flyfn_schedule")
    ]


def scheduled_machines(api: MachinesAPI) -> list[tuple[str, str | None, str | None]]:
    return sorted(
        (m.name or "", m.config.schedule if m.config else None, m.state)
        for m in scheduled_only(api)
    )


@pytest.mark.django_db
def test_prepare_keeps_one_scheduled_machine_per_interval_and_gc_removes_unneeded_ones(
    scheduled: FlyMachinesBackend, machines_api: MachinesAPI, settings: Any
) -> None:
    image = "registry.fly.io/testapp:deployment-7"
    with override_settings(FLYFN=machines_api.flyfn_settings(image)):
        first = flyfn("prepare")
        second = flyfn("prepare")
    assert "schedule hourly: scheduled Machine" in first
    assert "(created)" in first
    assert second.count("(up to date)") == 2
    assert [name for name, *_ in scheduled_machines(machines_api)] == [
        "flyfn-schedule-daily",
        "flyfn-schedule-hourly",
    ]
    (hourly,) = [m for m in machines_api.machines() if m.name == "flyfn-schedule-hourly"]
    assert hourly.config is not None
    assert hourly.config.schedule == "hourly"
    assert hourly.config.image == image
    assert not hourly.config.services  # nothing is sent to it
    assert hourly.config.init is not None
    assert hourly.config.init.cmd is not None
    assert hourly.config.init.cmd[-6:] == [
        "django",
        "flyfn",
        "--settings",
        "tests.settings",
        "tick",
        "hourly",
    ]
    # A schedule goes: its Machine is gc's; the other stays.
    settings.TASKS = tasks_setting({"h": SCHEDULES["hourly-note"]})
    with override_settings(FLYFN=machines_api.flyfn_settings(image)):
        dry = flyfn("gc", "--dry-run")
        assert "would destroy scheduled Machine" in dry
        assert len(scheduled_machines(machines_api)) == 2
        out = flyfn("gc")
    assert "no schedule runs daily any more" in out
    assert [name for name, *_ in scheduled_machines(machines_api)] == ["flyfn-schedule-hourly"]


@pytest.mark.django_db
def test_prepare_updates_a_scheduled_machine_for_a_new_image_and_leaves_it_stopped(
    scheduled: FlyMachinesBackend, machines_api: MachinesAPI
) -> None:
    with override_settings(FLYFN=machines_api.flyfn_settings("registry.fly.io/testapp:d-1")):
        flyfn("prepare")
    for machine in scheduled_only(machines_api):
        machines_api.http.post(f"/v1/apps/{EMULATOR_APP}/machines/{machine.id}/stop")
        machines_api.http.get(
            f"/v1/apps/{EMULATOR_APP}/machines/{machine.id}/wait", params={"state": "stopped"}
        )
    with override_settings(FLYFN=machines_api.flyfn_settings("registry.fly.io/testapp:d-2")):
        out = flyfn("prepare")
    assert out.count("(updated)") == 2
    assert {
        (m.config.image if m.config else None, m.state) for m in scheduled_only(machines_api)
    } == {("registry.fly.io/testapp:d-2", "stopped")}


def scheduled_versions(api: MachinesAPI) -> dict[str, tuple[str | None, str | None]]:
    """Each scheduled Machine's version and state."""
    return {
        m.name or "": (
            (m.config.metadata or {}).get("flyfn_version") if m.config else None,
            m.state,
        )
        for m in scheduled_only(api)
    }


def stop_scheduled(api: MachinesAPI) -> None:
    for machine in scheduled_only(api):
        api.http.post(f"/v1/apps/{EMULATOR_APP}/machines/{machine.id}/stop")
        api.http.get(
            f"/v1/apps/{EMULATOR_APP}/machines/{machine.id}/wait", params={"state": "stopped"}
        )


@pytest.mark.django_db
def test_prepare_updates_a_scheduled_machine_whose_secrets_changed_and_leaves_it_stopped(
    scheduled: FlyMachinesBackend,
    machines_api: MachinesAPI,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = "registry.fly.io/testapp:d-1"
    groups = {"tasks": {"env": ["REPORT_LOCALE"], "secrets": ["PARTNER_TOKEN"]}}
    monkeypatch.setenv("REPORT_LOCALE", "fr")
    monkeypatch.setenv("PARTNER_TOKEN", "partner-secret-1")
    with override_settings(FLYFN=machines_api.flyfn_settings(image, GROUPS=groups)):
        flyfn("prepare")
        stop_scheduled(machines_api)
        first = scheduled_versions(machines_api)
        (hourly,) = [m for m in scheduled_only(machines_api) if m.name == "flyfn-schedule-hourly"]
        assert hourly.config is not None
        assert (hourly.config.env or {}).get("REPORT_LOCALE") == "fr"  # the group's env
        assert "partner-secret-1" not in hourly.model_dump_json()
        assert "up to date" in flyfn("prepare")  # nothing changed: nothing updated
        # SECRET_KEY rotated (fly secrets set), same image: the wakes would be signed with it.
        settings.SECRET_KEY = "rotated-" + settings.SECRET_KEY
        assert flyfn("prepare").count("(updated)") == 2
        rotated = scheduled_versions(machines_api)
        # One of the group's named secrets changed.
        monkeypatch.setenv("PARTNER_TOKEN", "partner-secret-2")
        assert flyfn("prepare").count("(updated)") == 2
        renamed = scheduled_versions(machines_api)
    assert {state for _, state in [*first.values(), *rotated.values(), *renamed.values()]} == {
        "stopped"
    }
    for name in first:
        assert len({first[name][0], rotated[name][0], renamed[name][0]}) == 3
    assert settings.SECRET_KEY not in str(rotated)


@pytest.mark.django_db
def test_gc_destroys_scheduled_machines_once_flyfn_tasks_is_not_installed(
    scheduled: FlyMachinesBackend, machines_api: MachinesAPI
) -> None:
    with override_settings(FLYFN=machines_api.flyfn_settings("registry.fly.io/testapp:d-1")):
        flyfn("prepare")
        assert len(scheduled_machines(machines_api)) == 2
        with modify_settings(INSTALLED_APPS={"remove": ["flyfn.tasks"]}):
            out = flyfn("gc")
    assert out.count("destroying scheduled Machine") == 2
    assert scheduled_machines(machines_api) == []


@pytest.mark.django_db(transaction=True)
def test_a_tick_that_hangs_fails_within_its_deadline(
    scheduled: FlyMachinesBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    hung = threading.Event()
    release = threading.Event()

    def hang(which: Any) -> list[Any]:
        hung.set()
        release.wait(SAFETY_BOUND)  # a database connect that never answers
        return []

    monkeypatch.setattr(periodic, "enqueue_due", hang)
    try:
        with pytest.raises(CommandError, match=r"tick hourly did not finish within 0\.2 s"):
            flyfn("tick", "hourly", "--timeout", "0.2")
        assert hung.is_set()
    finally:
        release.set()


@pytest.mark.django_db(transaction=True)
def test_a_tick_whose_database_is_away_fails_without_its_address(
    scheduled: FlyMachinesBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def away(using: str = "default") -> datetime:
        raise OperationalError('connection to server at "db.internal" failed for user "admin"')

    monkeypatch.setattr(periodic, "db_now", away)
    with pytest.raises(CommandError) as caught:
        flyfn("tick", "hourly")
    assert "tick hourly failed: OperationalError" in str(caught.value)
    assert "db.internal" not in str(caught.value)


# --------------------------------------------------------------------------- the emulated Fly


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def scheduled_machine(emulator: MachinesEmulator, schedule: str | None) -> str:
    machine = await emulator.create(
        "app", CreateMachineRequest(config=MachineConfig(image="img", schedule=schedule))
    )
    await emulator.wait_for_state("app", machine.id, "started", timeout=SAFETY_BOUND)
    return machine.id


async def stop(emulator: MachinesEmulator, machine_id: str) -> None:
    await emulator.stop("app", machine_id)
    await emulator.wait_for_state("app", machine_id, "stopped", timeout=SAFETY_BOUND)


async def test_fly_starts_a_scheduled_machine_once_per_scaled_interval() -> None:
    clock = Clock(1_000_000.0)
    emulator = MachinesEmulator(clock=clock)
    schedules = FlySchedules(emulator, time_scale=360)
    hourly = await scheduled_machine(emulator, "hourly")
    other = await scheduled_machine(emulator, None)
    await stop(emulator, hourly)
    await stop(emulator, other)
    period = scaled_period("hourly", 360)
    assert period == 10.0
    assert await schedules.once() == []  # not yet: an interval counts from its creation
    assert schedules.next_start("app", hourly) == clock.now + period
    clock.now += period
    assert await schedules.once() == [hourly]
    await emulator.wait_for_state("app", hourly, "started", timeout=SAFETY_BOUND)
    assert emulator.get("app", other).state == "stopped"
    # Still running at its next time: Fly leaves it alone; the time after that it starts it.
    clock.now += period
    assert await schedules.once() == []
    await stop(emulator, hourly)
    clock.now += period
    assert await schedules.once() == [hourly]
    await stop(emulator, hourly)
    # Five intervals missed (nothing could start it): one start, then one per interval again.
    clock.now += 5 * period + 1
    assert await schedules.once() == [hourly]
    await stop(emulator, hourly)
    assert await schedules.once() == []
    clock.now += period
    assert await schedules.once() == [hourly]
    assert schedules.starts == 4
    await emulator.aclose()


async def test_a_destroyed_scheduled_machine_is_forgotten() -> None:
    clock = Clock(2_000_000.0)
    emulator = MachinesEmulator(clock=clock)
    schedules = FlySchedules(emulator, time_scale=3600)
    daily = await scheduled_machine(emulator, "daily")
    await schedules.once()
    assert schedules.next_start("app", daily) == clock.now + 24.0
    await emulator.destroy("app", daily, force=True)
    await asyncio.sleep(0)
    clock.now += 24.0
    assert await schedules.once() == []
    assert schedules.next_start("app", daily) is None
    with pytest.raises(ValueError, match="time_scale"):
        FlySchedules(emulator, time_scale=0)
    await emulator.aclose()


# --------------------------------------------------------------------------- the ticker


@pytest.mark.django_db(transaction=True)
def test_an_app_machine_s_ticker_runs_only_the_finer_schedules(
    scheduled: FlyMachinesBackend, settings: Any
) -> None:
    with machine_role.override_role(machine_role.function("tasks")):
        assert not start_ticker()  # function Machines never look
    settings.TASKS = tasks_setting({"h": SCHEDULES["hourly-note"]})
    with machine_role.override_role(machine_role.MAIN):
        assert not start_ticker()  # the scheduled Machine runs it, not an app Machine
    settings.TASKS = tasks_setting(SCHEDULES)
    with machine_role.override_role(machine_role.MAIN):
        assert start_ticker()
        deadline = time.monotonic() + SAFETY_BOUND
        while not ScheduledRun.objects.exists():
            assert time.monotonic() < deadline, "the ticker did not run: too slow"
            time.sleep(0.05)
        stop_ticker()
    assert list(ScheduledRun.objects.values_list("schedule", flat=True)) == ["five-minutes"]


def test_a_web_process_starts_its_dispatchers_and_ticker_as_it_boots_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An app Machine kept running may get no request after a deploy: its schedules and due tasks
    # must not wait for one. Loading flyfn's middleware (a web worker booting) starts them.
    from django.apps import apps
    from django.core.signals import request_started
    from django.http import HttpResponse

    from flyfn.middleware import FlyReplayMiddleware
    from flyfn.tasks import dispatch, periodic

    started: list[str] = []
    monkeypatch.setattr(dispatch, "start_all", lambda: started.append("dispatchers"))

    def start_ticker() -> bool:
        started.append("ticker")
        return True

    monkeypatch.setattr(periodic, "start_ticker", start_ticker)
    apps.get_app_config("flyfn_tasks").ready()  # connected again, as in a fresh process
    with machine_role.override_role(machine_role.MAIN):
        FlyReplayMiddleware(lambda request: HttpResponse())
        assert started == ["dispatchers", "ticker"]
        FlyReplayMiddleware(lambda request: HttpResponse())  # another handler of the process
        request_started.send(sender=None)  # and its first request
    assert started == ["dispatchers", "ticker"]


@pytest.mark.django_db(transaction=True)
def test_a_ticker_looks_again_soon_after_a_failed_enqueue_not_at_the_next_slot(
    scheduled: FlyMachinesBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = FlyMachinesBackend.enqueue
    failures: list[int] = []

    def fail_once(self: FlyMachinesBackend, *args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(1)
            raise OperationalError("the database went away")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FlyMachinesBackend, "enqueue", fail_once)
    # The next slot is an hour away: only a retry can enqueue this one within the bound.
    monkeypatch.setattr(Ticker, "_until_next", lambda self: 3600.0)
    ticker = Ticker(runs_on_app_machines)
    ticker.start()
    try:
        deadline = time.monotonic() + SAFETY_BOUND
        while not ScheduledRun.objects.exists():
            assert time.monotonic() < deadline, "no retry: the failed slot waits for the next"
            time.sleep(0.05)
    finally:
        ticker.stop()
    assert failures == [1]
    assert list(ScheduledRun.objects.values_list("schedule", flat=True)) == ["five-minutes"]


def test_one_process_of_a_machine_holds_its_ticker_lock(tmp_path: Any) -> None:
    path = tmp_path / "ticker.lock"
    first, second = TickerLock(path), TickerLock(path)
    assert first.acquire()
    assert first.acquire()  # held already
    assert not second.acquire()  # another worker process of the Machine: it waits
    first.release()  # its process ended: the kernel drops the lock
    assert second.acquire()
    second.release()
    assert TickerLock(None).acquire()  # off Fly (no Machine): every process looks


@pytest.mark.django_db(transaction=True)
def test_a_machine_s_second_ticker_looks_only_once_the_first_is_gone(
    scheduled: FlyMachinesBackend, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setattr(periodic, "LOCK_POLL", 0.05)
    tries: list[bool] = []
    acquire = TickerLock.acquire

    def counted(self: TickerLock) -> bool:
        tries.append(acquire(self))
        return tries[-1]

    monkeypatch.setattr(TickerLock, "acquire", counted)
    env = MachineEnv(machine_id="e286de4f711e86")
    with machine_role.override_role(machine_role.MAIN, env):
        held = periodic._machine_lock()
        assert held.path is not None
        assert held.path.name == "ticker.lock"
        assert held.acquire()  # another worker process's ticker
        assert start_ticker()
        assert periodic._ticker is not None
        assert periodic._ticker.lock.path == held.path
        deadline = time.monotonic() + SAFETY_BOUND
        while tries.count(False) < 3:  # the ticker found the lock held, and again
            assert time.monotonic() < deadline, "the ticker does not try the lock"
            time.sleep(0.05)
        looked = ScheduledRun.objects.exists()
        held.release()
        deadline = time.monotonic() + SAFETY_BOUND
        while not ScheduledRun.objects.exists():
            assert time.monotonic() < deadline, "the second ticker did not take over"
            time.sleep(0.05)
        stop_ticker()
    assert not looked


@pytest.mark.django_db
def test_status_on_fly_lists_the_scheduled_machines(
    scheduled: FlyMachinesBackend, machines_api: MachinesAPI
) -> None:
    with override_settings(FLYFN=machines_api.flyfn_settings("registry.fly.io/testapp:d-1")):
        flyfn("prepare")
        out = flyfn("status")
    assert "scheduled Machines (periodic tasks):" in out
    lines = [line.split() for line in out.splitlines() if "flyfn-schedule-" in line]
    assert sorted((cells[1], cells[2]) for cells in lines) == [
        ("flyfn-schedule-daily", "daily"),
        ("flyfn-schedule-hourly", "hourly"),
    ]


# --------------------------------------------------------------------------- the live page


@pytest.mark.django_db(transaction=True)
def test_the_live_page_lists_schedules_with_their_slots_at_the_stack_s_time_scale(
    scheduled: FlyMachinesBackend,
) -> None:
    enqueue_due(lambda s: s.fly_interval == "hourly")
    figures = _task_figures(3600.0)  # an hour lasts a second
    hourly = figures["schedule hourly-note"]
    assert hourly["task"] == "tests.testapp.tasks.note"
    assert hourly["runs on"] == "scheduled Machine (hourly)"
    assert hourly["last slot"] is not None
    assert figures["schedule daily-sum"]["last slot"] is None
    before = timezone.now()
    (row,) = [r for r in schedule_rows(3600.0) if r.name == "hourly-note"]
    after = timezone.now()
    # At 3600 times the speed the next hourly slot is at most a second after the look.
    assert before < row.next_slot <= after + timedelta(seconds=1)


async def test_the_live_page_names_a_scheduled_machine_by_its_interval() -> None:
    emulator = MachinesEmulator()
    config = MachineConfig(image="img", schedule="daily", metadata={"flyfn_schedule": "daily"})
    machine = await emulator.create("app", CreateMachineRequest(config=config, skip_launch=True))
    page = LivePage(emulator, lambda: ["app"])
    (shown,) = page.snapshot({})["machines"]
    assert (shown["id"], shown["group"]) == (machine.id, "schedule daily")
    await emulator.aclose()
