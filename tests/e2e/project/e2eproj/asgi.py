"""ASGI entry point of the end-to-end test project (what every Machine process serves)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "e2eproj.settings")

if os.environ.get("FLYFN_GROUP") == "broken":
    # A function Machine whose command fails: the e2e tests expect the local fallback.
    raise SystemExit("e2eproj: Machines of the 'broken' group refuse to boot")

application = get_asgi_application()
