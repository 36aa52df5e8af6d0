"""ASGI entry point of the e2e tasks project (what every Machine process serves)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tasksproj.settings")

application = get_asgi_application()
