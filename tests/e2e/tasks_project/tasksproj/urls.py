"""URLs of the e2e tasks project."""

from __future__ import annotations

from django.urls import include, path

from . import views

urlpatterns = [
    path("enqueue/<int:n>/", views.enqueue),
    path("naps/<int:n>/<int:deferred>/<int:seconds>/", views.enqueue_naps),
    path("results/", views.results),
    path("", include("flyfn.tasks.urls")),
]
