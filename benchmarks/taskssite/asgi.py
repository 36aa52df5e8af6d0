"""ASGI entry point of the tasks benchmark project (every Machine of `flyfn dev` serves it)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.taskssite.settings")

application = get_asgi_application()
