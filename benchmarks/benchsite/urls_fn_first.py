"""The benchmark project's URLs with the serverless view's pattern first (see `urls`)."""

from __future__ import annotations

from benchmarks.benchsite.urls import bench_urls, direct, fn

urlpatterns = bench_urls(fn, direct)
