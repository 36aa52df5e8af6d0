"""WSGI entry point of the demo store (for WSGI servers; Machines use the ASGI app)."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_store.settings")

application = get_wsgi_application()
