"""flyfn.registry: registering; lookups by callable, view class, wrapper and url name.

This module is also the urlconf of its own tests (`ROOT_URLCONF="tests.test_registry"`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.http import HttpRequest, HttpResponse
from django.test import override_settings
from django.urls import URLPattern, URLResolver, include, path
from django.views import View

from flyfn.registry import (
    HTTP_METHODS,
    Registry,
    ServerlessView,
    iter_url_names,
    iter_url_routes,
    normalize_methods,
    registry,
    view_name,
)


def receipt(request: HttpRequest) -> HttpResponse:
    return HttpResponse("receipt")


def report(request: HttpRequest) -> HttpResponse:
    return HttpResponse("report")


def unnamed(request: HttpRequest) -> HttpResponse:
    return HttpResponse("unnamed")


def label(request: HttpRequest) -> HttpResponse:
    return HttpResponse("label")


class Invoice(View):
    template_name = "invoice.html"

    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("invoice")


report_patterns: list[URLPattern | URLResolver] = [path("report/", report, name="report")]
shop_patterns: list[URLPattern | URLResolver] = [
    path("receipt/", receipt, name="receipt"),
    path("invoice/", Invoice.as_view(), name="invoice"),
    path("deeper/", include((report_patterns, "reports"))),
]

# The most common Django pattern: include() of an app's urls without any namespace.
label_patterns: list[URLPattern | URLResolver] = [path("label/", label, name="label")]
plain_patterns: list[URLPattern | URLResolver] = [path("inner/", include(label_patterns))]

urlpatterns = [
    path("shop/", include((shop_patterns, "shop"), namespace="store")),
    path("plain/", include(plain_patterns)),
    path("top/", report, name="top"),
    path("unnamed/", unnamed),
]


@pytest.fixture
def reg() -> Registry:
    return Registry()


# --------------------------------------------------------------------------- helpers


def test_methods_are_normalised_and_head_follows_get() -> None:
    assert normalize_methods(["get"]) == frozenset({"GET", "HEAD"})
    assert normalize_methods("post") == frozenset({"POST"})
    assert normalize_methods(("PUT", "patch", "put")) == frozenset({"PUT", "PATCH"})
    assert frozenset({"GET", "POST", "DELETE", "OPTIONS"}) <= HTTP_METHODS


@pytest.mark.parametrize("methods", [["GTE"], [], ["GET", 1], ["CONNECT"], [""]])
def test_bad_methods_are_rejected(methods: list[Any]) -> None:
    with pytest.raises(ValueError, match="HTTP method"):
        normalize_methods(methods)


# --------------------------------------------------------------------------- registering


def test_register_and_lookup_a_function(reg: Registry) -> None:
    entry = reg.register(receipt, ["GET"], "pdf")
    assert entry == ServerlessView(frozenset({"GET", "HEAD"}), "pdf", "tests.test_registry.receipt")
    assert reg.lookup(receipt) is entry
    assert reg.lookup(report) is None
    assert entry.allows("HEAD")
    assert not entry.allows("POST")


def test_a_registered_class_is_found_through_its_as_view_results(reg: Registry) -> None:
    entry = reg.register(Invoice, ["GET"], "default")
    assert reg.lookup(Invoice.as_view()) is entry
    assert reg.lookup(Invoice.as_view(template_name="x")) is entry

    class Subclass(Invoice):
        pass

    # Only the marked class itself: a subclass is a different view.
    assert reg.lookup(Subclass.as_view()) is None


def test_decorators_stacked_above_are_seen_through(reg: Registry) -> None:
    entry = reg.register(receipt, ["GET"], "default")

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return view(*args, **kwargs)

        return wrapper

    assert reg.lookup(decorate(decorate(receipt))) is entry
    assert reg.lookup(decorate(report)) is None


def test_registering_again_adds_methods_but_not_another_group(reg: Registry) -> None:
    reg.register(receipt, ["GET"], "pdf")
    assert reg.register(receipt, ["POST"], "pdf").methods == frozenset({"GET", "HEAD", "POST"})
    assert reg.lookup(receipt) is not None
    assert reg.lookup(receipt).methods == frozenset({"GET", "HEAD", "POST"})  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="already serverless in group 'pdf'"):
        reg.register(receipt, ["GET"], "default")


def test_lookup_results_are_refreshed_after_changes(reg: Registry) -> None:
    assert reg.lookup(receipt) is None  # memoised miss...
    entry = reg.register(receipt)
    assert reg.lookup(receipt) is entry  # ...forgotten on register
    reg.unregister(receipt)
    assert reg.lookup(receipt) is None


def test_unhashable_callables_are_looked_up_without_error(reg: Registry) -> None:
    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, request: HttpRequest) -> HttpResponse:
            return HttpResponse()

    reg.set_declared({"top": ServerlessView(frozenset({"GET"}), "default", "top")})
    assert reg.lookup(Unhashable()) is None


def test_groups_and_listing(reg: Registry) -> None:
    reg.register(receipt, ["GET"], "pdf")
    reg.set_declared({"shop:x": ServerlessView(frozenset({"GET"}), "reports", "shop:x")})
    assert reg.groups() == {"pdf", "reports"}
    assert len(reg) == 2
    assert list(reg.decorated()) == [receipt]
    assert list(reg.declared()) == ["shop:x"]


# --------------------------------------------------------------------------- url names


@override_settings(ROOT_URLCONF="tests.test_registry")
def test_iter_url_names_covers_namespaces() -> None:
    names = dict(iter_url_names())
    assert names["store:receipt"] is receipt
    assert names["shop:receipt"] is receipt  # the application namespace works too
    assert names["store:reports:report"] is report
    assert names["shop:reports:report"] is report
    assert names["top"] is report
    assert "unnamed" not in {name.rsplit(":", 1)[-1] for name in names}


@override_settings(ROOT_URLCONF="tests.test_registry")
def test_iter_url_names_walks_includes_without_a_namespace() -> None:
    names = list(iter_url_names())
    assert ("label", label) in names  # two plain include()s deep, under its own name
    assert not any(name.endswith(":label") for name, _ in names)
    assert len(names) == len(dict(names))  # each name once


@override_settings(ROOT_URLCONF="tests.test_registry")
def test_a_declared_view_inside_a_plain_include_is_found(reg: Registry) -> None:
    entry = ServerlessView(frozenset({"GET", "HEAD"}), "default", "label")
    reg.set_declared({"label": entry})
    assert reg.lookup(label) is entry  # resolved through the urlconf
    assert reg.lookup(label, "label") is entry


@override_settings(ROOT_URLCONF="tests.test_registry")
def test_declared_views_match_by_url_name_or_resolved_callback(reg: Registry) -> None:
    entry = ServerlessView(frozenset({"GET", "HEAD"}), "pdf", "store:receipt")
    reg.set_declared({"store:receipt": entry})
    assert reg.lookup(receipt, "store:receipt") is entry
    assert reg.lookup_url_name("store:receipt") is entry
    # With a url name, only that name counts: the same callable under another name is ordinary.
    assert reg.lookup(report, "top") is None
    # Without one, the declared names are resolved through the urlconf.
    assert reg.lookup(receipt) is entry
    assert reg.lookup(report) is None


@override_settings(ROOT_URLCONF="tests.test_registry")
def test_declared_class_based_view_by_name(reg: Registry) -> None:
    entry = ServerlessView(frozenset({"GET", "HEAD"}), "default", "shop:invoice")
    reg.set_declared({"shop:invoice": entry})
    (callback,) = [cb for name, cb in iter_url_names() if name == "shop:invoice"]
    assert reg.lookup(callback) is entry
    assert reg.lookup(callback, "store:invoice") is None  # a different name than declared


def test_forget_urls_resolves_again(reg: Registry) -> None:
    entry = ServerlessView(frozenset({"GET"}), "default", "top")
    reg.set_declared({"top": entry})
    with override_settings(ROOT_URLCONF="tests.urls"):
        reg.forget_urls()
        assert reg.lookup(report) is None  # no "top" in that urlconf
    with override_settings(ROOT_URLCONF="tests.test_registry"):
        reg.forget_urls()
        assert reg.lookup(report) is entry


# --------------------------------------------------------------------------- settings → registry


@pytest.fixture
def _urlconf() -> Iterator[None]:
    with override_settings(ROOT_URLCONF="tests.test_registry"):
        yield


@pytest.mark.usefixtures("_urlconf")
def test_settings_declared_views_reach_the_process_registry() -> None:
    assert registry.lookup_url_name("store:receipt") is None
    with override_settings(
        FLYFN={"VIEWS": {"store:receipt": ["GET"]}},
        FLY_MACHINES_SERVERLESS_FUNCTIONS=[("top", ("POST",))],
    ):
        found = registry.lookup(receipt, "store:receipt")
        assert found is not None
        assert found.methods == frozenset({"GET", "HEAD"})
        top = registry.lookup_url_name("top")
        assert top is not None
        assert top.methods == frozenset({"POST"})
        assert registry.lookup(report) is top  # by callback, through the urlconf
    assert registry.lookup_url_name("store:receipt") is None
    assert registry.lookup_url_name("top") is None


def test_invalid_settings_leave_no_declared_views() -> None:
    with override_settings(FLYFN={"VIEWS": {"store:receipt": ["GTE"]}}):
        assert registry.lookup_url_name("store:receipt") is None


# --------------------------------------------------------------------------- gaps found by mutmut


def test_helper_errors_say_what_is_allowed() -> None:
    with pytest.raises(TypeError, match=r"methods must be a list of HTTP methods.*got 5"):
        normalize_methods(5)  # type: ignore[arg-type]
    allowed = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, TRACE"
    with pytest.raises(ValueError, match=f"unknown HTTP method 'GTE'; allowed: {allowed}$"):
        normalize_methods(["GTE"])
    with pytest.raises(ValueError, match=r"^no HTTP method given; pass e\.g\. methods=\['GET'\]$"):
        normalize_methods([])


class CallableView:
    """A view that is an instance: it has a module (its class's) but no qualified name."""

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse()


class NoModuleView(CallableView):
    __module__ = None  # type: ignore[assignment]


def test_view_names() -> None:
    assert view_name(receipt) == "tests.test_registry.receipt"
    assert view_name(Invoice) == "tests.test_registry.Invoice"
    assert view_name(Invoice.as_view()) == "tests.test_registry.Invoice"
    assert view_name(CallableView()) == "tests.test_registry.CallableView"
    assert view_name(NoModuleView()) == "?.NoModuleView"


def test_a_fresh_registry_is_empty(reg: Registry) -> None:
    assert len(reg) == 0
    assert reg.declared() == {}
    assert reg.decorated() == {}
    assert reg.groups() == frozenset()
    assert reg.lookup(receipt, "shop:receipt") is None
    assert reg.lookup_url_name("shop:receipt") is None
    reg.unregister(receipt)  # forgetting an unknown view is fine


def test_register_names_the_view_in_its_error(reg: Registry) -> None:
    reg.register(receipt, ["GET"], "pdf")
    with pytest.raises(ValueError, match=r"^tests\.test_registry\.receipt is already serverless"):
        reg.register(receipt, ["GET"], "other")


def test_lookups_are_memoised_until_the_next_change(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    walks: list[object] = []
    find = reg._find_decorated

    def counting(view: object) -> ServerlessView | None:
        walks.append(view)
        return find(view)

    monkeypatch.setattr(reg, "_find_decorated", counting)
    for change in (
        lambda: None,
        lambda: reg.register(receipt),
        lambda: reg.unregister(receipt),
        lambda: reg.set_declared({}),
        reg.forget_urls,
    ):
        change()
        walks.clear()
        reg.lookup(report)
        reg.lookup(report)
        assert walks == [report]  # walked once, then answered from the memo


def test_an_unhashable_wrapper_of_a_registered_view_is_seen_through(reg: Registry) -> None:
    entry = reg.register(receipt)

    class Wrapper:
        __hash__ = None  # type: ignore[assignment]

        def __init__(self, wrapped: Callable[..., Any]) -> None:
            self.__wrapped__ = wrapped

    assert reg.lookup(Wrapper(receipt)) is entry
    assert reg.lookup(Wrapper(report)) is None


@override_settings(ROOT_URLCONF="tests.test_registry")
def test_the_urlconf_is_walked_once_for_declared_views(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flyfn.registry as registry_module

    walks: list[None] = []

    def counting(urlconf: str | None = None) -> Iterator[tuple[str, Callable[..., Any]]]:
        walks.append(None)
        return iter_url_names(urlconf)

    monkeypatch.setattr(registry_module, "iter_url_names", counting)
    entry = ServerlessView(frozenset({"GET"}), "default", "top")
    reg.set_declared({"top": entry})
    assert reg.lookup(report) is entry
    assert reg.lookup(receipt) is None
    assert reg.lookup(Invoice.as_view()) is None
    assert len(walks) == 1


@override_settings(ROOT_URLCONF="tests.test_registry")
def test_the_instance_namespace_comes_before_the_application_namespace() -> None:
    # "store" (instance) sorts after "shop" (application): the order is the walk's own.
    names = [name for name, _ in iter_url_names()]
    assert names.index("store:receipt") < names.index("shop:receipt")
    assert names.index("store:reports:report") < names.index("shop:reports:report")
    assert all(name.rsplit(":", 1)[-1] != "None" for name in names)  # unnamed patterns: none


def test_iter_url_routes_gives_each_pattern_once_with_its_route_and_names() -> None:
    routes = {url.route: url for url in iter_url_routes("tests.test_registry")}
    deep = routes["shop/deeper/report/"]
    assert deep.names == ("store:reports:report", "shop:reports:report")  # instance form first
    assert deep.callback is report
    assert routes["plain/inner/label/"].names == ("label",)
    assert routes["unnamed/"].names == ()
    assert len(routes) == len(list(iter_url_routes("tests.test_registry")))


def test_iter_url_names_reads_the_urlconf_it_is_given() -> None:
    names = dict(iter_url_names("tests.test_registry"))  # ROOT_URLCONF is tests.urls
    assert names["top"] is report
    assert "plain" not in names
