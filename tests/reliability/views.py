"""Views of the reliability tests: serverless views that measure how many run at once."""

from __future__ import annotations

import asyncio
import threading
import time

from django.http import HttpRequest, HttpResponse
from django.urls import include, path

from flyfn import fly_serverless
from tests import urls as test_urls

HOLD_SECONDS = 0.2


class Concurrency:
    """How many views run at once, and the most seen (threads and tasks alike)."""

    lock = threading.Lock()
    running = 0
    peak = 0
    ran = 0

    @classmethod
    def reset(cls) -> None:
        with cls.lock:
            cls.running = cls.peak = cls.ran = 0

    @classmethod
    def enter(cls) -> None:
        with cls.lock:
            cls.running += 1
            cls.ran += 1
            cls.peak = max(cls.peak, cls.running)

    @classmethod
    def leave(cls) -> None:
        with cls.lock:
            cls.running -= 1


@fly_serverless(group="flood")
def counted(request: HttpRequest) -> HttpResponse:
    Concurrency.enter()
    try:
        time.sleep(HOLD_SECONDS)
    finally:
        Concurrency.leave()
    return HttpResponse("counted")


@fly_serverless(group="flood")
async def acounted(request: HttpRequest) -> HttpResponse:
    Concurrency.enter()
    try:
        await asyncio.sleep(HOLD_SECONDS)
    finally:
        Concurrency.leave()
    return HttpResponse("counted")


urlpatterns = [
    *test_urls.urlpatterns,
    path(
        "reliability/", include(([path("counted/", counted), path("acounted/", acounted)], "rel"))
    ),
]
