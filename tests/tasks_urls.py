"""URLs of the test project with flyfn.tasks' wake views (tests/test_tasks.py)."""

from __future__ import annotations

from django.urls import include, path

from tests.urls import urlpatterns as base

urlpatterns = [*base, path("", include("flyfn.tasks.urls"))]
