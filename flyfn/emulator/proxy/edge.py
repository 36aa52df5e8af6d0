"""The local Fly Proxy's client connections: uvicorn's HTTP/1.1 protocol (h11) with Fly-like
idle and header timeouts, so that idle and slow-header connections are closed as Fly closes them.

uvicorn alone closes a keep-alive connection only after a response, and never one that is opened
and left silent or fed its request headers a byte at a time. `edge_protocol` returns the protocol
class `flyfn dev` serves the proxy with: a connection is closed once it has been idle for
`idle_timeout` seconds (before its first request and between requests), and once a request's
headers have taken `header_timeout` seconds to arrive.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HEADER_TIMEOUT", "IDLE_TIMEOUT", "edge_protocol"]

# Fly closes idle connections to public services after 60 seconds ("idle TCP connections are
# closed automatically after 60 seconds", Fly's services reference).
IDLE_TIMEOUT = 60.0
# Fly documents no header timeout; a client trickling its headers a byte at a time is never idle,
# so the whole header gets the idle timeout's budget.
HEADER_TIMEOUT = 60.0


def edge_protocol(
    idle_timeout: float = IDLE_TIMEOUT, header_timeout: float = HEADER_TIMEOUT
) -> type[H11Protocol]:
    """An h11 protocol class for uvicorn (`Config(http=...)`) with these timeouts; serve it with
    `timeout_keep_alive` set to `idle_timeout` so the idle time between requests is the same."""

    class EdgeProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # Idle before the first request, like between requests (uvicorn's keep-alive timer).
            self.timeout_keep_alive_task = self.loop.call_later(
                idle_timeout, self.timeout_keep_alive_handler
            )

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self._header_timer is None:  # the first bytes of a request's headers
                    self._header_timer = self.loop.call_later(header_timeout, self._too_slow)
            else:
                self._cancel_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._cancel_header_timer()

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

    return EdgeProtocol
