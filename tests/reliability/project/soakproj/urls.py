"""URLs of the soak project."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("plain/<int:n>/", views.plain),
    path("soak/<int:n>/", views.soak),
    path("strict/<int:n>/", views.strict),
]
