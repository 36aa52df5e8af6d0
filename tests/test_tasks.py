"""flyfn.tasks.FlyMachinesBackend through Django's task API (django.tasks, or the backport on 5.2):
enqueue and results, priority, run_after, queues → groups, context, errors, leases and attempts,
delivery after commit, the local role's thread, the wake view and the status counts."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, cast

import httpx
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import OperationalError, transaction
from django.http import HttpResponse
from django.test import AsyncClient, Client, override_settings
from django.utils import timezone
from django_tasks_db.compat import TaskResultStatus, task_backends
from django_tasks_db.models import DBTaskResult

from flyfn import machine_role
from flyfn.registry import registry
from flyfn.tasks import FlyMachinesBackend, TaskLost, TaskOptions, run_due_tasks
from flyfn.tasks import wake as wake_module
from flyfn.tasks.dispatch import Dispatcher, dispatcher, stop_all
from flyfn.tasks.models import TaskLease
from flyfn.tasks.options import home_app
from flyfn.tasks.runner import claim_next, run_claim, worker_id
from flyfn.tasks.status import task_status
from flyfn.tasks.wake import WAKE_HEADER, sign_wake, wake_view
from tests.support_procs import child_env
from tests.testapp import tasks

# A generous safety bound for work done by a background thread: "too slow", never a flaky fail.
SAFETY_BOUND = 60.0


TASKS = {
    "default": {
        "BACKEND": "flyfn.tasks.FlyMachinesBackend",
        "QUEUES": [],
        "OPTIONS": {"group": "tasks", "queue_groups": {"reports": "pdf"}},
    }
}


@pytest.fixture(scope="module", autouse=True)
def _wake_views_leave_the_registry() -> Iterator[None]:
    # The wake URLs register serverless views of groups "tasks" and "pdf": other modules'
    # tests count the groups of the process registry.
    yield
    from flyfn.tasks import wake

    for view in wake._views.values():
        registry.unregister(view)
    wake._views.clear()
    # SQLite keeps an in-memory test database's connection open for the whole session (its close()
    # is a no-op); a later test without database access whose response fires request_finished
    # would then find this thread's connection and be refused it. No later test uses the
    # database in this process, so it goes now.
    from django.db import connection
    from django.db.backends.base.base import BaseDatabaseWrapper

    if connection.connection is not None:
        BaseDatabaseWrapper.close(connection)


@pytest.fixture(autouse=True)
def _tasks_project(settings: Any) -> Iterator[None]:
    settings.TASKS = TASKS
    settings.ROOT_URLCONF = "tests.tasks_urls"
    tasks.ran.clear()
    yield
    stop_all()  # a dispatcher thread must not outlive the test's database
    tasks.ran.clear()


def backend() -> FlyMachinesBackend:
    found = task_backends["default"]
    assert isinstance(found, FlyMachinesBackend)
    return found


def status(result: Any) -> TaskResultStatus:
    """The status a result has now (read from the result object, which refresh() changes)."""
    return cast(TaskResultStatus, result.status)


def wait_finished(result: Any) -> None:
    deadline = time.monotonic() + SAFETY_BOUND
    while True:
        # The in-memory test database has table locks, and no waiting on them.
        with contextlib.suppress(OperationalError):
            result.refresh()
            if result.is_finished:
                return
        assert time.monotonic() < deadline, f"task {result.id} still {result.status}: too slow"
        time.sleep(0.05)


# --------------------------------------------------------------------------- options


def test_options_default_and_mapping() -> None:
    options = TaskOptions.parse("default", {"group": "tasks", "queue_groups": {"reports": "pdf"}})
    assert options.group_of("default") == "tasks"
    assert options.group_of("reports") == "pdf"
    assert options.groups == {"tasks", "pdf"}
    assert (options.lease, options.max_attempts, options.concurrency) == (30.0, 3, 1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"grup": "x"}, "unknown option 'grup'"),
        ({"group": "Bad Name"}, "TASKS['default'][\"OPTIONS\"]['group']: invalid group name"),
        ({"queue_groups": {"q": "NO!"}}, "['queue_groups']['q']: invalid group name"),
        ({"lease": 0}, "['lease']: must be a number of seconds >= 1 (got 0)"),
        ({"max_attempts": 0}, "['max_attempts']: must be a whole number from 1 to 100"),
        ({"concurrency": True}, "['concurrency']: must be a whole number"),
        ({"url": "ftp://x"}, "['url']: must be an http:// or https:// address"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ImproperlyConfigured) as caught:
        TaskOptions.parse("default", options)
    assert message in str(caught.value)


def test_wake_url_prefers_option_then_environment_then_fly_dev(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FLYFN_PUBLIC_URL", raising=False)
    assert TaskOptions().wake_url("shop") == "https://shop.fly.dev"
    assert TaskOptions().wake_url(None) is None
    monkeypatch.setenv("FLYFN_PUBLIC_URL", "http://127.0.0.1:8080/")
    assert TaskOptions().wake_url("shop") == "http://127.0.0.1:8080"
    assert TaskOptions(url="https://tasks.example").wake_url("shop") == "https://tasks.example"


def test_wakes_go_to_the_app_that_routes_the_group_not_a_function_app() -> None:
    # An app Machine, or a function Machine of the own app: its own app.
    assert home_app("shop", {}) == "shop"
    # A function Machine of the `app` strategy lives in "shop-fns": a wake sent there would reach
    # a function Machine unsigned; it goes to the app whose app Machines replay it (signed).
    assert home_app("shop-fns", {"FLYFN_HOME_APP": "shop"}) == "shop"
    assert home_app(None, {"FLYFN_HOME_APP": " "}) is None


def test_a_function_machine_of_another_app_wakes_through_the_app_that_created_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FLYFN_PUBLIC_URL", raising=False)
    monkeypatch.setenv("FLYFN_HOME_APP", "shop")
    sent: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(str(request.url))
        return httpx.Response(200, text='{"done": true, "ran": 2}\n')

    real_client = httpx.Client
    monkeypatch.setattr(
        httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(answer), **kw)
    )
    waker = Dispatcher("default", backend().flyfn)
    role, env = machine_role.function("pdf"), machine_role.MachineEnv(app_name="shop-fns")
    with machine_role.override_role(role, env):
        assert waker._send("tasks") == 2  # the tasks the wake ran
    assert sent == ["https://shop.fly.dev/_flyfn/tasks/tasks/"]


# --------------------------------------------------------------------------- Django's API


@pytest.mark.django_db
def test_enqueue_stores_a_ready_result_and_get_result_reads_it() -> None:
    result = tasks.add.enqueue(2, 3)
    assert result.status == TaskResultStatus.READY
    assert result.backend == "default"
    assert (result.args, result.kwargs) == ([2, 3], {})
    fetched = tasks.add.get_result(result.id)
    assert fetched.id == result.id
    assert fetched.status == TaskResultStatus.READY
    with pytest.raises(ValueError, match="not finished"):
        _ = fetched.return_value
    assert tasks.ran == []  # inside the test's transaction nothing was delivered


@pytest.mark.django_db
def test_run_records_the_return_value_and_the_worker() -> None:
    result = tasks.add.enqueue(2, 3)
    assert run_due_tasks() == 1
    result.refresh()
    assert status(result) == TaskResultStatus.SUCCESSFUL
    assert result.return_value is not None
    assert result.return_value["sum"] == 5
    assert result.worker_ids == [worker_id()]
    assert result.attempts == 1
    assert result.started_at is not None
    assert result.finished_at is not None
    assert result.errors == []
    assert not TaskLease.objects.exists()


@pytest.mark.django_db
def test_a_raising_task_fails_with_its_error_and_is_not_retried() -> None:
    result = tasks.explode.enqueue("boom at 3")
    run_due_tasks()
    result.refresh()
    assert status(result) == TaskResultStatus.FAILED
    assert [e.exception_class for e in result.errors] == [ValueError]
    assert "boom at 3" in result.errors[0].traceback
    with pytest.raises(ValueError, match="failed"):
        _ = result.return_value
    assert run_due_tasks() == 0
    assert tasks.ran == [("explode", "boom at 3")]


@pytest.mark.django_db
def test_a_return_value_that_is_not_json_fails_the_task() -> None:
    result = tasks.not_json.enqueue()
    run_due_tasks()
    result.refresh()
    assert status(result) == TaskResultStatus.FAILED
    assert result.errors[0].exception_class is TypeError


@pytest.mark.django_db
def test_higher_priority_runs_first_then_oldest() -> None:
    tasks.note.using(priority=-10).enqueue("low")
    tasks.note.enqueue("first normal")
    tasks.note.using(priority=50).enqueue("high")
    tasks.note.enqueue("second normal")
    run_due_tasks()
    assert [label for _, label in tasks.ran] == ["high", "first normal", "second normal", "low"]


@pytest.mark.django_db
def test_run_after_waits_until_due_and_the_dispatcher_knows_when() -> None:
    later = timezone.now() + timedelta(hours=1)
    result = tasks.note.using(run_after=later).enqueue("later")
    assert run_due_tasks() == 0
    due, next_at = Dispatcher("default", backend().flyfn).scan()
    assert due == {}
    assert next_at == later
    DBTaskResult.objects.filter(id=result.id).update(
        run_after=timezone.now() - timedelta(seconds=1)
    )
    due, _ = Dispatcher("default", backend().flyfn).scan()
    assert due == {"tasks": 1}
    assert run_due_tasks() == 1
    result.refresh()
    assert status(result) == TaskResultStatus.SUCCESSFUL


@pytest.mark.django_db
def test_queues_map_to_groups() -> None:
    report = tasks.report.enqueue("2026-11")
    plain = tasks.note.enqueue("plain")
    due, _ = Dispatcher("default", backend().flyfn).scan()
    assert due == {"pdf": 1, "tasks": 1}
    assert run_due_tasks("tasks") == 1
    assert tasks.ran == [("note", "plain")]
    assert run_due_tasks("pdf") == 1
    report.refresh()
    plain.refresh()
    assert report.return_value == "report 2026-11"
    assert plain.return_value == "plain"


@pytest.mark.django_db
def test_takes_context_sees_its_result_and_attempt() -> None:
    result = tasks.with_context.enqueue("ctx")
    run_due_tasks()
    result.refresh()
    assert result.return_value == {"attempt": 1, "id": result.id, "label": "ctx"}


@pytest.mark.django_db
def test_async_task_functions_run() -> None:
    result = tasks.async_double.enqueue(21)
    run_due_tasks()
    result.refresh()
    assert cast(object, result.return_value) == 42


@pytest.mark.django_db(transaction=True)
async def test_aenqueue_and_aget_result(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Dispatcher, "notify", lambda self, group=None: None)  # run it below instead
    result = await tasks.add.aenqueue(1, 1)
    assert result.status == TaskResultStatus.READY
    fetched = await tasks.add.aget_result(result.id)
    assert fetched.id == result.id
    from asgiref.sync import sync_to_async

    await sync_to_async(run_due_tasks)()
    await result.arefresh()
    assert status(result) == TaskResultStatus.SUCCESSFUL


@pytest.mark.django_db
def test_unknown_result_id_raises_django_s_error() -> None:
    from django_tasks_db.compat import TaskResultDoesNotExist

    with pytest.raises(TaskResultDoesNotExist):
        tasks.add.get_result("00000000-0000-0000-0000-000000000000")


# --------------------------------------------------------------------------- delivery


@pytest.mark.django_db
def test_delivery_waits_for_the_commit_and_a_rollback_delivers_nothing(
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
) -> None:
    notified: list[str] = []
    monkeypatch.setattr(
        Dispatcher, "notify", lambda self, group=None: notified.append(f"{self.alias}:{group}")
    )
    with django_capture_on_commit_callbacks(execute=True) as callbacks, transaction.atomic():
        tasks.note.enqueue("committed")
        assert notified == []  # not before the commit
    assert len(callbacks) == 1
    assert notified == ["default:tasks"]

    class Rollback(Exception):
        pass

    def enqueue_then_fail() -> None:
        with transaction.atomic():
            tasks.note.enqueue("rolled back")
            raise Rollback

    with django_capture_on_commit_callbacks(execute=True) as callbacks, pytest.raises(Rollback):
        enqueue_then_fail()
    assert callbacks == []
    assert notified == ["default:tasks"]
    assert DBTaskResult.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_local_role_runs_after_commit_off_the_request_thread() -> None:
    with machine_role.override_role(machine_role.LOCAL):
        result = tasks.add.enqueue(20, 22)
        wait_finished(result)
    assert status(result) == TaskResultStatus.SUCCESSFUL
    assert result.return_value is not None
    assert result.return_value["sum"] == 42
    assert result.return_value["thread"] != threading.current_thread().name
    assert dispatcher("default", backend().flyfn).wakes >= 1


# --------------------------------------------------------------------------- leases and attempts


def expire_leases() -> None:
    TaskLease.objects.update(expires_at=timezone.now() - timedelta(seconds=1))


@pytest.mark.django_db
def test_a_task_whose_machine_vanished_runs_again_and_the_late_outcome_is_dropped() -> None:
    result = tasks.note.enqueue("twice")
    lost = claim_next(backend(), "tasks", "machine-killed")
    assert lost is not None
    result.refresh()
    assert status(result) == TaskResultStatus.RUNNING
    assert result.worker_ids == ["machine-killed"]
    due, _ = Dispatcher("default", backend().flyfn).scan()
    assert due == {}  # its lease holds: nothing to wake
    expire_leases()
    due, _ = Dispatcher("default", backend().flyfn).scan()
    assert due == {"tasks": 1}
    assert run_due_tasks() == 1
    result.refresh()
    assert status(result) == TaskResultStatus.SUCCESSFUL
    assert result.worker_ids == ["machine-killed", worker_id()]
    assert result.attempts == 2
    # The first run comes back (a frozen Machine resumed): it writes nothing.
    assert run_claim(lost) is False
    result.refresh()
    assert result.worker_ids == ["machine-killed", worker_id()]


@pytest.mark.django_db
def test_the_last_lost_attempt_fails_the_task_with_task_lost() -> None:
    result = tasks.note.enqueue("doomed")
    for n in range(backend().flyfn.max_attempts):
        assert claim_next(backend(), "tasks", f"machine-{n}") is not None
        expire_leases()
    assert run_due_tasks() == 0
    result.refresh()
    assert status(result) == TaskResultStatus.FAILED
    assert result.errors[0].exception_class is TaskLost
    assert "machine-2" in result.errors[0].traceback
    assert "attempt 3 of 3" in result.errors[0].traceback
    assert tasks.ran == []


# Committed rows: the lease keeper renews from a thread (and connection) of its own.
@pytest.mark.django_db(transaction=True)
def test_a_live_lease_is_renewed_while_its_task_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Dispatcher, "notify", lambda self, group=None: None)  # no local runner
    TaskOptions.parse("default", {})  # defaults: lease 30 s
    tasks.note.enqueue("x")
    claim = claim_next(backend(), "tasks", "m")
    assert claim is not None
    before = TaskLease.objects.get().expires_at
    TaskLease.objects.update(expires_at=before - timedelta(seconds=20))
    from flyfn.tasks import runner

    renew = threading.Thread(target=runner._keeper._renew, args=({claim.token: ("default", 30.0)},))
    renew.start()
    renew.join(SAFETY_BOUND)
    assert TaskLease.objects.get().expires_at > before - timedelta(seconds=1)


# Two Machines, two connections, committed rows: only PostgreSQL locks rows (SQLite serialises
# whole transactions, so this interleaving cannot happen on it).
@pytest.mark.django_db(transaction=True)
def test_an_outcome_and_a_reaping_of_the_same_lease_never_both_win(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("row locks: PostgreSQL only")
    monkeypatch.setattr(Dispatcher, "notify", lambda self, group=None: None)  # no local runner
    result = tasks.note.enqueue("raced")
    first = claim_next(backend(), "tasks", "machine-a")
    assert first is not None
    other: list[Any] = []
    original = DBTaskResult.set_successful

    def racing_write(row: Any, value: Any) -> None:
        # Between machine-a's lease check and its write, its lease expires (it ran past it) and
        # machine-b reaps the task and claims it, in a thread and connection of its own.
        def machine_b() -> None:
            try:
                expire_leases()
                other.append(claim_next(backend(), "tasks", "machine-b"))
            finally:
                connection.close()

        thread = threading.Thread(target=machine_b)
        thread.start()
        thread.join(SAFETY_BOUND)
        assert not thread.is_alive(), "machine-b blocked: too slow (safety bound)"
        original(row, value)

    monkeypatch.setattr(DBTaskResult, "set_successful", racing_write)
    stored = run_claim(first)
    monkeypatch.undo()

    (second,) = other
    result.refresh()
    if stored:  # machine-a's outcome stands: nobody may have claimed the task meanwhile
        assert second is None
        assert status(result) == TaskResultStatus.SUCCESSFUL
        assert result.worker_ids == ["machine-a"]
        assert not TaskLease.objects.exists()
    else:  # machine-b took it over: its lease and its run stand
        assert second is not None
        assert status(result) == TaskResultStatus.RUNNING
        assert TaskLease.objects.get().token == second.token
        assert run_claim(second) is True


# --------------------------------------------------------------------------- the wake view


def test_each_group_has_a_registered_post_wake_view() -> None:
    view = wake_view("tasks")
    assert wake_view("tasks") is view
    entry = registry.lookup(view)
    assert entry is not None
    assert (entry.group, entry.methods) == ("tasks", frozenset({"POST"}))


@pytest.mark.django_db(transaction=True)
async def test_unsigned_wakes_are_refused_and_main_never_runs_tasks() -> None:
    client = AsyncClient()
    response = await client.post("/_flyfn/tasks/tasks/")
    assert response.status_code == 403
    response = await client.post("/_flyfn/tasks/tasks/", headers={WAKE_HEADER: sign_wake("pdf")})
    assert response.status_code == 403  # signed for another group
    with machine_role.override_role(machine_role.MAIN):
        response = await client.post(
            "/_flyfn/tasks/tasks/", headers={WAKE_HEADER: sign_wake("tasks")}
        )
    assert response.status_code == 503


@pytest.mark.django_db(transaction=True)
async def test_a_signed_wake_on_a_function_machine_runs_the_due_tasks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        Dispatcher, "notify", lambda self, group=None: None
    )  # no wake over the network
    env = machine_role.MachineEnv(app_name="testapp", machine_id="fn0123456789ab")
    with machine_role.override_role(machine_role.function("tasks"), env):
        results = [await tasks.note.aenqueue(f"n{i}") for i in range(3)]
        response = await AsyncClient().post(
            "/_flyfn/tasks/tasks/", headers={WAKE_HEADER: sign_wake("tasks")}
        )
        assert response.status_code == 200
        chunks = response.streaming_content  # type: ignore[attr-defined]
        body = b"".join([chunk async for chunk in chunks])
    lines = body.decode().strip().splitlines()
    assert lines[-1] == '{"done": true, "ran": 3, "machine": "fn0123456789ab"}'
    for result in results:
        await result.arefresh()
        assert status(result) == TaskResultStatus.SUCCESSFUL
        assert result.worker_ids == ["fn0123456789ab"]


@pytest.mark.django_db(transaction=True)
def test_under_wsgi_a_wakes_heartbeats_are_streamed_not_read_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Django reads an async iterator whole before a WSGI server sends any of it: a wake under
    WSGI answers with a plain iterator, so its heartbeats reach Fly Proxy (idle timeout 60 s)."""
    monkeypatch.setattr(Dispatcher, "notify", lambda self, group=None: None)
    monkeypatch.setattr(wake_module, "HEARTBEAT", 0.05)
    env = machine_role.MachineEnv(app_name="testapp", machine_id="fn0123456789ab")
    with machine_role.override_role(machine_role.function("tasks"), env):
        tasks.pause.enqueue(0.5)
        response = Client().post("/_flyfn/tasks/tasks/", headers={WAKE_HEADER: sign_wake("tasks")})
        assert response.status_code == 200
        assert not response.is_async  # type: ignore[attr-defined]
        chunks = response.streaming_content  # type: ignore[attr-defined]
        lines = b"".join(chunks).decode().splitlines()
    assert "." in lines  # heartbeats while the task ran
    assert lines[-1] == '{"done": true, "ran": 1, "machine": "fn0123456789ab"}'


