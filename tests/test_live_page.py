"""Tests of flyfn dev's live page: what /state.json shows, what it never shows, the page itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import pytest

from flyfn.cost_report import COST_HEADER, REGION_COST_HEADER, money
from flyfn.emulator.live import MAX_ROUTES, LivePage
from flyfn.emulator.logline import RequestLog
from flyfn.emulator.state import MachinesEmulator
from flyfn.fly.pricing import Guest, running_per_second, storage_per_second
from flyfn.machines.models import CreateMachineRequest, MachineConfig

APP = "shop"
IMAGE = "local/shop:dev-1"
SECRET = "django-insecure-live-page-never-shows-this"


async def _stack() -> tuple[MachinesEmulator, LivePage, str, str]:
    emulator = MachinesEmulator(region="local", default_app=APP)
    app_machine = await emulator.create(
        APP, CreateMachineRequest(config=MachineConfig(image=IMAGE, env={"SECRET_KEY": SECRET}))
    )
    function = await emulator.create(
        APP,
        CreateMachineRequest(
            name="flyfn-pdf-0",
            config=MachineConfig(image=IMAGE, metadata={"flyfn_group": "pdf"}),
        ),
    )
    await emulator.settle()
    return emulator, LivePage(emulator, lambda: [APP]), app_machine.id, function.id


async def _get(
    page: LivePage, path: str, method: str = "GET", *, host: str | None = None
) -> httpx.Response:
    # The page answers only at a loopback name with its port (the server's, as uvicorn reports).
    transport = httpx.ASGITransport(app=page)
    headers = {"host": host} if host is not None else {}
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8765") as client:
        return await client.request(method, path, headers=headers)


async def test_state_lists_every_machine_with_group_state_image_region_and_events() -> None:
    emulator, page, app_id, fn_id = await _stack()
    state = (await _get(page, "/state.json")).json()
    by_id = {m["id"]: m for m in state["machines"]}
    assert set(by_id) == {app_id, fn_id}
    assert by_id[fn_id]["group"] == "pdf"
    assert by_id[app_id]["group"] is None
    assert {m["state"] for m in by_id.values()} == {"started"}
    assert {m["image"] for m in by_id.values()} == {IMAGE}
    assert {m["region"] for m in by_id.values()} == {"local"}
    assert "start" in [e["type"] for e in by_id[fn_id]["events"]]
    await emulator.aclose()


async def test_a_stop_shows_in_the_next_state() -> None:
    emulator, page, _, fn_id = await _stack()
    await emulator.stop(APP, fn_id)
    await emulator.settle()
    state = (await _get(page, "/state.json")).json()
    (fn,) = [m for m in state["machines"] if m["id"] == fn_id]
    assert fn["state"] == "stopped"
    newest_first = [e["type"] for e in fn["events"]]
    assert newest_first.index("stop") < newest_first.index("start")
    await emulator.aclose()


async def test_routes_are_kept_newest_first_and_bounded() -> None:
    emulator, page, _, fn_id = await _stack()
    for n in range(MAX_ROUTES + 5):
        page.record_route(
            RequestLog("GET", f"/r/{n}/", hops=["main:abcd"], status=200, machine_id=fn_id)
        )
    routes = (await _get(page, "/state.json")).json()["routes"]
    assert len(routes) == MAX_ROUTES
    assert routes[0]["line"].startswith(f"GET /r/{MAX_ROUTES + 4}/ main:abcd 200")
    assert routes[0]["machine"] == fn_id
    await emulator.aclose()


async def test_a_route_of_a_multi_region_stack_says_where_it_entered() -> None:
    emulator, page, _, fn_id = await _stack()
    page.record_route(
        RequestLog("GET", "/r/", hops=["main:abcd@syd"], status=200, machine_id=fn_id, region="syd")
    )
    [route] = (await _get(page, "/state.json")).json()["routes"]
    assert route["region"] == "syd"
    assert route["line"].startswith("[syd] GET /r/ main:abcd@syd 200")
    await emulator.aclose()


async def test_task_figures_are_shown_and_a_failing_source_does_not_break_the_page() -> None:
    emulator, page, _, _ = await _stack()

    def figures() -> Mapping[str, Mapping[str, Any]]:
        return {"reports": {"ready": 2, "running": 1, "failed": 0}}

    page.tasks = figures
    assert (await _get(page, "/state.json")).json()["tasks"] == {
        "reports": {"ready": 2, "running": 1, "failed": 0}
    }

    def broken() -> Mapping[str, Mapping[str, Any]]:
        raise RuntimeError("database is locked")

    page.tasks = broken
    state = (await _get(page, "/state.json")).json()
    assert state["tasks"] == {"error": {"message": "RuntimeError: database is locked"}}
    assert len(state["machines"]) == 2
    await emulator.aclose()


async def test_the_page_never_shows_a_machines_environment() -> None:
    emulator, page, _, _ = await _stack()
    body = (await _get(page, "/state.json")).text
    assert SECRET not in body
    assert "SECRET_KEY" not in body
    await emulator.aclose()


@pytest.mark.parametrize(
    ("method", "path", "status", "content_type"),
    [
        ("GET", "/", 200, "text/html; charset=utf-8"),
        ("GET", "/state.json", 200, "application/json"),
        ("GET", "/admin/", 404, "text/plain; charset=utf-8"),
        ("POST", "/state.json", 405, "text/plain; charset=utf-8"),
    ],
)
async def test_paths_and_methods(method: str, path: str, status: int, content_type: str) -> None:
    emulator, page, _, _ = await _stack()
    response = await _get(page, path, method)
    assert (response.status_code, response.headers["content-type"]) == (status, content_type)
    assert response.headers["cache-control"] == "no-store"
    await emulator.aclose()


async def test_the_page_polls_the_state_it_draws() -> None:
    emulator, page, _, _ = await _stack()
    html = (await _get(page, "/")).text
    assert 'fetch("state.json"' in html
    for table in ("machines", "pools", "costs", "routes", "tasks"):
        assert f'id="{table}"' in html
    await emulator.aclose()


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8765", "localhost:8765", "LOCALHOST:8765", "[::1]:8765"]
)
async def test_the_page_answers_at_loopback_names_with_its_port(host: str) -> None:
    emulator, page, _, _ = await _stack()
    assert (await _get(page, "/state.json", host=host)).status_code == 200
    await emulator.aclose()


@pytest.mark.parametrize(
    "host",
    [
        "rebind.attacker.example:8765",  # DNS rebinding: a name that resolves to 127.0.0.1
        "rebind.attacker.example",
        "127.0.0.1",
        "127.0.0.1:9999",
        "localhost:8765.attacker.example",
        "localhost.:8765",
        "127.0.0.2:8765",
        "",
    ],
)
async def test_any_other_host_is_a_400_that_shows_nothing(host: str) -> None:
    # Issue 23: without this, a web page could read the route lines (query strings included).
    emulator, page, _, _ = await _stack()
    page.record_route(RequestLog(method="GET", path="/pay/?card=4111", machine_id="m1", status=200))
    for path in ("/", "/state.json"):
        response = await _get(page, path, host=host)
        assert response.status_code == 400
        assert "card" not in response.text
        assert "Machines" not in response.text
    await emulator.aclose()


async def test_the_page_checks_the_port_it_was_given() -> None:
    emulator = MachinesEmulator(region="local", default_app=APP)
    page = LivePage(emulator, lambda: [APP], port=4242)
    assert (await _get(page, "/", host="127.0.0.1:4242")).status_code == 200
    assert (await _get(page, "/", host="127.0.0.1:8765")).status_code == 400
    await emulator.aclose()


async def test_each_group_s_machine_time_and_cost_since_the_stack_started() -> None:
    now = [1_800_000_000.0]
    emulator = MachinesEmulator(region="local", default_app=APP, clock=lambda: now[0])
    page = LivePage(emulator, lambda: [APP])
    config = MachineConfig(image=IMAGE, metadata={"flyfn_group": "pdf"})
    now[0] += 10  # the stack is up before any Machine
    function = await emulator.create(APP, CreateMachineRequest(config=config))
    await emulator.settle()
    now[0] += 90
    await emulator.stop(APP, function.id)
    await emulator.settle()
    now[0] += 30
    costs = (await _get(page, "/state.json")).json()["costs"]
    assert costs["header"][:6] == ["GROUP", "MACHINES", "STARTED", "STOPPED", "SUSPENDED", "STARTS"]
    # Started 90 s, stopped 30 s, one start; the app Machines are no group's.
    assert [row[:6] for row in costs["rows"]] == [["pdf", "1", "1m30s", "30s", "0s", "1"]]
    assert costs["window"] == "since flyfn dev started"
    await emulator.aclose()


async def _function_machine(emulator: MachinesEmulator, group: str, region: str) -> str:
    config = MachineConfig(image=IMAGE, metadata={"flyfn_group": group})
    created = await emulator.create(APP, CreateMachineRequest(config=config, region=region))
    return created.id


async def test_a_stack_in_two_regions_splits_pools_and_costs_by_group_and_region() -> None:
    now = [1_800_000_000.0]
    emulator = MachinesEmulator(region="iad", default_app=APP, clock=lambda: now[0])
    page = LivePage(emulator, lambda: [APP])
    for region in ("iad", "syd"):  # the app's Machines: no group's, but the stack's regions
        await emulator.create(
            APP, CreateMachineRequest(config=MachineConfig(image=IMAGE), region=region)
        )
    now[0] += 10
    await _function_machine(emulator, "pdf", "iad")
    idle = await _function_machine(emulator, "pdf", "iad")
    await _function_machine(emulator, "pdf", "syd")
    gone = await _function_machine(emulator, "search", "syd")
    await emulator.settle()
    now[0] += 30
    await emulator.destroy(APP, gone, force=True)
    await emulator.settle()
    now[0] += 30
    await emulator.stop(APP, idle)
    await emulator.settle()
    now[0] += 30
    await _function_machine(emulator, "search", "syd")
    await emulator.settle()
    now[0] += 30
    state = (await _get(page, "/state.json")).json()

    # Pools: the Machines there now (the destroyed one is gone), started or not.
    assert state["pools"] == [
        {"group": "pdf", "region": "iad", "machines": 2, "started": 1},
        {"group": "pdf", "region": "syd", "machines": 1, "started": 1},
        {"group": "search", "region": "syd", "machines": 1, "started": 1},
    ]
    # Costs: a row per group and region, each from that region's Machines alone (the destroyed
    # one included: it ran 30 s); a group only in syd has no iad row.
    costs = state["costs"]
    assert costs["header"] == list(REGION_COST_HEADER)
    assert [row[:7] for row in costs["rows"]] == [
        ["pdf", "iad", "2", "3m00s", "1m00s", "0s", "2"],
        ["pdf", "syd", "1", "2m00s", "0s", "0s", "1"],
        ["search", "syd", "2", "1m00s", "0s", "0s", "2"],
    ]
    started, stored = running_per_second(Guest()), storage_per_second()
    cost_at = REGION_COST_HEADER.index("COST")
    assert [row[cost_at] for row in costs["rows"]] == [
        money(180 * started + 60 * stored),
        money(120 * started),
        money(60 * started),
    ]
    await emulator.aclose()


async def test_a_stack_in_one_region_keeps_the_cost_table_per_group() -> None:
    emulator = MachinesEmulator(region="iad", default_app=APP)
    page = LivePage(emulator, lambda: [APP])
    await emulator.create(APP, CreateMachineRequest(config=MachineConfig(image=IMAGE)))
    await _function_machine(emulator, "pdf", "iad")
    await _function_machine(emulator, "pdf", "iad")
    await emulator.settle()
    state = (await _get(page, "/state.json")).json()
    assert state["costs"]["header"] == list(COST_HEADER)
    assert [row[:2] for row in state["costs"]["rows"]] == [["pdf", "2"]]
    # The pools still name their region (one row per group here).
    assert state["pools"] == [{"group": "pdf", "region": "iad", "machines": 2, "started": 2}]
    await emulator.aclose()
