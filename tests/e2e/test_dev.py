"""End-to-end: `manage.py flyfn dev` on the e2e project, with real Machine processes on loopback.

The tests of this module share one `flyfn dev` (booting is the slow part) and run in file order:
the first serverless request of a group is the one that creates its function Machine. The last
tests stop stacks with SIGTERM / SIGINT and check that no process is left behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from flyfn.machine_dir import MACHINE_DIRS_ENV
from tests.e2e.stack import Dev, running_stack
from tests.support_procs import alive, identity, machine_pid
from tests.support_wait import wait_for

TIME_SCALE = 60  # autostop's pass every 5 s: two requests of one test seldom straddle a stop

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def _rss_mb(process: psutil.Process) -> float:
    return process.memory_info().rss / (1024 * 1024)


@pytest.fixture(scope="module")
def dev() -> Iterator[Dev]:
    with running_stack(TIME_SCALE) as stack:
        yield stack


def get(dev: Dev, path: str, **kwargs: Any) -> httpx.Response:
    response = httpx.get(dev.url + path, timeout=60, **kwargs)
    assert response.status_code == 200, response.text
    return response


# -- routing ---------------------------------------------------------------------------------------


def test_plain_view_answers_from_the_app_machine(dev: Dev) -> None:
    app_machine = dev.app_machine()
    response = get(dev, "/plain/")
    assert response.json() == {"view": "plain", "machine": app_machine["id"], "group": None}
    assert response.headers["x-flyfn-machine"] == app_machine["id"]
    assert response.headers["fly-request-id"]
    assert dev.group_machines("default") == []  # nothing serverless happened yet


def test_serverless_view_is_replayed_cold_then_warm(dev: Dev) -> None:
    app_id = dev.app_machine()["id"]
    mark = len(dev.lines)
    first = get(dev, "/square/7/")
    data = first.json()
    assert data["result"] == 49
    assert data["group"] == "default"
    fn_id = first.headers["x-flyfn-machine"]
    assert fn_id != app_id
    assert data["machine"] == fn_id
    (fn,) = dev.group_machines("default")  # created by the first request
    assert fn["id"] == fn_id
    assert fn["state"] == "started"
    assert fn["config"]["image"] == dev.app_machine()["config"]["image"]
    assert f"main:{app_id[:4]} → replay → fn:{fn_id[:4]} (cold" in dev.log_for("/square/7/", mark)

    mark = len(dev.lines)
    second = get(dev, "/square/8/")
    assert second.json()["result"] == 64
    assert second.headers["x-flyfn-machine"] == fn_id
    line = dev.log_for("/square/8/", mark)
    assert f"→ replay → fn:{fn_id[:4]} " in line
    # Warm unless autostop stopped it in between (a pass every 5 s: a slow machine may see one).
    assert ("(cold" in line) == dev.was_stopped(fn_id, mark), line


def test_idle_function_machine_stops_then_starts_again(dev: Dev) -> None:
    get(dev, "/square/2/")
    (fn,) = dev.group_machines("default")
    wait_for(
        lambda: dev.group_machines("default")[0]["state"] == "stopped",
        60,  # a safety bound: two or three passes are enough
        "the idle function Machine to stop",
    )
    assert machine_pid(dev.process.pid, fn["id"]) is None
    mark = len(dev.lines)
    response = get(dev, "/square/3/")
    assert response.json()["result"] == 9
    assert response.headers["x-flyfn-machine"] == fn["id"]
    assert f"fn:{fn['id'][:4]} (cold" in dev.log_for("/square/3/", mark)


def test_killed_function_process_is_replaced_for_the_next_request(dev: Dev) -> None:
    get(dev, "/square/4/")
    (fn,) = dev.group_machines("default")
    pid = machine_pid(dev.process.pid, fn["id"])
    assert pid is not None
    killed = identity(pid)
    assert killed is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(killed), 60, "the killed process to go")
    response = get(dev, "/square/5/")
    assert response.json()["result"] == 25
    assert response.headers["x-flyfn-machine"] == fn["id"]
    # A new process served it (autostop may have stopped that one too by now on a slow machine).
    assert machine_pid(dev.process.pid, fn["id"]) != pid


def test_function_machine_that_cannot_start_falls_back_locally(dev: Dev) -> None:
    app_id = dev.app_machine()["id"]
    response = get(dev, "/broken/")
    assert response.json() == {"view": "broken", "machine": app_id, "group": None}
    assert response.headers["x-flyfn-machine"] == app_id
    assert all(m["state"] != "started" for m in dev.group_machines("broken"))
    assert "refuse to boot" in "\n".join(dev.lines)


def test_hundred_concurrent_first_requests_make_one_function_machine(dev: Dev) -> None:
    assert dev.group_machines("burst") == []

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=dev.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(client.get(f"/burst/{i}/") for i in range(100)))

    mark = len(dev.lines)
    responses = asyncio.run(burst())
    failed = [ln for ln in dev.lines[mark:] if ln.startswith("GET /burst/") and " 200 " not in ln]
    assert [r.status_code for r in responses] == [200] * 100, "\n".join(failed)
    assert [r.json()["result"] for r in responses] == [i + 1 for i in range(100)]
    (fn,) = dev.group_machines("burst")
    assert {r.headers["x-flyfn-machine"] for r in responses} == {fn["id"]}
    assert {r.json()["group"] for r in responses} == {"burst"}


def test_fifty_megabytes_stream_through_the_proxy(dev: Dev) -> None:
    size = 50 * 1024 * 1024
    proxy = psutil.Process(dev.process.pid)
    # The proxy's resident size, sampled at every chunk the client gets: buffering the answer
    # would show as growth while it streams.
    before = peak = _rss_mb(proxy)
    received = 0
    with httpx.stream("GET", f"{dev.url}/big/?n={size}", timeout=60) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += len(chunk)
            peak = max(peak, _rss_mb(proxy))
    assert received == size
    grown_mb = max(peak, _rss_mb(proxy)) - before
    assert grown_mb < 25, f"the proxy's peak memory grew by {grown_mb:.0f} MB"


# -- shutdown --------------------------------------------------------------------------------------


def _assert_stops_cleanly(dev: Dev, sig: signal.Signals) -> None:
    machines = dev.descendants()
    assert len(machines) >= 2  # the app Machine and at least one function Machine
    # The Machines keep their own directories in one of the run's (under this session's
    # FLYFN_MACHINE_DIRS, as under /dev/shm by default), which goes as the stack stops.
    app_machine = dev.app_machine()["id"]
    base = Path(os.environ[MACHINE_DIRS_ENV])
    (run_dir,) = [d for d in base.glob("flyfn-dev-*") if (d / f"flyfn-{app_machine}").is_dir()]
    assert dev.stop(sig) == 0
    left = wait_for(
        lambda: not any(alive(proc) for proc in machines) or None, 60, "the Machines to exit"
    )
    assert left
    assert "flyfn dev: stopping" in "\n".join(dev.lines)
    assert not run_dir.exists(), sorted(p.name for p in run_dir.rglob("*"))


def test_sigterm_to_the_command_leaves_nothing_behind(dev: Dev) -> None:
    get(dev, "/square/9/")  # the function Machine is running too
    _assert_stops_cleanly(dev, signal.SIGTERM)


def test_sigint_to_the_command_leaves_nothing_behind() -> None:
    with running_stack(60) as stack:
        get(stack, "/square/10/")
        _assert_stops_cleanly(stack, signal.SIGINT)
