"""Views for the test project; the routing tests decide which are serverless."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse


def plain(request: HttpRequest) -> HttpResponse:
    return HttpResponse("plain")
