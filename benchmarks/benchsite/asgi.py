"""ASGI entry point of the benchmark project (what the emulated Machines run)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.benchsite.settings")

application = get_asgi_application()
