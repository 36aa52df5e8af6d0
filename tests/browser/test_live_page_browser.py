"""Headless Chromium on `flyfn dev`'s live page while the demo store runs: Machines change state on
the page without a reload, and the routes of the requests show up; and on the page alone over an
emulator with Machines in two regions: pool and cost rows per group and region. Its screenshot
goes to artifacts/browser/live.png (git-ignored; docs/live-page.png is a copy of one)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from playwright.sync_api import Page, expect

from flyfn.emulator.live import LivePage
from flyfn.emulator.state import MachinesEmulator
from flyfn.machines.models import CreateMachineRequest, MachineConfig
from tests.browser.support import SHOTS
from tests.demo_support import DEV_TOKEN, DemoStack
from tests.support_machines_api import serve_in_thread

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.timeout(400)]

# Safety bound for the page to show a change (it polls twice a second; a loaded machine is slow).
SHOWN_WITHIN_MS = 60_000


def test_live_page_follows_a_function_machine_through_start_and_stop(
    page: Page, stack: DemoStack
) -> None:
    assert stack.live.startswith("http://127.0.0.1:"), stack.live
    response = page.goto(stack.live)
    assert response is not None
    assert response.status == 200
    app_row = page.locator(f'tr[data-machine="{stack.app_machine}"]')
    expect(app_row).to_have_attribute("data-state", "started", timeout=SHOWN_WITHIN_MS)
    page.evaluate("window.flyfnNotReloaded = true")

    receipt = httpx.get(f"{stack.url}/purchases/1/receipt.pdf", timeout=120)
    assert receipt.status_code == 200
    drawn_on = receipt.headers["x-flyfn-machine"]
    assert drawn_on != stack.app_machine
    function_row = page.locator(f'tr[data-machine="{drawn_on}"]')
    expect(function_row).to_have_attribute("data-state", "started", timeout=SHOWN_WITHIN_MS)
    expect(function_row).to_contain_text("default")  # its group
    expect(page.locator("#routes")).to_contain_text(
        "/purchases/1/receipt.pdf", timeout=SHOWN_WITHIN_MS
    )
    # Its group's Machine time and cost since the stack started.
    expect(page.locator('#costs tr[data-group="default"]')).to_be_visible(timeout=SHOWN_WITHIN_MS)
    # Its pool: one region here, so the cost rows have none but the pool rows name it.
    expect(page.locator('#pools tr[data-group="default"][data-region]')).to_be_visible(
        timeout=SHOWN_WITHIN_MS
    )
    expect(page.locator("#costs tr[data-region]")).to_have_count(0)
    # The demo's background tasks: its `reports` group, counted from the database.
    expect(page.locator("#tasks")).to_contain_text("reports", timeout=SHOWN_WITHIN_MS)
    expect(page.locator("#tasks")).to_contain_text("ready", timeout=SHOWN_WITHIN_MS)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "live.png"), full_page=True)

    stopped = httpx.post(
        f"{stack.api}/v1/apps/{stack.app}/machines/{drawn_on}/stop",
        headers={"Authorization": f"Bearer {DEV_TOKEN}"},
        timeout=60,
    )
    assert stopped.status_code == 200, stopped.text
    expect(function_row).to_have_attribute("data-state", "stopped", timeout=SHOWN_WITHIN_MS)
    expect(function_row).to_contain_text("stop")  # the stop joined its strip of events
    assert page.evaluate("window.flyfnNotReloaded") is True  # redrawn in place, not reloaded


async def _two_regions() -> MachinesEmulator:
    """An emulated app with Machines in iad and syd: its app Machines, `pdf`'s in both."""
    emulator = MachinesEmulator(region="iad", default_app="shop")
    for region in ("iad", "syd"):
        await emulator.create(
            "shop", CreateMachineRequest(config=MachineConfig(image="shop:1"), region=region)
        )
        config = MachineConfig(image="shop:1", metadata={"flyfn_group": "pdf"})
        await emulator.create("shop", CreateMachineRequest(config=config, region=region))
    await emulator.settle()
    return emulator


def test_live_page_of_a_two_region_stack_marks_pools_and_cost_rows_with_their_region(
    page: Page,
) -> None:
    # The page alone on an in-process emulator (no demo store): only its drawing is under test.
    # Playwright's sync API runs a loop in this thread: the emulator is set up on another one.
    with ThreadPoolExecutor(1) as setup:
        emulator = setup.submit(lambda: asyncio.run(_two_regions())).result()
    with serve_in_thread(LivePage(emulator, lambda: ["shop"])) as url:
        assert page.goto(url + "/") is not None
        for region in ("iad", "syd"):
            for table in ("#pools", "#costs"):
                row = page.locator(f'{table} tr[data-group="pdf"][data-region="{region}"]')
                expect(row).to_be_visible(timeout=SHOWN_WITHIN_MS)
                expect(row).to_contain_text(region)
        expect(page.locator("#costs-head")).to_contain_text("region")
