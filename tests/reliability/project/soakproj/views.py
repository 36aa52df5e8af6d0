"""Views of the soak project: each answer is a function of `n` and says which group ran it."""

from __future__ import annotations

import os

from django.http import HttpRequest, HttpResponse, JsonResponse

from flyfn import fly_serverless


def _answer(view: str, value: int) -> HttpResponse:
    return JsonResponse({"view": view, "value": value, "group": os.environ.get("FLYFN_GROUP")})


def plain(request: HttpRequest, n: int) -> HttpResponse:
    return _answer("plain", n)


@fly_serverless(group="soak")
def soak(request: HttpRequest, n: int) -> HttpResponse:
    return _answer("soak", n * 3)


@fly_serverless(group="strict")
def strict(request: HttpRequest, n: int) -> HttpResponse:
    return _answer("strict", n + 7)
