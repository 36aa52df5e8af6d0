"""Fixtures of the browser tests: Chromium, the demo store on `flyfn dev`, a fresh page per test.

Without /usr/bin/chromium the tests skip on a developer's machine but fail on CI (CI=true), whose
`make test` installs it first (scripts/ensure-chromium): a CI run must never pass by skipping them.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, sync_playwright

from tests.browser.support import CHROMIUM, chromium_context, chromium_missing
from tests.demo_support import DemoStack, demo_stack
from tests.support_postgres import Postgres

PURCHASES = 3  # seeded purchases: a few rows are enough to pick one that is not the first
VIEWPORT = {"width": 1000, "height": 720}


@pytest.fixture(scope="session")
def chromium() -> Path:
    reason = chromium_missing()
    if reason is not None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI runs the browser tests: {reason}", pytrace=False)
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture(scope="module")
def stack(
    chromium: Path, tmp_path_factory: pytest.TempPathFactory, postgres: Postgres
) -> Iterator[DemoStack]:
    """The seeded demo store on `flyfn dev` (booted only when Chromium is there to use it)."""
    with demo_stack(tmp_path_factory.mktemp("demo"), postgres, purchases=PURCHASES) as running:
        yield running


@pytest.fixture(scope="module")
def browser_context(
    chromium: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrowserContext]:
    profile = tmp_path_factory.mktemp("chromium-profile")
    with (
        sync_playwright() as playwright,
        chromium_context(playwright, profile, viewport=VIEWPORT) as context,
    ):
        yield context


@pytest.fixture
def page(browser_context: BrowserContext) -> Iterator[Page]:
    page = browser_context.new_page()
    try:
        yield page
    finally:
        page.close()


# The demo stack's last lines of output beside a failing test's report: the route lines and the
# Machines' logs say why a request was answered as it was.
_OUTPUT_LINES = 150


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    running = getattr(item, "funcargs", {}).get("stack")
    if report.failed and isinstance(running, DemoStack):
        tail = "\n".join(running.lines[-_OUTPUT_LINES:])
        report.sections.append(("flyfn dev output (last lines)", tail))
    return report
