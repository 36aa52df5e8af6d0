"""When the local Fly Proxy sends a request again after a delivery broke off, and how often.

As reverse proxies do, a request is sent again only when that cannot repeat an effect: nothing
was sent (the connection was refused), or the request is safe (RFC 9110: GET, HEAD, OPTIONS) and
its body fully buffered (a streamed body cannot be sent twice). Anything else fails with PU02.
"""

from __future__ import annotations

import httpx

from flyfn.emulator.proxy.errors import ProxyError

__all__ = ["MAX_RESENDS", "RESEND_PAUSE", "resend_reason", "resendable"]

# How many times one delivery is attempted again before it counts as unreachable.
MAX_RESENDS = 5
# Seconds between attempts, times the attempt's number.
RESEND_PAUSE = 0.05
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def resendable(method: str, body_complete: bool) -> bool:
    """Whether a request may be delivered again after its first delivery broke off: safe (it can
    have had no effects) and fully buffered (a streamed body cannot be sent twice)."""
    return method.upper() in _SAFE_METHODS and body_complete


def resend_reason(exc: httpx.HTTPError, machine_id: str, method: str, body_complete: bool) -> str:
    """What went wrong with a delivery that may be sent again (for the message once retries run
    out), or a `ProxyError` (PU02) when it failed in a way that must not be retried."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return f"refused the connection ({exc})"  # nothing was sent
    # The connection died before any response: a keep-alive connection the Machine closed as it
    # stopped, or a process killed mid-request. A safe request is sent again (the Machine is
    # restarted or the fallback applies); any other may already have had effects, so it fails.
    if isinstance(
        exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
    ) and resendable(method, body_complete):
        return f"closed the connection ({type(exc).__name__})"
    raise ProxyError(
        "PU02", 502, f"failed to complete the request to Machine {machine_id}: {exc}"
    ) from exc
