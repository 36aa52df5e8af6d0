"""Fixtures of the reliability tests: an emulator with a sentinel token, a pool with faults."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from flyfn.pool.manager import PoolManager
from tests.reliability.faults import FaultTransport
from tests.support_machines_api import MachinesAPI, serve_machines_api
from tests.support_pools import installed, quick_client

# Distinctive, so a leak into any log line, page or header cannot go unnoticed.
SENTINEL_TOKEN = "fm2_Reliability-Sentinel-Q7x9Zk"


@pytest.fixture
def sentinel_api() -> Iterator[MachinesAPI]:
    """The emulator on loopback, accepting only SENTINEL_TOKEN, counting flyfn's calls."""
    with serve_machines_api(SENTINEL_TOKEN) as api:
        yield api


@pytest.fixture
def faulty_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[PoolManager, FaultTransport]]:
    """A fresh installed PoolManager whose Machines API traffic goes through a FaultTransport.

    The client's retry sleeps and the pool's failure backoff are made tiny: the tests check what
    requests get, not how long flyfn waits.
    """
    inner = httpx.AsyncHTTPTransport()
    faults = FaultTransport(inner)

    # Where the pools look them up.
    monkeypatch.setattr("flyfn.pool.manager.new_client", quick_client)
    monkeypatch.setattr("flyfn.pool.cache.FAILURE_BACKOFF", 0.01)
    manager = PoolManager(transport=faults)
    try:
        with installed(manager):
            yield manager, faults
    finally:
        manager.submit(inner.aclose()).result(5)
        manager.close()