# --------------------------------------------------------------------------- checks and status


@pytest.mark.django_db
def test_status_counts_per_group() -> None:
    tasks.explode.enqueue("failed")
    failing = claim_next(backend(), "tasks", "m1")
    assert failing is not None
    run_claim(failing)
    tasks.note.enqueue("running")
    assert claim_next(backend(), "tasks", "m2") is not None
    tasks.note.enqueue("ready")
    tasks.report.enqueue("2026-10")
    tasks.note.using(run_after=timezone.now() + timedelta(hours=1)).enqueue("later")
    DBTaskResult.objects.filter(args_kwargs__args=["ready"]).update(
        enqueued_at=timezone.now() - timedelta(minutes=5)
    )
    by_group = {g.group: g for g in task_status()}
    assert set(by_group) == {"tasks", "pdf"}
    mine, pdf = by_group["tasks"], by_group["pdf"]
    assert (mine.ready, mine.scheduled, mine.running, mine.failed) == (1, 1, 1, 1)
    assert (pdf.ready, pdf.scheduled, pdf.running, pdf.failed) == (1, 0, 0, 0)
    assert mine.oldest_waiting is not None
    assert mine.oldest_waiting >= timedelta(minutes=5)
    assert pdf.oldest_waiting is not None
    assert pdf.oldest_waiting < timedelta(minutes=5)


