"""How a request goes wrong in the local Fly Proxy: the exceptions its parts raise to each other."""

from __future__ import annotations

__all__ = ["ClientGone", "Full", "HttpsRedirect", "ProxyError", "Unreachable", "unbuffered"]


class ProxyError(Exception):
    """A request the proxy answers itself, with a Fly-style error code."""

    def __init__(self, code: str, status: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.status = status
        self.message = message


class Unreachable(Exception):
    """No connection could be made to a destination (a replay failure: fallback applies)."""

    def __init__(self, reason: str, detail: str, target: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason  # timeout | retries_exhausted | no_candidate
        self.detail = detail
        self.target = target


class Full(Exception):
    """Every candidate Machine is at its hard limit: the request waits for room."""


class HttpsRedirect(Exception):
    """The request came in over plain http to a port with `force_https`: answered 301."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


class ClientGone(Exception):
    """The client disconnected before its request was read."""


def unbuffered(edge_buffer_limit: int, what: str) -> str:
    """The PA01 message for a body too large for the edge to have kept (`what`: replayed...)."""
    return (
        f"the request body is over {edge_buffer_limit} bytes: the edge stopped "
        f"buffering it, so it cannot be {what}"
    )
