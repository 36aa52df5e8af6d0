"""The local Fly Proxy: an ASGI reverse proxy over emulated Machines, honouring fly-replay.

`FlyProxy` load-balances requests like Fly Proxy over every Machine of the app with a service on
the request's port, function Machines included (the decision lives in `flyfn.emulator.balancer`:
concurrency limits, started first, autostart at the soft limit, waiting at the hard limit, replays
to one `instance` included), and acts on `fly-replay` answers (header and JSON forms: instance,
prefer_instance, app, region, elsewhere, state, timeout, fallback, transform) the way Fly Proxy
does: it re-delivers the request with `fly-replay-src`, falls back with `fly-replay-failed`,
refuses to replay bodies over 1 MB and chains of more than 10 replays. Stopped or suspended targets
are started on demand (through the `MachinesEmulator`, so the state machine and events stay
right), idle ones are stopped or suspended after `idle_stop` seconds per their services'
`autostop`.

Bodies stream both ways; a request body is buffered up to 10 MB as Fly's edge does (to replay or
retry it), and a larger one that needs a replay or a retry fails with PA01.
Every response carries `Fly-Request-Id` and `X-Flyfn-Machine: <id>` (an emulator-only aid); proxy
errors are short plain pages with a Fly-style code. A `RequestLog` per request tells its route.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from flyfn.emulator import balancer
from flyfn.emulator.asgi import Receive, Scope, Send
from flyfn.emulator.state import EmulatorError, MachinesEmulator, new_ulid
from flyfn.emulator.supervisor import is_function_machine, machine_label
from flyfn.fly import autostop
from flyfn.fly.env import GROUP_ENV
from flyfn.fly.headers import (
    FLY_CLIENT_IP,
    FLY_FORCE_INSTANCE_ID,
    FLY_FORWARDED_PORT,
    FLY_PREFERRED_INSTANCE_UNAVAILABLE,
    FLY_REGION,
    FLY_REPLAY,
    FLY_REPLAY_FAILED,
    FLY_REPLAY_SRC,
    FLY_REQUEST_ID,
    REPLAY_JSON_CONTENT_TYPE,
)
from flyfn.fly.limits import EDGE_BUFFER_LIMIT, MAX_REPLAYS, REPLAY_BODY_LIMIT
from flyfn.machines.models import Machine
from flyfn.replay import (
    FlyReplay,
    ReplayFailed,
    ReplayHeaderError,
    ReplaySource,
)

__all__ = [
    "DEFAULT_IDLE_STOP",
    "DEFAULT_REPLAY_TIMEOUT",
    "EDGE_BUFFER_LIMIT",
    "MAX_REPLAYS",
    "REPLAY_BODY_LIMIT",
    "FlyProxy",
    "MachineAddresses",
    "RequestLog",
]

DEFAULT_REPLAY_TIMEOUT = 30.0
DEFAULT_IDLE_STOP = 60.0
# A replay response's ignored body is read (keeping its connection) up to this many bytes.
_DISCARD_LIMIT = 64 * 1024
_REPLAY_JSON_LIMIT = 64 * 1024
_VIA = "1.1 fly.io"
_MAX_CONNECT_RETRIES = 5
# A Machine's answer is read this far ahead (bytes, seconds) before its headers go to the client,
# so that a Machine dying mid-answer can still be retried (see `_ReadAhead`).
_READ_AHEAD_BYTES = 64 * 1024
_READ_AHEAD_SECONDS = 0.05
# While every Machine is at its hard limit a request waits, looking again this often (seconds).
_FULL_RETRY_SECONDS = 0.02
# Methods a failed delivery may be sent again for (RFC 9110 safe methods).
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers only the proxy sets (a client's values are replaced).
_PROXY_REQUEST_HEADERS = frozenset(
    {
        FLY_REQUEST_ID,
        FLY_REGION,
        FLY_CLIENT_IP,
        FLY_FORWARDED_PORT,
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-ssl",
        FLY_PREFERRED_INSTANCE_UNAVAILABLE,
        FLY_FORCE_INSTANCE_ID,
    }
)
_FLY_REQUEST_ID_BYTES = FLY_REQUEST_ID.encode()
_REPLAY_REQUEST_HEADERS = frozenset({FLY_REPLAY_SRC, FLY_REPLAY_FAILED})
_STARTABLE = frozenset({"created", "stopped", "suspended", "failed"})
_TRANSITIONAL = frozenset(
    {"creating", "starting", "stopping", "suspending", "restarting", "updating", "replacing"}
)


class MachineAddresses(Protocol):
    """Where Machines listen (implemented by `ProcessRuntime`)."""

    def address(self, machine_id: str) -> tuple[str, int] | None: ...

    def pid(self, machine_id: str) -> int | None: ...

    def boot_seconds(self, machine_id: str) -> float | None: ...

    async def reap(self, machine_id: str) -> bool: ...


class ProxyError(Exception):
    """A request the proxy answers itself, with a Fly-style error code."""

    def __init__(self, code: str, status: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.status = status
        self.message = message


class _Unreachable(Exception):
    """No connection could be made to a destination (a replay failure: fallback applies)."""

    def __init__(self, reason: str, detail: str, target: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason  # timeout | retries_exhausted | no_candidate
        self.detail = detail
        self.target = target


class _ClientGone(Exception):
    pass


class _Full(Exception):
    """Every candidate Machine is at its hard limit: the request waits for room."""


@dataclass
class RequestLog:
    """The route of one request, printed by `flyfn dev` as one line."""

    method: str
    path: str
    hops: list[str] = field(default_factory=list)
    status: int | None = None
    size: int = 0
    seconds: float = 0.0
    error: str | None = None
    machine_id: str | None = None  # the last Machine that answered

    def __str__(self) -> str:
        route = " → ".join(self.hops) if self.hops else "proxy"
        status = str(self.status) if self.status is not None else "---"
        tail = f" ({self.error})" if self.error else ""
        return (
            f"{self.method} {self.path} {route} {status} {_size_text(self.size)} "
            f"{_seconds_text(self.seconds)}{tail}"
        )


def _size_text(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def _seconds_text(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"


# -- fly-replay directives -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Directive:
    """One fly-replay answer, from the header or the JSON form."""

    instance: str | None = None
    prefer_instance: str | None = None
    app: str | None = None
    regions: tuple[str, ...] = ()
    elsewhere: bool = False
    state: str | None = None
    timeout: float | None = None
    fallback: str | None = None
    transform_path: str | None = None
    set_headers: tuple[tuple[str, str], ...] = ()
    delete_headers: frozenset[str] = frozenset()


def _directive(replay: FlyReplay) -> _Directive:
    """What the proxy does with a parsed fly-replay answer (PA03 when it makes no sense)."""
    transform = replay.transform or {}
    try:
        set_headers = tuple(
            (str(h["name"]), str(h["value"])) for h in transform.get("set_headers") or ()
        )
        delete_headers = frozenset(
            str(h["name"] if isinstance(h, Mapping) else h).lower()
            for h in transform.get("delete_headers") or ()
        )
    except (KeyError, TypeError) as exc:
        raise ProxyError("PA03", 502, "invalid fly-replay transform") from exc
    path = transform.get("path")
    if path is not None and not (isinstance(path, str) and path.startswith("/")):
        raise ProxyError("PA03", 502, "invalid fly-replay transform path")
    return _Directive(
        instance=replay.instance,
        prefer_instance=replay.prefer_instance,
        app=replay.app,
        regions=tuple(r.lower() for r in replay.region),
        elsewhere=replay.elsewhere,
        state=replay.state,
        timeout=replay.timeout_seconds,
        fallback=replay.fallback,
        transform_path=path,
        set_headers=set_headers,
        delete_headers=delete_headers,
    )


# -- request bodies ------------------------------------------------------------------------------


class _Body:
    """The request body: buffered whole when it fits the edge's buffer, else streamed once."""

    def __init__(self, prefix: bytes, complete: bool, receive: Receive) -> None:
        self.prefix = prefix
        self.complete = complete
        self._receive = receive
        self.consumed = False

    @classmethod
    async def read(cls, receive: Receive, limit: int) -> _Body:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                return cls(b"".join(chunks), True, receive)
            if size > limit:
                return cls(b"".join(chunks), False, receive)

    def content(self) -> bytes | AsyncIterator[bytes]:
        if self.complete:
            return self.prefix
        if self.consumed:
            raise ProxyError("PA03", 502, "the request body was already streamed")
        self.consumed = True
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        yield self.prefix
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


