"""Browser tests' and scripts/screenshots' shared code: Chromium, the demo store on `flyfn dev`.

Debian's Chromium is launched directly (never `playwright install`), with a fresh profile whose
one preference makes it download PDFs instead of opening its viewer, so the receipt's bytes are
the ones Chromium itself received. The demo store runs on `manage.py flyfn dev` in its own
process group; stopping it checks that no process it started is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from playwright.sync_api import BrowserContext, Download, Locator, Playwright

from tests.conftest import free_loopback_port
from tests.demo_support import DEMO, PYTHON, ROOT, demo_env, manage
from tests.support_dev import list_machines, start
from tests.support_procs import alive, descendants

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
DEV_TOKEN = "browser-tests-dev-token"  # the emulated Machines API's token, loopback only
IDLE_STOP = 30  # seconds: long enough that no function Machine stops in the middle of a test
BOOT_TIMEOUT = 90.0
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
    assert response.status == 200, f"{response.url}: {response.status}"
    if downloads:
        path = downloads[0].path()
        return ReceivedPdf(response.url, Path(path).read_bytes(), machine, downloaded=True)
    again = page.context.request.get(response.url, timeout=timeout * 1000)
    return ReceivedPdf(response.url, again.body(), machine, downloaded=False)


# -- the demo store on `flyfn dev` ----------------------------------------------------------------


@dataclass
class DemoStack:
    """A running `manage.py flyfn dev` of the demo store and what its banner said."""

    process: subprocess.Popen[str]
    lines: list[str]  # its output so far
    url: str = ""  # the proxy, e.g. http://127.0.0.1:PORT
    api: str = ""  # the emulated Machines API
    app: str = ""
    app_machine: str = ""
    live: str = ""  # the live page, e.g. http://127.0.0.1:PORT/

    def output(self) -> str:
        return "\n".join(self.lines)

    def group_machines(self, group: str = "default") -> list[dict[str, Any]]:
        """The function Machines of `group`, as the emulated Machines API lists them."""
        return list_machines(self.api, self.app, DEV_TOKEN, **{"metadata.flyfn_group": group})


_BANNER = {
    "url": re.compile(r"^\s+open\s+(http://\S+?)/?$"),
    "app": re.compile(r"^\s+app\s+(\S+)"),
    "app_machine": re.compile(r"^\s+main\s+.*\(Machine (\w+)\)"),
    "api": re.compile(r"^\s+API\s+(http://\S+)"),
    "live": re.compile(r"^\s+live\s+(http://\S+)"),
}


def _read_banner(stack: DemoStack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    found: dict[str, str] = {}
    seen = 0
    while len(found) < len(_BANNER):
        for line in stack.lines[seen:]:
            for key, pattern in _BANNER.items():
                if match := pattern.match(line):
                    found.setdefault(key, match.group(1))
            seen += 1
        if len(found) == len(_BANNER):
            break
        if stack.process.poll() is not None:
            raise AssertionError(
                f"flyfn dev exited ({stack.process.returncode}):\n{stack.output()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"no flyfn dev banner after {timeout}s:\n{stack.output()}")
        time.sleep(0.1)
    for key, value in found.items():
        setattr(stack, key, value)


@contextmanager
def demo_stack(
    workdir: Path, *, purchases: int, timeout: float = BOOT_TIMEOUT
) -> Iterator[DemoStack]:
    """The demo store, seeded in a fresh SQLite database under `workdir`, served by `flyfn dev`.

    On exit the stack is stopped and every process it started must be gone (AssertionError if not).
    """
    env = demo_env(workdir, DEBUG="1", FLYFN_DEV_TOKEN=DEV_TOKEN)
    manage(env, "migrate", "--noinput", "-v", "0")
    manage(env, "seed_store", "--purchases", str(purchases))
    command = [PYTHON, "manage.py", "flyfn", "dev", "--port", str(free_loopback_port())]
    command += ["--idle-stop", str(IDLE_STOP)]
    lines: list[str] = []
    process = start(command, cwd=DEMO, env=env, lines=lines)  # its own process group
    stack = DemoStack(process, lines)
    try:
        _read_banner(stack, timeout)
        yield stack
    finally:
        stop_and_reap(process)


# -- processes ------------------------------------------------------------------------------------


def stop_and_reap(process: subprocess.Popen[str], *, grace: float = 20) -> None:
    """SIGTERM `process` (flyfn dev stops its Machines), then SIGKILL its group and anything left.

    Raises AssertionError naming the processes that outlived a graceful stop.
    """
    family = descendants(process.pid)  # the Machines run in their own sessions
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    deadline = time.monotonic() + 30  # Machines die with their parent, a moment after it
    while any(alive(proc) for proc in family) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = sorted(proc[0] for proc in family if alive(proc))
    for pid in survivors:
        for sig in (signal.SIGCONT, signal.SIGKILL):  # a suspended Machine is SIGSTOPped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    assert not survivors, f"processes left behind by flyfn dev: {survivors}"
