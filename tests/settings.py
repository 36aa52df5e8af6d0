"""Django settings for flyfn's test suite (the test project lives in tests/)."""

from __future__ import annotations

from tests.support_postgres import suite_database

SECRET_KEY = "flyfn-tests-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "tests.urls"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "flyfn",
    "flyfn.tasks",
    "django_tasks_db",
    "tests.testapp",
]
MIDDLEWARE: list[str] = []
# PostgreSQL, as on Fly: the session's server (tests/support_postgres.py), started by the first test
# that uses the database; FLYFN_TEST_SQLITE=1 runs those tests on SQLite in memory instead.
DATABASES = {"default": suite_database()}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
# Any queue name; tests/test_tasks.py swaps in flyfn.tasks.FlyMachinesBackend (and its URLs).
try:
    import django.tasks  # noqa: F401

    _DUMMY_TASKS = "django.tasks.backends.dummy.DummyBackend"
except ImportError:  # Django 5.2: the django-tasks backport
    _DUMMY_TASKS = "django_tasks.backends.dummy.DummyBackend"
TASKS = {"default": {"BACKEND": _DUMMY_TASKS, "QUEUES": []}}
