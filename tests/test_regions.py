"""Multi-region groups against the Machines API emulator (in process): app Machines in iad and syd
each get their group's Machines in their own region, a group pinned to the primary region has one,
and a region without capacity sends its requests to the nearest one that has a Machine."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from io import StringIO
from typing import Any

import httpx
import pytest
from django.core.management import call_command
from django.test import Client, override_settings
from pytest_django.fixtures import Settings

from flyfn.checks import check_keep_warm, check_settings
from flyfn.conf import get_settings
from flyfn.emulator.proxy.balancer import Candidate, Limits, Readiness, choose
from flyfn.emulator.proxy.errors import ProxyError
from flyfn.emulator.proxy.regions import FROM_REGION_HEADER, EdgeRegions
from flyfn.events import FailoverReason
from flyfn.fly.regions import distance_km, nearest_first, one_way_latency_ms, parse_region_list
from flyfn.machine_role import MAIN, MachineEnv, function, override_role
from flyfn.machines import (
    Machine,
    MachineConfig,
    MachinesConnectionError,
    MachinesTimeoutError,
    error_for_status,
)
from flyfn.pool.cache import _failure_reason
from flyfn.pool.choice import ReplayTarget
from flyfn.pool.listing import MachineListing
from flyfn.pool.manager import PoolManager
from flyfn.pool.placement import Placement, placement, pool_regions, route
from flyfn.pool.spec import PoolConfigError, image_hash, spec_for
from flyfn.settings_errors import SettingsError
from tests.support_machines_api import MachinesAPI
from tests.support_middleware import ran_here
from tests.support_pools import installed
from tests.support_proxy import proxy_stack

IMAGE = "registry.fly.io/testapp:deployment-1"
APP_MACHINE = {"image": IMAGE, "metadata": {"fly_process_group": "app"}}
LIST = "/v1/apps/testapp/machines"  # create is a POST to it
FULL = "insufficient_capacity"


def app_machine(region: str) -> PoolManager:
    """The pools of an app Machine in `region` of an app whose primary region is iad."""
    return PoolManager(region=region, primary_region="iad")


@pytest.fixture
def iad_and_syd(machines_api: MachinesAPI) -> Iterator[tuple[PoolManager, PoolManager]]:
    """The pools of the app Machines of an app that runs in iad and syd (both are listed)."""
    for region in ("iad", "syd"):
        machines_api.create(region=region, config=APP_MACHINE)
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
    machines_api.emulator.full_regions.add("iad")
    with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=3600)):
        # Not the primary region (it is home), but where the app's other Machines run.
        assert region_of(machines_api, iad.wait_target("default", 30)) == "syd"
    assert [m.region for m in machines_api.machines(group="default")] == ["syd"]


class Refusing(httpx.AsyncBaseTransport):
    """The Machines API emulator (in process), except for the requests `refuse` picks: every one,
    or only the creates in one region, answered with an error status as Fly gives it."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.answer: tuple[int, dict[str, str]] | None = None
        self.creates_in: str | None = None

    def refuse(
        self,
        status: int,
        error: str,
        *,
        creates_in: str | None = None,
        error_status: str = "unknown",
    ) -> None:
        self.answer = (status, {"error": error, "status": error_status})
        self.creates_in = creates_in

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.answer is not None and self._picked(request):
            status, body = self.answer
            headers = {"retry-after": "1"} if status == 429 else {}
            return httpx.Response(status, json=body, headers=headers, request=request)
        return await self.inner.handle_async_request(request)

    def _picked(self, request: httpx.Request) -> bool:
        if self.creates_in is None:
            return True
        is_create = request.method == "POST" and request.url.path.endswith("/machines")
        return is_create and json.loads(request.content).get("region") == self.creates_in


@dataclass
class SydMachine:
    """The syd app Machine of an app that runs in iad and syd (primary iad): its pools, installed
    as the process's, their API calls through `api`, their clock standing at `now` (no cache
    expires and no back-off ends unless a test moves it)."""

    pools: PoolManager
    api: Refusing
    now: float = 1000.0


@pytest.fixture
def syd_machine(machines_api: MachinesAPI) -> Iterator[SydMachine]:
    for region in ("iad", "syd"):
        machines_api.create(region=region, config=APP_MACHINE)
    api = Refusing()
    pools = PoolManager(
        region="syd", primary_region="iad", transport=api, clock=lambda: machine.now
    )
    machine = SydMachine(pools, api)
    try:
        with installed(pools):
            yield machine
    finally:
        pools.close()


