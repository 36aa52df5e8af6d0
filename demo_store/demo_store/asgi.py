"""ASGI entry point of the demo store (what uvicorn serves on every Machine)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_store.settings")

application = get_asgi_application()
