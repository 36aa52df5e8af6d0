"""`manage.py flyfn status | prepare | gc` against the emulated Machines API on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from flyfn.checks import check_settings
from flyfn.conf import get_settings
from flyfn.management.commands.flyfn import metrics_url
from flyfn.pool.spec import image_hash, spec_for
from tests.support_machines_api import EMULATOR_APP, MachinesAPI, free_loopback_port

OLD = "registry.fly.io/testapp:deployment-1"
NEW = "registry.fly.io/testapp:deployment-2"
GROUPS = {"pdf": {"machines": 2}, "batch": {"strategy": "app", "app": "testapp-batch"}}


def flyfn(*args: str) -> str:
    out = StringIO()
    call_command("flyfn", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def app_machine(api: MachinesAPI, image: str) -> str:
    """An ordinary app Machine (no flyfn_group metadata) running `image`."""
    return api.create(config={"image": image}).id


def function_images(api: MachinesAPI, app: str = EMULATOR_APP) -> list[tuple[str, str]]:
    return sorted(
        (m.config.metadata["flyfn_group"], m.config.image)
        for m in api.machines(app)
        if m.config and m.config.metadata and m.config.image
    )


def test_prepare_creates_every_group_and_is_idempotent(machines_api: MachinesAPI) -> None:
    with override_settings(FLYFN=machines_api.flyfn_settings(NEW, GROUPS=GROUPS)):
        first = flyfn("prepare")
        second = flyfn("prepare")
    # Groups of decorated views (default, pdf) and declared groups (batch, in its own app).
    assert function_images(machines_api) == [("default", NEW), ("pdf", NEW), ("pdf", NEW)]
    assert function_images(machines_api, "testapp-batch") == [("batch", NEW)]
    assert "1 created" in first
    assert "2 created" in first
    assert second.count("0 created, 0 updated, 0 destroyed") == 3


def test_prepare_twice_makes_no_update_start_or_stop_call(machines_api: MachinesAPI) -> None:
    """On an unchanged image and settings the second `prepare` changes nothing, whatever zero
    values the API leaves out of its answers."""
    groups = {"pdf": {"machines": 2, "env": ["FLYFN_TEST_FORWARDED"]}}
    with override_settings(FLYFN=machines_api.flyfn_settings(NEW, GROUPS=groups)):
        flyfn("prepare")
        before = len(machines_api.calls)
        second = flyfn("prepare")
    changes = [
        (method, path)
        for method, path in machines_api.calls[before:]
        if method != "GET"  # lists are all a prepare needs when nothing changed
    ]
    assert changes == []
    assert second.count("0 created, 0 updated, 0 destroyed") == 2


def test_prepare_updates_machines_whose_config_drifted(machines_api: MachinesAPI) -> None:
    with override_settings(FLYFN=machines_api.flyfn_settings(NEW)):
        flyfn("prepare")
    bigger = {"default": {"guest": {"memory_mb": 1024}}}
    with override_settings(FLYFN=machines_api.flyfn_settings(NEW, GROUPS=bigger)):
        out = flyfn("prepare")
    assert "default: " in out
    assert "0 created, 1 updated" in out
    [machine] = machines_api.machines(group="default")
    assert machine.config is not None
    assert machine.config.guest is not None
    assert machine.config.guest.memory_mb == 1024


def test_status_shows_views_and_machines_with_freshness(machines_api: MachinesAPI) -> None:
    app_machine(machines_api, OLD)
    with override_settings(FLYFN=machines_api.flyfn_settings(OLD)):
        flyfn("prepare")
    with override_settings(FLYFN=machines_api.flyfn_settings(NEW)):
        flyfn("prepare")
        out = flyfn("status")
    assert "/routing/pdf/" in out
    assert "GET,HEAD" in out
    assert "tests.testapp.routing.Upload" in out
    current = f"flyfn-pdf-{image_hash(NEW)}-0"
    in_use = f"flyfn-pdf-{image_hash(OLD)}-0"
    lines = {line.split()[1]: line for line in out.splitlines() if "flyfn-" in line}
    assert lines[current].rstrip().endswith("current")
    assert lines[in_use].rstrip().endswith("in use")
    summaries = [line.strip() for line in out.splitlines() if "by state:" in line]
    assert "by state: started 2; by image: current 1, in use 1" in summaries


@pytest.mark.e2e
def test_status_shows_this_machines_metrics_per_group(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.delenv("FLY_APP_NAME", raising=False)
    port = free_loopback_port()
    worker = subprocess.Popen(
        [sys.executable, "-c", METRICS_SERVER, str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "serving"
        with override_settings(FLYFN={"METRICS_PORT": port}):
            out = flyfn("status")
    finally:
        worker.communicate(timeout=60)
    rows = {
        line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  pdf")
    }
    assert rows["pdf"] == ["3", "1", "0", "0", "1"]  # replays, fallbacks, bounces, rejected, cold


def test_status_says_when_metrics_are_not_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLY_APP_NAME", raising=False)
    with override_settings(FLYFN={"METRICS_PORT": free_loopback_port()}):
        out = flyfn("status")
    assert "not available from http://127.0.0.1:" in out


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("::", "http://127.0.0.1:9091/metrics"),
        ("0.0.0.0", "http://127.0.0.1:9091/metrics"),
        ("127.0.0.1", "http://127.0.0.1:9091/metrics"),
        ("::1", "http://[::1]:9091/metrics"),
        ("fdaa:0:1:a7b:1::2", "http://[fdaa:0:1:a7b:1::2]:9091/metrics"),
    ],
)
def test_status_reads_the_metrics_where_they_are_bound(address: str, url: str) -> None:
    assert metrics_url(address, 9091) == url


METRICS_SERVER = """
import sys
from flyfn import events, metrics
metrics.serve(int(sys.argv[1]), "127.0.0.1")
for _ in range(3):
    events.replayed("pdf", "m1", None)
