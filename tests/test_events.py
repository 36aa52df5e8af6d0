"""Tests of flyfn's events and metrics: each event's logger, level, fields and metric; serving."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.test import override_settings
from prometheus_client import generate_latest

from flyfn import events, metrics
from flyfn.conf import load_settings
from flyfn.machines import AsyncMachinesClient, MachinesError
from flyfn.middleware import FlyReplayMiddleware
from flyfn.pool.spec import new_client
from tests.support_machines_api import free_loopback_port

TOKEN = "FlyV1 fm2_events-token-never-shown"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def recorded() -> Iterator[metrics.Recorded]:
    metrics.disable()
    yield metrics.enable()
    metrics.disable()


def sample(recorded: metrics.Recorded, name: str, **labels: str) -> float:
    value = recorded.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# (call, logger, level, fields, metric sample, its labels)
Case = tuple[Callable[[], None], str, int, dict[str, Any], str, dict[str, str]]
CASES: dict[str, Case] = {
    "replay": (
        lambda: events.replayed("pdf", "m1", None),
        "flyfn.events.replay",
        logging.DEBUG,
        {"flyfn_event": "replay", "flyfn_group": "pdf", "flyfn_machine": "m1", "flyfn_app": None},
        "flyfn_replays_total",
        {"group": "pdf"},
    ),
    "fallback": (
        lambda: events.fell_back("pdf", "no_machine", "local"),
        "flyfn.events.fallback",
        logging.DEBUG,
        {"flyfn_event": "fallback", "flyfn_reason": "no_machine", "flyfn_outcome": "local"},
        "flyfn_fallbacks_total",
        {"group": "pdf", "reason": "no_machine", "outcome": "local"},
    ),
    "bounce": (
        lambda: events.bounced("pdf", "not_serverless"),
        "flyfn.events.bounce",
        logging.DEBUG,
        {"flyfn_event": "bounce", "flyfn_group": "pdf", "flyfn_reason": "not_serverless"},
        "flyfn_bounces_total",
        {"group": "pdf", "reason": "not_serverless"},
    ),
    "state_rejected": (
        lambda: events.state_rejected("pdf", "expired"),
        "flyfn.events.state",
        logging.DEBUG,
        {"flyfn_event": "state_rejected", "flyfn_reason": "expired"},
        "flyfn_rejected_states_total",
        {"group": "pdf", "reason": "expired"},
    ),
    "cold_wait": (
        lambda: events.cold_waited("pdf", 1.5, True),
        "flyfn.events.cold_wait",
        logging.DEBUG,
        {"flyfn_event": "cold_wait", "flyfn_seconds": 1.5, "flyfn_found": True},
        "flyfn_cold_wait_seconds_count",
        {"group": "pdf", "found": "true"},
    ),
    "pool": (
        lambda: events.pool_changed("pdf", "create", "m9"),
        "flyfn.events.pool",
        logging.INFO,
        {"flyfn_event": "pool", "flyfn_action": "create", "flyfn_machine": "m9"},
        "flyfn_pool_changes_total",
        {"group": "pdf", "action": "create"},
    ),
    "api_call": (
        lambda: events.api_called("create_machine", 201, 0.02),
        "flyfn.events.api",
        logging.DEBUG,
        {"flyfn_event": "api_call", "flyfn_operation": "create_machine", "flyfn_status": "201"},
        "flyfn_api_calls_total",
        {"operation": "create_machine", "status": "201"},
    ),
    "task_failed": (
        lambda: events.task_changed("tasks", "failed", "t1", "store.tasks.report"),
        "flyfn.events.task",
        logging.WARNING,
        {"flyfn_event": "task", "flyfn_outcome": "failed", "flyfn_task": "t1"},
        "flyfn_tasks_total",
        {"group": "tasks", "outcome": "failed"},
    ),
    "task_started": (
        lambda: events.task_changed("tasks", "started", "t1", "store.tasks.report"),
        "flyfn.events.task",
        logging.DEBUG,
        {"flyfn_event": "task", "flyfn_outcome": "started"},
        "flyfn_tasks_total",
        {"group": "tasks", "outcome": "started"},
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_event_is_one_record_of_its_logger_and_level_with_its_fields(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    call, logger, level, fields, _, _ = CASES[name]
    caplog.set_level(logging.DEBUG, logger="flyfn")
    call()
    (record,) = caplog.records
    assert (record.name, record.levelno) == (logger, level)
    for field, value in fields.items():
        assert getattr(record, field) == value, field


@pytest.mark.parametrize("name", CASES)
def test_event_updates_its_metric_once(name: str, recorded: metrics.Recorded) -> None:
    call, _, _, _, metric, labels = CASES[name]
    assert sample(recorded, metric, **labels) == 0
    call()
    assert sample(recorded, metric, **labels) == 1


@pytest.mark.parametrize("name", CASES)
def test_event_costs_no_metric_while_recording_is_off(name: str) -> None:
    metrics.disable()
    CASES[name][0]()  # nothing to record into, and no error
    assert metrics.recorded() is None


def test_nothing_per_request_is_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="flyfn")
    events.replayed("pdf", "m1", None)
    events.fell_back("pdf", "body", "unavailable")
    events.bounced("pdf", "unsigned")
    events.state_rejected("pdf", "mismatch")
    events.cold_waited("pdf", 0.3, False)
    events.api_called("list_machines", 200, 0.01)
    events.task_changed("tasks", "enqueued", "t1", "x")
    assert caplog.records == []


def test_cold_wait_durations_fall_into_histogram_buckets(recorded: metrics.Recorded) -> None:
    events.cold_waited("pdf", 0.2, True)
    events.cold_waited("pdf", 20.0, True)
    labels = {"group": "pdf", "found": "true"}
    assert sample(recorded, "flyfn_cold_wait_seconds_bucket", le="0.25", **labels) == 1
    assert sample(recorded, "flyfn_cold_wait_seconds_bucket", le="30.0", **labels) == 2
    assert sample(recorded, "flyfn_cold_wait_seconds_sum", **labels) == pytest.approx(20.2)


# -- the API client's calls --------------------------------------------------------------------


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> AsyncMachinesClient:
    """The pool's client (`new_client` hooks `events.api_called` to it), on a mock API; the calls
    pass `max_retries=0` so that each request is one attempt."""
    settings = load_settings({"APP_NAME": "shop", "API_TOKEN": TOKEN}, environ={})
    return new_client(settings, transport=httpx.MockTransport(handler))


async def test_a_client_without_a_hook_reports_nothing(recorded: metrics.Recorded) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=[]))
    async with AsyncMachinesClient("shop", api_token=TOKEN, transport=transport) as client:
        await client.list_machines()
    assert sample(recorded, "flyfn_api_calls_total", operation="list_machines", status="200") == 0


async def test_each_api_request_is_an_event_with_its_status(
    recorded: metrics.Recorded, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="flyfn")
    answers = iter([httpx.Response(200, json=[]), httpx.Response(404, json={"error": "nope"})])
    async with _client(lambda request: next(answers)) as client:
        await client.list_machines()
        with pytest.raises(MachinesError):
            await client.get_machine("m1")
    assert sample(recorded, "flyfn_api_calls_total", operation="list_machines", status="200") == 1
    assert sample(recorded, "flyfn_api_calls_total", operation="get_machine", status="404") == 1
    assert sample(recorded, "flyfn_api_call_seconds_count", operation="get_machine") == 1
    api = [r for r in caplog.records if r.name == "flyfn.events.api"]
    assert [r.flyfn_status for r in api] == ["200", "404"]  # type: ignore[attr-defined]


async def test_api_transport_failures_are_events_too(recorded: metrics.Recorded) -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    for handler in (timeout, refused):
        async with _client(handler) as client:
            with pytest.raises(MachinesError):
                await client.get_machine("m1", max_retries=0)
    assert sample(recorded, "flyfn_api_calls_total", operation="get_machine", status="timeout") == 1
    assert (
        sample(recorded, "flyfn_api_calls_total", operation="get_machine", status="connection") == 1
    )


async def test_no_event_or_metric_shows_the_token_or_secret_key(
    recorded: metrics.Recorded, caplog: pytest.LogCaptureFixture, settings: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    async with _client(lambda request: httpx.Response(500, json={"error": "boom"})) as client:
        with pytest.raises(MachinesError):
            await client.list_machines(max_retries=0)
    for call, *_ in CASES.values():
        call()
    shown = (
        "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
        + generate_latest(recorded.registry).decode()
    )
    assert "flyfn_api_calls_total" in shown
    for secret in (TOKEN, "events-token-never-shown", settings.SECRET_KEY):
        assert secret not in shown


# -- serving -----------------------------------------------------------------------------------


def test_middleware_serves_metrics_only_when_a_port_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[tuple[int, str, object]] = []

    def serve(port: int, address: str, *, extra: object = None) -> None:
        served.append((port, address, type(extra).__name__))

    monkeypatch.setattr(metrics, "serve", serve)
    FlyReplayMiddleware(lambda request: httpx.Response(200))  # type: ignore[arg-type,return-value]
    assert served == []
    with override_settings(FLYFN={"METRICS_PORT": 9191, "METRICS_ADDRESS": "127.0.0.1"}):
        FlyReplayMiddleware(lambda request: httpx.Response(200))  # type: ignore[arg-type,return-value]
    # With the Machine time and cost per group, computed when scraped.
    assert served == [(9191, "127.0.0.1", "MachineTimeCollector")]


@pytest.mark.e2e
def test_a_taken_port_is_a_warning_never_an_error(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        script = f"""
            import logging, sys
            logging.basicConfig(level=logging.WARNING)
            from flyfn import metrics
            sys.exit(0 if metrics.serve({port}, "127.0.0.1") is False else 1)
        """
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"cannot serve metrics on 127.0.0.1 port {port}" in done.stderr


WORKER = """
import sys, time
from flyfn import events, metrics
served = metrics.serve(int(sys.argv[1]), "127.0.0.1")
for _ in range(int(sys.argv[2])):
    events.replayed("pdf", "m1", None)
print("served" if served else "deferred", flush=True)
sys.stdin.read()  # stay up until the test closes stdin
"""


@pytest.mark.e2e
def test_several_worker_processes_are_served_as_one_sum(tmp_path: Path) -> None:
    port = free_loopback_port()
    env = {**os.environ, metrics.MULTIPROCESS_ENV: str(tmp_path)}
    workers: list[subprocess.Popen[str]] = []
    try:
        said = []
        for count in (2, 3):
            worker = subprocess.Popen(
                [sys.executable, "-c", WORKER, str(port), str(count)],
                cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            workers.append(worker)
            assert worker.stdout is not None
            said.append(worker.stdout.readline().strip())
        assert said == ["served", "deferred"]
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text
        assert 'flyfn_replays_total{group="pdf"} 5.0' in text
    finally:
        for worker in workers:
            worker.communicate(timeout=60)
