"""Browser tests' and scripts/screenshots' shared code: Chromium, the demo store on `flyfn dev`.

Debian's Chromium is launched directly (never `playwright install`), with a fresh profile whose
one preference makes it download PDFs instead of opening its viewer, so the receipt's bytes are
the ones Chromium itself received. The demo store on `manage.py flyfn dev` is
`tests.demo_support.demo_stack`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from playwright.sync_api import BrowserContext, Download, Locator, Playwright

from tests.demo_support import (
    ROOT,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
)
SHOTS = ROOT / "artifacts" / "browser"  # git-ignored (artifacts/)
PDF_TIMEOUT = 60.0


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None when Chromium is installed."""
    if CHROMIUM.exists():
        return None
    return f"{CHROMIUM} is missing (`make chromium` or `apt-get install chromium` installs it)"


@contextmanager
def chromium_context(
    playwright: Playwright, profile: Path, **options: Any
) -> Iterator[BrowserContext]:
    """Debian's Chromium with a fresh profile in `profile` (an empty directory), closed at exit."""
    (profile / "Default").mkdir(parents=True, exist_ok=True)
    prefs = {"plugins": {"always_open_pdf_externally": True}}
    (profile / "Default" / "Preferences").write_text(json.dumps(prefs))
    context = playwright.chromium.launch_persistent_context(
        str(profile),
        executable_path=str(CHROMIUM),
        args=list(CHROMIUM_ARGS),
        headless=True,
        accept_downloads=True,
        timeout=30_000,
        **options,
    )
    try:
        context.set_default_timeout(30_000)
        yield context
    finally:
        context.close()


@dataclass(frozen=True)
class ReceivedPdf:
    url: str
    data: bytes
    machine: str | None  # X-Flyfn-Machine of the response Chromium received
    downloaded: bool  # False: Chromium showed its viewer and the bytes were fetched again


def follow_pdf_link(link: Locator, *, timeout: float = PDF_TIMEOUT) -> ReceivedPdf:
    """Click a link to a PDF and return what arrived.

    Chromium downloads it (the profile's preference); should a Chromium ignore that and open its
    viewer instead, whose page hides the bytes, they are fetched once more with the same cookies.
    """
    page = link.page
    downloads: list[Download] = []

    def on_download(download: Download) -> None:
        downloads.append(download)

    page.on("download", on_download)
    try:
        with page.expect_response(
            lambda r: r.url.endswith(".pdf") and r.request.is_navigation_request(),
            timeout=timeout * 1000,
        ) as arrived:
            link.click()
        response = arrived.value
        deadline = time.monotonic() + timeout
        while not downloads and page.url != response.url:
            if time.monotonic() > deadline:
                raise AssertionError(f"{response.url}: neither downloaded nor displayed")
            page.wait_for_timeout(50)  # lets Playwright deliver the download event
    finally:
        page.remove_listener("download", on_download)
    machine = response.headers.get("x-flyfn-machine")
    assert response.status == 200, (
        f"{response.url}: {response.status} from Machine {machine} "
        f"(headers {dict(response.headers)})"
    )
    if downloads:
        path = downloads[0].path()
        return ReceivedPdf(response.url, Path(path).read_bytes(), machine, downloaded=True)
    again = page.context.request.get(response.url, timeout=timeout * 1000)
    return ReceivedPdf(response.url, again.body(), machine, downloaded=False)
