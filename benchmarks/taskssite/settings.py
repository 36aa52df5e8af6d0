"""Settings of the tasks benchmark: backend "default" is flyfn's, "db" django-tasks-db's own
(run by its db_worker); both store their tasks in one SQLite file in BENCH_TASKS_DIR."""

from __future__ import annotations

import os
from pathlib import Path

SECRET_KEY = "flyfn-benchmarks-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "benchmarks.taskssite.urls"
INSTALLED_APPS = ["flyfn", "flyfn.tasks", "django_tasks_db"]
MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": Path(os.environ.get("BENCH_TASKS_DIR", "/nonexistent")) / "tasks.sqlite3",
        "OPTIONS": {"timeout": 60, "init_command": "PRAGMA journal_mode=WAL"},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
LOGGING_CONFIG = None
TASKS = {
    "default": {"BACKEND": "flyfn.tasks.FlyMachinesBackend", "OPTIONS": {"group": "bench"}},
    "db": {"BACKEND": "django_tasks_db.DatabaseBackend"},
}
FLYFN = {"GROUPS": {"bench": {"machines": 1, "autostop": "stop", "replay_timeout": "60s"}}}
