"""`keep_warm`: a group's Machines' service gets Fly's `min_machines_running`, the pool creates and
starts that many, autostop (Fly's rule, in the primary region only) leaves them started, and a
group kept warm in another region is flyfn.W026."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.test import override_settings

from flyfn.checks import check_keep_warm
from flyfn.conf import SettingsError, get_settings
from flyfn.emulator.proxy.autostop import plan
from flyfn.machines.models import Machine
from flyfn.pool.spec import spec_for
from tests.support_machines_api import EMULATOR_APP, MachinesAPI

IMAGE = "registry.fly.io/testapp:deployment-1"
SETTINGS = {"APP_NAME": "shop", "API_TOKEN": "tok", "IMAGE_REF": IMAGE}


def spec_of(group: dict[str, object]) -> tuple[int, int | None, str, int]:
    with override_settings(FLYFN={**SETTINGS, "GROUPS": {"g": group}}):
        spec = spec_for(get_settings(), "g", environ={})
    [service] = spec.config.services or []
    return spec.count, service.min_machines_running, spec.version, spec.warm


def test_keep_warm_is_the_services_min_machines_running_and_a_floor_on_the_count() -> None:
    count, min_running, version, warm = spec_of({"keep_warm": 2})
    assert (count, min_running, warm) == (2, 2, 2)
    assert spec_of({"keep_warm": 1, "max_machines": 3})[:2] == (3, 1)
    cold_count, cold_min, cold_version, _ = spec_of({})
    assert (cold_count, cold_min) == (1, 0)
    # Its Machines get the new service (a new version); a group without it keeps its version.
    assert version != cold_version
    assert spec_of({"keep_warm": 0})[2] == cold_version


def test_a_pool_outside_the_primary_region_keeps_nothing_warm() -> None:
    # Fly applies min_machines_running in the primary region only: a pool elsewhere (a caller's
    # region, a listed one, a pinned `region`) neither launches nor restarts Machines for it.
    group = {"keep_warm": 2}
    with override_settings(
        FLYFN={**SETTINGS, "GROUPS": {"g": group, "p": {**group, "region": "syd"}}}
    ):
        settings = get_settings()
        environ = {"PRIMARY_REGION": "iad", "FLY_REGION": "syd"}
        far = spec_for(settings, "g", environ=environ, pool_region="syd")
        near = spec_for(settings, "g", environ=environ, pool_region="iad")
        pinned = spec_for(settings, "p", environ=environ)
        unknown = spec_for(settings, "g", environ={}, pool_region="syd")
    for spec in (far, pinned):
        [service] = spec.config.services or []
        assert (spec.warm, spec.count, service.min_machines_running) == (0, 1, 0)
    [service] = near.config.services or []
    assert (near.warm, near.count, service.min_machines_running) == (2, 2, 2)
    # Without PRIMARY_REGION flyfn cannot tell: it keeps what was asked.
    assert (unknown.warm, unknown.count) == (2, 2)


def test_the_app_s_one_pool_kept_warm_is_made_in_the_primary_region() -> None:
    # A group sharing one pool across the app ("shared", no `region`) used to be made wherever its
    # first caller ran; outside the primary region Fly would not keep it warm.
    with override_settings(
        FLYFN={**SETTINGS, "GROUPS": {"g": {"keep_warm": 1, "regions": "shared"}, "c": {}}}
    ):
        settings = get_settings()
        environ = {"PRIMARY_REGION": "iad", "FLY_REGION": "syd"}
        warm = spec_for(settings, "g", environ=environ)
        cold = spec_for(settings, "c", environ=environ)
        off_fly = spec_for(settings, "g", environ={"FLY_REGION": "syd"})
    assert (warm.region, warm.warm) == ("iad", 1)
    assert not warm.regional  # its Machines elsewhere stay its own; new ones go to iad
    assert cold.region == "syd"  # nothing kept warm: near its caller, as before
    assert off_fly.region == "syd"  # no primary region known: where it was asked


def test_keep_warm_refuses_a_negative_count() -> None:
    with (
        override_settings(FLYFN={**SETTINGS, "GROUPS": {"g": {"keep_warm": -1}}}),
        pytest.raises(SettingsError, match="keep_warm"),
    ):
        get_settings()


def states(api: MachinesAPI) -> list[str]:
    return [m.state or "" for m in sorted(api.machines(group="g"), key=lambda m: m.name or "")]


def wait(api: MachinesAPI, machine_id: str, state: str) -> None:
    api.http.get(
        f"/v1/apps/{EMULATOR_APP}/machines/{machine_id}/wait",
        params={"state": state, "timeout": 10},
    )


def act(api: MachinesAPI, machine_id: str, action: str, then: str) -> None:
    """`action` (start, stop) on the Machine once it settled, and wait for it to be `then`."""
    wait(api, machine_id, "settled")
    api.http.post(f"/v1/apps/{EMULATOR_APP}/machines/{machine_id}/{action}").raise_for_status()
    wait(api, machine_id, then)


def test_the_pool_launches_the_kept_warm_machines_and_starts_them_again(
    machines_api: MachinesAPI,
) -> None:
    group = {"machines": 1, "max_machines": 3, "keep_warm": 2}
    with override_settings(FLYFN=machines_api.flyfn_settings(IMAGE, GROUPS={"g": group})):
        call_command("flyfn", "prepare", stdout=StringIO())
        for machine in machines_api.machines(group="g"):
            wait(machines_api, machine.id, "settled")
        # The entry and the second kept warm are started; the third waits for load, stopped.
        assert states(machines_api) == ["started", "started", "created"]
        warm = sorted(machines_api.machines(group="g"), key=lambda m: m.name or "")[1]
        act(machines_api, warm.id, "stop", "stopped")
        call_command("flyfn", "prepare", stdout=StringIO())
        wait(machines_api, warm.id, "started")
    assert states(machines_api) == ["started", "started", "created"]


def function_machine(machine_id: str, region: str, keep_warm: int) -> Machine:
    with override_settings(FLYFN={**SETTINGS, "GROUPS": {"g": {"keep_warm": keep_warm}}}):
        config = spec_for(get_settings(), "g", environ={}).config
    return Machine(id=machine_id, state="started", region=region, config=config)


def test_the_pool_counts_its_started_machines_rather_than_restart_the_one_fly_stopped(
    machines_api: MachinesAPI,
) -> None:
    # Fly Proxy keeps `min_machines_running` started whichever they are: when it stopped the
    # first Machine in rank order while another runs, one is up and the pool starts nothing
    # (starting it again would have Fly stop one more at its next pass, over and over).
    group = {"machines": 1, "max_machines": 2, "keep_warm": 1}
    with override_settings(FLYFN=machines_api.flyfn_settings(IMAGE, GROUPS={"g": group})):
        call_command("flyfn", "prepare", stdout=StringIO())
        first, second = sorted(machines_api.machines(group="g"), key=lambda m: m.name or "")
        act(machines_api, second.id, "start", "started")
        act(machines_api, first.id, "stop", "stopped")
        call_command("flyfn", "prepare", stdout=StringIO())
        assert states(machines_api) == ["stopped", "started"]
        # Once none is up, the first resting one in rank order is started.
        act(machines_api, second.id, "stop", "stopped")
        call_command("flyfn", "prepare", stdout=StringIO())
        wait(machines_api, first.id, "started")
    assert states(machines_api) == ["started", "stopped"]


@pytest.mark.parametrize(
    ("keep_warm", "region", "stopped"),
    [(0, "ams", ["m1"]), (1, "ams", []), (1, "fra", ["m1"])],
)
def test_autostop_leaves_an_idle_kept_warm_machine_started_in_the_primary_region(
    keep_warm: int, region: str, stopped: list[str]
) -> None:
    stops = plan(
        [function_machine("m1", region, keep_warm)],
        load=lambda _: 0,
        in_flight=lambda _: 0,
        idle_since=lambda _: 0.0,
        region="ams",
        primary_region="ams",
    )
    assert [stop.machine.id for stop in stops] == stopped


def test_autostop_stops_the_machines_beyond_those_kept_warm() -> None:
    # m0 took the last request (it is the pool's entry, first in rank order); m1, beyond the one
    # kept warm, has been idle longer: Fly Proxy stops m1 and leaves m0 started.
    machines = [function_machine(f"m{n}", "ams", 1) for n in range(2)]
    last_request = {"m0": 50.0, "m1": 10.0}
    stops = plan(
        machines,
        load=lambda _: 0,
        in_flight=lambda _: 0,
        idle_since=last_request.__getitem__,
        region="ams",
        primary_region="ams",
    )
    assert [(stop.machine.id, stop.mode, stop.started) for stop in stops] == [("m1", "stop", 2)]


def test_w026_a_group_kept_warm_outside_the_primary_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIMARY_REGION", "ams")
    groups = {
        "far": {"keep_warm": 1, "region": "fra"},
        "near": {"keep_warm": 1, "region": "ams"},
        "cold": {"region": "fra"},
        "here": {"keep_warm": 1},
    }
    with override_settings(FLYFN={**SETTINGS, "GROUPS": groups}):
        messages = check_keep_warm()
    assert [m.id for m in messages] == ["flyfn.W026"]
    assert "'far'" in messages[0].msg
    assert "primary region ('ams')" in messages[0].msg
    assert messages[0].hint is not None
    assert 'Set its "region" to "ams"' in messages[0].hint


def test_a_task_group_keeps_nothing_warm() -> None:
    # Its Machines stop themselves once drained (flyfn.tasks.keeper): the pool must not restart
    # them, nor Fly Proxy count them.
    backend = {"BACKEND": "flyfn.tasks.FlyMachinesBackend", "OPTIONS": {"group": "pdf"}}
    with override_settings(
        TASKS={"default": backend}, FLYFN={**SETTINGS, "GROUPS": {"pdf": {"keep_warm": 1}}}
    ):
        spec = spec_for(get_settings(), "pdf", environ={})
    [service] = spec.config.services or []
    assert (spec.warm, service.min_machines_running) == (0, 0)
