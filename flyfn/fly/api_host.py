"""Where the Machines API is: its public default, Fly's private address, and which addresses may
carry the token over plain http."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = [
    "CLEAR_TEXT_HINT",
    "DEFAULT_API_HOSTNAME",
    "INTERNAL_API_HOST",
    "api_url",
    "clear_text_problem",
    "in_clear",
    "is_loopback_url",
    "is_private",
]

DEFAULT_API_HOSTNAME = "https://api.machines.dev"
# Fly's private network answers the Machines API here (port 4280), over plain http.
INTERNAL_API_HOST = "_api.internal"


CLEAR_TEXT_HINT = (
    "Use https:// (https://api.machines.dev), or http://_api.internal:4280 inside Fly's network."
)


def is_loopback_url(url: str) -> bool:
    """Whether `url` names this computer: `localhost` or a literal loopback address.

    Not `*.localhost`: RFC 6761 says such names resolve to loopback, but a resolver may not honour
    it and ask DNS instead, so only the names that cannot leave this computer count."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def is_private(url: str) -> bool:
    """Whether `url` stays off the internet: Fly's private network (`_api.internal`) or this
    computer. Plain http carries the token safely only there."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    return host == INTERNAL_API_HOST or is_loopback_url(url)


def in_clear(url: str) -> bool:
    """Whether the API token would travel in clear text to `url`: plain http to a host that is
    neither Fly's private network (`_api.internal`) nor this computer. The one rule behind system
    check flyfn.E011 and the client's refusal."""
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        return False
    return scheme.lower() == "http" and not is_private(url)


def clear_text_problem(url: str) -> str | None:
    """Why `url` may not carry the token (for messages), or None when it may."""
    if not in_clear(url):
        return None
    return (
        f"{url!r} is plain http to a host that is neither Fly's private network (_api.internal) "
        "nor this computer, so the Machines API token would travel in clear text"
    )


def api_url(hostname: str) -> str:
    """`hostname` as a base URL without a trailing slash; a bare host gets http when private
    (`_api.internal:4280`, `localhost`), else https."""
    hostname = hostname.strip().rstrip("/")
    if "://" not in hostname:
        scheme = "http" if is_private(f"//{hostname}") else "https"
        hostname = f"{scheme}://{hostname}"
    return hostname
