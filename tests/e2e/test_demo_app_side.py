"""End-to-end: the demo's app side as on Fly, under `flyfn dev` deploying the repository's fly.toml.

- Its app Machine runs the Dockerfile's command, `uvicorn --workers 2`: two worker processes.
- Receipts whose replays fail (the function Machine is `stopping`, which Fly Proxy never starts:
  PM08) fall back on the app Machine, on whichever worker Fly Proxy hands the fallback to: each is
  answered, none with a 503 for a replay that "this process" did not issue (at least 10 of the 20
  come back with `fly-replay-failed`: with a record per process, all 10 reaching the worker that
  issued the replay would have a chance of 1 in 1,024).
- fly.toml says `min_machines_running = 0` and `auto_stop_machines = "stop"`: the idle app Machine
  is stopped by autostop, and the next request starts it again.
- `manage.py flyfn status` against the running stack's Machines API shows each group's Machine
  time and cost beside the same Machines always on, as priced by hand from Fly's table.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from tests.demo_support import DEV_TOKEN, DemoStack, demo_stack, manage
from tests.support_postgres import Postgres

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TIME_SCALE = 30  # autostop's pass every 10 s
RECEIPTS = 20
SAFETY_BOUND = 240.0  # seconds: "too slow", never a verdict on behaviour
# A receipt that ran as a fallback on the app Machine: the route line ends on it after the replay.
FALLBACK_ROUTE = re.compile(r"^GET /purchases/\d+/receipt\.pdf .*→ replay → fn:\w+ .*main:\w+")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres) -> Iterator[DemoStack]:
    with demo_stack(
        tmp_path_factory.mktemp("app-side"), postgres, purchases=3, time_scale=TIME_SCALE
    ) as stack:
        yield stack


def _machine(stack: DemoStack, machine_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{stack.api}/v1/apps/{stack.app}/machines/{machine_id}",
        headers={"Authorization": f"Bearer {DEV_TOKEN}"},
        timeout=30,
    )
    response.raise_for_status()
    machine: dict[str, Any] = response.json()
    return machine


def _wait_state(stack: DemoStack, machine_id: str, states: set[str]) -> str:
    deadline = time.monotonic() + SAFETY_BOUND
    while True:
        state = str(_machine(stack, machine_id)["state"])
        if state in states:
            return state
        assert time.monotonic() < deadline, f"too slow: {machine_id} still {state} (safety bound)"
        time.sleep(0.5)


def _workers(machine_id: str) -> list[psutil.Process]:
    """The worker processes uvicorn spawned on the Machine (its own process is their parent)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "spawn_main" not in " ".join(process.info["cmdline"] or []):
                continue
            if process.environ().get("FLY_MACHINE_ID") == machine_id:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _stuck_stopping(stack: DemoStack, machine_id: str) -> None:
    """Leave the Machine `stopping` for the rest of the test: a stop whose signal uvicorn outlives
    (SIGHUP restarts its workers) with a long timeout. Fly Proxy starts no Machine in that state
    (PM08). Autostop may have stopped it meanwhile: then it is started first."""
    headers = {"Authorization": f"Bearer {DEV_TOKEN}"}
    machine = f"{stack.api}/v1/apps/{stack.app}/machines/{machine_id}"
    for _ in range(5):
        if _wait_state(stack, machine_id, {"started", "stopped"}) == "stopped":
            httpx.post(f"{machine}/start", headers=headers, timeout=30).raise_for_status()
            _wait_state(stack, machine_id, {"started"})
        stop = httpx.post(
            f"{machine}/stop",
            json={"signal": "SIGHUP", "timeout": "240s"},
            headers=headers,
            timeout=30,
        )
        assert stop.status_code == 200, stop.text
        if _machine(stack, machine_id)["state"] == "stopping":
            return
    raise AssertionError(f"{machine_id} never stayed stopping")


