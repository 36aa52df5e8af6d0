"""Views of the end-to-end test project: each answer says which Machine and group ran it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from flyfn import fly_serverless

_CHUNK = b"x" * 65536


def _where() -> dict[str, str | None]:
    return {"machine": os.environ.get("FLY_MACHINE_ID"), "group": os.environ.get("FLYFN_GROUP")}


# What the environment test asks each Machine about: set only in the shell that ran `flyfn dev`,
# in fly.toml's [env] (forwarded to function Machines by the group's "env"), as an app secret,
# and by Fly on Fly Launch Machines only.
_ENVIRONMENT = ("E2E_SHELL_ONLY", "E2E_GROUP_ENV", "E2E_SECRET", "FLY_PROCESS_GROUP")


def environment(request: HttpRequest) -> HttpResponse:
    return JsonResponse({**{name: os.environ.get(name) for name in _ENVIRONMENT}, **_where()})


@fly_serverless(methods=["GET"])
def serverless_environment(request: HttpRequest) -> HttpResponse:
    return environment(request)


def plain(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"view": "plain", **_where()})


@fly_serverless(methods=["GET"])
def square(request: HttpRequest, n: int) -> HttpResponse:
    return JsonResponse({"view": "square", "result": n * n, **_where()})


@fly_serverless(methods=["GET"], group="burst")
def burst(request: HttpRequest, n: int) -> HttpResponse:
    return JsonResponse({"view": "burst", "result": n + 1, **_where()})


@fly_serverless(methods=["GET"], group="elastic")
async def elastic(request: HttpRequest, n: int) -> HttpResponse:
    """With `?gate=<dir>`: leaves a mark in it, then waits (at most 120 s) for `<dir>/go`, so that
    a test holds a burst in flight until every request of it has arrived somewhere."""
    gate = request.GET.get("gate")
    if gate:
        Path(gate, f"arrived-{n}").touch()
        deadline = time.monotonic() + 120
        while not Path(gate, "go").exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    return JsonResponse({"view": "elastic", "result": n, **_where()})


@fly_serverless(methods=["GET"], group="warm")
def warm(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"view": "warm", **_where()})


@fly_serverless(methods=["GET"], group="broken")
def broken(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"view": "broken", **_where()})


def big(request: HttpRequest) -> StreamingHttpResponse:
    size = int(request.GET.get("n", "0"))

    def chunks() -> Iterator[bytes]:
        remaining = size
        while remaining > 0:
            chunk = _CHUNK[: min(remaining, len(_CHUNK))]
            remaining -= len(chunk)
            yield chunk

    response = StreamingHttpResponse(chunks(), content_type="application/octet-stream")
    response["Content-Length"] = str(size)
    return response


def upload(request: HttpRequest) -> HttpResponse:
    """An ordinary (not serverless) upload: its body read as a stream, as large as it comes."""
    digest = hashlib.sha256()
    size = 0
    while chunk := request.read(65536):
        digest.update(chunk)
        size += len(chunk)
    return JsonResponse({"view": "upload", "size": size, "sha256": digest.hexdigest(), **_where()})
