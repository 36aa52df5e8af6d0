"""Where the Machines API is: its public default, Fly's private address, and which addresses may
carry the token over plain http."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["DEFAULT_API_HOSTNAME", "INTERNAL_API_HOST", "api_url", "is_loopback_url", "is_private"]

DEFAULT_API_HOSTNAME = "https://api.machines.dev"
# Fly's private network answers the Machines API here (port 4280), over plain http.
INTERNAL_API_HOST = "_api.internal"


def is_loopback_url(url: str) -> bool:
    """Whether `url` names this computer (`localhost` or a loopback address)."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    if host is None:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_private(url: str) -> bool:
    """Whether `url` stays off the internet: Fly's private network (`_api.internal`) or this
    computer. Plain http carries the token safely only there."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    return host == INTERNAL_API_HOST or is_loopback_url(url)


def api_url(hostname: str) -> str:
    """`hostname` as a base URL without a trailing slash; a bare host gets http when private
    (`_api.internal:4280`, `localhost`), else https."""
    hostname = hostname.strip().rstrip("/")
    if "://" not in hostname:
        scheme = "http" if is_private(f"//{hostname}") else "https"
        hostname = f"{scheme}://{hostname}"
    return hostname
