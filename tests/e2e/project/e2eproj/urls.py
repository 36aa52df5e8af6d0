"""URLs of the end-to-end test project."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("plain/", views.plain, name="plain"),
    path("environment/", views.environment, name="environment"),
    path("environment/serverless/", views.serverless_environment, name="serverless_environment"),
    path("square/<int:n>/", views.square, name="square"),
    path("burst/<int:n>/", views.burst, name="burst"),
    path("elastic/<int:n>/", views.elastic, name="elastic"),
    path("warm/", views.warm, name="warm"),
    path("broken/", views.broken, name="broken"),
    path("big/", views.big, name="big"),
    path("upload/", views.upload, name="upload"),
]
