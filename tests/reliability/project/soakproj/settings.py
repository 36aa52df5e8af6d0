"""Settings of the soak project: two serverless groups with opposite fallback policies, and the
database every Machine shares (`DATABASE_URL`: PostgreSQL in the soak)."""

from __future__ import annotations

import os

import dj_database_url

SECRET_KEY = "flyfn-soak-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "soakproj.urls"
INSTALLED_APPS = ["flyfn", "soakproj"]
MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
DATABASES = (
    {"default": dj_database_url.parse(os.environ["DATABASE_URL"])}
    if os.environ.get("DATABASE_URL")
    else {}
)
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
FLYFN = {
    # Short cache: the pool notices Machines changed behind its back within the soak.
    "CACHE_TTL": 2,
    "GROUPS": {
        # Generous replay timeouts: cold boots on a loaded 2-core box are slow.
        "soak": {
            "machines": 2,
            "replay_timeout": "20s",
            "fallback": "local",
            "autostop": "suspend",
        },
        "strict": {"machines": 1, "replay_timeout": "20s", "fallback": "error"},
    },
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
