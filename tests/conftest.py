"""Shared pytest fixtures of flyfn's test suite (one section per area; add yours below)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from flyfn.emulator.api import EmulatorApp, MachinesEmulator, create_app
from flyfn.machines.client import AsyncMachinesClient

# -- Machines API emulator (owner: emulator-api) -------------------------------------------------

EMULATOR_TOKEN = "emulator-test-token"
EMULATOR_APP = "testapp"
EMULATOR_BASE_URL = "http://machines.emulator"


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def emulator() -> AsyncIterator[MachinesEmulator]:
    """A fresh state-only emulator; its background transitions are cancelled afterwards."""
    emu = MachinesEmulator(default_app=EMULATOR_APP)
    try:
        yield emu
    finally:
        await emu.aclose()


@pytest.fixture
def emulator_app(emulator: MachinesEmulator) -> EmulatorApp:
    return create_app(emulator, token=EMULATOR_TOKEN)


@pytest.fixture
async def emulator_http(emulator_app: EmulatorApp) -> AsyncIterator[httpx.AsyncClient]:
    """Raw HTTP to the emulator in process (ASGI), authorised."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=emulator_app),
        base_url=EMULATOR_BASE_URL,
        headers={"Authorization": f"Bearer {EMULATOR_TOKEN}"},
    ) as client:
        yield client


@pytest.fixture
async def emulator_client(emulator_app: EmulatorApp) -> AsyncIterator[AsyncMachinesClient]:
    """The real AsyncMachinesClient talking to the emulator in process (ASGI)."""
    async with AsyncMachinesClient(
        EMULATOR_APP,
        api_token=EMULATOR_TOKEN,
        api_hostname=EMULATOR_BASE_URL,
        transport=httpx.ASGITransport(app=emulator_app),
    ) as client:
        yield client


@pytest.fixture
def emulator_server() -> Iterator[str]:
    """The emulator served by uvicorn in a thread on a free loopback port; yields its base URL.

    The emulator lives in the server thread's event loop: talk to it over HTTP only.
    """
    import uvicorn

    port = free_loopback_port()
    app = create_app(MachinesEmulator(default_app=EMULATOR_APP), token=EMULATOR_TOKEN)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="emulator-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the emulator server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
