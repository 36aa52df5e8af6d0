"""A tiny plain-ASGI app the supervisor and proxy tests run as Machine processes.

It boots in a fraction of Django's time. `ECHO_EXIT_ON_BOOT=<code>` makes the process exit at
import (a Machine whose command fails). Paths: `/big?n=<bytes>` streams n bytes, `/slow?s=<secs>`
answers after a pause, `/replay-self` answers `fly-replay` to this very Machine unless it is
already the replay, anything else echoes the request as JSON (with `peak`, the most requests this
process has held at once). Every answer names the Machine it ran on.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

if os.environ.get("ECHO_EXIT_ON_BOOT"):
    print("echo app: refusing to boot", flush=True)
    sys.exit(int(os.environ["ECHO_EXIT_ON_BOOT"]))

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_CHUNK = b"x" * 65536
_load = {"now": 0, "peak": 0}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    _load["now"] += 1
    _load["peak"] = max(_load["peak"], _load["now"])
    try:
        await _serve(scope, receive, send)
    finally:
        _load["now"] -= 1


async def _serve(scope: Scope, receive: Receive, send: Send) -> None:
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    machine = os.environ.get("FLY_MACHINE_ID", "")
    if scope["path"] == "/big":
        remaining = int(query.get("n", "0"))
        headers = [(b"content-type", b"application/octet-stream")]
        headers.append((b"content-length", str(remaining).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        while remaining > 0:
            chunk = _CHUNK[: min(remaining, len(_CHUNK))]
            remaining -= len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    replayed = any(name == b"fly-replay-src" for name, _ in scope["headers"])
    if scope["path"] == "/replay-self" and not replayed:
        # No content-length: chunked, as Django's empty replay responses are under uvicorn.
        headers = [(b"fly-replay", f"instance={machine}".encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await asyncio.sleep(0.005)  # the end of the body arrives after the headers, as it may
        await send({"type": "http.response.body", "body": b""})
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(float(query.get("s", "0.5")))
    payload = {
        "machine": machine,
        "path": scope["path"],
        "env": {k: v for k, v in os.environ.items() if k.startswith(("FLY_", "FLYFN_", "PRIMARY"))},
        "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
        "body_len": size,
        "peak": _load["peak"],
    }
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})
