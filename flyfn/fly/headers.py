"""The HTTP header names of Fly Proxy and of the Machines API (lower case, as HTTP/2 sends them)."""

from __future__ import annotations

__all__ = [
    "FLY_CLIENT_IP",
    "FLY_FORCE_INSTANCE_ID",
    "FLY_FORWARDED_PORT",
    "FLY_PREFERRED_INSTANCE_UNAVAILABLE",
    "FLY_REGION",
    "FLY_REPLAY",
    "FLY_REPLAY_FAILED",
    "FLY_REPLAY_SRC",
    "FLY_REQUEST_ID",
    "LEASE_NONCE",
    "NEXT_CURSOR",
    "REPLAY_JSON_CONTENT_TYPE",
]

# Fly Proxy: the replay a Machine asks for (response), and what it tells the replayed Machine.
FLY_REPLAY = "fly-replay"
FLY_REPLAY_SRC = "fly-replay-src"
FLY_REPLAY_FAILED = "fly-replay-failed"
REPLAY_JSON_CONTENT_TYPE = "application/vnd.fly.replay+json"
# Fly Proxy: request headers only the proxy sets.
FLY_REQUEST_ID = "fly-request-id"
FLY_REGION = "fly-region"
FLY_CLIENT_IP = "fly-client-ip"
FLY_FORWARDED_PORT = "fly-forwarded-port"
FLY_FORCE_INSTANCE_ID = "fly-force-instance-id"
FLY_PREFERRED_INSTANCE_UNAVAILABLE = "fly-preferred-instance-unavailable"
# The Machines API (its answers carry fly-request-id too).
LEASE_NONCE = "fly-machine-lease-nonce"
NEXT_CURSOR = "fly-next-cursor"
