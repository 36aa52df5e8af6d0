"""URLs of the benchmark project, namespaced `bench:` (the blog's setting names `app:name`).

Django resolves a path by trying patterns in order, so a later pattern's requests also pay for the
failed matches before it. `urlconf_first` builds the same urlconf with one pattern moved first: the
middleware benchmark runs each handler under the one whose first pattern is its own.
"""

from __future__ import annotations

import types

from django.urls import URLPattern, URLResolver, include, path

from benchmarks.benchsite import views

PATTERNS: dict[str, URLPattern] = {
    "direct": path("direct/", views.direct, name="direct"),
    "fn": path("fn/", views.fn, name="fn"),
    # One path per item: requests whose paths differ, as /receipts/<id>.pdf do.
    "direct_item": path("direct/<int:n>/", views.direct_item, name="direct_item"),
    "fn_item": path("fn/<int:n>/", views.fn_item, name="fn_item"),
}


def bench_urls(*patterns: URLPattern) -> list[URLResolver]:
    return [path("", include((list(patterns), "bench")))]


def urlconf_first(name: str) -> types.ModuleType:
    """A urlconf (a module object, as ROOT_URLCONF may be) with pattern `name` first."""
    module = types.ModuleType(f"{__name__}[{name}]")
    first = PATTERNS[name]
    module.urlpatterns = bench_urls(first, *(p for p in PATTERNS.values() if p is not first))  # type: ignore[attr-defined]
    return module


# The elastic benchmark's views, after the others (they never run in the middleware benchmark).
ELASTIC = [
    path("wait/elastic/", views.wait_elastic, name="wait_elastic"),
    path("wait/fixed/", views.wait_fixed, name="wait_fixed"),
    path("wait/trickle/", views.wait_trickle, name="wait_trickle"),
    # The keep_warm benchmark's: one group scaled to zero, one kept warm.
    path("first/cold/", views.first_cold, name="first_cold"),
    path("first/warm/", views.first_warm, name="first_warm"),
]

# The regions benchmark's view: `fn` in a group whose Machines live in the primary region.
REGIONS = [path("fn/primary/", views.fn_primary, name="fn_primary")]

urlpatterns = bench_urls(*PATTERNS.values(), *ELASTIC, *REGIONS)
