"""What a response through FlyReplayMiddleware is: the view's output, a replay, or a clean 503."""

from __future__ import annotations

from typing import Literal

from django.http import HttpResponseBase

from flyfn.fly.replay import FlyReplay, ReplayHeaderError

Answer = Literal["view", "replay", "elsewhere", "unavailable", "broken"]


def classify(response: HttpResponseBase, view_body: bytes) -> Answer:
    """`broken` for anything a client should never get (500, a traceback, a half answer)."""
    content = getattr(response, "content", b"")
    if b"Traceback" in content:
        return "broken"
    if response.status_code == 503:
        retry_after = response.get("Retry-After", "")
        return "unavailable" if retry_after.isdigit() and int(retry_after) > 0 else "broken"
    if response.status_code != 200:
        return "broken"
    header = response.get("fly-replay")
    if header is None:
        return "view" if content == view_body else "broken"
    if content:
        return "broken"
    try:
        replay = FlyReplay.parse(header)
    except ReplayHeaderError:
        return "broken"
    if replay.elsewhere and not (replay.instance or replay.app):
        return "elsewhere"
    return "replay" if replay.instance or replay.app else "broken"
