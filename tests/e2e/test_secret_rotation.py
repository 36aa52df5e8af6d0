"""End-to-end: rotating SECRET_KEY while the demo store runs on `flyfn dev` heals itself.

As `fly secrets set` does, the emulator's secrets command restarts only the app Machine; the
function Machine keeps the old key until the app Machine, on its new key, updates it.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.demo_support import DEV_TOKEN, PYTHON, ROOT, DemoStack, demo_stack
from tests.support_postgres import Postgres
from tests.support_procs import child_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

RECEIPTS = 30
MAX_REPLAYS = 10  # Fly Proxy's limit for one request (more is PA02)
# The demo's group: CACHE_TTL (pool refresh, 30 s) plus one Machine update (a Django boot); a
# safety bound on the time the heal may take, not a measure of it.
HEAL_BOUND = 30 + 120
RECEIPT_PATH = re.compile(r"^GET /purchases/\d+/receipt\.pdf ")
# Fly Proxy's own error codes (PA02: too many replays, PR04: no candidate, ...).
PROXY_ERROR = re.compile(r"\b(P[A-Z]\d\d)\b")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres) -> Iterator[DemoStack]:
    # Autostop's pass every 6000 s: the function Machine must not stop (and so boot with the new
    # key) by itself.
    workdir = tmp_path_factory.mktemp("rotation")
    with demo_stack(workdir, postgres, purchases=3, time_scale=0.05) as stack:
        yield stack


def receipt(client: httpx.Client, n: int) -> httpx.Response:
    return client.get(f"/purchases/{n}/receipt.pdf")


def set_secret(stack: DemoStack, name: str, value: str) -> str:
    """`python -m flyfn.emulator.secrets set` against the stack, as a user would run it."""
    env = child_env()
    env.update(FLYFN_DEV_TOKEN=DEV_TOKEN, PYTHONPATH=str(ROOT))
    command = [PYTHON, "-m", "flyfn.emulator.secrets", "--app", stack.app, "--api", stack.api]
    done = subprocess.run(
        [*command, "set", f"{name}={value}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert value not in done.stdout + done.stderr
    return done.stdout


def test_rotating_secret_key_heals_without_a_proxy_error(demo: DemoStack, tmp_path: Path) -> None:
    with httpx.Client(base_url=demo.url, timeout=120) as client:
        first = receipt(client, 1)
        assert first.status_code == 200, first.text[:300]
        (machine,) = demo.group_machines()
        fn = machine["id"]
        assert first.headers["x-flyfn-machine"] == fn
        old_version = machine["config"]["metadata"]["flyfn_version"]

        new_key = secrets.token_urlsafe(40)
        out = set_secret(demo, "SECRET_KEY", new_key)
        assert "1 app Machine(s) restarted" in out
        rotated = time.monotonic()
        mark = len(demo.lines)

        answers: list[tuple[int, str | None, float]] = []
        for n in range(RECEIPTS):
            response = receipt(client, n % 3 + 1)
            assert response.status_code in (200, 503), (response.status_code, response.text[:300])
            if response.status_code == 200:
                assert response.headers["content-type"] == "application/pdf"
                assert response.content.startswith(b"%PDF-")
            else:
                assert response.headers["retry-after"].isdigit()
                time.sleep(1)  # a client retrying a 503 waits a little (Retry-After says 5 s)
            answers.append(
                (response.status_code, response.headers.get("x-flyfn-machine"), time.monotonic())
            )

    def receipt_routes() -> list[str]:
        return [ln for ln in demo.lines[mark:] if RECEIPT_PATH.match(ln)]

    # The proxy prints a route once its answer is sent: the last line may trail the answer.
    waited = time.monotonic() + 60  # safety bound
    while len(receipt_routes()) < RECEIPTS and time.monotonic() < waited:
        time.sleep(0.1)
    routes = receipt_routes()
    assert len(routes) == RECEIPTS, "\n".join(routes)
    for line in routes:
        assert PROXY_ERROR.search(line) is None, line  # no proxy error
        assert line.count("→ replay") + line.count("→ elsewhere") <= MAX_REPLAYS, line
    # The function Machine was updated to the new version (a digest: never the key itself) ...
    (updated,) = demo.group_machines()
    assert updated["id"] == fn
    assert updated["config"]["metadata"]["flyfn_version"] not in (old_version, "")
    assert new_key not in str(updated)
    # ... and from some request on, every receipt is a PDF from it: a function Machine verifies
    # the state the restarted app Machine signed with the new key, so it runs the new key.
    healed = next(
        (i for i, (status, machine, _) in enumerate(answers) if (status, machine) == (200, fn)),
        None,
    )
    assert healed is not None, (answers, routes)
    # From then on every receipt is a PDF; Fly-like balancing may land one on the function
    # Machine of another group (the release command's `prepare` made one), where it runs.
    function_machines = {m["id"] for m in demo.function_machines()}
    assert all(
        status == 200 and machine in function_machines for status, machine, _ in answers[healed:]
    ), (answers, routes)
    print(
        f"secret rotation: {RECEIPTS} receipts, {sum(a[0] == 503 for a in answers)} answered 503, "
        f"healed at request {healed + 1}, {answers[healed][2] - rotated:.1f}s after the rotation; "
        f"most replays in one route: {max(ln.count('→ replay') for ln in routes)}"
    )
    assert answers[healed][2] - rotated < HEAL_BOUND, "too slow to heal (safety bound)"
