"""Bodies through the local Fly Proxy: the request body as the edge buffers it, and a Machine's
answer read a little ahead so that one broken off early can still be sent again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx

from flyfn.emulator.asgi import Receive
from flyfn.emulator.proxy.errors import ClientGone, ProxyError
from flyfn.fly.limits import EDGE_BUFFER_LIMIT

__all__ = ["EDGE_BUFFER_LIMIT", "ReadAhead", "RequestBody"]

# Fly's edge buffers a request body up to 10 MB, to replay or retry it; beyond that buffering
# stops, and a request that then needs a replay or a retry fails with PA01 (Fly's error codes).
# A Machine's answer is read this far ahead (bytes, seconds) before its headers go to the client.
_READ_AHEAD_BYTES = 64 * 1024
_READ_AHEAD_SECONDS = 0.05


class RequestBody:
    """The request body: buffered whole when it fits the edge's buffer, else streamed once."""

    def __init__(self, prefix: bytes, complete: bool, receive: Receive) -> None:
        self.prefix = prefix
        self.complete = complete
        self._receive = receive
        self.consumed = False

    @classmethod
    async def read(cls, receive: Receive, limit: int) -> RequestBody:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
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
                raise ClientGone
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


class ReadAhead:
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
