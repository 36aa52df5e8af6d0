"""URLs of the tasks benchmark project."""

from __future__ import annotations

from django.urls import include, path

from . import views

urlpatterns = [
    path("enqueue/<str:backend>/<int:n>/", views.enqueue),
    path("results/", views.results),
    path("", include("flyfn.tasks.urls")),
]
