"""The Machines API emulator in its own process, counting every API call it answers.

`FLY_API_TOKEN=T python -m benchmarks.apiserver --port P` serves flyfn.emulator.api (state only: no
Machine processes) behind a counter. `GET /_bench/calls` returns {"total": n, "by_route": {...}};
`POST /_bench/reset` zeroes it. Requests carrying `x-bench-uncounted: 1` (the harness's own
look-ups) are not counted. `ApiServer` is the harness side: start, count, list, stop.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import httpx

from benchmarks.runner import LOOPBACK, child_env, free_port, spawned, wait_http

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNCOUNTED = {"x-bench-uncounted": "1"}
_MACHINE_ID = re.compile(r"^(/v1/apps/[^/]+/machines)/[^/]+")


def route_of(method: str, path: str) -> str:
    """`GET /v1/apps/a/machines/9a2c/wait` -> `GET /v1/apps/{app}/machines/{id}/wait`."""
    path = _MACHINE_ID.sub(r"\1/{id}", path)
    path = re.sub(r"^/v1/apps/[^/]+", "/v1/apps/{app}", path)
    return f"{method} {path}"


class CallCounter:
    """ASGI middleware: counts /v1 calls and answers the /_bench endpoints itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.calls: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/_bench/calls":
            body = {"total": sum(self.calls.values()), "by_route": dict(self.calls)}
            await _json(send, body)
            return
        if path == "/_bench/reset":
            self.calls.clear()
            await _json(send, {"total": 0})
            return
        headers = dict(scope.get("headers") or [])
        if path.startswith("/v1/") and headers.get(b"x-bench-uncounted") != b"1":
            self.calls[route_of(scope["method"], path)] += 1
        await self.app(scope, receive, send)


async def _json(send: Send, body: object) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def build_app(token: str) -> CallCounter:
    from flyfn.emulator.api import MachinesEmulator, create_app

    return CallCounter(create_app(MachinesEmulator(), token=token))


class ApiServer:
    """A running counting emulator: its URL and the harness's look-ups (uncounted)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self._client = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {token}", **UNCOUNTED},
            timeout=10.0,
        )

    def __repr__(self) -> str:
        return f"ApiServer(url={self.url!r})"

    def calls(self) -> int:
        total: int = self._client.get("/_bench/calls").json()["total"]
        return total

    def calls_by_route(self) -> dict[str, int]:
        routes: dict[str, int] = self._client.get("/_bench/calls").json()["by_route"]
        return routes

    def reset(self) -> None:
        self._client.post("/_bench/reset").raise_for_status()

    def machines(self, app: str) -> list[dict[str, Any]]:
        response = self._client.get(f"/v1/apps/{app}/machines")
        response.raise_for_status()
        machines: list[dict[str, Any]] = response.json()
        return machines

    def stop_machine(self, app: str, machine_id: str) -> None:
        self._client.post(f"/v1/apps/{app}/machines/{machine_id}/stop", json={}).raise_for_status()

    def close(self) -> None:
        self._client.close()


@contextmanager
def api_server(token: str = "bench-token") -> Iterator[ApiServer]:  # noqa: S107
    """Start the counting emulator on a free loopback port; stop it on exit."""
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    argv = [sys.executable, "-m", "benchmarks.apiserver", "--port", str(port)]
    # The token goes by environment, never on a command line that `ps` shows.
    with spawned(argv, env=child_env({"FLY_API_TOKEN": token})) as proc:
        wait_http(f"{url}/_bench/calls", timeout=30, proc=proc)
        server = ApiServer(url, token)
        try:
            yield server
        finally:
            server.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvicorn

    token = os.environ["FLY_API_TOKEN"]
    uvicorn.run(build_app(token), host=LOOPBACK, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
