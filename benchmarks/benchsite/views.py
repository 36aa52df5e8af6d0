"""The two views every benchmark compares: identical bodies, one of them serverless; and the
elastic benchmark's waiting view, in three groups."""

from __future__ import annotations

import asyncio
import os

from django.http import HttpRequest, HttpResponse

from flyfn import fly_serverless


def direct(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"direct", content_type="text/plain")


@fly_serverless(methods=["GET"])
def fn(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"fn", content_type="text/plain")


@fly_serverless(methods=["GET"], group="primary")
def fn_primary(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"fn", content_type="text/plain")


def direct_item(request: HttpRequest, n: int) -> HttpResponse:
    return HttpResponse(b"direct", content_type="text/plain")


@fly_serverless(methods=["GET"])
def fn_item(request: HttpRequest, n: int) -> HttpResponse:
    return HttpResponse(b"fn", content_type="text/plain")


# The elastic benchmark's work: a request that waits 200 ms (I/O, not CPU), async so that one
# Machine process serves many at once, as many as its concurrency lets Fly Proxy send it.
WAIT_SECONDS = 0.2


async def _wait() -> HttpResponse:
    await asyncio.sleep(WAIT_SECONDS)
    return HttpResponse(os.environ.get("FLY_MACHINE_ID", ""), content_type="text/plain")


@fly_serverless(methods=["GET"], group="elastic")
async def wait_elastic(request: HttpRequest) -> HttpResponse:
    return await _wait()


@fly_serverless(methods=["GET"], group="fixed")
async def wait_fixed(request: HttpRequest) -> HttpResponse:
    return await _wait()


@fly_serverless(methods=["GET"], group="cold")
def first_cold(request: HttpRequest) -> HttpResponse:
    return HttpResponse(os.environ.get("FLY_MACHINE_ID", ""), content_type="text/plain")


@fly_serverless(methods=["GET"], group="warm")
def first_warm(request: HttpRequest) -> HttpResponse:
    return HttpResponse(os.environ.get("FLY_MACHINE_ID", ""), content_type="text/plain")


@fly_serverless(methods=["GET"], group="trickle")
async def wait_trickle(request: HttpRequest) -> HttpResponse:
    return await _wait()