events.fell_back("pdf", "no_machine", "local")
events.cold_waited("pdf", 0.5, True)
print("serving", flush=True)
sys.stdin.read()
"""


def test_gc_destroys_functions_of_images_no_app_machine_runs(machines_api: MachinesAPI) -> None:
    old_app = app_machine(machines_api, OLD)
    with override_settings(FLYFN=machines_api.flyfn_settings(OLD)):
        flyfn("prepare")
    # A deploy: the new image gets its own function Machines; the old ones stay while an app
    # Machine still runs the old image.
    with override_settings(FLYFN=machines_api.flyfn_settings(NEW)):
        flyfn("prepare")
        assert "No orphaned" in flyfn("gc")
        assert ("pdf", OLD) in function_images(machines_api)
        machines_api.destroy(old_app)
        app_machine(machines_api, NEW)
        dry = flyfn("gc", "--dry-run")
        assert dry.count("would destroy") == 2
        assert ("pdf", OLD) in function_images(machines_api)
        out = flyfn("gc")
    assert "Destroyed 2 Machine(s)" in out
    assert function_images(machines_api) == [("default", NEW), ("pdf", NEW)]


def test_status_off_fly_lists_views_without_calling_the_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FLY_APP_NAME", raising=False)
    with override_settings(FLYFN={}):
        out = flyfn("status")
    assert "/routing/pdf/" in out
    assert "not on Fly" in out


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"APP_NAME": "testapp", "IMAGE_REF": OLD}, "FLY_API_TOKEN"),
        ({"APP_NAME": "testapp", "API_TOKEN": "t0ken-value"}, "FLY_IMAGE_REF"),
        (
            {
                "APP_NAME": "testapp",
                "API_TOKEN": "t0ken-value",
                "IMAGE_REF": OLD,
                "API_HOSTNAME": "http://127.0.0.1:9",
            },
            "Machines API",
        ),
    ],
)
def test_prepare_fails_clearly(
    settings: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("FLY_API_TOKEN", "FLY_IMAGE_REF"):
        monkeypatch.delenv(var, raising=False)
    with override_settings(FLYFN=settings), pytest.raises(CommandError) as error:
        flyfn("prepare")
    assert message in str(error.value)
    assert "t0ken-value" not in str(error.value)


def test_wrong_token_is_a_clear_error(machines_api: MachinesAPI) -> None:
    settings = {**machines_api.flyfn_settings(NEW), "API_TOKEN": "wrong-t0ken"}
    with override_settings(FLYFN=settings), pytest.raises(CommandError) as error:
        flyfn("gc")
    assert "401" in str(error.value)
    assert "wrong-t0ken" not in str(error.value)


def test_spec_names_are_deterministic_per_group_and_image(machines_api: MachinesAPI) -> None:
    with override_settings(FLYFN=machines_api.flyfn_settings(NEW)):
        spec = spec_for(get_settings(), "pdf")
    assert spec.name_prefix == f"flyfn-pdf-{image_hash(NEW)}-"


@pytest.mark.parametrize("hostname", ["http://127.0.0.1:99999", "http://[::1", "http://:80"])
@pytest.mark.parametrize("subcommand", ["status", "prepare", "gc"])
def test_a_malformed_api_hostname_is_a_settings_error_not_a_traceback(
    hostname: str, subcommand: str
) -> None:
    settings = {"APP_NAME": "testapp", "API_TOKEN": "t0ken-value", "IMAGE_REF": OLD}
    with override_settings(FLYFN={**settings, "API_HOSTNAME": hostname}):
        [message] = check_settings()
        with pytest.raises(CommandError) as error:
            flyfn(subcommand)
    assert message.id == "flyfn.E001"
    assert message.msg.startswith('FLYFN["API_HOSTNAME"]: must be an http(s) URL')
    assert 'FLYFN["API_HOSTNAME"]' in str(error.value)
    assert "t0ken-value" not in str(error.value)


@pytest.fixture
def silent_api() -> Iterator[str]:
    """An address that accepts connections and never answers (the kernel completes them)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize("subcommand", ["status", "prepare", "gc"])
