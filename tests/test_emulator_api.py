"""The Machines API emulator's behaviour: HTTP over ASGI, the state machine through the runtime
seam, and the `python -m flyfn.emulator.api` CLI as a real process on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flyfn.emulator.api import EmulatorApp, RateLimit, create_app, omit_zero
from flyfn.emulator.state import (
    EmulatorError,
    MachinesEmulator,
    image_ref_for,
    new_machine_id,
    new_ulid,
)
from flyfn.machines.models import CreateMachineRequest, Machine, MachineConfig
from tests.support_machines_api import (
    EMULATOR_APP,
    EMULATOR_BASE_URL,
    EMULATOR_TOKEN,
    free_loopback_port,
)

MACHINES = f"/v1/apps/{EMULATOR_APP}/machines"
ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
IMAGE = "registry.fly.io/testapp:deployment-01"


class RecordingRuntime:
    """A MachineRuntime that records calls; launches can be held back or made to fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.gate: asyncio.Event | None = None
        self.stop_gate: asyncio.Event | None = None
        self.fail_launch = False

    async def launch(self, app: str, machine: Machine) -> None:
        self.calls.append(("launch", app, machine.id))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_launch:
            raise RuntimeError("boom: the command exited with status 1")

    async def stop(self, app: str, machine: Machine, signal: str, timeout: float) -> None:
        self.calls.append(("stop", app, machine.id, signal, timeout))
        if self.stop_gate is not None:
            await self.stop_gate.wait()

    async def suspend(self, app: str, machine: Machine) -> None:
        self.calls.append(("suspend", app, machine.id))

    async def resume(self, app: str, machine: Machine) -> None:
        self.calls.append(("resume", app, machine.id))

    async def destroy(self, app: str, machine: Machine) -> None:
        self.calls.append(("destroy", app, machine.id))

    def kinds(self) -> list[str]:
        return [call[0] for call in self.calls]


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _http(app: EmulatorApp, token: str | None = EMULATOR_TOKEN) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=EMULATOR_BASE_URL, headers=headers
    )


@pytest.fixture
def runtime() -> RecordingRuntime:
    return RecordingRuntime()


@pytest.fixture
async def recorded(
    runtime: RecordingRuntime,
) -> AsyncIterator[tuple[MachinesEmulator, httpx.AsyncClient]]:
    emu = MachinesEmulator(runtime=runtime)
    async with _http(create_app(emu, token=EMULATOR_TOKEN, rate_limit=None)) as http:
        try:
            yield emu, http
        finally:
            await emu.aclose()


