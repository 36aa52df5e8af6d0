"""Fixtures of the reliability tests: an emulator with a sentinel token, a pool with faults."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from flyfn import pool
from flyfn.conf import FlyfnSettings
from flyfn.emulator.api import MachinesEmulator, create_app
from flyfn.machines import AsyncMachinesClient
from flyfn.pool import PoolManager, set_manager
from tests.conftest import _INSPECT_HEADER, EMULATOR_APP, MachinesAPI, _recording, serve_in_thread
from tests.reliability.faults import FaultTransport

# Distinctive, so a leak into any log line, page or header cannot go unnoticed.
SENTINEL_TOKEN = "fm2_Reliability-Sentinel-Q7x9Zk"


@pytest.fixture
def sentinel_api() -> Iterator[MachinesAPI]:
    """The emulator on loopback, accepting only SENTINEL_TOKEN, counting flyfn's calls."""
    calls: list[tuple[str, str]] = []
    app = create_app(MachinesEmulator(default_app=EMULATOR_APP), token=SENTINEL_TOKEN)
    with (
        serve_in_thread(_recording(app, calls)) as url,
        httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {SENTINEL_TOKEN}", _INSPECT_HEADER: "1"},
            timeout=10,
        ) as http,
    ):
        yield MachinesAPI(url, calls, http)


@pytest.fixture
def faulty_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[PoolManager, FaultTransport]]:
    """A fresh installed PoolManager whose Machines API traffic goes through a FaultTransport.

    The client's retry sleeps and the pool's failure backoff are made tiny: the tests check what
    requests get, not how long flyfn waits.
    """
    inner = httpx.AsyncHTTPTransport()
    faults = FaultTransport(inner)
    make_client = pool.new_client

    def quick_client(
        settings: FlyfnSettings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> AsyncMachinesClient:
        client = make_client(settings, transport=transport)

        async def no_sleep(seconds: float) -> None:
            await asyncio.sleep(0)

        client._sleep = no_sleep
        return client

    monkeypatch.setattr(pool, "new_client", quick_client)
    monkeypatch.setattr(pool, "FAILURE_BACKOFF", 0.01)
    manager = PoolManager(transport=faults)
    previous = set_manager(manager)
    try:
        yield manager, faults
    finally:
        set_manager(previous)
        manager.submit(inner.aclose()).result(5)
        manager.close()
