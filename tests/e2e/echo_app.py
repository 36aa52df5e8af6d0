"""A tiny plain-ASGI app the supervisor and proxy tests run as Machine processes.

It boots in a fraction of Django's time. `ECHO_EXIT_ON_BOOT=<code>` makes the process exit at
import (a Machine whose command fails). Every answer names the Machine it ran on.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

if os.environ.get("ECHO_EXIT_ON_BOOT"):
    print("echo app: refusing to boot", flush=True)
    sys.exit(int(os.environ["ECHO_EXIT_ON_BOOT"]))

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    payload = {
        "machine": os.environ.get("FLY_MACHINE_ID"),
        "path": scope["path"],
        "env": {k: v for k, v in os.environ.items() if k.startswith(("FLY_", "FLYFN_", "PRIMARY"))},
        "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
        "body_len": len(body),
    }
    data = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})