def test_check_reports_a_missing_wake_url() -> None:
    with override_settings(ROOT_URLCONF="tests.testapp.routing"):
        ids = [m.id for m in backend().check()]
    assert "flyfn.E013" in ids
    assert "flyfn.E013" not in [m.id for m in backend().check()]


def test_no_wake_is_sent_without_an_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLYFN_PUBLIC_URL", raising=False)
    waker = Dispatcher("default", backend().flyfn)
    with machine_role.override_role(machine_role.MAIN, machine_role.MachineEnv()):
        assert waker._send("tasks") is None
    assert waker._retry_at["tasks"] > 0


@pytest.mark.django_db
def test_flyfn_status_shows_each_group_s_tasks() -> None:
    from io import StringIO

    from django.core.management import call_command

    tasks.note.enqueue("waiting")
    tasks.report.enqueue("2026-09")
    DBTaskResult.objects.update(enqueued_at=timezone.now() - timedelta(seconds=90))
    out = StringIO()
    with machine_role.override_role(machine_role.LOCAL, machine_role.MachineEnv()):
        call_command("flyfn", "status", stdout=out)
    lines = out.getvalue().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Tasks"))
    table = [line.split() for line in lines[header + 1 : header + 4]]
    assert table[0] == ["GROUP", "READY", "SCHEDULED", "RUNNING", "FAILED", "OLDEST", "WAITING"]
    assert table[1][:5] == ["pdf", "1", "0", "0", "0"]
    assert table[2][:5] == ["tasks", "1", "0", "0", "0"]
    assert int(table[2][5].rstrip("s")) >= 90


