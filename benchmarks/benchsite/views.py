"""The two views every benchmark compares: identical bodies, one of them serverless."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from flyfn import fly_serverless


def direct(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"direct", content_type="text/plain")


@fly_serverless(methods=["GET"])
def fn(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"fn", content_type="text/plain")


def direct_item(request: HttpRequest, n: int) -> HttpResponse:
    return HttpResponse(b"direct", content_type="text/plain")


@fly_serverless(methods=["GET"])
def fn_item(request: HttpRequest, n: int) -> HttpResponse:
    return HttpResponse(b"fn", content_type="text/plain")
