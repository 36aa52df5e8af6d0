"""A fault-injecting httpx transport for the Machines API: 429 / 500 / timeout / bad JSON / refused.

`FaultTransport` wraps the transport flyfn's pool really uses and, for the operations chosen with
`inject()`, answers with a fault instead. Faults that a real API could produce after doing the work
(500, a read timeout, a garbled body) are injected *after* forwarding the request, so the operation
takes effect and only its answer is lost: the harshest case for a caller that must converge.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Literal, get_args

import httpx

Operation = Literal["list", "create", "wait", "start", "other"]
Fault = Literal["429", "500", "timeout", "malformed", "refused"]

OPERATIONS: tuple[Operation, ...] = ("list", "create", "wait", "start")
FAULTS: tuple[Fault, ...] = get_args(Fault)
# Faults raised before the request reaches the API: the operation never happens.
NOT_FORWARDED: frozenset[Fault] = frozenset({"429", "refused"})

_MACHINES = re.compile(r"^/v1/apps/[^/]+/machines/?$")
_ACTION = re.compile(r"^/v1/apps/[^/]+/machines/[^/]+/(wait|start)$")


def operation_of(request: httpx.Request) -> Operation:
    """Which Machines API operation a request is (the ones the fault matrix covers)."""
    path = request.url.path
    if _MACHINES.match(path):
        if request.method == "GET":
            return "list"
        if request.method == "POST":
            return "create"
    action = _ACTION.match(path)
    if action is not None:
        if action.group(1) == "wait" and request.method == "GET":
            return "wait"
        if action.group(1) == "start" and request.method == "POST":
            return "start"
    return "other"


class FaultTransport(httpx.AsyncBaseTransport):
    """Forwards to `inner` except for the operations given a fault; counts what it saw."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.faults: dict[Operation, Fault] = {}
        self.seen: Counter[Operation] = Counter()
        self.hits: Counter[Operation] = Counter()

    def inject(self, operation: Operation, fault: Fault) -> None:
        self.faults[operation] = fault

    def heal(self) -> None:
        self.faults.clear()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        operation = operation_of(request)
        self.seen[operation] += 1
        fault = self.faults.get(operation)
        if fault is None:
            return await self.inner.handle_async_request(request)
        self.hits[operation] += 1
        if fault == "refused":
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if fault == "429":
            return httpx.Response(
                429,
                headers={"retry-after": "1"},  # honoured after the heal: kept short
                json={"error": "rate limit exceeded", "status": "unknown"},
                request=request,
            )
        # The API did the work; its answer is lost or garbled on the way back.
        answer = await self.inner.handle_async_request(request)
        await answer.aread()
        await answer.aclose()
        if fault == "timeout":
            raise httpx.ReadTimeout("timed out while reading the response", request=request)
        if fault == "500":
            return httpx.Response(
                500, json={"error": "internal error", "status": "unknown"}, request=request
            )
        return httpx.Response(
            200,
            headers={"content-type": "application/json"},
            content=b'{"id": "d8e7", "state": [',  # cut off mid-document
            request=request,
        )

    async def aclose(self) -> None:
        # The owner closes `inner` (the pool manager may close its client more than once).
        return None