def task_events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    return [
        (r.flyfn_outcome, r.flyfn_task, r.flyfn_group)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "flyfn.events.task"
    ]


@pytest.mark.django_db
def test_each_step_of_a_task_is_an_event(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="flyfn.events.task")
    ok = tasks.add.enqueue(2, 3)
    run_due_tasks()
    bad = tasks.explode.enqueue("boom")
    run_due_tasks()
    ok_id, bad_id = str(ok.id), str(bad.id)
    assert task_events(caplog) == [
        ("enqueued", ok_id, "tasks"),
        ("started", ok_id, "tasks"),
        ("succeeded", ok_id, "tasks"),
        ("enqueued", bad_id, "tasks"),
        ("started", bad_id, "tasks"),
        ("failed", bad_id, "tasks"),
    ]
    failed = [r for r in caplog.records if getattr(r, "flyfn_outcome", None) == "failed"]
    assert [r.levelno for r in failed] == [logging.WARNING]


@pytest.mark.django_db
def test_a_lost_task_is_retried_then_failed_as_events(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="flyfn.events.task")
    result = tasks.note.enqueue("doomed")
    for n in range(backend().flyfn.max_attempts):
        assert claim_next(backend(), "tasks", f"machine-{n}") is not None
        expire_leases()
    run_due_tasks()
    outcomes = [outcome for outcome, task, _ in task_events(caplog) if task == str(result.id)]
    assert outcomes == ["enqueued", "retried", "retried", "failed"]


