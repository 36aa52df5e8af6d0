"""Settings of the end-to-end test project: flyfn routing, no database."""

from __future__ import annotations

SECRET_KEY = "flyfn-e2e-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "e2eproj.urls"
INSTALLED_APPS = ["flyfn", "e2eproj"]
MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
DATABASES: dict[str, dict[str, str]] = {}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
FLYFN = {
    "GROUPS": {
        # Generous timeouts: a cold Django boot on a loaded 2-core CI box is slow.
        # E2E_GROUP_ENV comes from fly.toml's [env] on the app Machine and is forwarded.
        "default": {"replay_timeout": "30s", "autostop": "stop", "env": ["E2E_GROUP_ENV"]},
        "burst": {"replay_timeout": "30s", "autostop": "stop"},
        # Up to 3 Machines of 2 requests each: a burst spreads, a trickle stays on the first.
        "elastic": {
            "replay_timeout": "30s",
            "max_machines": 3,
            "concurrency": {"soft_limit": 2, "hard_limit": 6},
        },
        # One Machine kept started (Fly's min_machines_running): never stopped when idle.
        "warm": {"replay_timeout": "30s", "keep_warm": 1},
        # Its Machines cannot boot (asgi.py refuses): requests fall back to the app Machine.
        "broken": {"replay_timeout": "10s", "fallback": "local"},
    }
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
