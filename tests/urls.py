"""URLs of the test project."""

from __future__ import annotations

from django.urls import include, path

from tests.testapp import views

urlpatterns = [
    path("plain/", views.plain, name="plain"),
    path("routing/", include(("tests.testapp.routing", "routing"))),
]