# --------------------------------------------------------------------------- scale to zero


def test_a_task_group_s_machines_run_with_autostop_off_and_stay_stopped_once_they_exit() -> None:
    from flyfn.conf import get_settings
    from flyfn.pool.spec import spec_for

    groups = {"pdf": {"autostop": "suspend"}, "views": {"autostop": "suspend"}}
    flyfn = {"APP_NAME": "shop", "IMAGE_REF": "registry.fly.io/shop:1", "GROUPS": groups}
    with override_settings(FLYFN=flyfn):
        pdf = spec_for(get_settings(), "pdf", {}).config
        views = spec_for(get_settings(), "views", {}).config
    [service] = pdf.services or []
    assert service.autostop == "off"  # background work is no load to Fly Proxy
    assert pdf.restart is not None
    assert pdf.restart.policy == "no"
    [service] = views.services or []
    assert service.autostop == "suspend"
    assert views.restart is not None
    assert views.restart.policy == "on-failure"


def test_beyond_horizon_is_checked_and_its_absence_warns() -> None:
    with pytest.raises(ImproperlyConfigured, match="beyond_horizon"):
        TaskOptions.parse("default", {"beyond_horizon": "cron"})
    assert "flyfn.W005" in [m.id for m in backend().check()]
    options = {**TASKS["default"]["OPTIONS"], "beyond_horizon": "next_wake"}  # type: ignore[dict-item]
    found = FlyMachinesBackend("default", {**TASKS["default"], "OPTIONS": options})
    assert "flyfn.W005" not in [m.id for m in found.check()]


@pytest.mark.django_db
def test_due_times_are_read_on_the_database_clock_not_the_machine_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = tasks.note.using(run_after=timezone.now() + timedelta(seconds=3)).enqueue("soon")
    real_now = timezone.now
    # This Machine's clock runs 5 s ahead of the database's: the task is not due for either.
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(seconds=5))
    due, next_at = Dispatcher("default", backend().flyfn).scan()
    assert due == {}
    assert next_at is not None
    assert claim_next(backend(), "tasks", "m1") is None
    result.refresh()
    assert status(result) == TaskResultStatus.READY


@pytest.mark.django_db
def test_a_wake_that_runs_nothing_backs_off_instead_of_storming() -> None:
    waker = Dispatcher("default", backend().flyfn)

    def wake() -> float:
        # In a thread of its own, as the dispatcher's: a run closes its thread's connections.
        waker._open["tasks"] += 1
        with machine_role.override_role(machine_role.LOCAL):
            thread = threading.Thread(target=waker._wake, args=("tasks",))
            thread.start()
            thread.join(SAFETY_BOUND)
        return waker._retry_at.get("tasks", 0.0) - time.monotonic()

    first = wake()  # nothing is due: the wake runs nothing
    second = wake()
    assert waker.idle_wakes == 2
    assert 0 < first <= 1.0 < second <= 2.0  # doubling, as after a failure


@pytest.mark.django_db(transaction=True)
def test_the_keeper_runs_what_comes_due_waits_within_the_horizon_then_stops_the_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flyfn.tasks import keeper as keeper_module
    from flyfn.tasks.dispatch import stop_all

    # Only the keeper runs tasks here: no dispatcher of this process's (the local role's in-process
    # runner) may take the task first.
    stop_all()
    monkeypatch.setattr(Dispatcher, "notify", lambda self, group=None: None)
    stops: list[str] = []
    keeper = keeper_module.Keeper(stop_machine=lambda: stops.append("stop"), live=True)
    keeper.group = "tasks"  # as start() sets it, without its thread
    soon = tasks.note.using(run_after=timezone.now() + timedelta(minutes=10)).enqueue("soon")
    tasks.note.using(run_after=timezone.now() + timedelta(hours=2)).enqueue("beyond")
    wait = keeper.step()
    assert 0 < wait <= keeper_module.LOOK  # within the horizon: it stays up
    assert stops == []
    DBTaskResult.objects.filter(id=soon.id).update(run_after=timezone.now())
    steps: list[float] = []
    # In a thread of its own, as the keeper's: a run closes its thread's connections.
    thread = threading.Thread(target=lambda: steps.append(keeper.step()))
    thread.start()
    thread.join(SAFETY_BOUND)
    assert steps == [0.0]
    assert keeper.ran == 1  # it ran the task itself, no wake needed
    assert 0 < keeper.step() <= keeper_module.IDLE_EXIT  # drained, but a request came lately
    monkeypatch.setattr(keeper_module, "IDLE_EXIT", 0.0)
    assert keeper.step() == float("inf")  # only a task beyond the horizon is left
    assert stops == ["stop"]
    assert keeper.stopping


