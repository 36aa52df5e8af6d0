"""Settings of the tasks benchmark: backend "default" is flyfn's, "db" django-tasks-db's own
(run by its db_worker); both store their tasks in one PostgreSQL database, DATABASE_URL (on
Fly a secret: `flyfn dev --secrets-file` gives it to the Machines, the environment to the
commands run beside them)."""

from __future__ import annotations

import os

import dj_database_url

SECRET_KEY = "flyfn-benchmarks-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "benchmarks.taskssite.urls"
INSTALLED_APPS = ["flyfn", "flyfn.tasks", "django_tasks_db"]
MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", "postgres://unset-see-benchmarks-tasks/none")
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
LOGGING_CONFIG = None
TASKS = {
    "default": {"BACKEND": "flyfn.tasks.FlyMachinesBackend", "OPTIONS": {"group": "bench"}},
    "db": {"BACKEND": "django_tasks_db.DatabaseBackend"},
}
FLYFN = {"GROUPS": {"bench": {"machines": 1, "autostop": "stop", "replay_timeout": "60s"}}}
