"""Settings of the e2e tasks project: the PostgreSQL database every Machine shares (DATABASE_URL,
an app secret, as on Fly); the tasks' own log in TASKS_E2E_DIR."""

from __future__ import annotations

import os

import dj_database_url

SECRET_KEY = "flyfn-e2e-tasks-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "tasksproj.urls"
INSTALLED_APPS = ["flyfn", "flyfn.tasks", "django_tasks_db", "tasksproj"]
MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"])}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
TASKS = {
    "default": {
        "BACKEND": "flyfn.tasks.FlyMachinesBackend",
        "QUEUES": [],
        # Short leases: a killed Machine's task runs again within seconds. Attempts enough for
        # the chaos, which may hit one task several times.
        "OPTIONS": {
            "group": "work",
            "lease": 3,
            "max_attempts": 25,
            "concurrency": 2,
            "poll": 5,
            "beyond_horizon": "next_wake",
        },
    }
}
FLYFN = {"GROUPS": {"work": {"machines": 2, "replay_timeout": "30s", "autostop": "stop"}}}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