def failovers(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """The failover events logged: (region, reason)."""
    return [
        (r.__dict__["flyfn_region"], r.__dict__["flyfn_reason"])
        for r in caplog.records
        if getattr(r, "flyfn_event", None) == "failover"
    ]


@pytest.fixture
def main_role(settings: Settings) -> Iterator[None]:
    settings.MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
    with override_role(MAIN):
        yield


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, "unauthorized"),
        (429, "rate limit exceeded"),
        (422, "invalid guest: memory_mb must be a multiple of 256"),  # the same in every region
    ],
)
@pytest.mark.usefixtures("main_role")
def test_a_create_refused_for_no_reason_of_its_region_does_not_fail_over(
    machines_api: MachinesAPI,
    syd_machine: SydMachine,
    caplog: pytest.LogCaptureFixture,
    client: Client,
    status: int,
    error: str,
) -> None:
    """Another region would answer the same (or, after a 429, get more calls): no Machine is
    created elsewhere for it, and the group's fallback answers."""
    syd, api = syd_machine.pools, syd_machine.api
    api.refuse(status, error, creates_in="syd")
    caplog.set_level(logging.INFO, logger="flyfn.events.region")
    with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=3600)):
        assert syd.wait_target("pdf", 10) is None
        assert ran_here(client.get("/routing/pdf/"), b"pdf")
    assert machines_api.machines(group="pdf") == []
    assert failovers(caplog) == []


@pytest.mark.parametrize("status", [401, 403, 404, 429])
@pytest.mark.usefixtures("main_role")
def test_a_bad_token_a_missing_app_or_a_429_does_not_fail_over_to_a_known_machine(
    machines_api: MachinesAPI,
    syd_machine: SydMachine,
    caplog: pytest.LogCaptureFixture,
    client: Client,
    status: int,
) -> None:
    """Every call fails the same way, whatever the region: the event would blame the region, and
    the requests go to the group's fallback as before regions, not to an iad Machine known."""
    syd, api = syd_machine.pools, syd_machine.api
    caplog.set_level(logging.INFO, logger="flyfn.events.region")
    with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=3600)):
        known = syd.regional_pool("pdf", "iad").wait_target(10)
        assert region_of(machines_api, known) == "iad"
        api.refuse(status, "no")
        assert syd.wait_target("pdf", 10) is None
        assert ran_here(client.get("/routing/pdf/"), b"pdf")
    assert [m.region for m in machines_api.machines(group="pdf")] == ["iad"]
    assert failovers(caplog) == []


def test_a_429_while_failed_over_keeps_the_failover_on_known_machines(
    machines_api: MachinesAPI, syd_machine: SydMachine, caplog: pytest.LogCaptureFixture
) -> None:
    """syd has no capacity, its requests go to iad; syd's next try is rate limited: a 429 says
    nothing of syd, the requests stay on the iad Machine (no flapping to the fallback), and
    nothing is created for them."""
    syd, api = syd_machine.pools, syd_machine.api
    assert machines_api.emulator is not None
    machines_api.emulator.full_regions.add("syd")
    caplog.set_level(logging.INFO, logger="flyfn.events.region")
    with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=3600)):
        failed_over = syd.wait_target("default", 30)
        assert region_of(machines_api, failed_over) == "iad"
        api.refuse(429, "rate limit exceeded", creates_in="syd")
        syd_machine.now += 60  # home's back-off is over: it tries again, and is rate limited
        retry = syd.regional_pool("default", "syd").refresh()
        assert retry is not None
        retry.result(10)
        assert syd.get_target("default") == failed_over
        assert syd.wait_target("default", 10) == failed_over
    assert [m.region for m in machines_api.machines(group="default")] == ["iad"]
    assert failovers(caplog) == [("iad", "no_capacity")]


