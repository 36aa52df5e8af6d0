"""Updating a group's Machines against the emulated Machines API: a new version (a rotated
secret, a forwarded env value) reaches every Machine, boots none that rests, and reboots a running
one once; `prepare` updates only a config that really differs."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from django.test import override_settings

from flyfn.conf import FlyfnSettings, get_settings
from flyfn.machines import Machine
from flyfn.pool.converge import converge, is_outdated, machine_version, prepare_group
from flyfn.pool.spec import PoolSpec, new_client, spec_for
from tests.support_machines_api import EMULATOR_APP, MachinesAPI

GROUPS = {"pdf": {"machines": 1, "max_machines": 3, "env": ["PDF_MODE"]}}
UPDATE = r"/v1/apps/[^/]+/machines/[^/]+"


def _spec(machines_api: MachinesAPI, mode: str) -> PoolSpec:
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=GROUPS)):
        return spec_for(get_settings(), "pdf", {"PDF_MODE": mode})


def _post(machines_api: MachinesAPI, machine_id: str, action: str) -> None:
    path = f"/v1/apps/{EMULATOR_APP}/machines/{machine_id}"
    machines_api.http.post(f"{path}/{action}").raise_for_status()


def _wait(machines_api: MachinesAPI, machine_id: str, state: str) -> None:
    path = f"/v1/apps/{EMULATOR_APP}/machines/{machine_id}/wait"
    machines_api.http.get(path, params={"state": state, "timeout": 10}).raise_for_status()


def _states(machines_api: MachinesAPI) -> dict[str, str | None]:
    return {m.id: m.state for m in machines_api.machines(group="pdf")}


def _by_name(machine: Machine) -> str:
    return machine.name or ""


def test_a_new_version_boots_no_resting_machine_and_reboots_a_running_one_once(
    machines_api: MachinesAPI,
) -> None:
    old, new = _spec(machines_api, "fast"), _spec(machines_api, "exact")
    assert old.version != new.version
    # An app Machine restarted with the new value after the Machines last changed.
    new = replace(new, started=time.time() + 2)

    async def first() -> list[str]:
        async with new_client(get_settings_for(machines_api)) as client:
            return [m.id for m in sorted((await converge(client, old)).machines, key=_by_name)]

    running, created, suspended = asyncio.run(first())
    # The entry runs; the other two were created stopped. One is started, then suspended.
    _wait(machines_api, running, "started")
    _post(machines_api, suspended, "start")
    _wait(machines_api, suspended, "started")
    _post(machines_api, suspended, "suspend")
    _wait(machines_api, suspended, "suspended")
    assert _states(machines_api) == {
        running: "started",
        created: "created",
        suspended: "suspended",
    }
    before = machines_api.count("POST", UPDATE)

    async def second() -> list[str]:
        async with new_client(get_settings_for(machines_api)) as client:
            return (await converge(client, new)).updated

    assert sorted(asyncio.run(second())) == sorted([running, created, suspended])
    _wait(machines_api, running, "started")
    _wait(machines_api, suspended, "stopped")
    assert machines_api.count("POST", UPDATE) - before == 3  # one update each, no start
    assert machines_api.count("POST", UPDATE + "/start") == 0
    assert _states(machines_api) == {running: "started", created: "created", suspended: "stopped"}
    assert {machine_version(m) for m in machines_api.machines(group="pdf")} == {new.version}

    # Nothing left to do: neither converge nor prepare updates (or reboots) anything again.
    async def again() -> tuple[list[str], list[str]]:
        async with new_client(get_settings_for(machines_api)) as client:
            done = await converge(client, new)
            report = await prepare_group(client, new)
            return done.updated, report.updated

    assert asyncio.run(again()) == ([], [])
    assert machines_api.count("POST", UPDATE) - before == 3


def test_prepare_updates_a_drifted_stopped_machine_without_starting_it(
    machines_api: MachinesAPI,
) -> None:
    spec = _spec(machines_api, "fast")
    drifted = replace(
        spec, config=spec.config.model_copy(update={"env": {**(spec.config.env or {}), "X": "1"}})
    )

    async def scenario() -> tuple[list[str], list[str]]:
        async with new_client(get_settings_for(machines_api)) as client:
            made = await converge(client, spec)
            report = await prepare_group(client, drifted)
            return [m.id for m in made.machines], report.updated

    machines, updated = asyncio.run(scenario())
    assert sorted(updated) == sorted(machines)
    entry = min(machines_api.machines(group="pdf"), key=_by_name)
    _wait(machines_api, entry.id, "started")
    states = _states(machines_api)
    # The two that rested (created stopped) still rest; only the entry runs.
    assert sorted(s or "" for s in states.values()) == ["created", "created", "started"]


def get_settings_for(machines_api: MachinesAPI) -> FlyfnSettings:
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=GROUPS)):
        return get_settings()


# ------------------------------------------------------------------ force_https, http_options

HTTP_OPTIONS = {
    "idle_timeout": 120,
    "h2_backend": False,
    "response": {"headers": {"X-Frame-Options": "DENY", "Server": False}},
}


def _group_spec(machines_api: MachinesAPI, **options: object) -> PoolSpec:
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS={"web": options})):
        return spec_for(get_settings(), "web", {})


def test_function_machines_force_https_on_port_80_by_default(machines_api: MachinesAPI) -> None:
    spec = _group_spec(machines_api)
    [service] = spec.config.services or []
    http, tls = service.ports or []
    assert (http.port, http.force_https, http.http_options) == (80, True, None)
    assert (tls.port, tls.force_https, tls.http_options) == (443, None, None)
    # Turned off it is said (false), so that turning it off is a change too.
    [service] = _group_spec(machines_api, force_https=False).config.services or []
    assert [p.force_https for p in service.ports or []] == [False, None]


def test_http_options_go_on_both_ports_and_into_the_version(machines_api: MachinesAPI) -> None:
    plain = _group_spec(machines_api)
    spec = _group_spec(machines_api, http_options=HTTP_OPTIONS)
    [service] = spec.config.services or []
    assert [p.http_options for p in service.ports or []] == [HTTP_OPTIONS, HTTP_OPTIONS]
    versions = {
        plain.version,
        spec.version,
        _group_spec(machines_api, force_https=False).version,
        _group_spec(machines_api, http_options={"idle_timeout": 121}).version,
    }
    assert len(versions) == 4
    assert _group_spec(machines_api, http_options=HTTP_OPTIONS).version == spec.version


def test_a_force_https_or_http_options_change_converges(machines_api: MachinesAPI) -> None:
    before = _group_spec(machines_api)
    after = replace(_group_spec(machines_api, http_options=HTTP_OPTIONS), started=time.time() + 2)

    async def scenario() -> tuple[list[str], list[str]]:
        async with new_client(get_settings_for(machines_api)) as client:
            made = await converge(client, before)
            done = await converge(client, after)
            return [m.id for m in made.machines], done.updated

    made, updated = asyncio.run(scenario())
    assert updated == made
    [machine] = machines_api.machines(group="web")
    assert machine.config is not None
    [service] = machine.config.services or []
    http, tls = service.ports or []
    assert http.force_https is True
    # As Fly answers: `h2_backend: false` left out (omitempty), a header map's entries kept.
    answered = {k: v for k, v in HTTP_OPTIONS.items() if k != "h2_backend"}
    assert http.http_options == tls.http_options == answered
    assert not is_outdated(machine, after.config)


def test_http_options_are_validated() -> None:
    from flyfn.conf import SettingsError

    for bad in (
        {"idle_timeout": 0},
        {"speed": "fast"},
        {"response": {"headers": {"Bad Name": "x"}}},
        {"response": {"headers": {"X-A": 3}}},
    ):
        with (
            override_settings(FLYFN={"GROUPS": {"web": {"http_options": bad}}}),
            pytest.raises(SettingsError, match="http_options"),
        ):
            get_settings()


def test_function_machines_of_another_app_know_the_app_that_created_them(
    machines_api: MachinesAPI,
) -> None:
    app_group = _group_spec(machines_api, strategy="app", app="testapp-fns")
    assert app_group.app == "testapp-fns"
    assert app_group.config.env == {"FLYFN_GROUP": "web", "FLYFN_HOME_APP": EMULATOR_APP}
    # In the own app FLY_APP_NAME says it already.
    assert _group_spec(machines_api).config.env == {"FLYFN_GROUP": "web"}
