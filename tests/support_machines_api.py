"""The Machines API emulator as the tests reach it: its test app and token, a loopback URL answered
in process (or by uvicorn in a thread for other processes), and the calls flyfn made to it."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from flyfn.emulator.api import MachinesEmulator, RateLimit, create_app
from flyfn.machines.models import Machine
from tests.support_emulator import VirtualClock, in_process
from tests.support_wait import wait_for

EMULATOR_TOKEN = "emulator-test-token"
EMULATOR_APP = "testapp"
EMULATOR_BASE_URL = "http://machines.emulator"
# Fly's Machines API spec, three versions, part of the repository (see its README).
FLY_SPEC_DIR = Path(__file__).resolve().parent / "fly_spec"


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    port = free_loopback_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="emulator-uvicorn", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), what="the server", step=0.02)
        if not server.started:
            raise RuntimeError("the server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# Requests carrying this header are the test's own inspection, not counted as API calls.
_INSPECT_HEADER = "x-flyfn-test-inspect"


@dataclass
class MachinesAPI:
    """The emulator at a loopback URL, with every API call flyfn made to it (method, path)."""

    url: str
    calls: list[tuple[str, str]]
    http: httpx.Client
    emulator: MachinesEmulator | None = None  # in this process (regions refusing creates)

    def count(self, method: str, pattern: str = r"/v1/apps/[^/]+/machines") -> int:
        """How many calls with `method` had a path fully matching `pattern`."""
        regex = re.compile(pattern)
        return sum(1 for m, path in list(self.calls) if m == method and regex.fullmatch(path))

    @property
    def list_calls(self) -> int:
        return self.count("GET")

    @property
    def create_calls(self) -> int:
        return self.count("POST")

    def machines(self, app: str = EMULATOR_APP, *, group: str | None = None) -> list[Machine]:
        """The app's live Machines (optionally one flyfn group's), read without being counted."""
        params = {"metadata.flyfn_group": group} if group else {}
        response = self.http.get(f"/v1/apps/{app}/machines", params=params)
        response.raise_for_status()
        return [Machine.model_validate(m) for m in response.json()]

    def create(self, app: str = EMULATOR_APP, **body: Any) -> Machine:
        response = self.http.post(f"/v1/apps/{app}/machines", json=body)
        response.raise_for_status()
        return Machine.model_validate(response.json())

    def destroy(self, machine_id: str, app: str = EMULATOR_APP) -> None:
        self.http.delete(f"/v1/apps/{app}/machines/{machine_id}", params={"force": "true"})

    def flyfn_settings(
        self, image: str = "registry.fly.io/testapp:deployment-1", **extra: Any
    ) -> dict[str, Any]:
        """A FLYFN setting that points flyfn at this emulator."""
        return {
            "APP_NAME": EMULATOR_APP,
            "API_HOSTNAME": self.url,
            "API_TOKEN": EMULATOR_TOKEN,
            "IMAGE_REF": image,
            **extra,
        }


def _recording(app: Any, inspector: Any, calls: list[tuple[str, str]]) -> Any:
    """`app`, counting its calls; the test's own inspection goes to `inspector` (same emulator, no
    rate limits), so that it neither counts nor takes flyfn's share of the limits."""

    async def recorder(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if (_INSPECT_HEADER.encode(), b"1") in scope.get("headers", []):
                await inspector(scope, receive, send)
                return
            calls.append((scope["method"], scope["path"]))
        await app(scope, receive, send)

    return recorder


@contextmanager
def serve_machines_api(
    token: str = EMULATOR_TOKEN,
    *,
    rate_limits: bool = True,
    on_socket: bool = False,
    wall_clock: Callable[[], float] = time.time,
) -> Iterator[MachinesAPI]:
    """A fresh emulator accepting `token`, counting calls; within Fly's rate limits unless a focused
    test passes `rate_limits=False`. Its loopback URL is answered in process (every httpx client of
    this process reaches it, no server runs; the rate limits' time passes as flyfn's clients wait
    out a 429), or with `on_socket` by uvicorn in a thread (for other processes: e2e tests only).
    `wall_clock` times its Machines' events (a test's own clock drives Machine time)."""
    calls: list[tuple[str, str]] = []
    emulator = MachinesEmulator(default_app=EMULATOR_APP, clock=wall_clock)
    # In process, Fly's limits run on a clock the Machines clients' Retry-After waits advance.
    clock = None if on_socket else VirtualClock()
    limits = RateLimit(clock=clock.now) if clock else RateLimit()
    app = create_app(emulator, token=token, rate_limit=limits if rate_limits else None)
    inspector = create_app(emulator, token=token, rate_limit=None)
    recording = _recording(app, inspector, calls)
    with contextlib.ExitStack() as stack:
        if on_socket:
            url = stack.enter_context(serve_in_thread(recording))
        else:
            url = f"http://127.0.0.1:{free_loopback_port()}"
            loop = stack.enter_context(in_process(url, recording, clock))
            # Its transitions run on that loop: cancelled there, before the loop stops.
            stack.callback(lambda: loop.submit(emulator.aclose()).result(10))
        http = stack.enter_context(
            httpx.Client(
                base_url=url,
                headers={"Authorization": f"Bearer {token}", _INSPECT_HEADER: "1"},
                timeout=10,
            )
        )
        yield MachinesAPI(url, calls, http, emulator)