def test_a_task_group_s_machine_keeps_itself_from_its_first_moment_not_its_first_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A pool launches the Machines it creates: one may never get a request, and with autostop off
    # only its keeper would stop it. The keeper starts as a web process loads the middleware.
    from flyfn.middleware import FlyReplayMiddleware
    from flyfn.tasks import keeper as keeper_module

    started: list[str] = []
    monkeypatch.setattr(keeper_module._keeper, "start", started.append)
    monkeypatch.setattr(keeper_module, "_tracked", {})
    with machine_role.override_role(machine_role.function("tasks")):
        FlyReplayMiddleware(lambda request: HttpResponse())
    assert started == ["tasks"]
    with machine_role.override_role(machine_role.function("receipts")):  # views only
        FlyReplayMiddleware(lambda request: HttpResponse())
    with machine_role.override_role(machine_role.MAIN):
        FlyReplayMiddleware(lambda request: HttpResponse())
    assert started == ["tasks"]


def test_a_keeper_that_never_saw_a_request_stops_its_machine_once_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flyfn.tasks import keeper as keeper_module

    stops: list[str] = []
    monkeypatch.setattr(keeper_module, "seconds_until_due", lambda group: None)  # nothing due
    keeper = keeper_module.Keeper(stop_machine=lambda: stops.append("stop"), live=True)
    keeper.group = "tasks"
    assert 0 < keeper.step() <= keeper_module.IDLE_EXIT  # just booted: it waits a moment
    monkeypatch.setattr(keeper_module, "IDLE_EXIT", 0.0)
    assert keeper.step() == float("inf")
    assert stops == ["stop"]


@pytest.mark.django_db
def test_the_lease_table_s_migrations_match_its_model() -> None:
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command("makemigrations", "flyfn_tasks", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()


# ------------------------------------------------------------------ BaseExceptions, signals


@pytest.mark.django_db
def test_system_exit_from_argparse_fails_the_task_and_the_run_goes_on() -> None:
    bad = tasks.parse_arguments.enqueue(["--no-such-flag"])
    after = tasks.note.enqueue("after")
    assert run_due_tasks() == 2  # the SystemExit did not end the run (nor the process)
    bad.refresh()
    after.refresh()
    assert status(bad) == TaskResultStatus.FAILED
    assert [e.exception_class for e in bad.errors] == [SystemExit]
    assert status(after) == TaskResultStatus.SUCCESSFUL
    assert not TaskLease.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_keyboard_interrupt_raised_by_a_task_off_the_main_thread_fails_it() -> None:
    # The local role runs tasks in the dispatcher's thread, as a function Machine runs them in a
    # thread of its server: no Ctrl-C lands there, the task's own code raised it.
    with machine_role.override_role(machine_role.LOCAL):
        interrupted = tasks.interrupt.enqueue("stop")
        wait_finished(interrupted)
        after = tasks.note.enqueue("after")
        wait_finished(after)
    assert status(interrupted) == TaskResultStatus.FAILED
    assert [e.exception_class for e in interrupted.errors] == [KeyboardInterrupt]
    assert status(after) == TaskResultStatus.SUCCESSFUL


@pytest.mark.django_db
def test_a_keyboard_interrupt_on_the_main_thread_goes_through_as_in_django() -> None:
    # Django's immediate backend lets the user stop: the task stays RUNNING until its lease
    # expires, then runs again.
    interrupted = tasks.interrupt.enqueue("ctrl-c")
    with pytest.raises(KeyboardInterrupt):
        run_due_tasks()
    interrupted.refresh()
    assert status(interrupted) == TaskResultStatus.RUNNING
    assert TaskLease.objects.count() == 1


@pytest.mark.django_db(transaction=True)
async def test_a_system_exit_in_a_wake_fails_its_task_and_the_wake_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Dispatcher, "notify", lambda self, group=None: None)
    env = machine_role.MachineEnv(app_name="testapp", machine_id="fn0123456789ab")
    with machine_role.override_role(machine_role.function("tasks"), env):
        bad = await tasks.parse_arguments.aenqueue(["--no-such-flag"])
        good = [await tasks.note.aenqueue(f"n{i}") for i in range(2)]
        response = await AsyncClient().post(
            "/_flyfn/tasks/tasks/", headers={WAKE_HEADER: sign_wake("tasks")}
        )
        chunks = response.streaming_content  # type: ignore[attr-defined]
        body = b"".join([chunk async for chunk in chunks])
    assert body.decode().strip().splitlines()[-1] == (
        '{"done": true, "ran": 3, "machine": "fn0123456789ab"}'
    )
    await bad.arefresh()
    assert status(bad) == TaskResultStatus.FAILED
    for result in good:
        await result.arefresh()
        assert status(result) == TaskResultStatus.SUCCESSFUL