def test_the_api_failing_fails_over_to_a_known_machine_and_creates_none(
    machines_api: MachinesAPI,
    syd_machine: SydMachine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 5xx fails for every region's pool alike (one API): a Machine of another region already
    known takes the requests, but none is created there for them."""
    syd, api = syd_machine.pools, syd_machine.api
    caplog.set_level(logging.INFO, logger="flyfn.events.region")
    api.refuse(500, "internal error", creates_in="syd")
    with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=3600)):
        assert syd.wait_target("default", 10) is None
        assert machines_api.machines(group="default") == []
        known = syd.regional_pool("default", "iad").wait_target(10)  # iad's own requests
        assert syd.get_target("default") == known
        assert syd.wait_target("default", 10) == known
    assert [m.region for m in machines_api.machines(group="default")] == ["iad"]
    assert failovers(caplog) == [("iad", "unavailable")]


def test_a_create_refused_for_its_region_fails_over(
    machines_api: MachinesAPI,
    syd_machine: SydMachine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    syd, api = syd_machine.pools, syd_machine.api
    caplog.set_level(logging.INFO, logger="flyfn.events.region")
    error = "Region syd is deprecated and cannot have new resources provisioned"
    api.refuse(422, error, creates_in="syd")
    with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=3600)):
        assert region_of(machines_api, syd.wait_target("default", 10)) == "iad"
    assert failovers(caplog) == [("iad", "refused")]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (MachinesConnectionError("refused", method="GET", path=LIST), "unavailable"),
        (MachinesTimeoutError("timed out", method="POST", path=LIST), "unavailable"),
        (error_for_status(500, method="POST", path=LIST), "unavailable"),
        (error_for_status(503, method="GET", path=LIST), "unavailable"),
        (error_for_status(412, method="POST", path=LIST, error_status=FULL), "no_capacity"),
        (error_for_status(409, method="POST", path=LIST, error_status=FULL), "no_capacity"),
        (error_for_status(422, method="POST", path=LIST, error="invalid region"), "refused"),
        (error_for_status(412, method="POST", path=LIST, error="no room in region"), "refused"),
        (
            error_for_status(
                409, method="POST", path=LIST, error="name in region", error_status="name_taken"
            ),
            None,
        ),
        (error_for_status(422, method="POST", path=LIST, error="invalid guest"), None),
        (error_for_status(422, method="POST", path=f"{LIST}/m1", error="bad region"), None),
        (error_for_status(400, method="GET", path=LIST), None),
        (error_for_status(401, method="GET", path=LIST), None),
        (error_for_status(403, method="GET", path=LIST), None),
        (error_for_status(404, method="GET", path=LIST, error="app not found"), None),
        (error_for_status(429, method="POST", path=LIST, retry_after=1.0), None),
        (PoolConfigError("no Machines API token"), None),
        (RuntimeError("a bug"), None),
    ],
)
def test_which_failures_another_region_may_serve(
    error: BaseException, reason: FailoverReason | None
) -> None:
    assert _failure_reason(error) == reason


def test_an_app_in_one_region_never_fails_over_to_a_primary_region_it_does_not_run_in(
    machines_api: MachinesAPI,
) -> None:
    """All app Machines run in ord, the primary region is iad (where the database is): ord's
    pool without capacity does not create Machines in iad (nobody else would use them, and `gc`
    would destroy them); the group's fallback answers."""
    assert machines_api.emulator is not None
    machines_api.create(region="ord", config=APP_MACHINE)
    machines_api.emulator.full_regions.add("ord")
    ord_ = PoolManager(region="ord", primary_region="iad")
    try:
        with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=3600)):
            assert ord_.wait_target("default", 30) is None
    finally:
        ord_.close()
    assert machines_api.machines(group="default") == []


def test_a_failed_over_request_costs_a_lookup(
    machines_api: MachinesAPI, syd_machine: SydMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While failed over, `get_target` neither reads the app's list nor orders the regions again:
    both are kept for the pools' cache lifetime."""
    syd = syd_machine.pools
    assert machines_api.emulator is not None
    machines_api.emulator.full_regions.add("syd")
    with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=3600)):
        target = syd.wait_target("default", 30)
        assert region_of(machines_api, target) == "iad"
        reads: list[str] = []
        orders: list[str] = []
        read, order = syd.listing.read, syd.choice.order_regions

        def counted_read(app: str) -> tuple[float, list[Machine]] | None:
            reads.append(app)
            return read(app)

        def counted_order(origin: str, regions: Iterable[str]) -> list[str]:
            orders.append(origin)
            return order(origin, regions)

        monkeypatch.setattr(syd.listing, "read", counted_read)
        monkeypatch.setattr(syd.choice, "order_regions", counted_order)
        calls = len(machines_api.calls)
        assert {syd.get_target("default") for _ in range(50)} == {target}
    assert (reads, orders, len(machines_api.calls)) == ([], [], calls)


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
    # Not the primary region: only where the app runs (the manager reads that from its list).
    assert route(caller, "syd", "iad").failover == ()
    assert route(caller, "syd", "iad").open
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
    # A release command runs in the primary region: not a region where the app runs.
    assert pool_regions(Placement("caller"), "iad", "iad", ["ord"]) == ["ord"]
    assert pool_regions(Placement("caller"), "iad", "iad", []) == ["iad"]  # a first deploy
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


