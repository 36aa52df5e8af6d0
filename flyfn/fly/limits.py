"""Fly's limits: what Fly Proxy replays and buffers, what the Machines API pages and waits, and the
guest sizes Fly accepts (its machine-sizing guide)."""

from __future__ import annotations

from typing import Literal

__all__ = [
    "EDGE_BUFFER_LIMIT",
    "GUEST_MB_STEP",
    "MAX_PAGE_SIZE",
    "MAX_REPLAYS",
    "MAX_WAIT_TIMEOUT",
    "MEMORY_MB_PER_CPU",
    "MEMORY_MB_STEP",
    "REPLAY_BODY_LIMIT",
    "CpuCount",
    "CpuKind",
]

# Fly Proxy cannot replay a request whose body is larger than 1 MB.
REPLAY_BODY_LIMIT = 1_000_000
# Fly's edge buffers a request body up to 10 MB, to replay or retry it; beyond that buffering
# stops, and a request that then needs a replay or a retry fails with PA01 (Fly's error codes).
EDGE_BUFFER_LIMIT = 10_000_000
# Replays of one request; one more is PA02.
MAX_REPLAYS = 10
# The Machines API lists at most this many items a page.
MAX_PAGE_SIZE = 1000
# The Machines API's `wait` blocks 60 s at most.
MAX_WAIT_TIMEOUT = 60
# A guest's CPUs: their kind, their count.
CpuKind = Literal["shared", "performance"]
CpuCount = Literal[1, 2, 4, 8, 16]
# A guest's memory is a multiple of a step of its CPU kind (256 MB for shared CPUs, 1024 MB for
# performance ones), within a range per CPU of that kind. GUEST_MB_STEP divides every step.
GUEST_MB_STEP = 256
MEMORY_MB_STEP: dict[str, int] = {"shared": 256, "performance": 1024}
MEMORY_MB_PER_CPU: dict[str, tuple[int, int]] = {
    "shared": (256, 2048),
    "performance": (2048, 8192),
}
