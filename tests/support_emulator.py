"""An ASGI app (the Machines API emulator) answering a loopback URL in process: every httpx client
of the test process, whatever its event loop or thread, reaches it without a socket or a server."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import httpx

from flyfn.pool.loop import LoopThread

# The clients that build their own transport (flyfn's pools, `manage.py flyfn`, the tasks'
# dispatch) reach the app because httpx's network transports are patched while any route exists.
_original_async = httpx.AsyncHTTPTransport.handle_async_request
_original_sync = httpx.HTTPTransport.handle_request
_routes: dict[tuple[bytes, bytes, int | None], _Route] = {}
_routes_lock = threading.Lock()


def _origin(url: httpx.URL) -> tuple[bytes, bytes, int | None]:
    return (url.raw_scheme, url.raw_host, url.port)


class _Route:
    """One app on its own event loop thread (as under a server: its state lives on one loop)."""

    def __init__(self, app: Any) -> None:
        # raise_app_exceptions=False: an app's crash is a 500, as a server would answer it.
        self.transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        self.thread = LoopThread()

    async def _send(self, method: str, url: str, headers: Any, body: bytes) -> httpx.Response:
        request = httpx.Request(method, url, headers=headers, content=body)
        response = await self.transport.handle_async_request(request)
        raw = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
        return httpx.Response(response.status_code, headers=response.headers, content=raw)

    def submit(self, request: httpx.Request, body: bytes) -> Any:
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
    response: httpx.Response = route.submit(request, request.read()).result()
    return response


@contextlib.contextmanager
def in_process(url: str, app: Any) -> Iterator[LoopThread]:
    """`app` answers every request of this process for `url`'s origin inside the block; yields the
    loop thread it runs on (run its cleanup there)."""
    origin = _origin(httpx.URL(url))
    route = _Route(app)
    with _routes_lock:
        if origin in _routes:
            raise RuntimeError(f"{url} is already served in process")
        if not _routes:
            httpx.AsyncHTTPTransport.handle_async_request = _handle_async  # type: ignore[method-assign]
            httpx.HTTPTransport.handle_request = _handle_sync  # type: ignore[method-assign]
        _routes[origin] = route
    try:
        yield route.thread
    finally:
        with _routes_lock:
            del _routes[origin]
            if not _routes:
                httpx.AsyncHTTPTransport.handle_async_request = _original_async  # type: ignore[method-assign]
                httpx.HTTPTransport.handle_request = _original_sync  # type: ignore[method-assign]
        route.thread.stop()