# -- routing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Destination:
    app: str
    instance: str | None = None
    prefer_instance: str | None = None
    regions: tuple[str, ...] = ()
    exclude: frozenset[str] = frozenset()
    timeout: float = DEFAULT_REPLAY_TIMEOUT
    fallback: str | None = None
    issuer: Machine | None = None  # the Machine that asked for this replay
    issuer_app: str | None = None
    port: int = 80  # the public port the request came in on (services are matched on it)


@dataclass
class _Delivery:
    """What changes between the deliveries of one request."""

    path: bytes
    headers: list[tuple[str, str]]
    extra: dict[str, str] = field(default_factory=dict)
    fallback: bool = False


async def _discard(response: httpx.Response) -> None:
    """Drop a replay response: its body (Fly ignores it) is read when small, so that the Machine's
    keep-alive connection goes back to the pool instead of being closed and opened again."""
    read = 0
    try:
        if not response.is_stream_consumed:  # the JSON form's body is read already
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read > _DISCARD_LIMIT:
                    break
    except httpx.HTTPError:
        pass  # the connection is closed below; the replay goes on
    finally:
        await response.aclose()


def _resendable(method: str, body: _Body) -> bool:
    """Whether a request may be delivered again after its first delivery broke off: safe (it can
    have had no effects) and fully buffered (a streamed body cannot be sent twice)."""
    return method.upper() in _SAFE_METHODS and body.complete


