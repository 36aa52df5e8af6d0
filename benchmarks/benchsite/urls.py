"""URLs of the benchmark project, namespaced `bench:` (the blog's setting names `app:name`)."""

from __future__ import annotations

from django.urls import URLPattern, include, path

from benchmarks.benchsite import views

bench_patterns: list[URLPattern] = [
    path("direct/", views.direct, name="direct"),
    path("fn/", views.fn, name="fn"),
]

urlpatterns = [path("", include((bench_patterns, "bench")))]
