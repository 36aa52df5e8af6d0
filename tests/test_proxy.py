"""The local Fly Proxy: routing, fly-replay semantics, limits, autostart/autostop.

Most tests run the proxy in-process over a fake fleet: Machines live in a real `MachinesEmulator`
whose runtime is `FakeFleet`, which also answers the proxy's upstream requests (an httpx
transport) with per-Machine handlers. Streaming and concurrency run against real processes.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import httpx
import psutil
import pytest
import uvicorn

from flyfn.emulator.proxy import routing
from flyfn.emulator.proxy.app import FlyProxy
from flyfn.emulator.proxy.bodies import EDGE_BUFFER_LIMIT
from flyfn.emulator.proxy.edge import edge_protocol
from flyfn.emulator.proxy.errors import Full
from flyfn.emulator.proxy.routing import Destination
from flyfn.emulator.state import MachinesEmulator
from flyfn.emulator.supervisor import ProcessRuntime
from flyfn.machines.models import (
    CreateMachineRequest,
    Machine,
    MachineConfig,
    MachinePort,
    MachineRestart,
    MachineService,
)
from tests.support_proxy import (
    APP,
    Handler,
    Stack,
    echo,
    proxy_stack,
    replay_once,
    route,
)
from tests.support_wait import until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    """For the focused tests of replay semantics: a request first reaches an app Machine, as
    they script it, so ordinary traffic is kept off function Machines (the unit-test switch)."""
    async with proxy_stack(balance_function_machines=False) as running:
        yield running


@pytest.fixture
async def fly() -> AsyncIterator[Stack]:
    """Fly's balancing, function Machines included (what `flyfn dev` runs)."""
    async with proxy_stack() as running:
        yield running


# -- plain proxying --------------------------------------------------------------------------------


async def test_balances_over_every_started_machine_with_the_service_like_fly(
    fly: Stack,
) -> None:
    a = await fly.machine()
    fn = await fly.machine(group="default")  # a function Machine of the `instance` strategy
    old = await fly.machine(group="default", image="local/p:0")  # one of an older image
    await fly.machine(ports=(8443,))  # no service on port 80: never a candidate
    await fly.machine(group="default", started=False)  # stopped: none at the soft limit
    seen: list[str] = []
    for _ in range(60):
        response = await fly.client.get("/plain/")
        assert response.status_code == 200
        assert response.headers["x-flyfn-machine"] == response.json()["machine"]
        seen.append(response.json()["machine"])
    assert set(seen) == {a.id, fn.id, old.id}
    # The route log names the Machine that served each request.
    assert {log.machine_id for log in fly.logs} == set(seen)
    assert any(f"GET /plain/ fn:{fn.id[:4]}" in route(log) for log in fly.logs)
    assert fly.fleet.launches.count(fn.id) == 1


async def test_the_switch_keeps_ordinary_traffic_off_function_machines() -> None:
    async with proxy_stack(balance_function_machines=False) as stack:
        a = await stack.machine()
        b = await stack.machine()
        fn = await stack.machine(group="default")
        seen = set()
        for _ in range(30):
            seen.add((await stack.client.get("/plain/")).json()["machine"])
        assert seen == {a.id, b.id}
        assert fn.id not in seen
        # A forced instance still reaches it.
        forced = await stack.client.get("/", headers={"fly-force-instance-id": fn.id})
        assert forced.headers["x-flyfn-machine"] == fn.id


def _gate(stack: Stack, machine_id: str) -> asyncio.Event:
    """Hold the Machine's answers until the returned event is set."""
    release = asyncio.Event()

    async def held(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200, json={"machine": machine_id})

    stack.fleet.async_handlers[machine_id] = held
    return release


async def test_a_stopped_machine_is_autostarted_only_when_started_ones_are_at_the_soft_limit(
    fly: Stack,
) -> None:
    busy = await fly.machine(soft_limit=2)
    spare = await fly.machine(group="default", started=False)
    release = _gate(fly, busy.id)
    held = [asyncio.ensure_future(fly.client.get("/")) for _ in range(2)]
    await until(lambda: fly.proxy.load(busy.id) >= 2)
    assert fly.emulator.get(APP, spare.id).state == "created"  # not needed yet
    third = await fly.client.get("/")  # `busy` is at its soft limit: `spare` is started
    assert third.headers["x-flyfn-machine"] == spare.id
    assert fly.emulator.get(APP, spare.id).state == "started"
    release.set()
    assert all(r.status_code == 200 for r in await asyncio.gather(*held))


