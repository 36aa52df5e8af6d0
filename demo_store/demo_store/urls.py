"""URLs of the demo store project: the store, the admin, and `/` leading to the purchases."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="store:purchase_list", permanent=False)),
    path("purchases/", include("store.urls")),
    path("admin/", admin.site.urls),
    path("", include("flyfn.tasks.urls")),  # the wakes of background tasks' function Machines
]
