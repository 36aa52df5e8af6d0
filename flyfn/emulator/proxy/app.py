"""`FlyProxy`, the ASGI app of the local Fly Proxy: one request's journey through deliveries,
replays, resends and fallbacks, and the Machines it starts on the way.

The decisions it acts on are pure and live in `routing` (and `balancer`); the HTTP
in `forwarding` and `bodies`; when to send again in `resend`; Fly's periodic autostop pass in
`autostop`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import httpx

from flyfn.emulator.asgi import Receive, Scope, Send
from flyfn.emulator.logline import RequestLog, cold_note, machine_label
from flyfn.emulator.proxy import forwarding, resend, routing
from flyfn.emulator.proxy.autostop import DEFAULT_AUTOSTOP_INTERVAL, Autostop
from flyfn.emulator.proxy.bodies import EDGE_BUFFER_LIMIT, ReadAhead, RequestBody
from flyfn.emulator.proxy.errors import (
    ClientGone,
    Full,
    HttpsRedirect,
    ProxyError,
    Unreachable,
    unbuffered,
)
from flyfn.emulator.proxy.load import Load
from flyfn.emulator.proxy.regions import FROM_REGION_HEADER, EdgeRegions
from flyfn.emulator.proxy.routing import Delivery, Destination
from flyfn.emulator.state import EmulatorError, MachinesEmulator, new_ulid
from flyfn.fly.headers import FLY_FORCE_INSTANCE_ID, FLY_FORWARDED_PORT
from flyfn.machines.models import Machine

__all__ = ["FlyProxy", "MachineAddresses"]

# While every Machine is at its hard limit a request waits, looking again this often (seconds).
_FULL_RETRY_SECONDS = 0.02
# While a Machine settles (starting, stopping, or its process not seen yet), this often.
_SETTLE_SECONDS = 0.05


class MachineAddresses(Protocol):
    """Where Machines listen (implemented by `ProcessRuntime`)."""

    def address(self, machine_id: str) -> tuple[str, int] | None: ...

    def pid(self, machine_id: str) -> int | None: ...

    def boot_seconds(self, machine_id: str) -> float | None: ...

    async def reap(self, machine_id: str) -> bool: ...


class FlyProxy:
    """The ASGI app of the local Fly Proxy."""

    def __init__(
        self,
        machines: MachinesEmulator,
        addresses: MachineAddresses,
        *,
        app_name: str,
        region: str = "local",
        primary_region: str | None = None,
        autostop_interval: float = DEFAULT_AUTOSTOP_INTERVAL,
        replay_timeout: float = routing.DEFAULT_REPLAY_TIMEOUT,
        replay_body_limit: int = routing.REPLAY_BODY_LIMIT,
        edge_buffer_limit: int = EDGE_BUFFER_LIMIT,
        on_log: Callable[[RequestLog], None] | None = None,
        on_event: Callable[[str], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        read_timeout: float = 300.0,
        balance_function_machines: bool = True,
        regions: tuple[str, ...] = (),
        emulate_latency: bool = True,
    ) -> None:
        self.machines = machines
        self.addresses = addresses
        self.app_name = app_name
        self.region = region
        self.primary_region = primary_region or region
        # Where requests may enter (`region` first); a hop between regions takes their latency.
        self.edge_regions = EdgeRegions(
            (region, *(r for r in regions if r != region)), emulate_latency
        )
        self.replay_timeout = replay_timeout
        self.replay_body_limit = replay_body_limit
        self.edge_buffer_limit = edge_buffer_limit
        self.on_log = on_log
        self.balance_function_machines = balance_function_machines
        self._transport = transport
        self._read_timeout = read_timeout
        self._client: httpx.AsyncClient | None = None
        self._load = Load()
        self._seen_pid: dict[str, int] = {}
        self._starting: dict[str, asyncio.Task[Machine]] = {}
        self.autostop = Autostop(
            machines,
            self._load,
            apps={app_name},
            interval=autostop_interval,
            region=region,
            primary_region=self.primary_region,
            on_event=on_event,
        )

    def load(self, machine_id: str) -> int:
        """Requests the proxy is delivering to the Machine or waiting for it to start."""
        return self._load.of(machine_id)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the upstream connection pool and start the autostop loop."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=httpx.Timeout(connect=2.0, read=self._read_timeout, write=60.0, pool=None),
                limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
                follow_redirects=False,
                trust_env=False,
            )
        self.autostop.start()

    async def aclose(self) -> None:
        await self.autostop.aclose()
        for task in list(self._starting.values()):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1011})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- one request ---------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._client is None:
            await self.start()
        started = time.monotonic()
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        path = raw_path + (b"?" + query if query else b"")
        shown = scope["path"] + ("?" + query.decode("latin-1") if query else "")
        log = RequestLog(scope["method"], shown)
        request_id = f"{new_ulid()}-{self.region}"
        try:
            edge = self.edge_regions.edge_of(forwarding.header(scope, FROM_REGION_HEADER))
            request_id = f"{new_ulid()}-{edge}"
            if len(self.edge_regions.regions) > 1:
                log.region = edge
            routing.check_target(raw_path)
            body = await RequestBody.read(receive, self.edge_buffer_limit)
            await self._route(scope, body, path, request_id, log, send, edge)
        except ClientGone:
            log.client_gone()
        except HttpsRedirect as redirect:  # force_https
            log.status = 301
            await forwarding.redirect(send, redirect.location, request_id)
        except ProxyError as exc:
            log.refused(exc.code, exc.status)
            await forwarding.error_page(send, exc, request_id, log.machine_id)
        finally:
            log.seconds = time.monotonic() - started
            if self.on_log is not None:
                self.on_log(log)

    async def _route(
        self,
        scope: Scope,
        body: RequestBody,
        path: bytes,
        request_id: str,
        log: RequestLog,
        send: Send,
        edge: str,
    ) -> None:
        """Deliver the request entering at the `edge` region, following its replays."""
        method: str = scope["method"]
        dest = Destination(
            app=self.app_name,
            instance=forwarding.header(scope, FLY_FORCE_INSTANCE_ID),
            timeout=self.replay_timeout,
            port=443 if scope.get("scheme") == "https" else 80,
            https_location=routing.https_location(
                scope.get("scheme", "http"),
                forwarding.header(scope, FLY_FORWARDED_PORT),
                forwarding.header(scope, "host"),
                path,
            ),
        )
        delivery = Delivery(path=path, headers=forwarding.request_headers(scope, request_id, edge))
        replays = resends = 0
        while True:
            begun = time.monotonic()
            try:
                machine, response, note = await self._deliver(dest, method, body, delivery, edge)
            except Unreachable as failure:
                log.unreachable(self._label(dest.app, failure.target), failure.reason)
                dest, delivery = routing.fallback_of(
                    dest,
                    delivery,
                    failure,
                    elapsed=time.monotonic() - begun,
                    region=edge,
                    home_app=self.app_name,
                    replay_timeout=self.replay_timeout,
                )
                log.fell_back()
                continue
            log.reached(machine, note)
            try:
                directive = await forwarding.read_replay(response)
            except BaseException:
                await response.aclose()
                self._load.end(machine.id)
                raise
            if directive is None:
                body_ahead = ReadAhead(response)
                await body_ahead.settle()
                if body_ahead.error is None:
                    try:
                        await forwarding.respond(
                            send, response, body_ahead, machine.id, request_id, log
                        )
                    finally:
                        self._load.end(machine.id)
                    return
                # The Machine's answer broke off before the client saw any of it: as when a
                # connection dies before the answer, a safe request is sent again; anything
                # else gets a clean error page rather than a truncated answer.
                await body_ahead.aclose()
                await response.aclose()
                self._load.end(machine.id)
                if not resend.resendable(method, body.complete) or resends >= resend.MAX_RESENDS:
                    raise ProxyError(
                        "PU02",
                        502,
                        f"Machine {machine.id} broke off its answer: {body_ahead.error}",
                    )
                await self.addresses.reap(machine.id)
                resends += 1
                log.resent()
                continue
            await forwarding.discard(response)
            self._load.end(machine.id)
            replays += 1
            routing.check_replayable(
                delivery,
                body_complete=body.complete,
                body_size=len(body.prefix),
                replays=replays,
                body_limit=self.replay_body_limit,
                edge_buffer_limit=self.edge_buffer_limit,
            )
            log.replayed(elsewhere=directive.elsewhere and not directive.instance)
            dest, delivery = routing.replayed(
                dest,
                delivery,
                directive,
                machine,
                region=self.region,
                replay_timeout=self.replay_timeout,
                now_us=time.time_ns() // 1000,
            )
            self.autostop.apps.add(dest.app)

    def _label(self, app: str, machine_id: str | None) -> str:
        if machine_id is None:
            return app
        try:
            return machine_label(self.machines.get(app, machine_id))
        except EmulatorError:
            return machine_id[:4]

    # -- delivering ----------------------------------------------------------------------------

    async def _deliver(
        self, dest: Destination, method: str, body: RequestBody, delivery: Delivery, edge: str
    ) -> tuple[Machine, httpx.Response, str]:
        """Send the request from the `edge` region to a Machine of `dest`; its response once the
        headers are in (after the round trip between their regions)."""
        assert self._client is not None
        deadline = time.monotonic() + dest.timeout
        attempts = 0
        while True:
            machine, note, preference = await self._acquire(dest, deadline, edge)
            address = self.addresses.address(machine.id)
            if address is None:  # stopped between the check and now: look again
                attempts += 1
                if attempts > resend.MAX_RESENDS or time.monotonic() >= deadline:
                    raise Unreachable(
                        "retries_exhausted", f"Machine {machine.id} has no process", machine.id
                    )
                await asyncio.sleep(resend.RESEND_PAUSE)
                continue
            host, port = address
            headers = forwarding.upstream_headers(
                [*delivery.headers, *delivery.extra.items(), *preference.items()]
            )
            url = httpx.URL(scheme="http", host=host, port=port, raw_path=delivery.path)
            request = self._client.build_request(
                method, url, headers=headers, content=body.content()
            )
            self._load.begin(machine.id)
            try:
                hop = self.edge_regions.hop_seconds(edge, machine.region or self.region)
                if hop:
                    await asyncio.sleep(hop)
                response = await self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                self._load.end(machine.id)
                failure = resend.resend_reason(exc, machine.id, method, body.complete)
                # A process that just died is seen now and started again.
                await self.addresses.reap(machine.id)
                attempts += 1
                if not body.complete:  # a streamed body cannot be sent twice
                    raise ProxyError(
                        "PA01",
                        502,
                        f"Machine {machine.id} {failure}; "
                        f"{unbuffered(self.edge_buffer_limit, 'retried')}",
                    ) from exc
                if attempts > resend.MAX_RESENDS or time.monotonic() >= deadline:
                    raise Unreachable(
                        "retries_exhausted", f"Machine {machine.id} {failure}", machine.id
                    ) from exc
                await asyncio.sleep(resend.RESEND_PAUSE * attempts)
                continue
            return machine, response, note

    async def _acquire(
        self, dest: Destination, deadline: float, edge: str
    ) -> tuple[Machine, str, dict[str, str]]:
        """A started Machine for `dest` (starting one if needed), a log note, extra headers."""
        unavailable: set[str] = set()
        while True:
            try:
                machine = routing.pick(
                    dest,
                    self.machines.list(dest.app),
                    home_app=self.app_name,
                    region=edge,
                    load=self._load.of,
                    answering=lambda machine_id: self.addresses.address(machine_id) is not None,
                    unavailable=unavailable,
                    balance_function_machines=self.balance_function_machines,
                )
            except Full as full:
                # Fly Proxy queues a request while every Machine is at its hard limit, and
                # answers 503 when that lasts.
                if time.monotonic() >= deadline:
                    raise Unreachable("no_candidate", str(full), dest.instance) from full
                await asyncio.sleep(_FULL_RETRY_SECONDS)
                continue
            location = routing.https_redirect(machine, dest)
            if location is not None:
                raise HttpsRedirect(location)
            preference = routing.preference_headers(dest, machine)
            step = routing.step_for(
                machine, answering=self.addresses.address(machine.id) is not None
            )
            if step == "deliver":
                return machine, self._cold_note(machine, None), preference
            if step == "settle":
                if machine.state == "started":  # no process: perhaps it just died; have it noticed
                    await self.addresses.reap(machine.id)
                if time.monotonic() >= deadline:
                    raise Unreachable(
                        "timeout", f"Machine {machine.id} did not settle in time", machine.id
                    )
                await asyncio.sleep(_SETTLE_SECONDS)
                continue
            if step == "start":
                begun = time.monotonic()
                self._load.wait(machine.id)  # load on it while it starts
                try:
                    started = await self._ensure_started(dest.app, machine, deadline)
                except Unreachable:
                    if dest.instance:
                        raise
                    unavailable.add(machine.id)  # try another candidate
                    continue
                finally:
                    self._load.unwait(machine.id)
                return started, self._cold_note(started, time.monotonic() - begun), preference
            if dest.instance:  # a replay to it fails (PM08 when stopping or failed)
                raise Unreachable(
                    "no_candidate", routing.unavailable_detail(machine), dest.instance
                )
            unavailable.add(machine.id)

    async def _ensure_started(self, app: str, machine: Machine, deadline: float) -> Machine:
        task = self._starting.get(machine.id)
        if task is None:
            # Not bound to this request: a start outlives a request that gives up waiting.
            task = asyncio.ensure_future(self.machines.start_and_wait(app, machine.id))
            self._starting[machine.id] = task
            task.add_done_callback(lambda _: self._starting.pop(machine.id, None))
        try:
            return await asyncio.wait_for(
                asyncio.shield(task), max(0.0, deadline - time.monotonic())
            )
        except TimeoutError as exc:
            raise Unreachable(
                "timeout", f"Machine {machine.id} did not start in time", machine.id
            ) from exc
        except EmulatorError as exc:
            raise Unreachable(
                "retries_exhausted", f"Machine {machine.id} failed to start: {exc}", machine.id
            ) from exc

    def _cold_note(self, machine: Machine, waited: float | None) -> str:
        """`(cold 1.8s)` on the first request a Machine's process serves."""
        pid = self.addresses.pid(machine.id)
        if pid is None or self._seen_pid.get(machine.id) == pid:
            return ""
        self._seen_pid[machine.id] = pid
        return cold_note(waited if waited is not None else self.addresses.boot_seconds(machine.id))
