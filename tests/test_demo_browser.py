"""Browser test of the demo store on the local Fly emulator (what `make demo` runs).

Headless Chromium (Debian's, installed by `make chromium`) opens /purchases/, follows a receipt
link and gets the PDF. The PDF's footer must name a Machine other than the one that served the
page: the receipt was drawn on a function Machine reached through fly-replay. A screenshot of the
store page goes to artifacts/ (git-ignored).
"""

from __future__ import annotations

import re
from io import BytesIO
from pathlib import Path

import pytest
from pypdf import PdfReader

from tests.conftest import free_loopback_port
from tests.demo_support import ROOT, demo_env, serving

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "artifacts" / "demo-store.png"

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (run `make chromium`)")
def test_receipt_is_drawn_on_another_machine(tmp_path: Path) -> None:
    from playwright.sync_api import Route, sync_playwright

    env = demo_env(tmp_path, DEBUG="1", DEMO_PURCHASES="5")
    port = free_loopback_port()
    base = f"http://127.0.0.1:{port}"
    captured: dict[str, bytes] = {}

    def capture(route: Route) -> None:
        # Chromium shows a PDF in its viewer: keep the bytes the server sent on the way through.
        response = route.fetch()
        captured["pdf"] = response.body()
        route.fulfill(response=response)

    demo = [str(ROOT / "scripts" / "demo"), str(port)]
    with (
        serving(demo, cwd=ROOT, env=env, url=f"{base}/purchases/", timeout=90),
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page()
            page.goto(f"{base}/purchases/")
            page_machine = page.get_attribute("[data-machine]", "data-machine")
            assert page_machine
            assert page_machine != "local"
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            row = page.locator("table.purchases tbody tr").first
            number = row.locator("td").first.inner_text().strip()
            page.route("**/receipt.pdf", capture)
            row.locator("a.receipt").click()
            page.wait_for_url("**/receipt.pdf", timeout=60_000)
        finally:
            browser.close()

    data = captured["pdf"]
    assert data.startswith(b"%PDF-")
    text = "\n".join(p.extract_text() for p in PdfReader(BytesIO(data)).pages)
    assert f"Receipt {number}" in text
    footer = re.search(r"generated on Machine (\S+)", text)
    assert footer is not None, text
    assert footer.group(1) not in ("local", page_machine)
