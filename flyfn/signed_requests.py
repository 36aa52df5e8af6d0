"""What a Machine checks and records of a request it replays or receives replayed: the body binding
a signed state covers, the state's check (its failures logged once a minute at most), and the
record of issued replays that explains a `fly-replay-failed` (`flyfn.replay_record`)."""

from __future__ import annotations

import logging
import time

from django.conf import settings as django_settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, RawPostDataException

from flyfn import process_state
from flyfn.fly.replay import ReplayHeaderError, ReplaySource
from flyfn.machine_role import current_env
from flyfn.replay_record import FALLBACK_RETURN_MARGIN, ReplayRecord, machine_record, replay_key
from flyfn.replay_state import (
    STATE_BODY_DIGEST_LIMIT,
    StateCheck,
    body_binding,
    sign_state,
    verify_state,
)

__all__ = [
    "explained_fallback",
    "issue_replay",
    "report_unverified",
    "request_body_binding",
    "request_state",
]

logger = logging.getLogger("flyfn.middleware")

# A replayed request whose state does not verify is logged at most once per this many seconds.
_UNVERIFIED_LOG_INTERVAL = 60.0
_unverified_logged_at = float("-inf")
process_state.register(__name__, "when an unverified replayed state was last logged")

# SECRET_KEY as last read: a read through Django's lazy settings costs about a third of a
# microsecond, on every replay (and every record look-up) otherwise.
_secret_key: str | bytes | None = None


def _forget_secret_key() -> None:
    global _secret_key
    _secret_key = None


process_state.register(
    __name__, "SECRET_KEY as last read", settings=_forget_secret_key, watched={"SECRET_KEY"}
)


def _secret() -> str | bytes:
    """`settings.SECRET_KEY`, read again once it changes (Django's `setting_changed`); Django
    refuses an empty one, and an empty one is never kept."""
    global _secret_key
    secret = _secret_key
    if secret is None:
        secret = _secret_key = django_settings.SECRET_KEY
    return secret


def request_body_binding(request: HttpRequest) -> str:
    """What a signed state binds of this request's body (`body_binding`): its digest when small,
    else its declared length. The app Machine and the function Machine compute it alike."""
    length = request.META.get("CONTENT_LENGTH")
    if not length:  # the usual replayed request (GET): no body to read
        return ""
    try:
        size = int(length)
    except ValueError:
        return "?"  # never what an app Machine signs: it does not replay such a request
    if size > STATE_BODY_DIGEST_LIMIT:
        return body_binding(size)
    try:
        return body_binding(size, request.body)
    except (RequestDataTooBig, RawPostDataException):
        # DATA_UPLOAD_MAX_MEMORY_SIZE below the body, or a middleware before this one already
        # streamed it: the length is all there is (and the same on both sides).
        return body_binding(size)


def issue_replay(
    request: HttpRequest, group: str, body: str, hop: int, timeout: float, *, signed: bool
) -> str | None:
    """Put a replay of this request to `group` (`body`: its body binding) on this Machine's
    record, where it explains one fallback for the replay's `timeout` and the way back; its state,
    issued now and `hop` function Machines far, or None when replays are not `signed`. The key
    and the request's fields are read once for both."""
    secret = _secret()
    method, path = request.method or "GET", request.path
    query = request.META.get("QUERY_STRING", "")
    now = time.time()
    state = None
    if signed:
        state = sign_state(secret, method, path, group, now, query=query, body=body, hop=hop)
    key = replay_key(secret, method, path, query, body)
    _replay_record().add(key, timeout + FALLBACK_RETURN_MARGIN, now)
    return state


def request_state(
    request: HttpRequest, source: str, group: str, max_age: float, body: str
) -> StateCheck | None:
    """The check of the state `fly-replay-src` (`source`) carries for this request to `group`;
    None when it carries none. An unreadable header is a state that does not verify."""
    try:
        state = ReplaySource.parse(source).state
    except ReplayHeaderError:
        state = ""
    if state is None:
        return None
    return verify_state(
        state,
        django_settings.SECRET_KEY,
        request.method or "GET",
        request.path,
        group,
        max_age=max_age,
        fallback_secrets=django_settings.SECRET_KEY_FALLBACKS,
        query=request.META.get("QUERY_STRING", ""),
        body=body,
    )


def report_unverified(group: str, reason: str | None) -> None:
    """Warn that a replayed request's state does not verify, once a minute at most."""
    global _unverified_logged_at
    now = time.monotonic()
    if now - _unverified_logged_at < _UNVERIFIED_LOG_INTERVAL:
        return
    _unverified_logged_at = now
    logger.warning(
        "flyfn: a replayed request of group %r carries a state this Machine cannot verify (%s): "
        "answered 503 with Retry-After. After a SECRET_KEY rotation this lasts until the app "
        "Machines update this Machine (logged once a minute at most).",
        group,
        reason,
    )


def _replay_record() -> ReplayRecord:
    """This Machine's record of issued replays (shared by its worker processes; in-process off
    Fly): a `fly-replay-failed` is only believed for one of its entries, once."""
    return machine_record(current_env().machine_id)


def _record_key(request: HttpRequest, body: str) -> str:
    """The record's key of this request (method, path, query string, body binding)."""
    return replay_key(
        _secret(),
        request.method or "GET",
        request.path,
        request.META.get("QUERY_STRING", ""),
        body,
    )


def explained_fallback(request: HttpRequest, body: str) -> bool:
    """Whether a replay this Machine issued explains this `fly-replay-failed` request: one
    unexpired entry of the same method, path, query string and body is consumed (so it explains
    no other). `fly-replay-failed` carries no state, and `fly-request-id` is not relied on (that
    Fly Proxy keeps it across the replay is not confirmed)."""
    return _replay_record().take(_record_key(request, body))
