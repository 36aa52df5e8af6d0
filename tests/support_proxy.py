"""The local Fly Proxy over a fake fleet, for the proxy's tests: `proxy_stack` runs `FlyProxy` in
process, its Machines in a real `MachinesEmulator` whose runtime is `FakeFleet`, which also answers
the proxy's upstream requests (an httpx transport) with per-Machine handlers."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from flyfn.emulator.logline import RequestLog
from flyfn.emulator.proxy.app import FlyProxy
from flyfn.emulator.state import MachinesEmulator
from flyfn.machines.models import (
    CreateMachineRequest,
    Machine,
    MachineConfig,
    MachinePort,
    MachineService,
    MachineServiceConcurrency,
)

APP = "web"

Handler = Callable[[str, httpx.Request, bytes], httpx.Response]


def echo(machine_id: str, request: httpx.Request, body: bytes) -> httpx.Response:
    return httpx.Response(
        200,
        json={"machine": machine_id, "headers": dict(request.headers), "body_len": len(body)},
        headers={"connection": "x-secret", "x-secret": "1", "keep-alive": "timeout=5"},
    )


def replay_once(value: str) -> Handler:
    """Answer `fly-replay: value` unless the request is itself a replay or a fallback."""

    def handler(machine_id: str, request: httpx.Request, body: bytes) -> httpx.Response:
        if "fly-replay-src" in request.headers or "fly-replay-failed" in request.headers:
            return echo(machine_id, request, body)
        return httpx.Response(200, headers={"fly-replay": value})

    return handler


def route(log: RequestLog) -> str:
    """The log line without its cold-start notes."""
    return re.sub(r" \(cold [^)]*\)", "", str(log))


@dataclass
class Delivery:
    machine_id: str
    headers: httpx.Headers
    body: bytes
    path: str


@dataclass
class FakeFleet(httpx.AsyncBaseTransport):
    """MachineRuntime + MachineAddresses + upstream transport for emulated Machines."""

    emulator: MachinesEmulator | None = None
    running: dict[str, int] = field(default_factory=dict)  # machine id -> pid
    handlers: dict[str, Handler] = field(default_factory=dict)
    fail_launch: set[str] = field(default_factory=set)
    launch_delay: dict[str, float] = field(default_factory=dict)
    silently_dead: set[str] = field(default_factory=set)
    async_handlers: dict[str, Callable[[httpx.Request], Awaitable[httpx.Response]]] = field(
        default_factory=dict
    )
    deliveries: list[Delivery] = field(default_factory=list)
    launches: list[str] = field(default_factory=list)
    active: Counter[str] = field(default_factory=Counter)  # requests inside each Machine now
    peak: Counter[str] = field(default_factory=Counter)
    _ports: dict[str, int] = field(default_factory=dict)
    _pids: int = 1000

    # MachineRuntime
    async def launch(self, app: str, machine: Machine) -> None:
        self.launches.append(machine.id)
        await asyncio.sleep(self.launch_delay.get(machine.id, 0))
        if machine.id in self.fail_launch:
            raise RuntimeError("the command failed")
        self._pids += 1
        self.running[machine.id] = self._pids

    async def stop(self, app: str, machine: Machine, signal: str, timeout: float) -> None:
        self.running.pop(machine.id, None)

    async def suspend(self, app: str, machine: Machine) -> None:
        self.running.pop(machine.id, None)

    async def resume(self, app: str, machine: Machine) -> None:
        await self.launch(app, machine)

    async def destroy(self, app: str, machine: Machine) -> None:
        self.running.pop(machine.id, None)

    # MachineAddresses
    def address(self, machine_id: str) -> tuple[str, int] | None:
        if machine_id not in self.running:
            return None
        port = self._ports.setdefault(machine_id, 20000 + len(self._ports))
        return ("127.0.0.1", port)

    def pid(self, machine_id: str) -> int | None:
        return self.running.get(machine_id)

    def boot_seconds(self, machine_id: str) -> float | None:
        return 0.5 if machine_id in self.running else None

    async def reap(self, machine_id: str) -> bool:
        if machine_id not in self.silently_dead:
            return machine_id not in self.running
        self.silently_dead.discard(machine_id)
        self.running.pop(machine_id, None)
        assert self.emulator is not None
        for app in (APP, "fnapp"):
            await self.emulator.machine_exited(app, machine_id, exit_code=137)
        return True

    # upstream transport
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        machine_id = next(m for m, p in self._ports.items() if p == request.url.port)
        if machine_id not in self.running or machine_id in self.silently_dead:
            raise httpx.ConnectError("connection refused", request=request)
        body = await request.aread()
        self.deliveries.append(
            Delivery(machine_id, request.headers, body, request.url.raw_path.decode())
        )
        held = self.async_handlers.get(machine_id)
        if held is not None:
            self.active[machine_id] += 1
            self.peak[machine_id] = max(self.peak[machine_id], self.active[machine_id])
            try:
                answer = await held(request)
            finally:
                self.active[machine_id] -= 1
        else:
            answer = self.handlers.get(machine_id, echo)(machine_id, request, body)
        # Like a real transport: a body still to be streamed, not one already read (a handler's
        # own stream, e.g. one that breaks off, is passed on as it is).
        try:
            stream: httpx.AsyncByteStream = httpx.ByteStream(answer.content)
        except httpx.ResponseNotRead:
            stream = answer.stream  # type: ignore[assignment]
        return httpx.Response(answer.status_code, headers=answer.headers, stream=stream)


@dataclass
class Stack:
    emulator: MachinesEmulator
    fleet: FakeFleet
    proxy: FlyProxy
    client: httpx.AsyncClient
    logs: list[RequestLog]
    events: list[str]

    async def machine(
        self,
        *,
        group: str | None = None,
        app: str = APP,
        autostop: str | None = None,
        min_running: int | None = None,
        started: bool = True,
        autostart: bool = True,
        soft_limit: int | None = None,
        hard_limit: int | None = None,
        ports: tuple[int, ...] = (80, 443),
        region: str | None = None,
        **config: Any,
    ) -> Machine:
        concurrency = None
        if soft_limit is not None or hard_limit is not None:
            concurrency = MachineServiceConcurrency(
                type="requests", soft_limit=soft_limit, hard_limit=hard_limit
            )
        services = [
            MachineService(
                protocol="tcp",
                internal_port=8000,
                autostart=autostart,
                autostop=autostop or "off",
                min_machines_running=min_running,
                ports=[MachinePort(port=port, handlers=["http"]) for port in ports],
                concurrency=concurrency,
            )
        ]
        env = {"FLYFN_GROUP": group} if group else None
        request = CreateMachineRequest(
            config=MachineConfig(
                **{"image": "local/p:1", "env": env, "services": services, **config}
            ),
            skip_launch=not started,
            region=region,
        )
        machine = await self.emulator.create(app, request)
        await self.emulator.settle()
        return self.emulator.get(app, machine.id)

    async def replay_pair(
        self, replay: str = "instance={fn}", *, started: bool = True, launch_fails: bool = False
    ) -> tuple[Machine, Machine]:
        """An app Machine whose answer is `fly-replay: <replay>` (`{fn}`: the other's id) unless
        the request is a replay or fallback, and a `default` function Machine (maybe stopped)."""
        main = await self.machine()
        fn = await self.machine(group="default", started=started)
        if launch_fails:
            self.fleet.fail_launch.add(fn.id)
        self.fleet.handlers[main.id] = replay_once(replay.format(fn=fn.id))
        return main, fn


@asynccontextmanager
async def proxy_stack(
    *, balance_function_machines: bool = True, regions: tuple[str, ...] = ()
) -> AsyncIterator[Stack]:
    """The proxy in process over a fake fleet, with a client that reaches it through ASGI;
    `regions`: the stack's regions (the first the primary), hops between them not delayed."""
    fleet = FakeFleet()
    primary = regions[0] if regions else "local"
    emulator = MachinesEmulator(runtime=fleet, region=primary, default_app=APP)
    fleet.emulator = emulator
    logs: list[RequestLog] = []
    events: list[str] = []
    proxy = FlyProxy(
        emulator,
        fleet,
        app_name=APP,
        autostop_interval=0,
        on_log=logs.append,
        on_event=events.append,
        transport=fleet,
        balance_function_machines=balance_function_machines,
        region=primary,
        regions=regions,
        emulate_latency=False,
    )
    transport = httpx.ASGITransport(app=proxy, client=("203.0.113.9", 40000))
    client = httpx.AsyncClient(transport=transport, base_url="http://myapp.local")
    try:
        yield Stack(emulator, fleet, proxy, client, logs, events)
    finally:
        await client.aclose()
        await proxy.aclose()
        await emulator.aclose()
