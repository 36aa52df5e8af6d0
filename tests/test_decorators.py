"""@fly_serverless: every form marks the view in the process registry and leaves it unchanged."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory
from django.views import View

import flyfn
from flyfn import fly_serverless
from flyfn.registry import registry


@pytest.fixture
def marked() -> Iterator[list[object]]:
    """Views the test marks; unregistered afterwards so the process registry stays clean."""
    views: list[object] = []
    yield views
    for view in views:
        registry.unregister(view)


def test_public_api() -> None:
    assert flyfn.__all__ == sorted(flyfn.__all__)
    assert "fly_serverless" in flyfn.__all__
    assert flyfn.fly_serverless is fly_serverless


def test_bare_decorator_marks_get_and_head(marked: list[object]) -> None:
    def view(request: HttpRequest) -> HttpResponse:
        return HttpResponse("hi")

    marked.append(view)
    assert fly_serverless(view) is view
    entry = registry.lookup(view)
    assert entry is not None
    assert entry.methods == frozenset({"GET", "HEAD"})
    assert entry.group == "default"
    assert entry.name.endswith("test_bare_decorator_marks_get_and_head.<locals>.view")


def test_methods_and_group(marked: list[object]) -> None:
    @fly_serverless(["post", "PUT"], group="uploads")
    def view(request: HttpRequest) -> HttpResponse:
        return HttpResponse("ok")

    marked.append(view)
    entry = registry.lookup(view)
    assert entry is not None
    assert entry.methods == frozenset({"POST", "PUT"})
    assert entry.group == "uploads"


def test_methods_by_keyword_and_as_a_single_string(marked: list[object]) -> None:
    @fly_serverless(methods="delete")
    def view(request: HttpRequest) -> HttpResponse:
        return HttpResponse("ok")

    marked.append(view)
    assert registry.lookup(view) is not None
    assert registry.lookup(view).methods == frozenset({"DELETE"})  # type: ignore[union-attr]


def test_sync_view_behaviour_is_unchanged(marked: list[object], rf: RequestFactory) -> None:
    def view(request: HttpRequest, pk: int) -> HttpResponse:
        return HttpResponse(f"receipt {pk}")

    decorated = fly_serverless(["GET"])(view)
    marked.append(view)
    assert decorated is view
    assert decorated(rf.get("/"), pk=7).content == b"receipt 7"


async def test_async_view_stays_a_coroutine_function(
    marked: list[object], rf: RequestFactory
) -> None:
    @fly_serverless(["GET"], group="pdf")
    async def view(request: HttpRequest) -> HttpResponse:
        await asyncio.sleep(0)
        return HttpResponse("async")

    marked.append(view)
    assert inspect.iscoroutinefunction(view)
    assert (await view(rf.get("/"))).content == b"async"
    assert registry.lookup(view) is not None


def test_class_based_view_class(marked: list[object], rf: RequestFactory) -> None:
    @fly_serverless(["GET", "POST"], group="pdf")
    class Receipt(View):
        def get(self, request: HttpRequest) -> HttpResponse:
            return HttpResponse("get")

        def post(self, request: HttpRequest) -> HttpResponse:
            return HttpResponse("post")

    marked.append(Receipt)
    assert isinstance(Receipt, type)
    view = Receipt.as_view()
    entry = registry.lookup(view)
    assert entry is not None
    assert entry.group == "pdf"
    assert entry.methods == frozenset({"GET", "HEAD", "POST"})
    response = view(rf.post("/"))
    assert isinstance(response, HttpResponse)
    assert response.content == b"post"


def test_as_view_result(marked: list[object], rf: RequestFactory) -> None:
    class Report(View):
        def get(self, request: HttpRequest) -> HttpResponse:
            return HttpResponse("report")

    view = fly_serverless(Report.as_view())
    marked.append(view)
    assert registry.lookup(view) is not None
    assert registry.lookup(Report.as_view()) is None  # only that one as_view() result
    response = view(rf.get("/"))
    assert isinstance(response, HttpResponse)
    assert response.content == b"report"


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: fly_serverless(["GTE"]), "unknown HTTP method 'GTE'"),
        (lambda: fly_serverless([]), "no HTTP method"),
        (lambda: fly_serverless(["GET"], group="Big Group"), "invalid group name"),
        (lambda: fly_serverless(123), "HTTP methods"),  # type: ignore[call-overload]
    ],
)
def test_mistakes_fail_when_the_decorator_is_created(
    call: Callable[[], Any], fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        call()
    assert str(info.value).startswith("@fly_serverless: ")


def test_decorating_something_that_is_not_a_view() -> None:
    with pytest.raises(TypeError, match="expects a view"):
        fly_serverless(["GET"])("not a view")  # type: ignore[type-var]


def test_a_view_cannot_be_in_two_groups(marked: list[object]) -> None:
    @fly_serverless(group="a")
    def view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    marked.append(view)
    with pytest.raises(ValueError, match="already serverless in group 'a'"):
        fly_serverless(group="b")(view)
