"""Machine time and cost per group: the price table, the seconds read from Machine events, and a
group driven through starts, stops and a suspend under the emulated Machines API on a test clock,
checked against a hand computation from the price table (and as `manage.py flyfn status` shows
it)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from flyfn.cost_report import REGION_COST_HEADER, money, region_cost_rows, seconds_text, window_for
from flyfn.fly.pricing import (
    PER_CPU_MONTHLY,
    PER_EXTRA_GB_MONTHLY,
    ROOTFS_GB_MONTHLY,
    SECONDS_PER_MONTH,
    Guest,
    running_per_second,
    storage_per_second,
)
from flyfn.fly.timestamps import unix_seconds
from flyfn.machine_time import (
    MachineTime,
    Window,
    by_region,
    group_cost,
    machine_time,
    parse_window,
)
from flyfn.machines.models import Machine, MachineEvent
from flyfn.management.commands import flyfn as command
from tests.support_machines_api import EMULATOR_APP, MachinesAPI, serve_machines_api

IMAGE = "registry.fly.io/testapp:deployment-1"
T0 = 1_800_000_000.0


class TestClock:
    """A wall clock the test moves by hand."""

    __test__ = False

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("guest", "published"),
    [
        (Guest("shared", 1, 256), 1.94),
        (Guest("shared", 1, 1024), 5.70),
        (Guest("shared", 1, 2048), 10.70),
        (Guest("performance", 1, 4096), 41.01),
        (Guest("shared", 2, 1024), 6.39),
        (Guest("shared", 4, 8192), 42.79),
        (Guest("performance", 1, 2048), 31.00),
        (Guest("performance", 2, 4096), 62.00),
        (Guest("performance", 1, 8192), 61.00),
    ],
)
def test_the_table_gives_fly_s_published_preset_prices(guest: Guest, published: float) -> None:
    assert running_per_second(guest) * SECONDS_PER_MONTH == pytest.approx(published, abs=0.01)


def test_an_unknown_cpu_kind_has_no_price() -> None:
    with pytest.raises(ValueError, match="no price for cpu_kind 'gpu'"):
        running_per_second(Guest("gpu", 1, 256))


def test_a_stopped_machine_pays_its_root_file_system_per_gb_month() -> None:
    assert storage_per_second(2.0) * SECONDS_PER_MONTH == pytest.approx(0.30)


def event(kind: str, status: str, at: float) -> MachineEvent:
    return MachineEvent(type=kind, status=status, timestamp=int(at * 1000))


def test_seconds_belong_to_the_state_each_event_entered() -> None:
    machine = Machine(
        id="m1",
        state="stopped",
        events=[  # newest first, as the API lists them
            event("exit", "stopped", 700),
            event("stop", "stopping", 690),
            event("start", "started", 102),
            event("start", "starting", 100),
            event("launch", "created", 50),
        ],
    )
    # Created at 50 (stopped, paying its root file system), running from 100 until 700.
    assert machine_time(machine, Window(0, 1000)) == MachineTime(
        started=600, stopped=350, starts=1, exact=True
    )
    # A window starting later: the state at its start is that of the last event before it.
    assert machine_time(machine, Window(200, 1000)) == MachineTime(
        started=500, stopped=300, exact=True
    )


def test_events_that_do_not_reach_the_window_start_are_not_exact() -> None:
    # Fly keeps the latest events only: here the creation is gone.
    machine = Machine(id="m1", state="started", events=[event("start", "started", 500)])
    assert machine_time(machine, Window(0, 1000)) == MachineTime(started=500, starts=1, exact=False)


def test_a_destroyed_machine_costs_nothing_after_it_is_gone() -> None:
    machine = Machine(
        id="m1",
        state="destroyed",
        events=[
            event("destroy", "destroyed", 400),
            event("start", "started", 100),
            event("launch", "created", 100),
        ],
    )
    assert machine_time(machine, Window(0, 1000)) == MachineTime(started=300, starts=1)


@pytest.mark.parametrize("text", ["", "1", "-1h", "0s", "forever", "1w"])
def test_a_window_is_a_duration_days_or_deploy(text: str) -> None:
    assert parse_window("1h") == 3600
    assert parse_window("7d") == 7 * 86400
    assert parse_window("deploy") is None
    with pytest.raises(ValueError, match=r'expected a window such as "1h", "1d" or "deploy"'):
        parse_window(text)


def test_figures_are_written_for_reading() -> None:
    assert [seconds_text(s) for s in (42, 725, 11220)] == ["42s", "12m05s", "3h07m"]
    figures = (0, 2e-10, 0.000123456, 0.0042, 0.05, 1234.5)
    assert [money(d) for d in figures] == [
        "$0",
        "$0",
        "$0.000123",
        "$0.00420",
        "$0.050",
        "$1,234.500",
    ]


@pytest.fixture
def clock() -> TestClock:
    return TestClock(T0)


@pytest.fixture
def timed_api(clock: TestClock) -> Iterator[MachinesAPI]:
    with serve_machines_api(wall_clock=clock) as api:
        yield api


def act(api: MachinesAPI, machine_id: str, action: str, settled: str) -> None:
    """Ask for a transition and wait until the Machine has settled in `settled` (same instant)."""
    path = f"/v1/apps/{EMULATOR_APP}/machines/{machine_id}"
    api.http.post(f"{path}/{action}").raise_for_status()
    api.http.get(f"{path}/wait", params={"state": settled, "timeout": 10}).raise_for_status()


GROUPS = {"pdf": {"guest": {"memory_mb": 512}}}


def test_a_group_driven_through_starts_and_stops_costs_what_the_table_says(
    timed_api: MachinesAPI, clock: TestClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    with override_settings(FLYFN=timed_api.flyfn_settings(IMAGE, GROUPS=GROUPS)):
        call_command("flyfn", "prepare", stdout=StringIO())
    [machine] = timed_api.machines(group="pdf")
    act(timed_api, machine.id, "start", "started")  # launched at T0: already started
    clock.now = T0 + 600
    act(timed_api, machine.id, "stop", "stopped")
    clock.now = T0 + 1800
    act(timed_api, machine.id, "start", "started")
    clock.now = T0 + 2100
    act(timed_api, machine.id, "suspend", "suspended")
    clock.now = T0 + 3000
    act(timed_api, machine.id, "start", "started")
    clock.now = T0 + 3600

    [listed] = timed_api.machines(group="pdf")
    cost = group_cost("pdf", [listed], Window(T0 - 60, T0 + 3600))

    # By hand: started 0-600, 1800-2100, 3000-3600; stopped 600-1800; suspended 2100-3000.
    assert cost.time == MachineTime(started=1500, stopped=1200, suspended=900, starts=3)
    monthly = PER_CPU_MONTHLY["shared"] + 0.25 * PER_EXTRA_GB_MONTHLY  # 512 MB: 256 included
    running, storage = monthly / SECONDS_PER_MONTH, ROOTFS_GB_MONTHLY / SECONDS_PER_MONTH
    assert cost.cost is not None
    assert cost.always_on is not None
    assert cost.saved is not None
    assert math.isclose(cost.cost, 1500 * running + 2100 * storage)
    assert math.isclose(cost.always_on, 3600 * running)
    assert cost.saved > 0
    levers = {lever.change: lever.cost for lever in cost.levers}
    assert math.isclose(levers['autostop "off"'], cost.always_on)
    # Kept warm, its 2100 idle seconds would have run instead of resting.
    assert math.isclose(levers["keep_warm +1"], cost.cost + 2100 * (running - storage))
    # At 256 MB, the same seconds at the smallest preset's price.
    smallest = PER_CPU_MONTHLY["shared"] / SECONDS_PER_MONTH
    assert math.isclose(levers["guest shared-cpu-1x 256MB"], 1500 * smallest + 2100 * storage)

    monkeypatch.setattr(command, "CLOCK", clock)
    out = StringIO()
    with override_settings(FLYFN=timed_api.flyfn_settings(IMAGE, GROUPS=GROUPS)):
        call_command("flyfn", "status", "--window", "deploy", stdout=out)
    [row] = [line.split() for line in out.getvalue().splitlines() if line.startswith("  pdf ")]
    # Since the deploy (T0): the same seconds and starts but the launch, at the window's start.
    assert row == [
        "pdf",
        "1",
        "25m00s",
        "20m00s",
        "15m00s",
        "2",
        money(cost.cost),
        money(cost.always_on),
        money(cost.saved),
    ]
    assert "keep_warm +1" in out.getvalue()


def test_the_deploy_window_starts_with_the_current_image_s_first_machine() -> None:
    old = Machine(id="a", created_at="2027-01-15T08:00:00Z", config={"image": "old"})
    new = Machine(id="b", created_at="2027-01-15T09:00:00Z", config={"image": "new"})
    window = window_for("deploy", [old, new], "new", now=T0)
    assert window.start == datetime(2027, 1, 15, 9, tzinfo=UTC).timestamp()
    assert window_for("1h", [old, new], "new", now=T0) == Window(T0 - 3600, T0, "1h")


def test_status_refuses_a_window_it_cannot_read() -> None:
    with pytest.raises(CommandError, match="expected a window such as"):
        call_command("flyfn", "status", "--window", "soon", stdout=StringIO(), stderr=StringIO())


def test_a_group_in_two_regions_is_split_by_region_and_could_do_with_one_machine_fewer() -> None:
    busy = Machine(
        id="a",
        region="ams",
        events=[
            event("exit", "stopped", 400),
            event("start", "started", 100),
            event("launch", "created", 0),
        ],
    )
    idle = Machine(id="b", region="fra", events=[event("launch", "created", 0)])
    cost = group_cost("pdf", [busy, idle], Window(0, 1000))
    assert cost.regions == {
        "ams": MachineTime(started=300, stopped=700, starts=1),
        "fra": MachineTime(stopped=1000),
    }
    assert cost.time == MachineTime(started=300, stopped=1700, starts=1)
    levers = {lever.change: lever.cost for lever in cost.levers}
    # Without the idle Machine: its 1000 s of root file system are saved.
    assert cost.cost is not None
    assert math.isclose(levers["max_machines 1"], cost.cost - 1000 * storage_per_second())
    assert "guest shared-cpu-1x 256MB" not in levers  # already the smallest


def test_machines_by_region_sorted_in_the_order_given_and_dash_for_none() -> None:
    a, b, c, d = (
        Machine(id=i, region=r) for i, r in (("a", "syd"), ("b", None), ("c", "iad"), ("d", "syd"))
    )
    split = by_region([a, b, c, d])
    assert list(split) == ["-", "iad", "syd"]
    assert [[m.id for m in found] for found in split.values()] == [["b"], ["c"], ["a", "d"]]


def test_region_cost_rows_price_each_region_from_its_own_machines() -> None:
    busy = Machine(
        id="a",
        region="ams",
        events=[event("start", "started", 100), event("launch", "created", 0)],
    )
    idle = Machine(id="b", region="fra", events=[event("launch", "created", 0)])
    rows = region_cost_rows("pdf", [idle, busy], Window(0, 1000))
    assert [row[:7] for row in rows] == [
        ("pdf", "ams", "1", "15m00s", "1m40s", "0s", "1"),
        ("pdf", "fra", "1", "0s", "16m40s", "0s", "0"),
    ]
    cost_at = REGION_COST_HEADER.index("COST")
    assert [row[cost_at] for row in rows] == [
        money(900 * running_per_second(Guest()) + 100 * storage_per_second()),
        money(1000 * storage_per_second()),
    ]


def test_status_splits_a_group_in_several_regions(machines_api: MachinesAPI) -> None:
    for region in ("ams", "fra"):
        config = {"image": IMAGE, "metadata": {"flyfn_group": "pdf"}}
        machines_api.create(config=config, region=region)
    out = StringIO()
    settings = machines_api.flyfn_settings(IMAGE, GROUPS={"pdf": {"max_machines": 2}})
    with override_settings(FLYFN=settings):
        call_command("flyfn", "status", "--window", "1h", stdout=out)
    regions = [line.split(":")[0].strip() for line in out.getvalue().splitlines()]
    assert [line for line in regions if line.startswith("pdf in ")] == ["pdf in ams", "pdf in fra"]


def test_an_update_or_restart_keeps_the_state_it_happens_in() -> None:
    # Fly records an update of a stopped Machine too: its root file system only, no start.
    stopped = Machine(
        id="m1",
        state="stopped",
        events=[
            event("update", "replacing", 300),
            event("update", "updating", 200),
            event("restart", "restarting", 100),
            event("launch", "created", 0),
        ],
    )
    assert machine_time(stopped, Window(0, 1000)) == MachineTime(stopped=1000)
    # Of a started Machine: still started, and not a start.
    started = Machine(
        id="m2",
        state="started",
        events=[
            event("update", "started", 300),
            event("update", "updating", 200),
            event("start", "started", 100),
            event("launch", "created", 0),
        ],
    )
    assert machine_time(started, Window(0, 1000)) == MachineTime(started=900, stopped=100, starts=1)


def test_a_size_the_price_table_does_not_know_is_an_unknown_cost_not_an_error(
    machines_api: MachinesAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kind Fly has and the table lacks (the emulator accepts only the known ones): here
    # `performance`, taken out of the table.
    guest = {"cpu_kind": "performance", "cpus": 1, "memory_mb": 2048}
    config = {"image": IMAGE, "metadata": {"flyfn_group": "gpu"}, "guest": guest}
    machines_api.create(config=config, region="ams")
    monkeypatch.delitem(PER_CPU_MONTHLY, "performance")
    out = StringIO()
    with override_settings(FLYFN=machines_api.flyfn_settings(IMAGE, GROUPS={"gpu": {}})):
        call_command("flyfn", "status", "--window", "1h", stdout=out)
    lines = out.getvalue().splitlines()
    [row] = [line.split() for line in lines if line.strip().startswith("gpu ")]
    assert row[-3:] == ["unknown", "unknown", "unknown"]
    assert "  gpu: cost unknown: no price for cpu_kind 'performance'" in lines


def test_api_timestamps_are_read_in_one_place_and_never_fail() -> None:
    assert unix_seconds("2027-01-15T08:00:00Z") == datetime(2027, 1, 15, 8, tzinfo=UTC).timestamp()
    assert unix_seconds("2027-01-15T09:00:00+01:00") == unix_seconds("2027-01-15T08:00:00Z")
    assert [unix_seconds(text) for text in (None, "", "soon")] == [None, None, None]