def test_gc_keeps_a_pinned_groups_failover_machines_while_the_primary_has_none(
    machines_api: MachinesAPI,
    iad_and_syd: tuple[PoolManager, PoolManager],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A group pinned to the primary region that failed over for want of capacity there runs on
    a syd Machine: `gc` keeps it (destroyed, the next request would create it again) until the
    primary region has a Machine of the group again."""
    _, syd = iad_and_syd
    assert machines_api.emulator is not None
    monkeypatch.setenv("FLY_REGION", "iad")
    monkeypatch.setenv("PRIMARY_REGION", "iad")
    machines_api.emulator.full_regions.add("iad")
    groups = {"reports": {"regions": "primary"}}
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups, CACHE_TTL=3600)):
        assert region_of(machines_api, syd.wait_target("reports", 30)) == "syd"
        assert command("gc") == "No orphaned function Machines.\n"
        machines_api.emulator.full_regions.clear()
        command("prepare")  # the primary region has room again
        assert sorted(m.region or "" for m in machines_api.machines(group="reports")) == [
            "iad",
            "syd",
        ]
        assert "its group no longer lives in that region" in command("gc", "--dry-run")
        assert "Destroyed 1 Machine(s)." in command("gc")
    assert [m.region for m in machines_api.machines(group="reports")] == ["iad"]


def test_a_release_command_prepares_where_the_app_runs_not_where_it_runs_itself(
    machines_api: MachinesAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app whose Machines run in ord, its primary region iad: the release command runs in
    iad (listed as a Machine of flyctl's `fly_app_release_command` group), and `prepare` makes
    the group following its callers a pool in ord only, which `gc` keeps."""
    monkeypatch.setenv("FLY_REGION", "iad")
    monkeypatch.setenv("PRIMARY_REGION", "iad")
    machines_api.create(region="ord", config=APP_MACHINE)
    release = {"image": IMAGE, "metadata": {"fly_process_group": "fly_app_release_command"}}
    machines_api.create(region="iad", config=release)
    with override_settings(FLYFN=machines_api.flyfn_settings()):
        prepared = command("prepare")
        assert command("gc") == "No orphaned function Machines.\n"
    assert "default: 1 Machine(s) in app testapp in ord" in prepared
    assert [m.region for m in machines_api.machines(group="default")] == ["ord"]


def test_upgrading_a_single_region_app_creates_no_machine(
    machines_api: MachinesAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's Machines from before regions (one pool for the app, names without region) on
    the current image are adopted by the pool of the app's only region: a pool holds the group's
    Machines of its image and region, whatever their names, and creates only what it lacks."""
    monkeypatch.setenv("FLY_REGION", "iad")
    monkeypatch.setenv("PRIMARY_REGION", "iad")
    machines_api.create(region="iad", config=APP_MACHINE)
    before, after = app_machine("iad"), app_machine("iad")
    try:
        shared = {"default": {"regions": "shared"}}  # flyfn's pools before regions
        with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=shared)):
            old = before.wait_target("default", 10)
        [machine] = machines_api.machines(group="default")
        assert machine.name == f"flyfn-default-{image_hash(IMAGE)}-0"
        with override_settings(FLYFN=machines_api.flyfn_settings()):
            assert after.wait_target("default", 10) == old
            prepared = command("prepare")
            assert command("gc") == "No orphaned function Machines.\n"
    finally:
        before.close()
        after.close()
    assert (
        "default: 1 Machine(s) in app testapp in iad on the current image "
        "(0 created, 0 updated, 0 destroyed)"
    ) in prepared
    assert machines_api.machines(group="default") == [machine]


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
