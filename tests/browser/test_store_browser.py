"""Headless Chromium on the demo store under `flyfn dev`: pages on the app Machine, PDFs elsewhere.

The store page is served by the app Machine and says so; following a receipt link brings a PDF
that a function Machine drew (fly-replay through the local Fly Proxy), which its footer names.
A screenshot of the store page goes to artifacts/browser/ (git-ignored).
"""

from __future__ import annotations

import re
import time
from io import BytesIO

import pytest
from playwright.sync_api import Page
from pypdf import PdfReader

from tests.browser.conftest import PURCHASES
from tests.browser.support import SHOTS, follow_pdf_link
from tests.demo_support import DemoStack

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.timeout(400)]

RECEIPT_LINK = re.compile(r"^/purchases/(\d+)/receipt\.pdf$")


def open_purchases(page: Page, stack: DemoStack) -> str:
    """Open /purchases/ and return the Machine that served it (its X-Flyfn-Machine header)."""
    response = page.goto(f"{stack.url}/purchases/")
    assert response is not None
    assert response.status == 200, response.status
    machine = response.headers.get("x-flyfn-machine")
    assert machine, response.headers
    return machine


def test_purchases_page_lists_purchases_and_names_its_machine(page: Page, stack: DemoStack) -> None:
    # Pages stay on the app Machine. Fly-like balancing may land one on a function Machine, which
    # sends it to the app Machine once it knows the app's Machines; one booted a moment ago may
    # not yet (it waits 5 s for its list, then serves the page rather than fail): ask again.
    for _ in range(3):
        machine = open_purchases(page, stack)
        if machine == stack.app_machine:
            break
        time.sleep(2)
    assert machine == stack.app_machine

    rows = page.locator("table.purchases tbody tr")
    assert rows.count() == PURCHASES
    links = [rows.nth(i).locator("a.receipt").get_attribute("href") for i in range(PURCHASES)]
    pks = sorted(int(m.group(1)) for href in links if (m := RECEIPT_LINK.match(href or "")))
    assert len(pks) == PURCHASES, links
    numbers = {rows.nth(i).locator("td").first.inner_text().strip() for i in range(PURCHASES)}
    assert numbers == {f"{pk:06d}" for pk in pks}  # the number shown is the purchase's

    note = page.locator("#machine-note")
    assert note.locator("[data-machine]").get_attribute("data-machine") == machine
    assert f"served by Machine {machine}" in note.inner_text()
    assert "generated on another Machine" in note.inner_text()

    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / "store.png"
    shot.unlink(missing_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_receipt_link_brings_a_pdf_drawn_on_another_machine(page: Page, stack: DemoStack) -> None:
    open_purchases(page, stack)
    row = page.locator("table.purchases tbody tr").nth(1)  # not the first: any row's own receipt
    number = row.locator("td").nth(0).inner_text().strip()
    customer = row.locator("td").nth(1).inner_text().strip()

    pdf = follow_pdf_link(row.locator("a.receipt"))

    assert pdf.url == f"{stack.url}/purchases/{int(number)}/receipt.pdf"
    assert pdf.data.startswith(b"%PDF-"), pdf.data[:64]
    (SHOTS / f"receipt-{number}.pdf").parent.mkdir(parents=True, exist_ok=True)
    (SHOTS / f"receipt-{number}.pdf").write_bytes(pdf.data)
    text = "\n".join(p.extract_text() for p in PdfReader(BytesIO(pdf.data)).pages)
    assert f"Receipt {number}" in text, text
    assert customer in text, text
    footer = re.search(r"generated on Machine (\w+)", text)
    assert footer is not None, text
    drawn_on = footer.group(1)
    # Not the app Machine. The page itself may come from a function Machine (one that booted a
    # moment ago serves it rather than wait longer for the app's list): "another" is not "the
    # page's".
    assert drawn_on not in (stack.app_machine, "local"), text
    assert pdf.machine == drawn_on  # the response Chromium got came from that Machine
    function_machines = {m["id"]: m["state"] for m in stack.group_machines("default")}
    assert function_machines.get(drawn_on) == "started", function_machines


REPORT_TIMEOUT = 240.0  # seconds for a cold function Machine to draw the report: a safety bound


def test_sales_report_is_drawn_by_a_background_task_on_a_function_machine(
    page: Page, stack: DemoStack
) -> None:
    open_purchases(page, stack)
    month = page.locator("#report-month option").first.get_attribute("value")
    assert month is not None
    with page.expect_navigation():
        page.get_by_role("button", name="Sales report").click()
    report = page.locator("li[data-report]").first
    first_state = report.get_attribute("data-state") or ""
    assert first_state == "queued" or first_state.startswith(("running on Machine", "done")), (
        first_state
    )

    # The page follows the task: reloaded until the report is done (a person's browser reloads
    # it by itself every 2 s while a report is pending; this headless one ignores meta refresh).
    done = page.locator("li[data-report][data-state='done'] a.report").first
    states = [first_state]
    deadline = time.monotonic() + REPORT_TIMEOUT
    while not done.count():
        assert time.monotonic() < deadline, (
            f"report still {states[-1]!r}: too slow\n{stack.output()}"
        )
        page.wait_for_timeout(500)
        page.reload()
        states.append(report.get_attribute("data-state") or "")
    pdf = follow_pdf_link(done)

    assert re.fullmatch(rf"{re.escape(stack.url)}/purchases/reports/\d+\.pdf", pdf.url), pdf.url
    # The finished file is served from the database: by whichever Machine Fly Proxy picked (an idle
    # function Machine is a favourite target for ordinary traffic too).
    assert pdf.machine in stack.machine_ids(), pdf.machine
    pages = [p.extract_text() for p in PdfReader(BytesIO(pdf.data)).pages]
    assert len(pages) >= 2, pages
    footers = {m.group(1) for text in pages for m in re.finditer(r"on Machine (\w+)", text)}
    assert len(footers) == 1, pages
    drawn_on = footers.pop()
    assert drawn_on not in (stack.app_machine, "local")  # the page's Machine may be a function's
    assert drawn_on in {m["id"] for m in stack.group_machines("reports")}
