"""Views of the soak project: each answer is a function of `n` and says which group ran it."""

from __future__ import annotations

import os

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse

from flyfn import fly_serverless


def _answer(view: str, value: int) -> HttpResponse:
    return JsonResponse({"view": view, "value": value, "group": os.environ.get("FLYFN_GROUP")})


def plain(request: HttpRequest, n: int) -> HttpResponse:
    return _answer("plain", n)


def _times_three(n: int) -> int:
    """`n * 3`, computed by the shared database when there is one (the soak: PostgreSQL)."""
    if connection.settings_dict["ENGINE"] == "django.db.backends.dummy":
        return n * 3
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s * 3", [n])
        (value,) = cursor.fetchone()
    return int(value)


@fly_serverless(group="soak")
def soak(request: HttpRequest, n: int) -> HttpResponse:
    return _answer("soak", _times_three(n))


@fly_serverless(group="strict")
def strict(request: HttpRequest, n: int) -> HttpResponse:
    return _answer("strict", n + 7)
