"""PostgreSQL for the test suites: one server per test session, a fresh database per use.

The server itself is benchmarks/postgres.py's (one implementation, shared with `python -m
benchmarks`); this module adds the session's parts: where its server lives, and the DATABASES
entry of tests/settings.py.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from benchmarks.postgres import Database, Postgres, PostgresError, socket_url

__all__ = [
    "ROOT_ENV",
    "SQLITE_ENV",
    "Database",
    "Postgres",
    "PostgresError",
    "session_root",
    "suite_database",
]

# The session server's directory, fixed when tests/settings.py loads (the server starts later).
ROOT_ENV = "FLYFN_TEST_PG_ROOT"
# Set (to anything) to run the pytest-django tests on SQLite in memory instead.
SQLITE_ENV = "FLYFN_TEST_SQLITE"


def session_root() -> Path:
    """This session's server directory: chosen once per process (kept in ROOT_ENV), created
    only when the server starts."""
    default = f"/tmp/flyfn-pg-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return Path(os.environ.setdefault(ROOT_ENV, default))


def suite_database() -> dict[str, Any]:
    """tests/settings.py's DATABASES["default"]: database `flyfn` of the session's server (the
    test database pytest-django creates is `test_flyfn`), or SQLite in memory when SQLITE_ENV
    is set. Nothing starts here: the `postgres` fixture starts the server for the first test
    that uses the database."""
    if os.environ.get(SQLITE_ENV):
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}
    return Database("flyfn", socket_url(session_root(), "flyfn")).django_settings()
