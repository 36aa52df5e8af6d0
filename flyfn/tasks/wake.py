"""The wake view: a function Machine runs its group's due tasks while this request is open.

`POST /_flyfn/tasks/<group>/` is a serverless view of the group (one view per group, made and
marked `@fly_serverless` by `wake_view`; `flyfn.tasks.urls` routes to them), so an app Machine
replays it to a function Machine like any other. Wakes are signed with `SECRET_KEY` by the
dispatcher; anything else is refused. The answer streams a heartbeat line every `HEARTBEAT`
seconds while tasks run and ends with a JSON summary line. The run does not depend on the
request: it goes on if the connection is cut, and the Machine stays up (autostop off for task
groups) until its keeper finds the group drained (flyfn.tasks.keeper).

An app Machine checks a wake's signature before it replays it (`refuse_unsigned`, the view's
`flyfn_gate`, which the middleware calls): an unsigned POST never starts a function Machine. Each
signed wake carries a nonce, recorded in the database by the function Machine that accepts it: the
same header is accepted once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from datetime import timedelta
from functools import partial
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_not_required  # Django >= 5.1
from django.core import signing
from django.core.handlers.wsgi import WSGIRequest
from django.db import IntegrityError, transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from flyfn import process_state
from flyfn.decorators import fly_serverless
from flyfn.machine_role import current_role
from flyfn.names import validate_group_name
from flyfn.tasks import runner
from flyfn.tasks.keeper import keeper
from flyfn.tasks.models import WakeNonce

__all__ = ["HEARTBEAT", "WAKE_HEADER", "refuse_unsigned", "sign_wake", "wake_view"]

logger = logging.getLogger("flyfn.tasks")

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
process_state.register(__name__, "wake views per task group")


def sign_wake(group: str) -> str:
    """The wake header's value for `group`: the group and a fresh nonce, signed and timed."""
    return signing.TimestampSigner(salt=_SALT).sign(f"{group}/{secrets.token_hex(16)}")


def _nonce(value: str, group: str) -> str | None:
    """The nonce of a wake header signed for `group` within WAKE_MAX_AGE, or None."""
    try:
        signed = signing.TimestampSigner(salt=_SALT).unsign(value, max_age=WAKE_MAX_AGE)
    except signing.BadSignature:
        return None
    signed_group, _, nonce = signed.partition("/")
    return nonce if signed_group == group and nonce else None


def refuse_unsigned(group: str, request: HttpRequest) -> HttpResponse | None:
    """403 for a request that is not a wake signed for `group` (checked before any replay)."""
    if _nonce(request.META.get(_WAKE_META, ""), group) is None:
        return _text(403, "not a signed flyfn wake")
    return None


def _first_use(nonce: str) -> bool:
    """Record `nonce` as used; whether it was not already (expired records are dropped)."""
    now = timezone.now()
    WakeNonce.objects.filter(expires_at__lt=now).delete()
    try:
        with transaction.atomic():
            until = now + timedelta(seconds=WAKE_MAX_AGE)
            WakeNonce.objects.create(nonce=nonce, expires_at=until)
    except IntegrityError:
        return False
    return True


def _text(status: int, message: str) -> HttpResponse:
    return HttpResponse(
        message + "\n",
        status=status,
        content_type="text/plain; charset=utf-8",
        headers={"Cache-Control": "private, no-store"},
    )


def _start(group: str) -> tuple[str, Callable[[], int]]:
    """The Machine's id, and what runs the group's due work: the run belongs to the Machine, not
    to the request. If the connection that woke it is cut (the app Machine that sent it stopped),
    the run goes on, and the keeper runs what comes due next and stops the Machine once drained
    (flyfn.tasks.keeper)."""
    machine = runner.worker_id()
    run = partial(runner.run_until_idle, group, machine=machine, budget=WAKE_BUDGET)
    return machine, partial(keeper().run, group, run)


def _summary(group: str, machine: str, result: Callable[[], int]) -> bytes:
    """The wake's last line, from the run's `result` (which raises what the run raised)."""
    try:
        summary: dict[str, object] = {"done": True, "ran": result(), "machine": machine}
    except Exception:
        # Logged here; the answer goes back through Fly Proxy and carries no error text.
        logger.exception("flyfn tasks: the wake of group %s failed", group)
        summary = {"done": False, "error": "see the Machine's log", "machine": machine}
    return (json.dumps(summary) + "\n").encode()


async def _run(group: str) -> AsyncIterator[bytes]:
    """The wake's answer under ASGI: a heartbeat line every `HEARTBEAT` seconds, then a summary."""
    machine, work = _start(group)
    running = asyncio.get_running_loop().run_in_executor(None, work)
    yield f"flyfn tasks: running group {group} on {machine}\n".encode()
    while True:
        done, _ = await asyncio.wait({running}, timeout=HEARTBEAT)
        if done:
            break
        yield b".\n"
    yield _summary(group, machine, running.result)


def _run_blocking(group: str) -> Iterator[bytes]:
    """`_run` for a WSGI server: Django reads an async iterator whole before a WSGI server sends
    any of it, so Fly Proxy would see no heartbeat (its idle timeout is 60 s). A plain iterator,
    fed by a thread of the run's own, reaches it line by line."""
    machine, work = _start(group)
    future: concurrent.futures.Future[int] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(work())
        except Exception as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name=f"flyfn-wake-{group}", daemon=True).start()
    yield f"flyfn tasks: running group {group} on {machine}\n".encode()
    while True:
        try:
            future.exception(timeout=HEARTBEAT)
        except concurrent.futures.TimeoutError:
            yield b".\n"
            continue
        break
    yield _summary(group, machine, future.result)


def wake_view(group: str) -> Callable[[HttpRequest], Coroutine[Any, Any, HttpResponseBase]]:
    """The wake view of `group`: one object per group, made on first use and marked serverless
    for POST in `group` (`@fly_serverless`) as it is made."""
    validate_group_name(group)
    with _views_lock:
        view = _views.get(group)
        if view is not None:
            return view

        async def wake(request: HttpRequest) -> HttpResponseBase:
            if request.method != "POST":
                return _text(405, "wakes are POST requests")
            nonce = _nonce(request.META.get(_WAKE_META, ""), group)
            if nonce is None:
                return _text(403, "not a signed flyfn wake")
            if current_role().is_main:
                # The replay could not happen and the group's fallback ran the view here: tasks
                # run on function Machines only; the dispatcher tries again.
                return _text(503, f"no function Machine of group {group!r} reached; retry")
            if not await sync_to_async(_first_use)(nonce):
                return _text(403, "this wake was already used")
            # Under WSGI a plain iterator, or the heartbeats would be read whole before sending.
            lines = _run_blocking(group) if isinstance(request, WSGIRequest) else _run(group)
            response = StreamingHttpResponse(lines, content_type="text/plain")
            response["Cache-Control"] = "private, no-store"
            return response

        wake.__name__ = wake.__qualname__ = f"wake_{group.replace('-', '_')}"
        # A wake carries its own signature: no CSRF token, no login (Django >= 5.1's
        # LoginRequiredMiddleware would answer it with a redirect the dispatcher retries forever).
        view = login_not_required(csrf_exempt(wake))
        view.flyfn_gate = partial(refuse_unsigned, group)  # type: ignore[attr-defined]
        _views[group] = fly_serverless(["POST"], group=group)(view)
        return view
