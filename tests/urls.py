"""URLs of the test project."""

from __future__ import annotations

from django.urls import path

from tests.testapp import views

urlpatterns = [
    path("plain/", views.plain, name="plain"),
]
