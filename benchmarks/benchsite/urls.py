"""URLs of the benchmark project, namespaced `bench:` (the blog's setting names `app:name`).

Django resolves a path by trying patterns in order, so the second pattern's requests also pay for
a failed match of the first. `urls_fn_first` lists the same patterns the other way round: the
middleware benchmark runs each handler under the urlconf whose first pattern is its own path.
"""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, include, path

from benchmarks.benchsite import views

direct = path("direct/", views.direct, name="direct")
fn = path("fn/", views.fn, name="fn")


def bench_urls(*patterns: URLPattern) -> list[URLResolver]:
    return [path("", include((list(patterns), "bench")))]


urlpatterns = bench_urls(direct, fn)
