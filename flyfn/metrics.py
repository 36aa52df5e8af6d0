"""flyfn's Prometheus metrics: the metric objects (off until enabled) and the port serving them.

Recording is off by default and costs one global read per event. `enable()` creates the
metrics; `serve(port)` exposes them for Fly's scraper (`[metrics]` in fly.toml). With several
worker processes, set prometheus-client's `PROMETHEUS_MULTIPROC_DIR` before they start: each
process then records into that directory and the one that binds the port first serves the sum of
all (the others find the port taken and leave it to it).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from flyfn import process_state

__all__ = ["MULTIPROCESS_ENV", "Recorded", "disable", "enable", "recorded", "serve"]

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Cold waits and API calls take from milliseconds (warm API) to tens of seconds (a cold boot
# behind a slow API): buckets cover both ends.
_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

logger = logging.getLogger("flyfn.metrics")


@dataclass(frozen=True, slots=True)
class Recorded:
    """The metrics flyfn records; each event of `flyfn.events` names the one it updates."""

    registry: CollectorRegistry
    replays: Counter
    fallbacks: Counter
    bounces: Counter
    rejected_states: Counter
    cold_waits: Histogram
    pool_changes: Counter
    region_failovers: Counter
    api_calls: Counter
    api_seconds: Histogram
    tasks: Counter


_recorded: Recorded | None = None
_lock = threading.Lock()
_served: tuple[str, int] | None = None
process_state.register(__name__, "the recorded metrics and the port serving them")


def recorded() -> Recorded | None:
    """The metrics when recording is on, else None (the events' one check)."""
    return _recorded


def enable() -> Recorded:
    """Start recording (idempotent: a second call returns the same metrics)."""
    global _recorded
    with _lock:
        if _recorded is None:
            _recorded = _create(CollectorRegistry(auto_describe=True))
        return _recorded


def disable() -> None:
    """Stop recording and forget the values (a served port keeps serving what it had)."""
    global _recorded
    with _lock:
        _recorded = None


def serve(port: int, address: str = "::", *, extra: Collector | None = None) -> bool:
    """Serve the metrics on `address:port` (recording starts too). True when this process
    serves them; False when it cannot: the port is taken by another worker of the same
    multiprocess directory (which then serves every process's values), or by anything else
    (logged as a warning). Calling it again after success is a no-op. `extra` is served beside
    them (metrics computed when scraped)."""
    global _served
    metrics = enable()
    with _lock:
        if _served is not None:
            return True
        registry = metrics.registry
        if os.environ.get(MULTIPROCESS_ENV):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        if extra is not None:
            registry.register(extra)
        try:
            start_http_server(port, addr=address, registry=registry)
        except OSError as exc:
            # Never fatal: the app serves its requests whether or not its metrics can be scraped.
            if exc.errno == errno.EADDRINUSE and os.environ.get(MULTIPROCESS_ENV):
                logger.debug("flyfn: metrics port %d served by another worker", port)
            else:
                logger.warning("flyfn: cannot serve metrics on %s port %d: %s", address, port, exc)
            return False
        _served = (address, port)
        logger.info("flyfn: serving metrics on %s port %d", address, port)
        return True


def _create(registry: CollectorRegistry) -> Recorded:
    def counter(name: str, doc: str, *labels: str) -> Counter:
        return Counter(name, doc, labels, registry=registry)

    def histogram(name: str, doc: str, *labels: str) -> Histogram:
        return Histogram(name, doc, labels, registry=registry, buckets=_DURATION_BUCKETS)

    return Recorded(
        registry=registry,
        replays=counter("flyfn_replays", "Requests replayed to a function Machine.", "group"),
        fallbacks=counter(
            "flyfn_fallbacks",
            "Serverless requests not replayed: run here (local) or answered 503 (unavailable).",
            "group",
            "reason",
            "outcome",
        ),
        bounces=counter(
            "flyfn_bounces",
            "Requests a function Machine sent back with elsewhere=true.",
            "group",
            "reason",
        ),
        rejected_states=counter(
            "flyfn_rejected_states",
            "Replays whose signed state a function Machine could not verify.",
            "group",
            "reason",
        ),
        cold_waits=histogram(
            "flyfn_cold_wait_seconds",
            "Time a request waited for a group without a known Machine.",
            "group",
            "found",
        ),
        pool_changes=counter(
            "flyfn_pool_changes",
            "Function Machines created, updated or destroyed by flyfn.",
            "group",
            "action",
        ),
        region_failovers=counter(
            "flyfn_region_failovers",
            "Changes of the region a multi-region group's requests go to (failovers, returns).",
            "group",
            "home",
            "region",
            "reason",
        ),
        api_calls=counter(
            "flyfn_api_calls",
            "Machines API requests by operation and HTTP status (or timeout/connection).",
            "operation",
            "status",
        ),
        api_seconds=histogram(
            "flyfn_api_call_seconds", "Duration of Machines API requests.", "operation"
        ),
        tasks=counter(
            "flyfn_tasks",
            "Background tasks by group and outcome (enqueued, started, succeeded, failed, "
            "retried).",
            "group",
            "outcome",
        ),
    )
