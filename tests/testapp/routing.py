"""Serverless views of the test project for the routing tests (mounted under /routing/)."""

from __future__ import annotations

import asyncio
import threading

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import path
from django.views import View

from flyfn import fly_serverless


@fly_serverless(["GET"], group="pdf")
def pdf(request: HttpRequest) -> HttpResponse:
    return HttpResponse("pdf")


@fly_serverless(["GET"], group="pdf")
def pages(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(iter([b"page 1\n", b"page 2\n"]))


@fly_serverless(["GET", "POST"])
async def report(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"report {len(request.body)}")


@fly_serverless(methods=["POST"], group="pdf")
class Upload(View):
    def post(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse(f"upload {len(request.body)}")

    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("upload form")


class Hold:
    """Keeps `held` / `aheld` running until the test releases them (concurrency tests)."""

    entered = threading.Event()
    release = threading.Event()
    async_release: asyncio.Event | None = None

    @classmethod
    def reset(cls) -> None:
        cls.entered.clear()
        cls.release.clear()
        cls.async_release = None


@fly_serverless
def held(request: HttpRequest) -> HttpResponse:
    Hold.entered.set()
    Hold.release.wait(30)
    return HttpResponse("held")


@fly_serverless
async def aheld(request: HttpRequest) -> HttpResponse:
    Hold.entered.set()
    if Hold.async_release is not None:
        await asyncio.wait_for(Hold.async_release.wait(), 30)
    return HttpResponse("held")


urlpatterns = [
    path("pdf/", pdf, name="pdf"),
    path("pages/", pages, name="pages"),
    path("report/", report, name="report"),
    path("upload/", Upload.as_view(), name="upload"),
    path("held/", held, name="held"),
    path("aheld/", aheld, name="aheld"),
]
