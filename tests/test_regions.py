"""Multi-region groups against the Machines API emulator (in process): app Machines in iad and syd
each get their group's Machines in their own region, a group pinned to the primary region has one,
and a region without capacity sends its requests to the nearest one that has a Machine."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.test import override_settings

from flyfn.checks import check_keep_warm, check_settings
from flyfn.conf import get_settings
from flyfn.emulator.proxy.balancer import Candidate, Limits, Readiness, choose
from flyfn.emulator.proxy.errors import ProxyError
from flyfn.emulator.proxy.regions import FROM_REGION_HEADER, EdgeRegions
from flyfn.fly.regions import distance_km, nearest_first, one_way_latency_ms, parse_region_list
from flyfn.machine_role import MachineEnv, function, override_role
from flyfn.machines import Machine, MachineConfig
from flyfn.pool.choice import ReplayTarget
from flyfn.pool.listing import MachineListing
from flyfn.pool.manager import PoolManager
from flyfn.pool.placement import Placement, placement, pool_regions, route
from flyfn.pool.spec import image_hash, spec_for
from flyfn.settings_errors import SettingsError
from tests.support_machines_api import MachinesAPI
from tests.support_proxy import proxy_stack

IMAGE = "registry.fly.io/testapp:deployment-1"


def app_machine(region: str) -> PoolManager:
    """The pools of an app Machine in `region` of an app whose primary region is iad."""
    return PoolManager(region=region, primary_region="iad")


@pytest.fixture
def iad_and_syd() -> Iterator[tuple[PoolManager, PoolManager]]:
    iad, syd = app_machine("iad"), app_machine("syd")
    try:
        yield iad, syd
    finally:
        iad.close()
        syd.close()


def region_of(api: MachinesAPI, target: ReplayTarget | None) -> str | None:
    assert target is not None
    assert target.instance is not None
    [machine] = [m for m in api.machines() if m.id == target.instance]
    return machine.region


def test_a_group_following_the_caller_gets_a_machine_in_each_callers_region(
    machines_api: MachinesAPI, iad_and_syd: tuple[PoolManager, PoolManager]
) -> None:
    iad, syd = iad_and_syd
    with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=3600)):
        assert region_of(machines_api, syd.wait_target("default", 10)) == "syd"
        assert region_of(machines_api, iad.wait_target("default", 10)) == "iad"
        # Warm: each region's requests stay on its own Machine, with no API call.
        calls = len(machines_api.calls)
        assert {region_of(machines_api, syd.get_target("default")) for _ in range(20)} == {"syd"}
        assert len(machines_api.calls) == calls
    machines = machines_api.machines(group="default")
    assert sorted((m.region, m.name) for m in machines) == [
        ("iad", f"flyfn-default-{image_hash(IMAGE)}-iad-0"),
        ("syd", f"flyfn-default-{image_hash(IMAGE)}-syd-0"),
    ]


def test_max_machines_holds_per_region(
    machines_api: MachinesAPI, iad_and_syd: tuple[PoolManager, PoolManager]
) -> None:
    iad, syd = iad_and_syd
    groups = {"pdf": {"machines": 1, "max_machines": 2}}
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups, CACHE_TTL=3600)):
        syd.wait_target("pdf", 10)
        iad.wait_target("pdf", 10)
        assert len(syd.members("pdf")) == 2
        assert len(iad.members("pdf")) == 2
        assert set(syd.members("pdf")).isdisjoint(iad.members("pdf"))
    regions = sorted(m.region or "" for m in machines_api.machines(group="pdf"))
    assert regions == ["iad", "iad", "syd", "syd"]


def test_a_group_pinned_to_the_primary_region_creates_one_machine(
    machines_api: MachinesAPI, iad_and_syd: tuple[PoolManager, PoolManager]
) -> None:
    iad, syd = iad_and_syd
    groups = {"reports": {"regions": "primary"}}
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups, CACHE_TTL=3600)):
        from_syd = syd.wait_target("reports", 10)
        from_iad = iad.wait_target("reports", 10)
    assert from_syd == from_iad
    assert [m.region for m in machines_api.machines(group="reports")] == ["iad"]


def test_a_region_without_capacity_fails_over_to_the_nearest_with_an_event(
    machines_api: MachinesAPI,
    iad_and_syd: tuple[PoolManager, PoolManager],
    caplog: pytest.LogCaptureFixture,
) -> None:
    iad, syd = iad_and_syd
    assert machines_api.emulator is not None
    machines_api.emulator.full_regions.add("syd")
    caplog.set_level(logging.INFO, logger="flyfn.events.region")
    with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=3600)):
        target = syd.wait_target("default", 30)
        assert region_of(machines_api, target) == "iad"
        # The iad app Machine finds the same Machine: one pool per region, whoever created it.
        assert iad.wait_target("default", 10) == target
        assert syd.get_target("default") == target
    assert [m.region for m in machines_api.machines(group="default")] == ["iad"]
    [record] = [r for r in caplog.records if getattr(r, "flyfn_event", None) == "failover"]
    fields: dict[str, Any] = record.__dict__
    assert (fields["flyfn_group"], fields["flyfn_home"], fields["flyfn_region"]) == (
        "default",
        "syd",
        "iad",
    )
    assert fields["flyfn_reason"] == "no_capacity"


def test_the_primary_region_without_capacity_fails_over_where_the_app_runs(
    machines_api: MachinesAPI, iad_and_syd: tuple[PoolManager, PoolManager]
) -> None:
    iad, _ = iad_and_syd
    assert machines_api.emulator is not None
    for region in ("iad", "syd"):
        machines_api.create(
            region=region, config={"image": IMAGE, "metadata": {"fly_process_group": "app"}}
        )
    machines_api.emulator.full_regions.add("iad")
    with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=3600)):
        # Not the primary region (it is home), but where the app's other Machines run.
        assert region_of(machines_api, iad.wait_target("default", 30)) == "syd"
    assert [m.region for m in machines_api.machines(group="default")] == ["syd"]


def test_a_caller_outside_the_groups_list_uses_the_nearest_listed_region(
    machines_api: MachinesAPI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flyfn.events.region")
    nrt = PoolManager(region="nrt", primary_region="iad")
    groups = {"g": {"regions": ["iad", "syd"]}}
    try:
        with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups, CACHE_TTL=3600)):
            # Tokyo is nearer Sydney (~7,800 km) than Ashburn (~10,900 km).
            assert region_of(machines_api, nrt.wait_target("g", 10)) == "syd"
    finally:
        nrt.close()
    reasons = [
        r.__dict__["flyfn_reason"] for r in caplog.records if r.name == "flyfn.events.region"
    ]
    assert reasons == ["not_listed"]


def test_off_fly_and_shared_groups_keep_one_pool_named_as_before(
    machines_api: MachinesAPI, pool_manager: PoolManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLY_REGION", raising=False)
    groups = {"old": {"regions": "shared"}}
    shared_from_syd = app_machine("syd")
    try:
        with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups, CACHE_TTL=3600)):
            pool_manager.wait_target("default", 10)  # off Fly: no region known
            shared_from_syd.wait_target("old", 10)
    finally:
        shared_from_syd.close()
    found = sorted((m.name or "", m.region) for m in machines_api.machines())
    assert found == [
        (f"flyfn-default-{image_hash(IMAGE)}-0", "local"),  # Fly's choice (the emulator's)
        (f"flyfn-old-{image_hash(IMAGE)}-0", "syd"),  # where its first creator runs
    ]


# -- placement, pure -----------------------------------------------------------------------------


def test_routes_per_mode() -> None:
    caller, primary, shared = Placement("caller"), Placement("primary"), Placement("shared")
    assert route(caller, "syd", "iad").home == "syd"
    assert route(caller, "syd", "iad").failover == ("iad",)
    assert route(caller, None, "iad").home is None  # off Fly: the shared pool
    assert route(primary, "syd", "iad").home == "iad"
    assert route(primary, "syd", "iad").failover == ("syd",)
    assert route(shared, "syd", "iad").home is None
    listed = Placement("listed", ("iad", "ams", "syd"))
    assert route(listed, "fra", "iad").home == "ams"
    assert route(listed, "fra", "iad").failover == ("iad", "syd")
    assert route(listed, "fra", "iad").reason == "not_listed"
    assert route(listed, "syd", "iad").reason is None


def test_regions_to_prepare() -> None:
    assert pool_regions(Placement("caller"), "iad", "iad", ["syd", "iad", "syd"]) == ["iad", "syd"]
    assert pool_regions(Placement("primary"), "syd", "iad", ["syd"]) == ["iad"]
    assert pool_regions(Placement("shared"), "syd", "iad", ["syd"]) == [None]
    assert pool_regions(Placement("caller"), None, None, []) == [None]


def test_task_groups_default_to_the_primary_region(machines_api: MachinesAPI) -> None:
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS={"t": {"region": "ams"}})):
        settings = get_settings()
        assert placement(settings, "x", task_group=True) == Placement("primary")
        assert placement(settings, "x") == Placement("caller")
        assert placement(settings, "t") == Placement("shared")  # `region`: as before


def test_a_regional_spec_names_and_holds_its_region(machines_api: MachinesAPI) -> None:
    with override_settings(FLYFN=machines_api.flyfn_settings()):
        spec = spec_for(get_settings(), "default", {"FLY_REGION": "iad"}, pool_region="syd")
        shared = spec_for(get_settings(), "default", {"FLY_REGION": "iad"})
    assert (spec.region, spec.regional) == ("syd", True)
    assert spec.name_prefix.endswith("-syd-")
    assert spec.holds("syd")
    assert not spec.holds("iad")
    assert (shared.region, shared.regional, shared.holds("syd")) == ("iad", False, True)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("everywhere", 'must be "caller", "primary", "shared" or a list'),
        (["iad", "SYD"], 'must list Fly region codes such as "iad"'),
        ([], "must name at least one region"),
    ],
)
def test_bad_regions_are_refused_with_the_problem(
    machines_api: MachinesAPI, value: Any, message: str
) -> None:
    with (
        override_settings(FLYFN=machines_api.flyfn_settings(GROUPS={"g": {"regions": value}})),
        pytest.raises(SettingsError, match=message),
    ):
        get_settings()


def test_region_and_regions_are_not_both_set(machines_api: MachinesAPI) -> None:
    groups = {"g": {"region": "iad", "regions": ["syd"]}}
    with (
        override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups)),
        pytest.raises(SettingsError, match="either"),
    ):
        get_settings()


# -- regions, pure -------------------------------------------------------------------------------


def test_distances_and_latency() -> None:
    iad_syd = distance_km("iad", "syd")
    assert iad_syd is not None
    assert 15_500 < iad_syd < 15_900
    assert distance_km("iad", "iad") == 0.0
    assert distance_km("iad", "local") is None
    assert one_way_latency_ms("iad", "syd") == pytest.approx(1.5 * iad_syd / 200)
    assert one_way_latency_ms("local", "syd") == 0.0
    assert nearest_first("lhr", ["syd", "iad", "ams", "lhr", "xyz", "ams"]) == [
        "lhr",
        "ams",
        "iad",
        "syd",
        "xyz",
    ]


# -- manage.py flyfn prepare | status ------------------------------------------------------------


def test_prepare_makes_a_pool_where_each_app_machine_runs_and_status_shows_regions(
    machines_api: MachinesAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release command (in the primary region, iad) of an app with Machines in iad and syd."""
    monkeypatch.setenv("FLY_REGION", "iad")
    monkeypatch.setenv("PRIMARY_REGION", "iad")
    for region in ("iad", "syd"):
        machines_api.create(
            region=region, config={"image": IMAGE, "metadata": {"fly_process_group": "app"}}
        )
    groups = {"reports": {"regions": "primary"}}
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups)):
        prepared = command("prepare")
        status = command("status")
    assert sorted((m.region, m.name) for m in machines_api.machines(group="default")) == [
        ("iad", f"flyfn-default-{image_hash(IMAGE)}-iad-0"),
        ("syd", f"flyfn-default-{image_hash(IMAGE)}-syd-0"),
    ]
    assert [m.region for m in machines_api.machines(group="reports")] == ["iad"]
    assert "default: 1 Machine(s) in app testapp in iad" in prepared
    assert "default: 1 Machine(s) in app testapp in syd" in prepared
    assert "reports: 1 Machine(s) in app testapp in iad" in prepared
    assert "1 per image and region, 2 found, regions caller" in status
    assert "regions primary" in status
    assert "by region: iad 1, syd 1" in status
    syd_name = f"flyfn-default-{image_hash(IMAGE)}-syd-0"
    [row] = [line.split() for line in status.splitlines() if syd_name in line]
    assert row[2] == "syd"  # the REGION column