def _resend_reason(exc: httpx.HTTPError, machine_id: str, method: str, body: _Body) -> str:
    """What went wrong with a delivery that may be sent again (for the message once retries run
    out), or a `ProxyError` (PU02) when it failed in a way that must not be retried."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return f"refused the connection ({exc})"  # nothing was sent
    # The connection died before any response: a keep-alive connection the Machine closed as it
    # stopped, or a process killed mid-request. As reverse proxies do, a safe request is sent
    # again (the Machine is restarted or the fallback applies); any other may already have had
    # effects, so it fails.
    if isinstance(
        exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
    ) and _resendable(method, body):
        return f"closed the connection ({type(exc).__name__})"
    raise ProxyError(
        "PU02", 502, f"failed to complete the request to Machine {machine_id}: {exc}"
    ) from exc


class _ReadAhead:
    """A Machine's response body, read by its own task into a small queue.

    The proxy waits for the whole body, `_READ_AHEAD_BYTES`, or `_READ_AHEAD_SECONDS`, whichever
    comes first, before the client gets the headers: a Machine killed before it finished a short
    answer is then seen while the request can still be sent again, not as a truncated response.
    Longer or slower answers stream on from the queue (bounded, so memory stays bounded).
    """

    def __init__(self, response: httpx.Response) -> None:
        self._queue: asyncio.Queue[bytes | httpx.HTTPError | None] = asyncio.Queue(maxsize=16)
        self._buffered = 0
        self._settled = asyncio.Event()  # the body ended, failed, or filled the read-ahead
        self.error: httpx.HTTPError | None = None
        self._task = asyncio.ensure_future(self._pump(response))

    async def _pump(self, response: httpx.Response) -> None:
        try:
            async for chunk in response.aiter_raw():
                await self._queue.put(chunk)
                self._buffered += len(chunk)
                if self._buffered >= _READ_AHEAD_BYTES:
                    self._settled.set()
        except httpx.HTTPError as exc:
            self.error = exc
            await self._queue.put(exc)
        else:
            await self._queue.put(None)
        finally:
            self._settled.set()

    async def settle(self) -> None:
        """Wait until the body ended or failed, filled the read-ahead, or the wait is over."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), _READ_AHEAD_SECONDS)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks; raises the upstream error where the body broke off."""
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, httpx.HTTPError):
                raise item
            yield item

    async def aclose(self) -> None:
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class FlyProxy:
    """The ASGI app of the local Fly Proxy."""

    def __init__(
        self,
        machines: MachinesEmulator,
        addresses: MachineAddresses,
        *,
        app_name: str,
        region: str = "local",
        idle_stop: float = DEFAULT_IDLE_STOP,
        replay_timeout: float = DEFAULT_REPLAY_TIMEOUT,
        replay_body_limit: int = REPLAY_BODY_LIMIT,
        edge_buffer_limit: int = EDGE_BUFFER_LIMIT,
        on_log: Callable[[RequestLog], None] | None = None,
        on_event: Callable[[str], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        read_timeout: float = 300.0,
        balance_function_machines: bool = True,
    ) -> None:
        self.machines = machines
        self.addresses = addresses
        self.app_name = app_name
        self.region = region
        self.idle_stop = idle_stop
        self.replay_timeout = replay_timeout
        self.replay_body_limit = replay_body_limit
        self.edge_buffer_limit = edge_buffer_limit
        self.on_log = on_log
        self.on_event = on_event
        self._transport = transport
        self._read_timeout = read_timeout
        self._client: httpx.AsyncClient | None = None
        self._inflight: defaultdict[str, int] = defaultdict(int)
        self._waiting: defaultdict[str, int] = defaultdict(int)
        self.balance_function_machines = balance_function_machines
        self._last_active: dict[str, float] = {}
        self._seen_pid: dict[str, int] = {}
        self._starting: dict[str, asyncio.Task[Machine]] = {}
        self._apps: set[str] = {app_name}
        self._autostop_task: asyncio.Task[None] | None = None

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
        if self._autostop_task is None and self.idle_stop > 0:
            self._autostop_task = asyncio.ensure_future(self._autostop_loop())

    async def aclose(self) -> None:
        if self._autostop_task is not None:
            self._autostop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._autostop_task
            self._autostop_task = None
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
            _check_target(raw_path)
            body = await _Body.read(receive, self.edge_buffer_limit)
            await self._route(scope, body, path, request_id, log, send)
        except _ClientGone:
            log.error = "client went away"
        except ProxyError as exc:
            log.status = exc.status
            log.error = exc.code
            log.hops.append(exc.code)
            await self._error_page(send, exc, request_id, log.machine_id)
        finally:
            log.seconds = time.monotonic() - started
            if self.on_log is not None:
                self.on_log(log)

    async def _route(
        self, scope: Scope, body: _Body, path: bytes, request_id: str, log: RequestLog, send: Send
    ) -> None:
        headers = self._request_headers(scope, request_id)
        forced = _header(scope, FLY_FORCE_INSTANCE_ID)
        port = 443 if scope.get("scheme") == "https" else 80
        dest = _Destination(
            app=self.app_name, instance=forced, timeout=self.replay_timeout, port=port
        )
        delivery = _Delivery(path=path, headers=headers)
        replays = resends = 0
        while True:
            begun = time.monotonic()
            try:
                machine, response, note = await self._deliver(dest, scope["method"], body, delivery)
            except _Unreachable as failure:
                elapsed = time.monotonic() - begun
                dest, delivery = self._fallback(dest, delivery, failure, elapsed, log)
                continue
            log.hops.append(machine_label(machine) + note)
            log.machine_id = machine.id
            try:
                directive = await self._replay_of(response)
            except BaseException:
                await response.aclose()
                self._done(machine)
                raise
            if directive is None:
                body_ahead = _ReadAhead(response)
                await body_ahead.settle()
                if body_ahead.error is not None:
                    # The Machine's answer broke off before the client saw any of it: as when a
                    # connection dies before the answer, a safe request is sent again; anything
                    # else gets a clean error page rather than a truncated answer.
                    await body_ahead.aclose()
                    await response.aclose()
                    self._done(machine)
                    if not _resendable(scope["method"], body) or resends >= _MAX_CONNECT_RETRIES:
                        raise ProxyError(
                            "PU02",
                            502,
                            f"Machine {machine.id} broke off its answer: {body_ahead.error}",
                        )
                    await self.addresses.reap(machine.id)
                    resends += 1
                    log.hops.append("resent")
                    continue
                await self._respond(send, response, body_ahead, machine, request_id, log)
                return
            await _discard(response)
            self._done(machine)
            if delivery.fallback:
                raise ProxyError("PA03", 502, "a fallback request cannot be replayed again")
            if not body.complete:
                raise ProxyError("PA01", 502, self._unbuffered("replayed"))
            if len(body.prefix) > self.replay_body_limit:
                raise ProxyError(
                    "PA03",
                    502,
                    f"a request with a body over {self.replay_body_limit} bytes cannot be replayed",
                )
            replays += 1
            if replays > MAX_REPLAYS:
                raise ProxyError("PA02", 502, f"more than {MAX_REPLAYS} replays for one request")
            log.hops.append(
                "elsewhere" if directive.elsewhere and not directive.instance else "replay"
            )
            dest, delivery = self._replayed(dest, delivery, directive, machine)

    def _replayed(
        self, dest: _Destination, delivery: _Delivery, directive: _Directive, machine: Machine
    ) -> tuple[_Destination, _Delivery]:
        app = directive.app or dest.app
        self._apps.add(app)
        src = ReplaySource(
            instance=machine.id,
            region=machine.region or self.region,
            t=time.time_ns() // 1000,
            state=directive.state,
        ).to_header()
        drop = directive.delete_headers | _REPLAY_REQUEST_HEADERS
        headers = [(k, v) for k, v in delivery.headers if k.lower() not in drop]
        if directive.set_headers:
            names = {k.lower() for k, _ in directive.set_headers}
            headers = [(k, v) for k, v in headers if k.lower() not in names]
            headers.extend(directive.set_headers)
        path = delivery.path
        if directive.transform_path is not None:
            path = directive.transform_path.encode()
        new_dest = _Destination(
            app=app,
            instance=directive.instance,
            prefer_instance=directive.prefer_instance,
            regions=directive.regions,
            exclude=frozenset({machine.id}) if directive.elsewhere else frozenset(),
            timeout=directive.timeout if directive.timeout is not None else self.replay_timeout,
            fallback=directive.fallback,
            issuer=machine,
            issuer_app=dest.app,
            port=dest.port,
        )
        return new_dest, _Delivery(path=path, headers=headers, extra={FLY_REPLAY_SRC: src})

    def _fallback(
        self,
        dest: _Destination,
        delivery: _Delivery,
        failure: _Unreachable,
        elapsed: float,
        log: RequestLog,
    ) -> tuple[_Destination, _Delivery]:
        """Where a failed delivery goes next; raises the proxy error when nowhere."""
        log.hops.append(f"{self._label(dest.app, failure.target)} ✗ {failure.reason}")
        issuer = dest.issuer
        if issuer is None or dest.fallback is None or delivery.fallback:
            status = 503 if failure.reason == "no_candidate" else 502
            code = "PR04" if failure.reason == "no_candidate" else "PC01"
            raise ProxyError(code, status, failure.detail)
        app = dest.issuer_app or self.app_name
        failed = ReplayFailed(
            instance=failure.target,
            app=dest.app,
            region=self.region,
            replay_source=issuer.id,
            reason=failure.reason,
            elapsed_ms=round(elapsed * 1000),
        ).to_header()
        headers = [(k, v) for k, v in delivery.headers if k.lower() not in _REPLAY_REQUEST_HEADERS]
        log.hops.append("fallback")
        if dest.fallback == "force_self":
            new_dest = _Destination(
                app=app, instance=issuer.id, timeout=self.replay_timeout, port=dest.port
            )
        else:
            new_dest = _Destination(
                app=app, prefer_instance=issuer.id, timeout=self.replay_timeout, port=dest.port
            )
        return new_dest, _Delivery(
            path=delivery.path, headers=headers, extra={FLY_REPLAY_FAILED: failed}, fallback=True
        )

    def _unbuffered(self, what: str) -> str:
        return (
            f"the request body is over {self.edge_buffer_limit} bytes: the edge stopped "
            f"buffering it, so it cannot be {what}"
        )

    def _label(self, app: str, machine_id: str | None) -> str:
        if machine_id is None:
            return app
        try:
            return machine_label(self.machines.get(app, machine_id))
        except EmulatorError:
            return machine_id[:4]

    # -- delivering ----------------------------------------------------------------------------

    async def _deliver(
        self, dest: _Destination, method: str, body: _Body, delivery: _Delivery
    ) -> tuple[Machine, httpx.Response, str]:
        """Send the request to a Machine of `dest`; its response once the headers are in."""
        assert self._client is not None
        begun = time.monotonic()
        deadline = begun + dest.timeout
        attempts = 0
        while True:
            machine, note, headers_extra = await self._acquire(dest, deadline)
            address = self.addresses.address(machine.id)
            if address is None:  # stopped between the check and now: look again
                attempts += 1
                if attempts > _MAX_CONNECT_RETRIES or time.monotonic() >= deadline:
                    raise _Unreachable(
                        "retries_exhausted", f"Machine {machine.id} has no process", machine.id
                    )
                await asyncio.sleep(0.05)
                continue
            host, port = address
            headers = [
                (_header_bytes(k), _header_bytes(v))
                for k, v in [*delivery.headers, *delivery.extra.items(), *headers_extra.items()]
            ]
            url = httpx.URL(scheme="http", host=host, port=port, raw_path=delivery.path)
            request = self._client.build_request(
                method, url, headers=headers, content=body.content()
            )
            self._busy(machine)
            try:
                response = await self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                self._done(machine)
                failure = _resend_reason(exc, machine.id, method, body)  # or ProxyError
                # A process that just died is seen now and started again.
                await self.addresses.reap(machine.id)
                attempts += 1
                if not body.complete:  # a streamed body cannot be sent twice
                    raise ProxyError(
                        "PA01",
                        502,
                        f"Machine {machine.id} {failure}; {self._unbuffered('retried')}",
                    ) from exc
                if attempts > _MAX_CONNECT_RETRIES or time.monotonic() >= deadline:
                    raise _Unreachable(
                        "retries_exhausted", f"Machine {machine.id} {failure}", machine.id
                    ) from exc
                await asyncio.sleep(0.05 * attempts)
                continue
            return machine, response, note

    async def _acquire(
        self, dest: _Destination, deadline: float
    ) -> tuple[Machine, str, dict[str, str]]:
        """A started Machine for `dest` (starting one if needed), a log note, extra headers."""
        unavailable: set[str] = set()
        while True:
            try:
                machine = self._pick(dest, unavailable)
            except _Full as full:
                # Fly Proxy queues a request while every Machine is at its hard limit, and
                # answers 503 when that lasts.
                if time.monotonic() >= deadline:
                    raise _Unreachable("no_candidate", str(full), dest.instance) from full
                await asyncio.sleep(_FULL_RETRY_SECONDS)
                continue
            extra: dict[str, str] = {}
            if dest.prefer_instance and machine.id != dest.prefer_instance:
                extra[FLY_PREFERRED_INSTANCE_UNAVAILABLE] = dest.prefer_instance
            state = machine.state or ""
            if state == "started" and self.addresses.address(machine.id) is not None:
                return machine, self._cold_note(machine, None), extra
            if state in _TRANSITIONAL or state == "started":
                if state == "started":  # no process: perhaps it just died; have it noticed
                    await self.addresses.reap(machine.id)
                if time.monotonic() >= deadline:
                    raise _Unreachable(
                        "timeout", f"Machine {machine.id} did not settle in time", machine.id
                    )
                await asyncio.sleep(0.05)
                continue
            if state in _STARTABLE and self._autostart(machine):
                begun = time.monotonic()
                self._waiting[machine.id] += 1  # load on it while it starts
                try:
                    started = await self._ensure_started(dest.app, machine, deadline)
                except _Unreachable:
                    if dest.instance:
                        raise
                    unavailable.add(machine.id)  # try another candidate
                    continue
                finally:
                    self._waiting[machine.id] -= 1
                return started, self._cold_note(started, time.monotonic() - begun), extra
            if dest.instance:
                raise _Unreachable(
                    "no_candidate",
                    f"no candidate: Machine {dest.instance} is not available",
                    dest.instance,
                )
            unavailable.add(machine.id)

    def _pick(self, dest: _Destination, unavailable: set[str]) -> Machine:
        """The Machine this delivery goes to (Fly's balancing, `flyfn.emulator.balancer`);
        `_Full` when every candidate is at its hard limit."""
        machines = self.machines.list(dest.app)
        if not machines and dest.app != self.app_name:
            raise ProxyError("PA04", 502, f"replay target app {dest.app!r} not found")
        if dest.instance:
            for machine in machines:
                if machine.id == dest.instance and machine.id not in unavailable:
                    # Its hard limit holds for replays to it too: they wait for room, as every
                    # request does when all the Machines it may go to are full.
                    service = balancer.service_on_port(machine, dest.port)
                    if (
                        service is not None
                        and balancer.limits_of(service).band(self.load(machine.id)) == 2
                    ):
                        raise _Full(f"Machine {machine.id} is at its hard_limit")
                    return machine
            raise _Unreachable(
                "no_candidate",
                f"no candidate: Machine {dest.instance} is not available",
                dest.instance,
            )
        pool = [m for m in machines if m.id not in dest.exclude and m.id not in unavailable]
        if not self.balance_function_machines:
            # Focused unit tests only: ordinary traffic kept off function Machines (an app of
            # only function Machines, the `app` strategy's, is still balanced over them).
            pool = [m for m in pool if not is_function_machine(m)] or pool
        if dest.regions and "any" not in dest.regions:
            pool = [m for m in pool if (m.region or self.region) in dest.regions]
        by_id = {m.id: m for m in pool}
        candidates = [
            c
            for m in pool
            if (
                c := balancer.candidate(
                    m,
                    port=dest.port,
                    load=self.load(m.id),
                    answering=self.addresses.address(m.id) is not None,
                    region=self.region,
                )
            )
            is not None
        ]
        choice = balancer.choose(candidates, prefer=dest.prefer_instance)
        if choice is not None:
            return by_id[choice.machine_id]
        if candidates:  # every one at its hard limit: the request waits its turn
            raise _Full(f"every Machine of app {dest.app!r} is at its hard_limit")
        raise _Unreachable(
            "no_candidate", f"no candidate: no Machine of app {dest.app!r} can take it", None
        )

    @staticmethod
    def _autostart(machine: Machine) -> bool:
        services = machine.config.services if machine.config is not None else None
        return not services or any(s.autostart is not False for s in services)

    def load(self, machine_id: str) -> int:
        """Requests the proxy is delivering to the Machine or waiting for it to start."""
        return self._inflight[machine_id] + self._waiting[machine_id]

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
            raise _Unreachable(
                "timeout", f"Machine {machine.id} did not start in time", machine.id
            ) from exc
        except EmulatorError as exc:
            raise _Unreachable(
                "retries_exhausted", f"Machine {machine.id} failed to start: {exc}", machine.id
            ) from exc

    def _cold_note(self, machine: Machine, waited: float | None) -> str:
        """`(cold 1.8s)` on the first request a Machine's process serves."""
        pid = self.addresses.pid(machine.id)
        if pid is None or self._seen_pid.get(machine.id) == pid:
            return ""
        self._seen_pid[machine.id] = pid
        boot = waited if waited is not None else self.addresses.boot_seconds(machine.id)
        return f" (cold {boot:.1f}s)" if boot is not None else " (cold)"

    async def _replay_of(self, response: httpx.Response) -> _Directive | None:
        """The replay a Machine's response asks for, or None for an answer to pass on."""
        header = response.headers.get(FLY_REPLAY)
        if header is not None:
            try:
                return _directive(FlyReplay.parse(header))
            except ReplayHeaderError as exc:
                raise ProxyError("PA03", 502, f"invalid fly-replay: {exc}") from exc
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != REPLAY_JSON_CONTENT_TYPE:
            return None
        raw = b""
        async for chunk in response.aiter_raw():
            raw += chunk
            if len(raw) > _REPLAY_JSON_LIMIT:
                raise ProxyError("PA03", 502, "fly-replay JSON body too large")
        try:
            return _directive(FlyReplay.from_json(raw))
        except ReplayHeaderError as exc:
            raise ProxyError("PA03", 502, f"invalid fly-replay: {exc}") from exc

    async def _respond(
        self,
        send: Send,
        response: httpx.Response,
        body_ahead: _ReadAhead,
        machine: Machine,
        request_id: str,
        log: RequestLog,
    ) -> None:
        try:
            listed = _connection_tokens(response.headers.get_list("connection"))
            headers = [
                (k, v)
                for k, v in response.headers.raw
                if k.lower().decode("latin-1") not in HOP_BY_HOP | listed
                and k.lower() not in (_FLY_REQUEST_ID_BYTES, b"x-flyfn-machine")
            ]
            headers.append((_FLY_REQUEST_ID_BYTES, request_id.encode()))
            headers.append((b"x-flyfn-machine", machine.id.encode()))
            headers.append((b"via", _VIA.encode()))
            log.status = response.status_code
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": headers}
            )
            try:
                async for chunk in body_ahead.chunks():
                    log.size += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError:
                # Too late for an error page: leave the response incomplete so the client's
                # connection is closed rather than a truncated body looking whole.
                log.error = "PU02 upstream closed mid-response"
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await body_ahead.aclose()
            await response.aclose()
            self._done(machine)

    async def _error_page(
        self, send: Send, exc: ProxyError, request_id: str, machine_id: str | None
    ) -> None:
        body = f"{exc.code}: {exc.message}\nfly-request-id: {request_id}\n".encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (_FLY_REQUEST_ID_BYTES, request_id.encode()),
            (b"x-flyfn-proxy-error", exc.code.encode()),
            (b"via", _VIA.encode()),
        ]
        if machine_id is not None:
            headers.append((b"x-flyfn-machine", machine_id.encode()))
        with contextlib.suppress(Exception):  # the response may already have started
            await send({"type": "http.response.start", "status": exc.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

    def _request_headers(self, scope: Scope, request_id: str) -> list[tuple[str, str]]:
        raw: list[tuple[str, str]] = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
        ]
        listed = _connection_tokens(v for k, v in raw if k.lower() == "connection")
        drop = HOP_BY_HOP | listed | _PROXY_REQUEST_HEADERS | {"content-length"}
        client_ip = (scope.get("client") or ("127.0.0.1", 0))[0]
        server_port = (scope.get("server") or ("127.0.0.1", 80))[1]
        forwarded_for = [v for k, v in raw if k.lower() == "x-forwarded-for"]
        via = [v for k, v in raw if k.lower() == "via"]
        headers = [(k, v) for k, v in raw if k.lower() not in drop | {"x-forwarded-for", "via"}]
        headers.extend(
            [
                (FLY_REQUEST_ID, request_id),
                (FLY_REGION, self.region),
                (FLY_CLIENT_IP, client_ip),
                (FLY_FORWARDED_PORT, str(server_port)),
                ("x-forwarded-for", ", ".join([*forwarded_for, client_ip])),
                ("x-forwarded-proto", scope.get("scheme", "http")),
                ("x-forwarded-port", str(server_port)),
                ("via", ", ".join([*via, _VIA])),
            ]
        )
        return headers

    # -- load and autostop ---------------------------------------------------------------------

    def _busy(self, machine: Machine) -> None:
        self._inflight[machine.id] += 1
        self._last_active[machine.id] = time.monotonic()

    def _done(self, machine: Machine) -> None:
        self._inflight[machine.id] = max(0, self._inflight[machine.id] - 1)
        self._last_active[machine.id] = time.monotonic()

    async def _autostop_loop(self) -> None:
        interval = min(max(self.idle_stop / 4, 0.2), 5.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.autostop_once()
            except Exception as exc:  # the loop must survive one bad pass
                self._event(f"autostop: pass failed: {exc}")

    async def autostop_once(self, now: float | None = None) -> list[str]:
        """Stop or suspend each started Machine idle for `idle_stop` seconds; their ids."""
        now = time.monotonic() if now is None else now
        acted: list[str] = []
        for app in sorted(self._apps):
            machines = self.machines.list(app)
            started = [m for m in machines if m.state == "started"]
            for machine in started:
                mode, keep = _autostop_of(machine)
                last = self._last_active.setdefault(machine.id, now)
                if mode == "off" or self._inflight[machine.id] or now - last < self.idle_stop:
                    continue
                peers = [m for m in started if _role(m) == _role(machine) and m.id not in acted]
                if len(peers) <= keep:
                    continue
                try:
                    if mode == "suspend":
                        await self.machines.suspend(app, machine.id)
                    else:
                        await self.machines.stop(app, machine.id)
                except EmulatorError:
                    continue
                self._last_active.pop(machine.id, None)
                acted.append(machine.id)
                verb = "suspended" if mode == "suspend" else "stopped"
                self._event(
                    f"autostop: {machine_label(machine)} {verb} after {now - last:.0f}s idle"
                )
        return acted

    def _event(self, message: str) -> None:
        if self.on_event is not None:
            self.on_event(message)

    def inflight(self, machine_id: str) -> int:
        """Requests the proxy is delivering to the Machine right now."""
        return self._inflight[machine_id]


def _role(machine: Machine) -> str | None:
    env = machine.config.env if machine.config is not None else None
    return (env or {}).get(GROUP_ENV)


def _autostop_of(machine: Machine) -> tuple[str, int]:
    """The Machine's autostop mode and min_machines_running over its services."""
    services = (machine.config.services if machine.config is not None else None) or []
    mode = autostop.strongest(str(s.autostop) for s in services if s.autostop is not None)
    keep = max((s.min_machines_running or 0 for s in services), default=0)
    return mode, keep


def _check_target(raw_path: bytes) -> None:
    """Only origin-form targets (`/path`) reach a Machine: absolute-form (`http://host/path`),
    asterisk-form (`*`) and targets with a fragment (`#`) get a clean 400, as from Fly Proxy."""
    if not raw_path.startswith(b"/") or b"#" in raw_path:
        shown = raw_path[:100].decode("latin-1")
        raise ProxyError(
            "PU04", 400, f"invalid request target {shown!r}: a path such as /x is needed"
        )


def _header_bytes(text: str) -> bytes:
    # Header text arrives as latin-1 (so any byte a client sent goes on unchanged, non-ASCII
    # included); a value set by a replay's JSON transform may need UTF-8.
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode()


def _header(scope: Scope, name: str) -> str | None:
    key = name.encode()
    for k, v in scope["headers"]:
        if k.lower() == key:
            return str(v.decode("latin-1"))
    return None


def _connection_tokens(values: Iterable[str]) -> frozenset[str]:
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())