async def test_at_the_soft_limit_with_nothing_to_start_the_started_machine_still_serves(
    fly: Stack,
) -> None:
    busy = await fly.machine(soft_limit=1)
    await fly.machine(group="default", started=False, autostart=False)
    release = _gate(fly, busy.id)
    first = asyncio.ensure_future(fly.client.get("/"))
    second = asyncio.ensure_future(fly.client.get("/"))
    await until(lambda: fly.proxy.load(busy.id) >= 2)
    release.set()
    assert [r.headers["x-flyfn-machine"] for r in await asyncio.gather(first, second)] == [
        busy.id,
        busy.id,
    ]


class HardLimitChecks:
    """How often the proxy found every Machine a request may go to at its hard limit, per request
    (a waiting request checks again and again: each check is where it could go over the limit)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.refusals: Counter[int] = Counter()
        pick = routing.pick

        def counted(dest: Destination, *args: Any, **kwargs: Any) -> Machine:
            try:
                return pick(dest, *args, **kwargs)
            except Full:
                self.refusals[id(dest)] += 1  # one Destination per request, kept while it waits
                raise

        monkeypatch.setattr(routing, "pick", counted)

    def refused_again(self, requests: int) -> bool:
        """Whether `requests` requests were each refused twice or more (before and after a wait)."""
        return len(self.refusals) >= requests and min(self.refusals.values()) >= 2


@pytest.fixture
def hard_limit(monkeypatch: pytest.MonkeyPatch) -> HardLimitChecks:
    return HardLimitChecks(monkeypatch)


async def test_no_request_goes_over_the_hard_limit_it_waits_its_turn(
    fly: Stack, hard_limit: HardLimitChecks
) -> None:
    machine = await fly.machine(soft_limit=1, hard_limit=2)
    release = _gate(fly, machine.id)
    held = [asyncio.ensure_future(fly.client.get("/")) for _ in range(5)]
    await until(lambda: fly.proxy.load(machine.id) >= 2)
    # Each of the other three found the Machine full, waited, and found it full again.
    await until(lambda: hard_limit.refused_again(3))
    assert fly.proxy.load(machine.id) == 2
    assert fly.fleet.peak[machine.id] == 2
    release.set()
    answers = await asyncio.gather(*held)
    assert [r.status_code for r in answers] == [200] * 5
    assert fly.fleet.peak[machine.id] == 2


async def test_at_the_hard_limit_for_longer_than_the_timeout_is_a_503(fly: Stack) -> None:
    fly.proxy.replay_timeout = 0.3
    machine = await fly.machine(soft_limit=1, hard_limit=1)
    release = _gate(fly, machine.id)
    held = asyncio.ensure_future(fly.client.get("/"))
    await until(lambda: fly.proxy.load(machine.id) >= 1)
    response = await fly.client.get("/")
    assert response.status_code == 503
    assert response.headers["x-flyfn-proxy-error"] == "PR04"
    assert "hard_limit" in response.text
    release.set()
    assert (await held).status_code == 200


async def test_a_replay_to_an_instance_at_its_hard_limit_waits_its_turn(
    stack: Stack, hard_limit: HardLimitChecks
) -> None:
    main = await stack.machine()
    fn = await stack.machine(group="default", soft_limit=1, hard_limit=2)
    stack.fleet.handlers[main.id] = replay_once(f"instance={fn.id};timeout=30s")
    release = _gate(stack, fn.id)
    held = [asyncio.ensure_future(stack.client.get("/")) for _ in range(5)]
    await until(lambda: stack.proxy.load(fn.id) >= 2)
    # Each of the other three replays found it full, waited, and found it full again.
    await until(lambda: hard_limit.refused_again(3))
    assert stack.fleet.peak[fn.id] == 2
    release.set()
    answers = await asyncio.gather(*held)
    assert [r.json()["machine"] for r in answers] == [fn.id] * 5
    assert stack.fleet.peak[fn.id] == 2


async def test_a_replay_to_an_instance_full_beyond_its_timeout_falls_back(stack: Stack) -> None:
    main = await stack.machine()
    fn = await stack.machine(group="default", soft_limit=1, hard_limit=1)
    stack.fleet.handlers[main.id] = replay_once(
        f"instance={fn.id};timeout=300ms;fallback=force_self"
    )
    release = _gate(stack, fn.id)
    held = asyncio.ensure_future(stack.client.get("/"))
    await until(lambda: stack.proxy.load(fn.id) >= 1)
    response = await stack.client.get("/")
    assert response.headers["x-flyfn-machine"] == main.id
    failed = response.json()["headers"]["fly-replay-failed"]
    assert f"instance={fn.id}" in failed
    assert "reason=no_candidate" in failed
    release.set()
    assert (await held).json()["machine"] == fn.id


async def test_fly_headers_added_and_hop_by_hop_removed(stack: Stack) -> None:
    machine = await stack.machine()
    response = await stack.client.get(
        "/plain/?q=1",
        headers={
            "connection": "x-hop",
            "x-hop": "secret",
            "te": "trailers",
            "x-forwarded-for": "198.51.100.1",
            "fly-client-ip": "spoofed",
        },
    )
    sent = response.json()["headers"]
    assert sent["host"] == "myapp.local"
    assert sent["fly-region"] == "local"
    assert sent["fly-client-ip"] == "203.0.113.9"
    assert sent["x-forwarded-for"] == "198.51.100.1, 203.0.113.9"
    assert sent["x-forwarded-proto"] == "http"
    assert sent["via"] == "1.1 fly.io"
    assert sent["fly-request-id"] == response.headers["fly-request-id"]
    assert sent["fly-request-id"].endswith("-local")
    assert "x-hop" not in sent
    assert "te" not in sent
    # The Machine's hop-by-hop answer headers stay between proxy and Machine.
    assert "x-secret" not in response.headers
    assert "keep-alive" not in response.headers
    assert response.headers["x-flyfn-machine"] == machine.id
    assert stack.fleet.deliveries[-1].path == "/plain/?q=1"
    # The first request a Machine's process serves is its cold one.
    pattern = rf"GET /plain/\?q=1 main:{machine.id[:4]} \(cold 0\.5s\) 200 \d+ B \d+ms"
    assert re.fullmatch(pattern, str(stack.logs[-1]))


async def test_no_machine_is_a_short_error_page(stack: Stack) -> None:
    response = await stack.client.get("/")
    assert response.status_code == 503
    assert response.text.startswith("PR04: ")
    assert response.headers["x-flyfn-proxy-error"] == "PR04"
    assert "fly-request-id" in response.headers


async def test_stopped_app_machine_is_autostarted(stack: Stack) -> None:
    machine = await stack.machine(started=False)
    assert machine.state == "created"
    response = await stack.client.get("/")
    assert response.headers["x-flyfn-machine"] == machine.id
    assert stack.emulator.get(APP, machine.id).state == "started"
    assert "(cold" in str(stack.logs[-1])


class _BrokenBody(httpx.AsyncByteStream):
    """A body that breaks off after `sent` bytes, as a Machine killed mid-answer leaves it."""

    def __init__(self, sent: bytes) -> None:
        self.sent = sent

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.sent:
            yield self.sent
        raise httpx.ReadError("peer closed connection without sending complete message body")


def breaks_off_first(times: int) -> Handler:
    """Answer with a body that breaks off, `times` times, then echo."""
    calls: list[int] = []

    def handler(machine_id: str, request: httpx.Request, body: bytes) -> httpx.Response:
        calls.append(1)
        if len(calls) <= times:
            return httpx.Response(200, stream=_BrokenBody(b'{"partial'))
        return echo(machine_id, request, body)

    return handler


async def test_an_answer_broken_off_early_is_sent_again_for_a_safe_request(stack: Stack) -> None:
    machine = await stack.machine()
    stack.fleet.handlers[machine.id] = breaks_off_first(2)
    response = await stack.client.get("/")
    assert response.status_code == 200
    assert response.json()["machine"] == machine.id
    assert str(stack.logs[-1]).count("resent") == 2


async def test_an_answer_broken_off_early_is_a_clean_502_for_an_unsafe_request(
    stack: Stack,
) -> None:
    machine = await stack.machine()
    stack.fleet.handlers[machine.id] = breaks_off_first(1)
    response = await stack.client.post("/", content=b"x")
    assert response.status_code == 502
    assert "PU02" in response.text
    assert "partial" not in response.text


async def test_force_instance_header_reaches_that_machine(stack: Stack) -> None:
    await stack.machine()
    fn = await stack.machine(group="default")
    response = await stack.client.get("/", headers={"fly-force-instance-id": fn.id})
    assert response.headers["x-flyfn-machine"] == fn.id
    assert "fly-force-instance-id" not in response.json()["headers"]


# -- force_https -----------------------------------------------------------------------------------


def _https_services(force_https: bool) -> list[MachineService]:
    return [
        MachineService(
            protocol="tcp",
            internal_port=8000,
            autostart=True,
            autostop="off",
            ports=[
                MachinePort(port=80, handlers=["http"], force_https=force_https),
                MachinePort(port=443, handlers=["tls", "http"]),
            ],
        )
    ]


async def test_force_https_redirects_plain_http_on_port_80_like_fly(fly: Stack) -> None:
    machine = await fly.machine(started=False, services=_https_services(True))
    plain = {"fly-forwarded-port": "80"}
    response = await fly.client.get("/cart/?x=1", headers=plain)
    assert response.status_code == 301
    assert response.headers["location"] == "https://myapp.local/cart/?x=1"
    assert response.headers["fly-request-id"]
    # Fly's edge answers it: the Machine is neither reached nor started for it.
    assert fly.fleet.deliveries == []
    assert fly.emulator.get(APP, machine.id).state == "created"
    assert fly.logs[-1].status == 301
    # The local edge serves plain http only: an unmarked request is delivered.
    response = await fly.client.get("/cart/")
    assert response.status_code == 200
    assert response.headers["x-flyfn-machine"] == machine.id


async def test_force_https_off_delivers_plain_http(fly: Stack) -> None:
    machine = await fly.machine(services=_https_services(False))
    response = await fly.client.get("/", headers={"fly-forwarded-port": "80"})
    assert response.status_code == 200
    assert response.headers["x-flyfn-machine"] == machine.id


async def test_a_replay_to_a_force_https_machine_is_delivered(stack: Stack) -> None:
    main = await stack.machine()  # the dev app Machine: no force_https
    fn = await stack.machine(group="default", services=_https_services(True))
    stack.fleet.handlers[main.id] = replay_once(f"instance={fn.id}")
    response = await stack.client.get("/fn/", headers={"fly-forwarded-port": "80"})
    assert response.status_code == 200
    assert response.headers["x-flyfn-machine"] == fn.id


# -- fly-replay ------------------------------------------------------------------------------------


async def test_instance_replay_carries_replay_src(stack: Stack) -> None:
    main = await stack.machine()
    fn = await stack.machine(group="default")
    stack.fleet.handlers[main.id] = lambda m, r, b: httpx.Response(
        200, headers={"fly-replay": f"instance={fn.id};state=s1gned;timeout=5s"}
    )
    # A client's own fly-replay-src never reaches a replay target next to the proxy's.
    spoof = {"fly-replay-src": "instance=evil;state=forged"}
    response = await stack.client.post("/fn/", content=b"payload", headers=spoof)
    assert response.status_code == 200
    assert response.headers["x-flyfn-machine"] == fn.id
    data = response.json()
    assert data["body_len"] == len(b"payload")
    src = dict(part.split("=", 1) for part in data["headers"]["fly-replay-src"].split(";"))
    assert src["instance"] == main.id
    assert src["region"] == "local"
    assert src["state"] == "s1gned"
    assert int(src["t"]) > 1_600_000_000_000_000  # microseconds
    assert [d.machine_id for d in stack.fleet.deliveries] == [main.id, fn.id]
    assert len(stack.fleet.deliveries[-1].headers.get_list("fly-replay-src")) == 1
    assert f"main:{main.id[:4]} → replay → fn:{fn.id[:4]}" in route(stack.logs[-1])


async def test_json_replay_with_transform(stack: Stack) -> None:
    main = await stack.machine()
    fn = await stack.machine(group="default")

    def handler(machine_id: str, request: httpx.Request, body: bytes) -> httpx.Response:
        return httpx.Response(
            200,
            headers={"content-type": "application/vnd.fly.replay+json"},
            content=json.dumps(
                {
                    "instance": fn.id,
                    "state": "j",
                    "transform": {
                        "path": "/rewritten",
                        "set_headers": [{"name": "x-added", "value": "yes"}],
                        "delete_headers": [{"name": "x-drop"}],
                    },
                }
            ),
        )

    stack.fleet.handlers[main.id] = handler
    response = await stack.client.get("/orig", headers={"x-drop": "1"})
    assert response.headers["x-flyfn-machine"] == fn.id
    last = stack.fleet.deliveries[-1]
    assert last.path == "/rewritten"
    assert last.headers["x-added"] == "yes"
    assert "x-drop" not in last.headers
    assert "state=j" in last.headers["fly-replay-src"]


async def test_elsewhere_bounces_to_another_app_machine(stack: Stack) -> None:
    main = await stack.machine()
    fn = await stack.machine(group="default")
    stack.fleet.handlers[fn.id] = replay_once("elsewhere=true")
    response = await stack.client.get("/plain/", headers={"fly-force-instance-id": fn.id})
    assert response.headers["x-flyfn-machine"] == main.id
    assert f"fn:{fn.id[:4]} → elsewhere → main:{main.id[:4]}" in route(stack.logs[-1])


async def test_elsewhere_with_nowhere_else_is_an_error(stack: Stack) -> None:
    main = await stack.machine()
    stack.fleet.handlers[main.id] = replay_once("elsewhere=true")
    response = await stack.client.get("/")
    assert response.status_code == 503
    assert response.headers["x-flyfn-proxy-error"] == "PR04"


async def test_app_replay_balances_over_the_other_app(stack: Stack) -> None:
    main = await stack.machine()
    f1 = await stack.machine(group="pdf", app="fnapp")
    stack.fleet.handlers[main.id] = replay_once("app=fnapp")
    response = await stack.client.get("/")
    assert response.headers["x-flyfn-machine"] == f1.id
    stack.fleet.handlers[main.id] = replay_once("app=nosuchapp")
    response = await stack.client.get("/")
    assert response.status_code == 502
    assert response.headers["x-flyfn-proxy-error"] == "PA04"


async def test_prefer_instance_falls_back_to_another_machine(stack: Stack) -> None:
    main = await stack.machine()
    good = await stack.machine(group="g", app="fnapp")
    bad = await stack.machine(group="g", app="fnapp", started=False)
    stack.fleet.fail_launch.add(bad.id)
    stack.fleet.handlers[main.id] = replay_once(f"app=fnapp;prefer_instance={bad.id}")
    response = await stack.client.get("/")
    assert response.headers["x-flyfn-machine"] == good.id
    assert response.json()["headers"]["fly-preferred-instance-unavailable"] == bad.id
    # And when the preferred one is fine, it is the one used.
    stack.fleet.handlers[main.id] = replay_once(f"app=fnapp;prefer_instance={good.id}")
    response = await stack.client.get("/")
    assert response.headers["x-flyfn-machine"] == good.id
    assert "fly-preferred-instance-unavailable" not in response.json()["headers"]


async def test_region_filter(stack: Stack) -> None:
    main = await stack.machine()
    fn = await stack.machine(group="g", app="fnapp")
    stack.fleet.handlers[main.id] = replay_once('app=fnapp;region="iad,local"')
    assert (await stack.client.get("/")).headers["x-flyfn-machine"] == fn.id
    stack.fleet.handlers[main.id] = replay_once("app=fnapp;region=iad;fallback=force_self")
    response = await stack.client.get("/")
    assert response.headers["x-flyfn-machine"] == main.id
    failed = response.json()["headers"]["fly-replay-failed"]
    assert "reason=no_candidate" in failed


async def test_stopped_target_is_autostarted_cold(stack: Stack) -> None:
    _, fn = await stack.replay_pair(started=False)
    response = await stack.client.get("/")
    assert response.headers["x-flyfn-machine"] == fn.id
    assert stack.emulator.get(APP, fn.id).state == "started"
    assert f"fn:{fn.id[:4]} (cold" in str(stack.logs[-1])
    # The next one is warm.
    await stack.client.get("/")
    assert "cold" not in str(stack.logs[-1])


async def test_target_that_cannot_start_falls_back_to_the_issuer(stack: Stack) -> None:
    main, fn = await stack.replay_pair(
        "instance={fn};timeout=5s;fallback=force_self", started=False, launch_fails=True
    )
    response = await stack.client.get("/pdf/")
    assert response.status_code == 200
    assert response.headers["x-flyfn-machine"] == main.id
    failed = dict(
        part.split("=", 1) for part in response.json()["headers"]["fly-replay-failed"].split(";")
    )
    assert failed["instance"] == fn.id
    assert failed["app"] == APP
    assert failed["replay_source"] == main.id
    assert failed["reason"] == "retries_exhausted"
    assert int(failed["elapsed_ms"]) >= 0
    assert "fly-replay-src" not in response.json()["headers"]
    assert "fallback" in str(stack.logs[-1])


async def test_target_that_cannot_start_without_fallback_is_an_error(stack: Stack) -> None:
    await stack.replay_pair(started=False, launch_fails=True)
    response = await stack.client.get("/")
    assert response.status_code == 502
    assert response.text.startswith("PC01: ")


async def test_replay_timeout_triggers_fallback(stack: Stack) -> None:
    main, fn = await stack.replay_pair(
        "instance={fn};timeout=100ms;fallback=force_self", started=False
    )
    stack.fleet.launch_delay[fn.id] = 30  # far beyond the replay's timeout
    response = await stack.client.get("/")
    assert response.headers["x-flyfn-machine"] == main.id
    assert "reason=timeout" in response.json()["headers"]["fly-replay-failed"]


async def test_prefer_self_fallback_may_use_another_app_machine(stack: Stack) -> None:
    main, _ = await stack.replay_pair(
        "instance={fn};fallback=prefer_self", started=False, launch_fails=True
    )
    response = await stack.client.get("/")
    assert response.headers["x-flyfn-machine"] == main.id
    assert "fly-replay-failed" in response.json()["headers"]


async def test_fallback_request_cannot_replay_again(stack: Stack) -> None:
    main = await stack.machine()
    fn = await stack.machine(group="default", started=False)
    stack.fleet.fail_launch.add(fn.id)
    stack.fleet.handlers[main.id] = lambda m, r, b: httpx.Response(
        200, headers={"fly-replay": f"instance={fn.id};fallback=force_self"}
    )
    response = await stack.client.get("/")
    assert response.status_code == 502
    assert response.headers["x-flyfn-proxy-error"] == "PA03"


async def test_more_than_ten_replays_fail_with_pa02(stack: Stack) -> None:
    a = await stack.machine()
    b = await stack.machine()
    for machine in (a, b):
        stack.fleet.handlers[machine.id] = lambda m, r, body: httpx.Response(
            200, headers={"fly-replay": "elsewhere=true"}
        )
    response = await stack.client.get("/loop")
    assert response.status_code == 502
    assert response.text.startswith("PA02: ")
    assert len(stack.fleet.deliveries) == 11  # the request, then ten replays


async def test_ten_replays_are_allowed(stack: Stack) -> None:
    a = await stack.machine()
    b = await stack.machine()

    def bounce(machine_id: str, request: httpx.Request, body: bytes) -> httpx.Response:
        if len(stack.fleet.deliveries) <= 10:
            return httpx.Response(200, headers={"fly-replay": "elsewhere=true"})
        return echo(machine_id, request, body)

    stack.fleet.handlers[a.id] = stack.fleet.handlers[b.id] = bounce
    response = await stack.client.get("/")
    assert response.status_code == 200
    assert len(stack.fleet.deliveries) == 11


async def test_invalid_replay_is_pa03(stack: Stack) -> None:
    main = await stack.machine()
    stack.fleet.handlers[main.id] = replay_once("instance=x;timeout=soon")
    response = await stack.client.get("/")
    assert response.status_code == 502
    assert response.headers["x-flyfn-proxy-error"] == "PA03"
    assert response.headers["x-flyfn-machine"] == main.id


async def test_body_up_to_the_limit_is_replayed_whole(stack: Stack) -> None:
    _, fn = await stack.replay_pair()
    body = b"a" * 1_000_000
    response = await stack.client.post("/upload", content=body)
    assert response.headers["x-flyfn-machine"] == fn.id
    assert stack.fleet.deliveries[-1].body == body


async def test_body_over_the_limit_is_not_replayed(stack: Stack) -> None:
    main, _ = await stack.replay_pair()
    response = await stack.client.post("/upload", content=b"a" * 1_000_001)
    assert response.status_code == 502
    assert response.headers["x-flyfn-proxy-error"] == "PA03"
    assert "cannot be replayed" in response.text
    assert [d.machine_id for d in stack.fleet.deliveries] == [main.id]


async def test_a_body_over_the_edge_buffer_that_needs_a_replay_is_pa01(stack: Stack) -> None:
    main, _ = await stack.replay_pair()
    response = await stack.client.post("/upload", content=b"a" * (EDGE_BUFFER_LIMIT + 1))
    assert response.status_code == 502
    assert response.headers["x-flyfn-proxy-error"] == "PA01"
    assert "cannot be replayed" in response.text
    assert [d.machine_id for d in stack.fleet.deliveries] == [main.id]


async def test_a_body_within_the_edge_buffer_is_retried_after_a_refused_connection(
    stack: Stack,
) -> None:
    machine = await stack.machine(restart=MachineRestart(policy="no"))
    stack.fleet.silently_dead.add(machine.id)
    body = b"p" * 5_000_000  # over the replay limit, within the edge's buffer
    response = await stack.client.post("/upload", content=body)
    assert response.status_code == 200
    assert response.json()["body_len"] == len(body)
    assert stack.fleet.launches.count(machine.id) == 2


async def test_a_body_over_the_edge_buffer_that_needs_a_retry_is_pa01(stack: Stack) -> None:
    machine = await stack.machine(restart=MachineRestart(policy="no"))
    stack.fleet.silently_dead.add(machine.id)
    response = await stack.client.post("/upload", content=b"p" * (EDGE_BUFFER_LIMIT + 1))
    assert response.status_code == 502
    assert response.headers["x-flyfn-proxy-error"] == "PA01"
    assert "cannot be retried" in response.text


async def test_large_streamed_upload_without_replay_arrives_whole(stack: Stack) -> None:
    await stack.machine()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(200):
            yield b"b" * 65536

    response = await stack.client.post("/upload", content=chunks())  # over 10 MB, streamed
    assert response.status_code == 200
    assert response.json()["body_len"] == 200 * 65536


async def test_silently_dead_machine_is_noticed_and_restarted(stack: Stack) -> None:
    machine = await stack.machine(restart=MachineRestart(policy="no"))
    stack.fleet.silently_dead.add(machine.id)
    response = await stack.client.get("/")
    assert response.status_code == 200
    assert response.headers["x-flyfn-machine"] == machine.id
    assert stack.fleet.launches.count(machine.id) == 2


# -- autostop --------------------------------------------------------------------------------------


async def test_autostop_stops_and_suspends_idle_machines(stack: Stack) -> None:
    main = await stack.machine()  # autostop off
    stopper = await stack.machine(group="a", autostop="stop")
    suspender = await stack.machine(group="b", autostop="suspend")
    kept = await stack.machine(group="c", autostop="stop", min_running=1)
    # Machines started since the previous pass get one pass of grace, as if they had served.
    assert await stack.proxy.autostop.once(now=999.0) == []
    acted = await stack.proxy.autostop.once(now=1000.0)
    assert sorted(acted) == sorted([stopper.id, suspender.id])
    await stack.emulator.settle()
    assert stack.emulator.get(APP, stopper.id).state == "stopped"
    assert stack.emulator.get(APP, suspender.id).state == "suspended"
    assert stack.emulator.get(APP, kept.id).state == "started"
    assert stack.emulator.get(APP, main.id).state == "started"
    assert f"autostop: fn:{stopper.id[:4]} stopped after 0s idle (pass 2)" in stack.events


async def test_a_machine_that_served_since_the_last_pass_is_not_stopped_alone(
    stack: Stack,
) -> None:
    fn = await stack.machine(group="a", autostop="stop")
    stack.proxy.autostop.load.begin(fn.id)  # a request is being served
    assert await stack.proxy.autostop.once() == []
    stack.proxy.autostop.load.end(fn.id)
    assert await stack.proxy.autostop.once() == []  # it served since the previous pass
    assert await stack.proxy.autostop.once() == [fn.id]  # nothing since: idle


async def test_a_request_through_the_proxy_is_load_for_the_next_pass(stack: Stack) -> None:
    fn = await stack.machine(group="a", autostop="stop")
    response = await stack.client.get("/", headers={"fly-force-instance-id": fn.id})
    assert response.headers["x-flyfn-machine"] == fn.id
    assert await stack.proxy.autostop.once() == []
    assert await stack.proxy.autostop.once() == [fn.id]


# -- real processes: streaming and concurrency -----------------------------------------------------


async def asgi_get(proxy: FlyProxy, path: str, query: str = "") -> tuple[int, bytes]:
    """GET `path` straight through the proxy's ASGI interface: (status, body)."""
    status: list[int] = []
    body = bytearray()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        else:
            body.extend(message.get("body", b""))

    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": [(b"host", b"x")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8080),
        "scheme": "http",
    }
    await proxy(scope, receive, send)
    return status[0], bytes(body)


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def real() -> AsyncIterator[tuple[FlyProxy, ProcessRuntime, Machine]]:
    runtime = ProcessRuntime(
        "tests.e2e.echo_app:app", cwd=ROOT, output=io.StringIO(), boot_timeout=20
    )
    emulator = MachinesEmulator(runtime=runtime, default_app=APP)
    runtime.attach(emulator)
    proxy = FlyProxy(emulator, runtime, app_name=APP, autostop_interval=0)
    try:
        service = MachineService(
            protocol="tcp", internal_port=8000, ports=[MachinePort(port=80, handlers=["http"])]
        )
        machine = await emulator.create(
            APP,
            CreateMachineRequest(config=MachineConfig(image="local/p:1", services=[service])),
        )
        machine = await emulator.wait_for_state(APP, machine.id, "started", timeout=20)
        yield proxy, runtime, machine
    finally:
        await proxy.aclose()
        await emulator.aclose()
        await runtime.aclose(grace=1.0)