def test_gc_destroys_a_groups_machines_in_regions_it_no_longer_lives_in(
    machines_api: MachinesAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app leaves syd and a listed group drops syd: gc destroys both groups' syd Machines,
    on the current image, and keeps their iad ones; off Fly it destroys none for its region."""
    monkeypatch.setenv("FLY_REGION", "iad")
    monkeypatch.setenv("PRIMARY_REGION", "iad")
    app = {"image": IMAGE, "metadata": {"fly_process_group": "app"}}
    machines_api.create(region="iad", config=app)
    syd_app = machines_api.create(region="syd", config=app)
    groups: dict[str, Any] = {"reports": {"regions": ["iad", "syd"]}}
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups)):
        command("prepare")
        assert command("gc") == "No orphaned function Machines.\n"

    def function_machines(region: str) -> dict[str, str | None]:
        """Machine id -> group of the function Machines in `region`."""
        return {
            m.id: (m.config.metadata or {}).get("flyfn_group")
            for m in machines_api.machines()
            if m.region == region
            and m.config is not None
            and m.config.metadata
            and "flyfn_group" in m.config.metadata
        }

    in_iad, in_syd = function_machines("iad"), function_machines("syd")
    assert {"default", "reports"} <= set(in_syd.values()) == set(in_iad.values())

    machines_api.destroy(syd_app.id)
    groups["reports"]["regions"] = ["iad"]
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups)):
        monkeypatch.delenv("FLY_REGION")
        assert command("gc") == "No orphaned function Machines.\n"  # off Fly: no region known
        monkeypatch.setenv("FLY_REGION", "iad")
        dry = command("gc", "--dry-run")
        assert dry.count("its group no longer lives in that region") == len(in_syd)
        assert f"{len(in_syd)} Machine(s) would be destroyed (dry run)." in dry
        assert f"Destroyed {len(in_syd)} Machine(s)." in command("gc")
    assert function_machines("syd") == {}
    assert function_machines("iad") == in_iad


def command(*args: str) -> str:
    out = StringIO()
    call_command("flyfn", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


# -- the emulator's regions ----------------------------------------------------------------------


async def test_a_request_enters_at_the_region_it_comes_from() -> None:
    async with proxy_stack(regions=("iad", "syd")) as stack:
        iad = await stack.machine(region="iad")
        syd = await stack.machine(region="syd")
        from_syd = await stack.client.get("/", headers={FROM_REGION_HEADER: "syd"})
        from_nowhere = await stack.client.get("/")
        unknown = await stack.client.get("/", headers={FROM_REGION_HEADER: "ams"})
    assert from_syd.json()["machine"] == syd.id  # the nearest app Machine
    assert from_syd.json()["headers"]["fly-region"] == "syd"
    assert from_syd.headers["fly-request-id"].endswith("-syd")
    assert from_nowhere.json()["machine"] == iad.id  # the primary region's edge
    assert from_nowhere.json()["headers"]["fly-region"] == "iad"
    assert unknown.status_code == 400
    assert "'ams' is not a region of this stack (iad, syd" in unknown.text
    assert str(stack.logs[0]).startswith(f"[syd] GET / main:{syd.id[:4]}@syd ")


def test_edge_regions_and_their_latency() -> None:
    edges = EdgeRegions(("iad", "syd"))
    assert edges.edge_of(None) == "iad"
    assert edges.edge_of(" SYD ") == "syd"
    assert edges.hop_seconds("syd", "syd") == 0
    assert edges.hop_seconds("syd", "iad") == pytest.approx(
        2 * one_way_latency_ms("syd", "iad") / 1000
    )
    assert EdgeRegions(("iad", "syd"), emulate_latency=False).hop_seconds("syd", "iad") == 0
    with pytest.raises(ProxyError, match="not a region of this stack"):
        edges.edge_of("fra")


def test_the_balancer_prefers_the_nearest_region_when_its_own_has_no_machine() -> None:
    def remote(machine_id: str, region: str) -> Candidate:
        distance = distance_km("lhr", region)
        assert distance is not None
        return Candidate(machine_id, Readiness.READY, 0, Limits(), local=False, distance=distance)

    chosen = choose([remote("far", "syd"), remote("near", "ams"), remote("mid", "iad")])
    assert chosen is not None
    assert chosen.machine_id == "near"


def test_region_lists_on_the_command_line() -> None:
    assert parse_region_list("iad, SYD,iad") == ("iad", "syd")
    with pytest.raises(ValueError, match="'xyz' is not a Fly region; Fly's regions are ams"):
        parse_region_list("iad,xyz")
    with pytest.raises(ValueError, match="at least one"):
        parse_region_list(" , ")


def test_a_function_machine_sends_on_to_an_app_machine_of_its_own_region() -> None:
    listing = MachineListing(None)
    fn = PoolManager(listing=listing, region="syd", primary_region="iad")

    def app_in(region: str, state: str = "started") -> Machine:
        metadata = {"fly_process_group": "app"}
        return Machine(
            id=f"app-{region}", state=state, region=region, config=MachineConfig(metadata=metadata)
        )

    try:
        with override_role(function("default"), MachineEnv(app_name="app1", machine_id="fn0")):
            listing.write("app1", time.time(), [app_in("iad"), app_in("syd"), app_in("ams")])
            assert {fn.app_machine() for _ in range(20)} == {"app-syd"}
            # None of its region: any of the app's, a started one first, as before regions.
            listing.write("app1", time.time(), [app_in("iad", "stopped"), app_in("ams")])
            assert {fn.app_machine() for _ in range(20)} == {"app-ams"}
    finally:
        fn.close()


def test_an_unknown_region_code_is_a_warning_naming_it(machines_api: MachinesAPI) -> None:
    groups = {"a": {"regions": ["iad", "sdy"]}, "b": {"region": "xyz"}, "c": {"regions": ["syd"]}}
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups)):
        warnings = [m for m in check_settings(None) if m.id == "flyfn.W006"]
    assert [m.msg.split(",")[0] for m in warnings] == [
        "FLYFN['GROUPS']['a'] names region 'sdy'",
        "FLYFN['GROUPS']['b'] names region 'xyz'",
    ]
    assert warnings[0].hint is not None
    assert "syd" in warnings[0].hint


def test_keep_warm_in_a_listed_region_outside_the_primary_is_a_warning(
    machines_api: MachinesAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRIMARY_REGION", "iad")
    groups = {"w": {"keep_warm": 1, "regions": ["iad", "syd"]}, "p": {"keep_warm": 1}}
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups)):
        warnings = [m for m in check_keep_warm(None) if m.id == "flyfn.W026"]
    assert [m.msg.split(":")[0] for m in warnings] == [
        "group 'w' has keep_warm 1, but its pool in region 'syd' keeps nothing warm"
    ]


def test_keep_warm_of_a_group_that_follows_its_callers_outside_the_primary_is_a_warning(
    machines_api: MachinesAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default `regions: "caller"` has a pool wherever the app runs: an app Machine in syd
    # (FLY_REGION) says the app runs outside the primary region, where nothing is kept warm.
    monkeypatch.setenv("PRIMARY_REGION", "iad")
    monkeypatch.setenv("FLY_REGION", "syd")
    groups = {"c": {"keep_warm": 1}, "p": {"keep_warm": 1, "regions": "primary"}}
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups)):
        warnings = [m for m in check_keep_warm(None) if m.id == "flyfn.W026"]
    assert [m.msg.split(":")[0] for m in warnings] == [
        "group 'c' has keep_warm 1, but its pool in region 'syd' keeps nothing warm"
    ]
    assert warnings[0].hint is not None
    assert '"regions" to "primary"' in warnings[0].hint
    assert "where the app Machine is" not in warnings[0].hint
    # In the primary region the same app Machine cannot tell: no warning.
    monkeypatch.setenv("FLY_REGION", "iad")
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups)):
        assert [m for m in check_keep_warm(None) if m.id == "flyfn.W026"] == []