async def _create(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    body.setdefault("config", {"image": IMAGE})
    response = await http.post(MACHINES, json=body)
    assert response.status_code == 200, response.text
    machine: dict[str, Any] = response.json()
    return machine


async def _wait(
    http: httpx.AsyncClient, machine_id: str, state: str, timeout: int = 5
) -> httpx.Response:
    return await http.get(
        f"{MACHINES}/{machine_id}/wait", params={"state": state, "timeout": timeout}
    )


async def _started(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    machine = await _create(http, **body)
    assert (await _wait(http, machine["id"], "started")).status_code == 200
    return machine


# -- authentication, routing, request ids --------------------------------------------------------


async def test_requests_without_the_right_token_get_401_json(emulator_app: EmulatorApp) -> None:
    for token in (None, "wrong-token"):
        async with _http(emulator_app, token) as http:
            response = await http.get(MACHINES)
        assert response.status_code == 401
        assert response.json()["error"]
        assert response.headers["fly-request-id"]
        assert EMULATOR_TOKEN not in response.text


async def test_list_is_empty_and_every_answer_has_a_request_id(
    emulator_http: httpx.AsyncClient,
) -> None:
    first = await emulator_http.get(MACHINES)
    second = await emulator_http.get(MACHINES)
    assert first.status_code == 200
    assert first.json() == []
    assert first.headers["fly-request-id"] != second.headers["fly-request-id"]


async def test_unknown_paths_404_and_wrong_methods_405(emulator_http: httpx.AsyncClient) -> None:
    machine = await _create(emulator_http)
    assert (await emulator_http.get("/v1/apps/testapp/volumes")).status_code == 404
    assert (await emulator_http.get(f"{MACHINES}/{machine['id']}/nonsense")).status_code == 404
    response = await emulator_http.put(f"{MACHINES}/{machine['id']}/start")
    assert response.status_code == 405
    assert "error" in response.json()


async def test_unknown_machine_is_404_with_error_text(emulator_http: httpx.AsyncClient) -> None:
    response = await emulator_http.get(f"{MACHINES}/0123456789abcd")
    assert response.status_code == 404
    assert response.json() == {"error": "machine not found"}


# -- create ---------------------------------------------------------------------------------------


async def test_create_returns_a_machine_in_flys_form(emulator_http: httpx.AsyncClient) -> None:
    machine = await _create(
        emulator_http, name="fn-pdf-1", region="ams", config={"image": IMAGE, "env": {"A": "1"}}
    )
    assert re.fullmatch(r"[0-9a-f]{14}", machine["id"])
    assert ULID.match(machine["instance_id"])
    assert machine["version"] == machine["instance_id"]
    assert machine["state"] == "created"
    assert machine["name"] == "fn-pdf-1"
    assert machine["region"] == "ams"
    assert machine["config"]["env"] == {"A": "1"}
    assert machine["image_ref"]["registry"] == "registry.fly.io"
    assert machine["image_ref"]["tag"] == "deployment-01"
    assert machine["events"][0]["type"] == "launch"
    # Not skip_launch: the Machine goes on to start.
    assert (await _wait(emulator_http, machine["id"], "started")).json()["state"] == "started"


async def test_answers_leave_out_zero_values_like_fly(emulator_http: httpx.AsyncClient) -> None:
    config = {
        "image": IMAGE,
        "auto_destroy": False,
        "env": {},
        "metadata": {"flyfn_group": "pdf", "empty": ""},
        "services": [
            {
                "internal_port": 8000,
                "autostart": False,
                "min_machines_running": 0,
                "ports": [{"port": 80, "handlers": ["http"], "force_https": False}],
            }
        ],
        "restart": {"policy": "on-failure", "max_retries": 0},
        "mounts": [],
    }
    machine = await _create(emulator_http, config=config, skip_launch=True)
    for answer in (
        machine,
        (await emulator_http.get(f"{MACHINES}/{machine['id']}")).json(),
        (await emulator_http.get(MACHINES)).json()[0],
    ):
        got = answer["config"]
        assert "auto_destroy" not in got
        assert "env" not in got
        assert "mounts" not in got
        assert got["restart"] == {"policy": "on-failure"}
        assert got["services"] == [
            {"internal_port": 8000, "ports": [{"port": 80, "handlers": ["http"]}]}
        ]
        # Map entries are data: an empty value stays.
        assert got["metadata"] == {"flyfn_group": "pdf", "empty": ""}
        assert "lease" not in answer
        assert "nonce" not in answer


def test_omit_zero_keeps_lists_maps_and_true() -> None:
    assert omit_zero({"a": [0, False, {}], "b": {"c": 0, "d": True}, "env": {"X": ""}}) == {
        "a": [0, False, {}],
        "b": {"d": True},
        "env": {"X": ""},
    }
    assert omit_zero({"checks": {"http": {"port": 0}}}) == {"checks": {"http": {}}}
    # http_options.response.headers is a map: `false` there removes a header, it is kept.
    options = {"h2_backend": False, "response": {"headers": {"Server": False}, "pristine": False}}
    assert omit_zero({"http_options": options}) == {
        "http_options": {"response": {"headers": {"Server": False}}}
    }


async def test_create_skip_launch_stays_created(
    emulator_http: httpx.AsyncClient, emulator: MachinesEmulator
) -> None:
    machine = await _create(emulator_http, skip_launch=True)
    await emulator.settle()
    assert emulator.get(EMULATOR_APP, machine["id"]).state == "created"


@pytest.mark.parametrize(
    "body", [{"config": {}}, {"config": {"env": {"A": "1"}}}, {"name": "x"}, {}]
)
async def test_create_without_an_image_is_422(
    emulator_http: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    response = await emulator_http.post(MACHINES, json=body)
    assert response.status_code == 422
    assert "image" in response.json()["error"]


async def test_invalid_json_and_bad_types_are_400(emulator_http: httpx.AsyncClient) -> None:
    response = await emulator_http.post(
        MACHINES, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]
    response = await emulator_http.post(MACHINES, json=["config"])
    assert response.status_code == 400
    response = await emulator_http.post(
        MACHINES, json={"config": {"image": IMAGE, "guest": {"cpus": "many"}}}
    )
    assert response.status_code == 400
    assert "cpus" in response.json()["error"]


async def test_names_are_unique_among_live_machines(emulator_http: httpx.AsyncClient) -> None:
    first = await _create(emulator_http, name="worker", skip_launch=True)
    response = await emulator_http.post(
        MACHINES, json={"name": "worker", "config": {"image": IMAGE}}
    )
    assert response.status_code == 409
    assert response.json()["status"] == "name_taken"
    assert "worker" in response.json()["error"]
    # Another app may use the name; and once destroyed, the name is free again.
    other = await emulator_http.post(
        "/v1/apps/otherapp/machines", json={"name": "worker", "config": {"image": IMAGE}}
    )
    assert other.status_code == 200
    assert (await emulator_http.delete(f"{MACHINES}/{first['id']}")).status_code == 200
    again = await emulator_http.post(MACHINES, json={"name": "worker", "config": {"image": IMAGE}})
    assert again.status_code == 200


async def test_generated_names_are_distinct(emulator_http: httpx.AsyncClient) -> None:
    names = {(await _create(emulator_http, skip_launch=True))["name"] for _ in range(5)}
    assert len(names) == 5


# -- list: filters and pagination ----------------------------------------------------------------


async def test_list_filters(emulator_http: httpx.AsyncClient, emulator: MachinesEmulator) -> None:
    pdf = await _create(
        emulator_http, region="ams", config={"image": IMAGE, "metadata": {"group": "pdf", "v": "1"}}
    )
    other = await _create(
        emulator_http,
        skip_launch=True,
        config={"image": IMAGE, "metadata": {"group": "pdf", "v": "2"}},
    )
    plain = await _create(emulator_http, skip_launch=True)
    await emulator.settle()

    async def ids(**params: Any) -> list[str]:
        response = await emulator_http.get(MACHINES, params=params)
        assert response.status_code == 200
        return [m["id"] for m in response.json()]

    assert await ids() == [pdf["id"], other["id"], plain["id"]]
    assert await ids(**{"metadata.group": "pdf"}) == [pdf["id"], other["id"]]
    assert await ids(**{"metadata.group": "pdf", "metadata.v": "2"}) == [other["id"]]
    assert await ids(**{"metadata.group": "nope"}) == []
    assert await ids(region="ams") == [pdf["id"]]
    assert await ids(state="started") == [pdf["id"]]
    assert await ids(state="created,started") == [pdf["id"], other["id"], plain["id"]]

    await emulator_http.delete(f"{MACHINES}/{plain['id']}")
    await emulator.settle()
    assert plain["id"] not in await ids()
    assert plain["id"] in await ids(include_deleted="true")

    summary = (await emulator_http.get(MACHINES, params={"summary": "true"})).json()
    assert all("config" not in m and "events" not in m for m in summary)
    assert all(m["state"] for m in summary)


async def test_list_paginates_with_fly_next_cursor(emulator_http: httpx.AsyncClient) -> None:
    created = [(await _create(emulator_http, skip_launch=True))["id"] for _ in range(5)]
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    pages = 0
    while True:
        response = await emulator_http.get(MACHINES, params=params)
        assert response.status_code == 200
        page = response.json()
        assert len(page) <= 2
        seen += [m["id"] for m in page]
        pages += 1
        cursor = response.headers.get("fly-next-cursor")
        if cursor is None:
            break
        params = {"limit": 2, "cursor": cursor}
    assert seen == created
    assert pages == 3
    bad = await emulator_http.get(MACHINES, params={"limit": 2, "cursor": "garbage!"})
    assert bad.status_code == 400
    assert (await emulator_http.get(MACHINES, params={"limit": "x"})).status_code == 400
    maybe = await emulator_http.get(MACHINES, params={"include_deleted": "maybe"})
    assert maybe.status_code == 400


# -- start / stop / suspend / wait ---------------------------------------------------------------


async def test_start_stop_suspend_go_through_the_runtime(
    recorded: tuple[MachinesEmulator, httpx.AsyncClient], runtime: RecordingRuntime
) -> None:
    emu, http = recorded
    machine = await _started(
        http, config={"image": IMAGE, "stop_config": {"signal": "SIGTERM", "timeout": "7s"}}
    )
    mid = machine["id"]
    response = await http.post(f"{MACHINES}/{mid}/stop")
    assert response.status_code == 200
    assert (await _wait(http, mid, "stopped")).json()["state"] == "stopped"
    assert runtime.calls[-1] == ("stop", EMULATOR_APP, mid, "SIGTERM", 7.0)

    start = await http.post(f"{MACHINES}/{mid}/start")
    assert start.status_code == 200
    # Zero values are left out, as Fly leaves them out (`migrated: false`, `new_host: ""`).
    assert start.json() == {"previous_state": "stopped"}
    assert (await _wait(http, mid, "started")).status_code == 200

    stop = await http.post(f"{MACHINES}/{mid}/stop", json={"signal": "SIGKILL", "timeout": "1m30s"})
    assert stop.status_code == 200
    await _wait(http, mid, "stopped")
    assert runtime.calls[-1] == ("stop", EMULATOR_APP, mid, "SIGKILL", 90.0)

    await http.post(f"{MACHINES}/{mid}/start")
    await _wait(http, mid, "started")
    assert (await http.post(f"{MACHINES}/{mid}/suspend")).status_code == 200
    assert (await _wait(http, mid, "suspended")).json()["state"] == "suspended"
    resumed = await http.post(f"{MACHINES}/{mid}/start")
    assert resumed.json()["previous_state"] == "suspended"
    await _wait(http, mid, "started")
    assert runtime.kinds() == [
        "launch", "stop", "launch", "stop", "launch", "suspend", "resume",
    ]  # fmt: skip
    events = emu.events(EMULATOR_APP, mid)
    assert events[0].status == "started"
    assert {e.type for e in events} >= {"launch", "start", "stop", "exit", "suspend"}


async def test_stop_rejects_bad_signal_and_timeout(emulator_http: httpx.AsyncClient) -> None:
    machine = await _started(emulator_http)
    for body in ({"signal": "SIGBOGUS"}, {"timeout": "soon"}):
        response = await emulator_http.post(f"{MACHINES}/{machine['id']}/stop", json=body)
        assert response.status_code == 400
        assert response.json()["error"]


async def test_suspend_requires_a_started_machine(emulator_http: httpx.AsyncClient) -> None:
    machine = await _create(emulator_http, skip_launch=True)
    response = await emulator_http.post(f"{MACHINES}/{machine['id']}/suspend")
    assert response.status_code == 412
    assert "created" in response.json()["error"]


async def test_wait_times_out_with_408(emulator_http: httpx.AsyncClient) -> None:
    machine = await _create(emulator_http, skip_launch=True)
    response = await _wait(emulator_http, machine["id"], "started", timeout=1)
    assert response.status_code == 408
    assert "started" in response.json()["error"]


async def test_wait_answers_when_the_state_is_reached(
    recorded: tuple[MachinesEmulator, httpx.AsyncClient], runtime: RecordingRuntime
) -> None:
    emu, http = recorded
    runtime.gate = asyncio.Event()
    machine = await _create(http)
    waiter = asyncio.create_task(_wait(http, machine["id"], "started", timeout=30))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert emu.get(EMULATOR_APP, machine["id"]).state == "starting"
    runtime.gate.set()
    response = await asyncio.wait_for(waiter, 10)
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True
    assert body["state"] == "started"
    assert body["version"] == machine["version"]
    assert body["event_id"] == emu.events(EMULATOR_APP, machine["id"])[0].id


async def test_wait_parameters_are_validated(emulator_http: httpx.AsyncClient) -> None:
    machine = await _started(emulator_http)
    path = f"{MACHINES}/{machine['id']}/wait"
    assert (await emulator_http.get(path, params={"state": "sleeping"})).status_code == 400
    assert (await emulator_http.get(path, params={"timeout": "abc"})).status_code == 400
    assert (await emulator_http.get(path, params={"timeout": "0"})).status_code == 400
    # One duration rule (issue 23): not "inf" (read as the 60 s cap), not non-ASCII digits.
    for text in ("inf", "nan", "\u0663", "1e1", "1_0"):
        assert (await emulator_http.get(path, params={"timeout": text})).status_code == 400
    assert (
        await emulator_http.get(path, params={"version": "01ABCDEFGHJKMNPQRSTVWXYZ00"})
    ).status_code == 400
    ok = await emulator_http.get(path, params={"instance_id": machine["instance_id"], "timeout": 2})
    assert ok.status_code == 200
    settled = await emulator_http.get(path, params={"state": "settled", "timeout": 2})
    assert settled.json()["state"] == "started"


async def test_stop_while_starting_ends_stopped(
    recorded: tuple[MachinesEmulator, httpx.AsyncClient], runtime: RecordingRuntime
) -> None:
    emu, http = recorded
    runtime.gate = asyncio.Event()
    machine = await _create(http)
    await asyncio.sleep(0.01)
    assert (await http.post(f"{MACHINES}/{machine['id']}/stop")).status_code == 200
    assert emu.get(EMULATOR_APP, machine["id"]).state == "stopping"
    runtime.gate.set()
    assert (await _wait(http, machine["id"], "stopped")).status_code == 200
    await emu.settle()
    assert emu.get(EMULATOR_APP, machine["id"]).state == "stopped"
    assert runtime.kinds() == ["launch", "stop"]


async def test_start_while_stopping_is_queued_and_wins(
    recorded: tuple[MachinesEmulator, httpx.AsyncClient], runtime: RecordingRuntime
) -> None:
    emu, http = recorded
    machine = await _started(http)
    runtime.stop_gate = asyncio.Event()
    await http.post(f"{MACHINES}/{machine['id']}/stop")
    await asyncio.sleep(0.01)
    assert emu.get(EMULATOR_APP, machine["id"]).state == "stopping"
    start = await http.post(f"{MACHINES}/{machine['id']}/start")
    assert start.json()["previous_state"] == "stopping"
    runtime.stop_gate.set()
    await emu.settle()
    assert emu.get(EMULATOR_APP, machine["id"]).state == "started"
    assert runtime.kinds() == ["launch", "stop", "launch"]


async def test_a_failed_launch_leaves_the_machine_failed(
    recorded: tuple[MachinesEmulator, httpx.AsyncClient], runtime: RecordingRuntime
) -> None:
    emu, http = recorded
    runtime.fail_launch = True
    machine = await _create(http, skip_launch=True)
    with pytest.raises(EmulatorError) as caught:
        await emu.start_and_wait(EMULATOR_APP, machine["id"], timeout=5)
    assert caught.value.status == 412
    assert emu.get(EMULATOR_APP, machine["id"]).state == "failed"
    assert "boom" in str(emu.events(EMULATOR_APP, machine["id"])[0].request)
    # A failed Machine can be started again once the cause is fixed.
    runtime.fail_launch = False
    started = await emu.start_and_wait(EMULATOR_APP, machine["id"], timeout=5)
    assert started.state == "started"


# -- destroy -------------------------------------------------------------------------------------


async def test_destroy_refuses_a_started_machine_without_force(
    recorded: tuple[MachinesEmulator, httpx.AsyncClient], runtime: RecordingRuntime
) -> None:
    emu, http = recorded
    machine = await _started(http)
    path = f"{MACHINES}/{machine['id']}"
    refused = await http.delete(path)
    assert refused.status_code == 412
    assert "not currently stopped" in refused.json()["error"]
    assert emu.get(EMULATOR_APP, machine["id"]).state == "started"

    assert (await http.delete(path, params={"force": "true"})).status_code == 200
    assert (await _wait(http, machine["id"], "destroyed")).json()["state"] == "destroyed"
    assert runtime.kinds()[-1] == "destroy"
    assert (await http.get(path)).json()["state"] == "destroyed"
    for method, suffix in (("POST", "/start"), ("POST", "/stop"), ("DELETE", "")):
        gone = await http.request(method, path + suffix)
        assert gone.status_code == 404, (method, suffix)


async def test_destroy_a_stopped_machine(
    emulator_http: httpx.AsyncClient, emulator: MachinesEmulator
) -> None:
    machine = await _create(emulator_http, skip_launch=True)
    assert (await emulator_http.delete(f"{MACHINES}/{machine['id']}")).json() == {"ok": True}
    await emulator.settle()
    assert emulator.get(EMULATOR_APP, machine["id"]).state == "destroyed"


# -- update --------------------------------------------------------------------------------------


async def test_update_replaces_the_config_and_restarts(
    recorded: tuple[MachinesEmulator, httpx.AsyncClient], runtime: RecordingRuntime
) -> None:
    emu, http = recorded
    machine = await _started(http)
    path = f"{MACHINES}/{machine['id']}"
    new_image = "registry.fly.io/testapp:deployment-02"
    response = await http.post(path, json={"config": {"image": new_image, "env": {"B": "2"}}})
    assert response.status_code == 200
    updated = response.json()
    assert updated["config"] == {"image": new_image, "env": {"B": "2"}}
    assert updated["version"] != machine["version"]
    assert ULID.match(updated["version"])
    await _wait(http, machine["id"], "started")
    await emu.settle()
    assert runtime.kinds() == ["launch", "stop", "launch"]
    assert emu.get(EMULATOR_APP, machine["id"]).state == "started"

    stale = await http.post(
        path, json={"config": {"image": IMAGE}, "current_version": machine["version"]}
    )
    assert stale.status_code == 409
    assert (await http.post(path, json={"config": {"env": {}}})).status_code == 422


async def test_update_of_a_stopped_machine_honours_skip_launch(
    recorded: tuple[MachinesEmulator, httpx.AsyncClient], runtime: RecordingRuntime
) -> None:
    emu, http = recorded
    machine = await _create(http, skip_launch=True)
    path = f"{MACHINES}/{machine['id']}"
    await http.post(path, json={"config": {"image": IMAGE}, "skip_launch": True})
    await emu.settle()
    assert emu.get(EMULATOR_APP, machine["id"]).state == "created"
    assert runtime.calls == []
    await http.post(path, json={"config": {"image": IMAGE}})
    await emu.settle()
    assert emu.get(EMULATOR_APP, machine["id"]).state == "started"


async def test_update_of_a_suspended_machine_never_resumes_its_old_snapshot(
    recorded: tuple[MachinesEmulator, httpx.AsyncClient], runtime: RecordingRuntime
) -> None:
    emu, http = recorded
    machine = await _started(http)
    mid, path = machine["id"], f"{MACHINES}/{machine['id']}"
    await http.post(f"{path}/suspend")
    await _wait(http, mid, "suspended")
    # skip_launch: the snapshot (of the old config) is discarded and the Machine stays down.
    await http.post(path, json={"config": {"image": IMAGE, "env": {"A": "1"}}, "skip_launch": True})
    await _wait(http, mid, "stopped")
    await emu.settle()
    assert emu.get(EMULATOR_APP, mid).state == "stopped"
    assert runtime.kinds() == ["launch", "suspend", "stop"]
    # Its next start boots the new config cold, never a resume.
    await http.post(f"{path}/start")
    await _wait(http, mid, "started")
    assert runtime.kinds()[-1] == "launch"
    # Without skip_launch a suspended Machine is booted afresh at once, as a running one is.
    await http.post(f"{path}/suspend")
    await _wait(http, mid, "suspended")
    await http.post(path, json={"config": {"image": IMAGE, "env": {"A": "2"}}})
    await _wait(http, mid, "started")
    await emu.settle()
    assert runtime.kinds()[-3:] == ["suspend", "stop", "launch"]
    assert "resume" not in runtime.kinds()


async def test_update_of_a_leased_machine_needs_the_nonce(emulator_http: httpx.AsyncClient) -> None:
    machine = await _create(emulator_http, skip_launch=True)
    path = f"{MACHINES}/{machine['id']}"
    lease = (await emulator_http.post(f"{path}/lease", json={"ttl": 60})).json()
    body = {"config": {"image": IMAGE}, "skip_launch": True}
    for headers in ({}, {"fly-machine-lease-nonce": "not-the-nonce"}):
        refused = await emulator_http.post(path, json=body, headers=headers)
        assert refused.status_code == 409
        assert "lease currently held" in refused.json()["error"]
    ok = await emulator_http.post(
        path, json=body, headers={"fly-machine-lease-nonce": lease["nonce"]}
    )
    assert ok.status_code == 200


# -- leases --------------------------------------------------------------------------------------


async def test_lease_lifecycle() -> None:
    clock = FakeClock()
    emu = MachinesEmulator(clock=clock)
    async with _http(create_app(emu, token=EMULATOR_TOKEN, rate_limit=None)) as http:
        machine = await _create(http, skip_launch=True)
        path = f"{MACHINES}/{machine['id']}/lease"
        assert (await http.get(path)).status_code == 404

        acquired = await http.post(path, json={"ttl": 30, "description": "deploy"})
        assert acquired.status_code == 201
        lease = acquired.json()
        assert lease["expires_at"] == int(clock.now) + 30
        assert lease["description"] == "deploy"
        assert lease["owner"]
        assert lease["nonce"]
        assert (await http.get(path)).json()["nonce"] == lease["nonce"]

        held = await http.post(path, json={"ttl": 30})
        assert held.status_code == 409
        assert "lease currently held" in held.json()["error"]

        clock.now += 10
        refreshed = await http.post(
            path, json={"ttl": 60}, headers={"fly-machine-lease-nonce": lease["nonce"]}
        )
        assert refreshed.status_code == 201
        assert refreshed.json()["nonce"] == lease["nonce"]
        assert refreshed.json()["expires_at"] == int(clock.now) + 60

        leased = (
            await http.get(f"{MACHINES}/{machine['id']}", params={"include_leases": "true"})
        ).json()
        assert leased["lease"]["expires_at"] == int(clock.now) + 60
        assert "nonce" not in leased["lease"]

        assert (await http.delete(path)).status_code == 400
        wrong = await http.delete(path, headers={"fly-machine-lease-nonce": "nope"})
        assert wrong.status_code == 409
        released = await http.delete(path, headers={"fly-machine-lease-nonce": lease["nonce"]})
        assert released.status_code == 200
        assert (await http.get(path)).status_code == 404

        # An expired lease no longer blocks anyone.
        await http.post(path, json={"ttl": 5})
        clock.now += 6
        assert (await http.post(path, json={"ttl": 5})).status_code == 201
        assert (await http.post(path, json={"ttl": 0})).status_code in (400, 409)
    await emu.aclose()


async def test_create_with_lease_ttl_returns_the_nonce(emulator_http: httpx.AsyncClient) -> None:
    machine = await _create(emulator_http, skip_launch=True, lease_ttl=30)
    assert machine["nonce"]
    lease = (await emulator_http.get(f"{MACHINES}/{machine['id']}/lease")).json()
    assert lease["nonce"] == machine["nonce"]


# -- metadata ------------------------------------------------------------------------------------


async def test_metadata_get_set_delete(emulator_http: httpx.AsyncClient) -> None:
    machine = await _create(
        emulator_http, skip_launch=True, config={"image": IMAGE, "metadata": {"a": "1"}}
    )
    path = f"{MACHINES}/{machine['id']}/metadata"
    assert (await emulator_http.get(path)).json() == {"a": "1"}
    put = await emulator_http.post(f"{path}/group", json={"value": "pdf"})
    assert put.status_code == 204
    assert put.content == b""
    assert (await emulator_http.get(path)).json() == {"a": "1", "group": "pdf"}
    assert (await emulator_http.get(f"{path}/group")).json() == {"value": "pdf"}
    assert (await emulator_http.get(f"{MACHINES}/{machine['id']}")).json()["config"]["metadata"][
        "group"
    ] == "pdf"
    assert (await emulator_http.delete(f"{path}/a")).status_code == 204
    assert (await emulator_http.get(path)).json() == {"group": "pdf"}
    assert (await emulator_http.get(f"{path}/a")).status_code == 404
    assert (await emulator_http.post(f"{path}/x", json={})).status_code == 400
    # An encoded "/" stays inside the key.
    assert (await emulator_http.post(f"{path}/a%2Fb", json={"value": "v"})).status_code == 204
    assert (await emulator_http.get(path)).json()["a/b"] == "v"


# -- exits reported by the runtime ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("restart", "exit_code", "expected_state", "launches"),
    [
        (None, 1, "started", 2),  # default policy on-failure: restarted
        (None, 0, "stopped", 1),  # a clean exit is not a failure
        ({"policy": "no"}, 137, "stopped", 1),
        ({"policy": "always"}, 0, "started", 2),
        ({"policy": "on-failure", "max_retries": 0}, 1, "stopped", 1),
    ],
)
async def test_machine_exited_follows_the_restart_policy(
    runtime: RecordingRuntime,
    restart: dict[str, Any] | None,
    exit_code: int,
    expected_state: str,
    launches: int,
) -> None:
    emu = MachinesEmulator(runtime=runtime)
    config = MachineConfig(image=IMAGE, restart=restart)
    machine = await emu.create(EMULATOR_APP, CreateMachineRequest(config=config))
    await emu.settle()
    await emu.machine_exited(EMULATOR_APP, machine.id, exit_code=exit_code)
    await emu.settle()
    assert emu.get(EMULATOR_APP, machine.id).state == expected_state
    assert runtime.kinds().count("launch") == launches
    exit_event = next(e for e in emu.events(EMULATOR_APP, machine.id) if e.type == "exit")
    assert exit_event.request["exit_event"]["exit_code"] == exit_code
    await emu.aclose()


async def test_exits_of_stopping_machines_are_ignored_and_auto_destroy_applies(
    runtime: RecordingRuntime,
) -> None:
    emu = MachinesEmulator(runtime=runtime)
    plain = await emu.create(EMULATOR_APP, CreateMachineRequest(config=MachineConfig(image=IMAGE)))
    await emu.settle()
    await emu.stop(EMULATOR_APP, plain.id)
    await emu.machine_exited(EMULATOR_APP, plain.id, exit_code=143)  # the stop's own SIGTERM
    await emu.settle()
    assert emu.get(EMULATOR_APP, plain.id).state == "stopped"
    assert runtime.kinds().count("launch") == 1

    once = await emu.create(
        EMULATOR_APP,
        CreateMachineRequest(
            config=MachineConfig(image=IMAGE, auto_destroy=True, restart={"policy": "no"})
        ),
    )
    await emu.settle()
    await emu.machine_exited(EMULATOR_APP, once.id, exit_code=0)
    await emu.settle()
    assert emu.get(EMULATOR_APP, once.id).state == "destroyed"
    await emu.aclose()


# -- rate limiting -------------------------------------------------------------------------------


async def test_rate_limit_answers_429_with_retry_after() -> None:
    clock = FakeClock(0.0)
    emu = MachinesEmulator()
    app = create_app(
        emu, token=EMULATOR_TOKEN, rate_limit=RateLimit(rate=1.0, burst=2, clock=clock)
    )
    async with _http(app) as http:
        machine = await _create(http, skip_launch=True)
        path = f"{MACHINES}/{machine['id']}/start"
        assert (await http.post(path)).status_code == 200
        assert (await http.post(path)).status_code == 200
        limited = await http.post(path)
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "1"
        assert limited.json()["error"]
        # Other actions and other Machines have their own buckets; get has a bigger one.
        assert (await http.post(f"{MACHINES}/{machine['id']}/stop")).status_code == 200
        assert all(
            [(await http.get(f"{MACHINES}/{machine['id']}")).status_code == 200 for _ in range(10)]
        )
        clock.now += 1.0
        assert (await http.post(path)).status_code == 200
    await emu.aclose()


async def test_rate_limits_are_on_by_default_with_flys_numbers() -> None:
    emu = MachinesEmulator()
    async with _http(create_app(emu, token=EMULATOR_TOKEN)) as http:
        # List and create: per app, burst 3.
        statuses = [(await http.get(MACHINES)).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        machines = [await _create(http, skip_launch=True) for _ in range(3)]
        limited = await http.post(MACHINES, json={"config": {"image": "nginx"}})
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        # Other actions: per Machine and action, burst 3; get: per Machine, burst 10.
        for machine in machines[:2]:
            path = f"{MACHINES}/{machine['id']}/start"
            statuses = [(await http.post(path)).status_code for _ in range(4)]
            assert statuses[3] == 429
            gets = [(await http.get(f"{MACHINES}/{machine['id']}")).status_code for _ in range(11)]
            assert gets == [200] * 10 + [429]
    await emu.aclose()


# -- ASGI lifespan and helpers --------------------------------------------------------------------


async def test_lifespan_startup_and_shutdown(emulator_app: EmulatorApp) -> None:
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await asyncio.wait_for(emulator_app({"type": "lifespan"}, receive, send), 5)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_app_repr_hides_the_token(emulator_app: EmulatorApp) -> None:
    assert EMULATOR_TOKEN not in repr(emulator_app)


def test_identifiers_have_flys_form() -> None:
    ids = {new_machine_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[0-9a-f]{14}", i) for i in ids)
    assert ULID.match(new_ulid())
    assert new_ulid(1.0) < new_ulid(2.0)  # time-ordered


def test_image_ref_for() -> None:
    ref = image_ref_for("python:3.12-slim")
    assert (ref.registry, ref.repository, ref.tag) == ("docker.io", "library/python", "3.12-slim")
    ref = image_ref_for("localhost:5000/app@sha256:abc")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        "localhost:5000", "app", "latest", "sha256:abc",
    )  # fmt: skip


# -- the CLI as a real process -------------------------------------------------------------------


def _wait_listening(port: int, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the emulator exited early with {process.returncode}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("the emulator did not listen in time")


@pytest.mark.e2e
def test_cli_serves_the_api_on_loopback() -> None:
    port = free_loopback_port()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FLY_API_TOKEN": ""}
    process = subprocess.Popen(
        [
            sys.executable, "-m", "flyfn.emulator.api",
            "--host", "127.0.0.1", "--port", str(port), "--token", "cli-token", "--app", "demo",
        ],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_listening(port, process, time.monotonic() + 60)
        url = f"http://127.0.0.1:{port}/v1/apps/demo/machines"
        ok = httpx.get(url, headers={"Authorization": "Bearer cli-token"}, timeout=5)
        assert ok.status_code == 200
        assert ok.json() == []
        denied = httpx.get(url, timeout=5)
        assert denied.status_code == 401
        assert denied.json()["error"]
    finally:
        process.terminate()
        try:
            _, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate(timeout=5)
    assert b"cli-token" not in stderr


@pytest.mark.e2e
def test_cli_refuses_to_run_without_a_token() -> None:
    env = {**os.environ, "FLY_API_TOKEN": ""}
    result = subprocess.run(
        [sys.executable, "-m", "flyfn.emulator.api", "--port", "1"],
        env=env, capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert b"token" in result.stderr
