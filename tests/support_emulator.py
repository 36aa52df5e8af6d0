"""An ASGI app (the Machines API emulator) answering a loopback URL in process: every httpx client
of the test process, whatever its event loop or thread, reaches it without a socket or a server;
and a virtual clock for its rate limits, which the Machines clients' retry waits advance."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import httpx

from flyfn.machines.client import AsyncMachinesClient
from flyfn.pool.loop import LoopThread

# The clients that build their own transport (flyfn's pools, `manage.py flyfn`, the tasks'
# dispatch) reach the app because httpx's network transports are patched while any route exists
# (and the Machines clients' retry waits, for a route with a clock).
_original_async = httpx.AsyncHTTPTransport.handle_async_request
_original_sync = httpx.HTTPTransport.handle_request
_original_client_init = AsyncMachinesClient.__init__
_routes: dict[tuple[bytes, bytes, int | None], _Route] = {}
_routes_lock = threading.Lock()


class VirtualClock:
    """Monotonic seconds that a Machines client's retry waits advance instead of passing: rate
    limits on this clock refill as if the client had waited, and it goes on at once. Concurrent
    waits each advance it, so limits on it are at most as strict as on the real clock."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() + self._offset

    async def sleep(self, seconds: float) -> None:
        with self._lock:
            self._offset += seconds
        await asyncio.sleep(0)


def _origin(url: httpx.URL) -> tuple[bytes, bytes, int | None]:
    return (url.raw_scheme, url.raw_host, url.port)


class _Route:
    """One app on its own event loop thread (as under a server: its state lives on one loop)."""

    def __init__(self, app: Any, clock: VirtualClock | None) -> None:
        self.clock = clock
        # raise_app_exceptions=False: an app's crash is a 500, as a server would answer it.
        self.transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        self.thread = LoopThread()

    async def _send(self, method: str, url: str, headers: Any, body: bytes) -> httpx.Response:
        request = httpx.Request(method, url, headers=headers, content=body)
        response = await self.transport.handle_async_request(request)
        raw = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
        return httpx.Response(response.status_code, headers=response.headers, content=raw)

    def submit(self, request: httpx.Request, body: bytes) -> Future[httpx.Response]:
        """Send `request` (its body read already) to the app on its loop."""
        coro = self._send(request.method, str(request.url), request.headers.raw, body)
        return self.thread.submit(coro)


async def _handle_async(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
    route = _routes.get(_origin(request.url))
    if route is None:
        return await _original_async(self, request)
    body = await request.aread()
    return await asyncio.wrap_future(route.submit(request, body))


def _handle_sync(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
    route = _routes.get(_origin(request.url))
    if route is None:
        return _original_sync(self, request)
    return route.submit(request, request.read()).result()


def _client_init(self: AsyncMachinesClient, *args: Any, **kwargs: Any) -> None:
    _original_client_init(self, *args, **kwargs)
    route = _routes.get(_origin(httpx.URL(self.config.api_hostname)))
    if route is not None and route.clock is not None:
        self._sleep = route.clock.sleep


@contextlib.contextmanager
def in_process(url: str, app: Any, clock: VirtualClock | None = None) -> Iterator[LoopThread]:
    """`app` answers every request of this process for `url`'s origin inside the block; yields the
    loop thread it runs on (run its cleanup there). With `clock`, the Machines clients made for
    `url` wait on it (the app's rate limits should run on it too)."""
    origin = _origin(httpx.URL(url))
    route = _Route(app, clock)
    with _routes_lock:
        if origin in _routes:
            raise RuntimeError(f"{url} is already served in process")
        if not _routes:
            httpx.AsyncHTTPTransport.handle_async_request = _handle_async  # type: ignore[method-assign]
            httpx.HTTPTransport.handle_request = _handle_sync  # type: ignore[method-assign]
            AsyncMachinesClient.__init__ = _client_init  # type: ignore[method-assign]
        _routes[origin] = route
    try:
        yield route.thread
    finally:
        with _routes_lock:
            del _routes[origin]
            if not _routes:
                httpx.AsyncHTTPTransport.handle_async_request = _original_async  # type: ignore[method-assign]
                httpx.HTTPTransport.handle_request = _original_sync  # type: ignore[method-assign]
                AsyncMachinesClient.__init__ = _original_client_init  # type: ignore[method-assign]
        route.thread.stop()