@pytest.mark.e2e
async def test_fifty_megabytes_stream_through_without_buffering(
    real: tuple[FlyProxy, ProcessRuntime, Machine],
) -> None:
    proxy, _, _machine = real
    size = 50 * 1024 * 1024
    received = 0
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        nonlocal received
        if message["type"] == "http.response.start":
            status.append(message["status"])
        else:
            received += len(message.get("body", b""))

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/big",
        "raw_path": b"/big",
        "query_string": f"n={size}".encode(),
        "headers": [(b"host", b"x")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8080),
        "scheme": "http",
    }
    tracemalloc.start()
    try:
        await proxy(scope, receive, send)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == [200]
    assert received == size
    assert peak < 10 * 1024 * 1024, f"proxy held {peak} bytes at once"


def closed_connections_to(port: int) -> int:
    """Loopback TCP connections to `port` this side closed first (TIME_WAIT)."""
    return sum(
        1
        for conn in psutil.net_connections(kind="tcp4")
        if conn.status == psutil.CONN_TIME_WAIT and conn.raddr and conn.raddr.port == port
    )


@pytest.mark.e2e
async def test_replay_responses_leave_their_connection_open(
    real: tuple[FlyProxy, ProcessRuntime, Machine],
) -> None:
    """The proxy reads a replay response's empty body, so the Machine's keep-alive connection is
    used again rather than closed and opened once per replay."""
    proxy, runtime, machine = real
    address = runtime.address(machine.id)
    assert address is not None
    before = closed_connections_to(address[1])
    for _ in range(20):
        status, body = await asgi_get(proxy, "/replay-self")
        assert status == 200
    answer = json.loads(body)
    assert answer["machine"] == machine.id
    assert "fly-replay-src" in answer["headers"]
    assert closed_connections_to(address[1]) - before <= 1