def test_an_api_that_never_answers_meets_the_commands_deadline(
    silent_api: str, subcommand: str
) -> None:
    settings = {"APP_NAME": "testapp", "API_TOKEN": "t0ken-value", "IMAGE_REF": OLD}
    begun = time.monotonic()
    with (
        override_settings(FLYFN={**settings, "API_HOSTNAME": silent_api}),
        pytest.raises(CommandError) as error,
    ):
        flyfn(subcommand, "--timeout", "0.5")
    # Safety bound only: without the deadline the client's timeouts and retries take 90 s+.
    assert time.monotonic() - begun < 60
    assert str(error.value).startswith(f"gave up after 0.5 s: the Machines API at {silent_api}")
    assert "release_command" in str(error.value)
    assert "--timeout" in str(error.value)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf", "nan"])
def test_the_deadline_must_be_a_positive_number(value: str) -> None:
    with pytest.raises(CommandError, match="positive number of seconds"):
        flyfn("prepare", "--timeout", value)


def test_dev_takes_a_time_scale_instead_of_an_idle_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    import flyfn.emulator.dev as dev

    seen: list[Any] = []

    def run_dev(options: Any) -> int:
        seen.append(options)
        return 0

    monkeypatch.setattr(dev, "run_dev", run_dev)
    flyfn("dev", "--time-scale", "120")
    assert seen[0].time_scale == 120.0
    flyfn("dev")
    assert seen[1].time_scale == 1.0
    for bad in ("0", "-2", "x", "inf"):
        with pytest.raises(CommandError, match="time-scale"):
            flyfn("dev", "--time-scale", bad)
    with pytest.raises(CommandError, match="idle-stop"):
        flyfn("dev", "--idle-stop", "5")
