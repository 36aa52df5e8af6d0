"""Views of the reliability tests: serverless views that measure how many run at once."""

from __future__ import annotations

import asyncio
import threading
import time

from django.http import HttpRequest, HttpResponse
from django.urls import include, path

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


def counted(request: HttpRequest) -> HttpResponse:
    Concurrency.enter()
    try:
        time.sleep(HOLD_SECONDS)
    finally:
        Concurrency.leave()
    return HttpResponse("counted")


async def acounted(request: HttpRequest) -> HttpResponse:
    Concurrency.enter()
    try:
        await asyncio.sleep(HOLD_SECONDS)
    finally:
        Concurrency.leave()
    return HttpResponse("counted")


# Made serverless (group "flood") by the flood tests' fixture, only while they run: marked at
# import, they would add a "flood" group to every later test that lists the groups (flyfn prepare).
FLOOD_VIEWS = (counted, acounted)

urlpatterns = [
    *test_urls.urlpatterns,
    path(
        "reliability/", include(([path("counted/", counted), path("acounted/", acounted)], "rel"))
    ),
]