@pytest.mark.e2e
async def test_holds_two_hundred_concurrent_connections(
    real: tuple[FlyProxy, ProcessRuntime, Machine],
) -> None:
    proxy, _, machine = real
    config = uvicorn.Config(proxy, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    try:
        await until(lambda: server.started)
        port = server.servers[0].sockets[0].getsockname()[1]
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:

            async def one() -> dict[str, Any]:
                response = await client.get(f"http://127.0.0.1:{port}/slow?s=1.5")
                assert response.status_code == 200
                data: dict[str, Any] = response.json()
                return data

            results = await asyncio.gather(*(one() for _ in range(200)))
        assert all(r["machine"] == machine.id for r in results)
        # The Machine held all 200 at once: the proxy queued none of them.
        assert max(r["peak"] for r in results) >= 200
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


# -- the edge: hostile requests and Fly-like connection timeouts (a real server, real sockets) -----


@asynccontextmanager
async def served(
    proxy: FlyProxy, *, idle_timeout: float = 60.0, header_timeout: float = 60.0
) -> AsyncIterator[int]:
    """The proxy on a loopback port with `flyfn dev`'s edge protocol; the port."""
    config = uvicorn.Config(
        proxy,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="off",
        http=edge_protocol(idle_timeout, header_timeout),
        timeout_keep_alive=idle_timeout,  # type: ignore[arg-type]
    )
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    try:
        await until(lambda: server.started)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


async def exchange(port: int, raw: bytes) -> bytes:
    """Send `raw` on a new connection; everything the proxy answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 60)  # a safety bound only
    finally:
        writer.close()


@pytest.mark.e2e
async def test_non_ascii_header_values_are_forwarded(
    real: tuple[FlyProxy, ProcessRuntime, Machine],
) -> None:
    proxy, _, machine = real
    async with served(proxy) as port, httpx.AsyncClient() as client:
        response = await client.get(
            f"http://127.0.0.1:{port}/echo", headers={b"x-name": "café".encode()}
        )
    assert response.status_code == 200
    data = response.json()
    assert data["machine"] == machine.id
    assert data["headers"]["x-name"].encode("latin-1") == "café".encode()


@pytest.mark.e2e
@pytest.mark.parametrize("target", [b"http://evil.example/x", b"*", b"/a#frag", b"#"])
async def test_absolute_asterisk_and_fragment_targets_get_a_clean_400(
    real: tuple[FlyProxy, ProcessRuntime, Machine], target: bytes
) -> None:
    proxy, _, _ = real
    async with served(proxy) as port:
        raw = b"OPTIONS " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answer = await exchange(port, raw)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"Traceback" not in answer
    assert b"PU04: invalid request target" in answer


@pytest.mark.e2e
async def test_idle_and_slow_header_connections_are_closed(
    real: tuple[FlyProxy, ProcessRuntime, Machine],
) -> None:
    proxy, _, _ = real
    async with served(proxy, idle_timeout=0.5, header_timeout=1.0) as port:
        loop = asyncio.get_running_loop()
        # Opened and never used: closed once idle for the idle timeout.
        begun = loop.time()
        assert await exchange(port, b"") == b""
        assert loop.time() - begun >= 0.5
        # Headers trickled in, never idle for long, never finished: closed at the header timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        begun = loop.time()
        closed = asyncio.ensure_future(reader.read())
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            if closed.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(closed, 60) == b""
        assert loop.time() - begun >= 1.0
        writer.close()
        # A connection in use is not idle: keep-alive requests go on while they keep coming.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = h11.Connection(h11.CLIENT)
        for _ in range(4):
            request = h11.Request(method="GET", target="/echo", headers=[("host", "x")])
            writer.write(client.send(request) + client.send(h11.EndOfMessage()))
            statuses = []
            while (event := client.next_event()) is not h11.PAUSED and not isinstance(
                event, h11.EndOfMessage
            ):
                if event is h11.NEED_DATA:
                    client.receive_data(await asyncio.wait_for(reader.read(65536), 60))
                elif isinstance(event, h11.Response):
                    statuses.append(event.status_code)
            assert statuses == [200]
            client.start_next_cycle()
            await asyncio.sleep(0.3)
        writer.close()