@pytest.mark.parametrize("signal_name", ["task_started", "task_finished"])
@pytest.mark.django_db
def test_a_signal_receiver_that_raises_is_logged_and_the_wake_goes_on(
    signal_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    from django_tasks_db import compat

    signal = getattr(compat, signal_name)

    def broken(**kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    results = [tasks.note.enqueue(f"n{i}") for i in range(3)]
    signal.connect(broken, dispatch_uid="test-broken-receiver")
    try:
        with caplog.at_level(logging.WARNING, logger="flyfn.tasks"):
            assert run_due_tasks() == 3
    finally:
        signal.disconnect(dispatch_uid="test-broken-receiver")
    for result in results:
        result.refresh()
        assert status(result) == TaskResultStatus.SUCCESSFUL
    logged = [r.getMessage() for r in caplog.records if "signal receiver" in r.getMessage()]
    assert len(logged) == 3
    assert all("broken raised RuntimeError: receiver bug" in m for m in logged)


@pytest.mark.django_db(transaction=True)
async def test_the_wake_needs_no_login_under_login_required_middleware(
    monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    settings.MIDDLEWARE = [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.auth.middleware.LoginRequiredMiddleware",
    ]
    settings.SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
    monkeypatch.setattr(Dispatcher, "notify", lambda self, group=None: None)
    env = machine_role.MachineEnv(app_name="testapp", machine_id="fn0123456789ab")
    with machine_role.override_role(machine_role.function("tasks"), env):
        result = await tasks.note.aenqueue("no login")
        unsigned = await AsyncClient().post("/_flyfn/tasks/tasks/")
        response = await AsyncClient().post(
            "/_flyfn/tasks/tasks/", headers={WAKE_HEADER: sign_wake("tasks")}
        )
        assert response.status_code == 200
        chunks = response.streaming_content  # type: ignore[attr-defined]
        body = b"".join([chunk async for chunk in chunks])
    assert unsigned.status_code == 403  # refused by its signature, not sent to a login page
    assert body.decode().strip().splitlines()[-1].startswith('{"done": true, "ran": 1')
    await result.arefresh()
    assert status(result) == TaskResultStatus.SUCCESSFUL


# --------------------------------------------------------------------------- a dropped connection


# Committed rows, and the connection of the thread running the task terminated by the server.
@pytest.mark.parametrize("conn_max_age", [0, None], ids=["per-request", "persistent"])
@pytest.mark.django_db(transaction=True)
def test_an_outcome_is_written_on_a_new_connection_when_the_server_dropped_the_old(
    conn_max_age: int | None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("pg_terminate_backend: PostgreSQL only")
    monkeypatch.setattr(Dispatcher, "notify", lambda self, group=None: None)  # run it here
    # Persistent connections (CONN_MAX_AGE None) are not recycled before the write: the failed
    # write finds the connection unusable and is tried again on a new one.
    connection.close()
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", conn_max_age)
    result = tasks.lose_my_connection.enqueue()
    after = tasks.note.enqueue("after")
    with caplog.at_level(logging.WARNING, logger="flyfn.tasks"):
        assert run_due_tasks() == 2
    result.refresh()
    after.refresh()
    assert status(result) == TaskResultStatus.SUCCESSFUL
    assert result.return_value == "survived"
    assert result.attempts == 1  # no attempt burnt
    assert status(after) == TaskResultStatus.SUCCESSFUL
    assert not TaskLease.objects.exists()
    lost = [r for r in caplog.records if "could not be written" in r.getMessage()]
    assert len(lost) == (1 if conn_max_age is None else 0)


# --------------------------------------------------------------------------- retries and timeouts


def with_options(settings: Any, **options: Any) -> None:
    base: dict[str, Any] = TASKS["default"]
    settings.TASKS = {"default": {**base, "OPTIONS": {**base["OPTIONS"], **options}}}


def make_due() -> None:
    DBTaskResult.objects.filter(status=TaskResultStatus.READY).update(
        run_after=timezone.now() - timedelta(seconds=1)
    )


def test_retry_options_are_checked_and_per_queue_ones_win() -> None:
    options = TaskOptions.parse(
        "default",
        {
            "retries": {"max_attempts": 3, "backoff": "exponential", "base": 2},
            "timeout": 60,
            "queue_options": {"reports": {"retries": {"max_attempts": 5}, "timeout": 600}},
        },
    )
    policy = options.retries_of("default")
    assert policy is not None
    assert (policy.max_attempts, policy.backoff) == (3, "exponential")
    assert [policy.delay(n) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]
    reports = options.retries_of("reports")
    assert reports is not None
    assert reports.max_attempts == 5
    assert (options.timeout_of("default"), options.timeout_of("reports")) == (60.0, 600.0)
    assert TaskOptions().retries_of("default") is None  # Django's: a task that raises fails
    constant = TaskOptions.parse("d", {"retries": {"backoff": "constant", "base": 5}}).retries
    assert constant is not None
    assert [constant.delay(n) for n in (1, 5)] == [5.0, 5.0]
    capped = TaskOptions.parse("d", {"retries": {"base": 60, "max_delay": 100}}).retries
    assert capped is not None
    assert capped.delay(10) == 100.0
    cases: list[tuple[dict[str, Any], str]] = [
        ({"retries": {"max_attempts": 0}}, "['retries']['max_attempts']: must be a whole"),
        ({"retries": {"backoff": "fibonacci"}}, "['retries']['backoff']: must be one of"),
        ({"retries": {"tries": 3}}, "['retries']: unknown key 'tries'"),
        ({"timeout": 0}, "['timeout']: must be a number of seconds > 0"),
        ({"queue_options": {"q": {"lease": 3}}}, "['queue_options']['q']: unknown option"),
        ({"exit_wait": -1}, "['exit_wait']: must be a number of seconds >= 0"),
    ]
    for bad, message in cases:
        with pytest.raises(ImproperlyConfigured, match=re.escape(message)):
            TaskOptions.parse("default", bad)


@pytest.mark.django_db
def test_a_raising_task_is_retried_with_back_off_and_every_error_is_kept(settings: Any) -> None:
    with_options(settings, retries={"max_attempts": 3, "backoff": "exponential", "base": 2})
    result = tasks.fail_until.enqueue(succeed_on=99)
    before = timezone.now()
    assert run_due_tasks() == 1
    after = timezone.now()
    row = DBTaskResult.objects.get()
    assert row.status == TaskResultStatus.READY
    assert before + timedelta(seconds=2) <= row.run_after <= after + timedelta(seconds=2)
    assert run_due_tasks() == 0  # not due before its back-off
    due, next_at = Dispatcher("default", backend().flyfn).scan()
    assert (due, next_at) == ({}, row.run_after)  # the dispatcher wakes the group then
    make_due()
    before = timezone.now()
    assert run_due_tasks() == 1
    row = DBTaskResult.objects.get()
    assert row.run_after >= before + timedelta(seconds=4)  # the second back-off doubles
    make_due()
    assert run_due_tasks() == 1
    result.refresh()
    assert status(result) == TaskResultStatus.FAILED
    assert result.attempts == 3
    assert [e.exception_class for e in result.errors] == [ValueError] * 3
    assert [f"failed on attempt {n}" in e.traceback for n, e in enumerate(result.errors, 1)] == [
        True
    ] * 3
    # Each run saw the errors of the runs before it (context.task_result.errors).
    assert tasks.ran == [("fail_until", (1, 0)), ("fail_until", (2, 1)), ("fail_until", (3, 2))]
    assert run_due_tasks() == 0


@pytest.mark.django_db
def test_a_retried_task_that_then_succeeds_keeps_its_earlier_errors(settings: Any) -> None:
    with_options(settings, queue_options={"default": {"retries": {"max_attempts": 5}}})
    result = tasks.fail_until.enqueue(succeed_on=2)
    run_due_tasks()
    make_due()
    run_due_tasks()
    result.refresh()
    assert status(result) == TaskResultStatus.SUCCESSFUL
    assert result.return_value == {"attempt": 2, "errors_seen": 1}
    assert [e.exception_class for e in result.errors] == [ValueError]
    fetched = tasks.fail_until.get_result(result.id)
    assert len(fetched.errors) == 1


@pytest.mark.django_db
def test_a_system_exit_is_not_retried(settings: Any) -> None:
    with_options(settings, retries={"max_attempts": 3})
    result = tasks.parse_arguments.enqueue(["--no-such-flag"])
    run_due_tasks()
    result.refresh()
    assert status(result) == TaskResultStatus.FAILED
    assert result.attempts == 1


@pytest.mark.django_db
def test_a_task_past_its_queue_s_timeout_fails_and_frees_the_runner(settings: Any) -> None:
    from flyfn.tasks import TaskTimeout

    # Only the "slow" queue has a timeout. `block` waits until the test releases it: it is
    # always past its timeout, whatever the machine's speed.
    with_options(settings, queue_options={"slow": {"timeout": 0.05}})
    tasks.release.clear()
    try:
        slow = tasks.block.enqueue("stuck")
        after = tasks.note.enqueue("after")
        assert run_due_tasks() == 2  # the runner went on to the next task
        slow.refresh()
        after.refresh()
        assert status(slow) == TaskResultStatus.FAILED
        assert [e.exception_class for e in slow.errors] == [TaskTimeout]
        assert "ran past its timeout of 0.05 s" in slow.errors[0].traceback
        assert status(after) == TaskResultStatus.SUCCESSFUL
        assert not TaskLease.objects.exists()  # no lease is renewed for it any more
    finally:
        tasks.release.set()


# --------------------------------------------------------------------------- a process that exits

EXIT_SETTINGS = """
from tests.settings import *  # noqa: F403

DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": {db!r}}}}}
ROOT_URLCONF = "tests.tasks_urls"
TASKS = {{
    "default": {{
        "BACKEND": "flyfn.tasks.FlyMachinesBackend",
        "QUEUES": [],
        "OPTIONS": {{"group": "tasks", "url": {url!r}, "exit_wait": 60}},
    }}
}}
"""

EXIT_SCRIPT = """
import atexit

import django

django.setup()
from django.core.management import call_command

call_command("migrate", verbosity=0)


def report():  # registered first: runs after flyfn's flush
    from flyfn.tasks import dispatch

    print("delivered", dispatch._dispatchers["default"].delivered, flush=True)


atexit.register(report)
from tests.testapp import tasks

tasks.note.enqueue("from a command")
"""


@pytest.mark.e2e
def test_a_process_that_enqueues_and_exits_delivers_its_wake_first(tmp_path: Any) -> None:
    import http.server
    import os
    import sqlite3
    import subprocess
    import sys

    from flyfn.tasks.wake import _nonce

    db = str(tmp_path / "db.sqlite3")
    wakes: list[tuple[str, bool]] = []

    class FakeRunner(http.server.BaseHTTPRequestHandler):
        # A function Machine's answer to a wake: it runs the due task (here: marks it done).
        def do_POST(self) -> None:
            wakes.append(
                (self.path, _nonce(self.headers.get(WAKE_HEADER, ""), "tasks") is not None)
            )
            with sqlite3.connect(db) as rows:
                rows.execute("UPDATE django_tasks_database_dbtaskresult SET status = 'SUCCESSFUL'")
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'flyfn tasks: running group tasks\n{"done": true, "ran": 1}\n')

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeRunner)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        (tmp_path / "exit_settings.py").write_text(EXIT_SETTINGS.format(db=db, url=url))
        env = {
            **child_env(("FLY", "DJANGO")),
            "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()]),
            "DJANGO_SETTINGS_MODULE": "exit_settings",
            "FLY_APP_NAME": "testapp",  # an app Machine: it wakes through Fly Proxy
            "FLYFN_TEST_SQLITE": "1",
        }
        done = subprocess.run(
            [sys.executable, "-c", EXIT_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=SAFETY_BOUND * 2,
        )
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert wakes == [("/_flyfn/tasks/tasks/", True)]
    assert "delivered 1" in done.stdout
    with sqlite3.connect(db) as rows:
        assert rows.execute("SELECT status FROM django_tasks_database_dbtaskresult").fetchall() == [
            ("SUCCESSFUL",)
        ]
