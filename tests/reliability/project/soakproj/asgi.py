"""ASGI entry point of the soak project (what every Machine process serves)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "soakproj.settings")

application = get_asgi_application()
