"""The wake view: a function Machine runs its group's due tasks while this request is open.

`POST /_flyfn/tasks/<group>/` is a serverless view of the group (one view per group, registered
with flyfn's registry), so an app Machine replays it to a function Machine like any other. Wakes
are signed with `SECRET_KEY` by the dispatcher; anything else is refused. The answer streams a
heartbeat line every `HEARTBEAT` seconds while tasks run (Fly Proxy sees a live request, so the
Machine is not stopped under them) and ends with a JSON summary line.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from functools import partial
from typing import Any

from django.contrib.auth.decorators import login_not_required  # Django >= 5.1
from django.core import signing
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from flyfn.registry import registry, validate_group_name
from flyfn.runtime import current_role

__all__ = ["HEARTBEAT", "WAKE_HEADER", "sign_wake", "wake_view"]

WAKE_HEADER = "X-Flyfn-Wake"
_WAKE_META = "HTTP_" + WAKE_HEADER.upper().replace("-", "_")
_SALT = "flyfn.tasks.wake"
# A signed wake is accepted this long (seconds): a replay reaches its Machine within its timeout.
WAKE_MAX_AGE = 300
HEARTBEAT = 10.0
# One wake runs tasks at most this long, then answers; the dispatcher wakes again if work is left.
WAKE_BUDGET = 600.0

_views: dict[str, Callable[..., Any]] = {}
_views_lock = threading.Lock()


def sign_wake(group: str) -> str:
    """The wake header's value for `group`."""
    return signing.TimestampSigner(salt=_SALT).sign(group)


def _signed_for(value: str, group: str) -> bool:
    try:
        return signing.TimestampSigner(salt=_SALT).unsign(value, max_age=WAKE_MAX_AGE) == group
    except signing.BadSignature:
        return False


def _text(status: int, message: str) -> HttpResponse:
    return HttpResponse(
        message + "\n",
        status=status,
        content_type="text/plain; charset=utf-8",
        headers={"Cache-Control": "private, no-store"},
    )


async def _run(group: str) -> AsyncIterator[bytes]:
    from flyfn.tasks.runner import run_until_idle, worker_id

    stop = threading.Event()
    machine = worker_id()
    loop = asyncio.get_running_loop()
    work = loop.run_in_executor(
        None, partial(run_until_idle, group, stop, machine=machine, budget=WAKE_BUDGET)
    )
    try:
        yield f"flyfn tasks: running group {group} on {machine}\n".encode()
        while True:
            done, _ = await asyncio.wait({work}, timeout=HEARTBEAT)
            if done:
                break
            yield b".\n"
        try:
            summary: dict[str, object] = {"done": True, "ran": work.result(), "machine": machine}
        except Exception as exc:
            summary = {"done": False, "error": f"{type(exc).__name__}: {exc}", "machine": machine}
        yield (json.dumps(summary) + "\n").encode()
    finally:
        stop.set()  # the wake was cut off: claim nothing more (the running task finishes)


def wake_view(group: str) -> Callable[[HttpRequest], Coroutine[Any, Any, HttpResponseBase]]:
    """The wake view of `group` (one object per group, registered as its serverless view)."""
    validate_group_name(group)
    with _views_lock:
        view = _views.get(group)
        if view is not None:
            return view

        async def wake(request: HttpRequest) -> HttpResponseBase:
            if request.method != "POST":
                return _text(405, "wakes are POST requests")
            if not _signed_for(request.META.get(_WAKE_META, ""), group):
                return _text(403, "not a signed flyfn wake")
            if current_role().is_main:
                # The replay could not happen and the group's fallback ran the view here: tasks
                # run on function Machines only; the dispatcher tries again.
                return _text(503, f"no function Machine of group {group!r} reached; retry")
            response = StreamingHttpResponse(_run(group), content_type="text/plain")
            response["Cache-Control"] = "private, no-store"
            return response

        wake.__name__ = wake.__qualname__ = f"wake_{group.replace('-', '_')}"
        # A wake carries its own signature: no CSRF token, no login (Django >= 5.1's
        # LoginRequiredMiddleware would answer it with a redirect the dispatcher retries forever).
        view = login_not_required(csrf_exempt(wake))
        registry.register(view, ["POST"], group)
        _views[group] = view
        return view