def test_the_app_machine_runs_two_workers_and_fallbacks_reach_either(demo: DemoStack) -> None:
    with httpx.Client(base_url=demo.url, timeout=120) as client:
        first = client.get("/purchases/1/receipt.pdf")
        assert first.status_code == 200, first.text[:300]
        (function_machine,) = demo.group_machines()
        fn = function_machine["id"]
        assert len(_workers(demo.app_machine)) == 2
        _stuck_stopping(demo, fn)
        mark = len(demo.lines)
        answers = []
        for n in range(RECEIPTS):
            answers.append(client.get(f"/purchases/{n % 3 + 1}/receipt.pdf"))
            # A client's pace: the app Machine's pool, which drops a Machine a failed replay
            # names, lists the app again within Fly's rate limit (1 list/s for the whole app).
            time.sleep(1.0)
        assert _machine(demo, fn)["state"] == "stopping"  # still: every replay failed

    statuses = [a.status_code for a in answers]
    assert statuses == [200] * RECEIPTS, [(a.status_code, a.text[:100]) for a in answers]
    assert all(a.content.startswith(b"%PDF-") for a in answers)
    assert {a.headers["x-flyfn-machine"] for a in answers} == {demo.app_machine}
    # Most ran after a replay Fly Proxy brought back (`fly-replay-failed`), on whichever of the
    # two workers got it (a record of replays per process answered about half with 503); others
    # ran here because the pool, still listing again, had no target (fallback `no_machine`).
    time.sleep(2)  # the proxy prints a route once its answer is sent
    routes = [ln for ln in demo.lines[mark:] if ln.startswith("GET /purchases/")]
    fallbacks = [ln for ln in routes if FALLBACK_ROUTE.match(ln)]
    print(
        f"app side: {RECEIPTS} receipts answered 200 by the app Machine, {len(fallbacks)} after a "
        f"failed replay (fly-replay-failed), workers {len(_workers(demo.app_machine))}"
    )
    assert len(fallbacks) >= RECEIPTS // 2, "\n".join(routes)


def test_the_idle_app_machine_is_stopped_by_autostop_and_started_by_a_request(
    demo: DemoStack,
) -> None:
    app_machine = demo.app_machine
    assert _wait_state(demo, app_machine, {"stopped"}) == "stopped"
    assert _workers(app_machine) == []  # its threads and workers went with it
    response = httpx.get(f"{demo.url}/purchases/", timeout=120)
    assert response.status_code == 200, response.text[:300]
    assert _machine(demo, app_machine)["state"] == "started"
    assert len(_workers(app_machine)) == 2


# shared-cpu-1x with 1 GB (the demo's groups): $1.945 per 30 days for the CPU and its 256 MB,
# $5 per 30 days for each GB beyond; a stopped Machine's 1 GB root file system $0.15.
RUNNING_PER_SECOND = (1.945 + 0.75 * 5.00) / 2_592_000
STORED_PER_SECOND = 0.15 / 2_592_000
_SECONDS = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def _seconds(text: str) -> float:
    """`12m05s`, `3h07m`, `42s` (as the table writes them) in seconds."""
    match = _SECONDS.fullmatch(text)
    assert match is not None, text
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return hours * 3600.0 + minutes * 60.0 + seconds


def _dollars(text: str) -> float:
    return float(text.removeprefix("$"))


def test_status_shows_each_group_s_machine_time_cost_and_always_on(demo: DemoStack) -> None:
    with httpx.Client(base_url=demo.url, timeout=120) as client:  # the group has run
        assert client.get("/purchases/1/receipt.pdf").status_code == 200
    env = {
        **demo.env,
        "FLY_APP_NAME": demo.app,
        "FLY_API_HOSTNAME": demo.api,
        "FLY_API_TOKEN": DEV_TOKEN,
    }
    out = manage(env, "flyfn", "status", "--window", "1h", timeout=120)
    section = out[out.index("Machine time and cost (window 1h, estimates)") :].splitlines()
    print("\n".join(section[:8]))
    header = section[1].split()
    assert header[:2] == ["GROUP", "MACHINES"]
    assert header[-4:] == ["COST", "ALWAYS", "ON", "SAVED"]
    rows = {line.split()[0]: line.split() for line in section[2:4]}
    assert set(rows) == {"default", "reports"}, section
    # Both groups have run (the task group's Machine wakes at boot); each priced by hand (the
    # columns are rounded: a second each, three significant digits).
    for group, row in rows.items():
        _, machines, started, stopped, suspended, starts, cost, always_on, saved = row
        assert (machines, suspended) == ("1", "0s"), row
        assert int(starts) >= 1, row
        running, resting = _seconds(started), _seconds(stopped)
        assert running > 0, row
        expected = running * RUNNING_PER_SECOND + resting * STORED_PER_SECOND
        assert math.isclose(_dollars(cost), expected, rel_tol=0.1, abs_tol=2e-7), (group, expected)
        always = (running + resting) * RUNNING_PER_SECOND
        assert math.isclose(_dollars(always_on), always, rel_tol=0.1, abs_tol=2e-7), (group, always)
        assert math.isclose(
            _dollars(saved), _dollars(always_on) - _dollars(cost), rel_tol=0.05, abs_tol=2e-7
        ), row
    for group in rows:
        assert any(line.startswith(f'  {group}: autostop "off" $') for line in section), section
    assert any(line.startswith("  prices: ") for line in section), section
