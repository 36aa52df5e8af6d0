"""The demo's `DATABASE_URL` (sqlite:/// or postgres://) as a Django DATABASES entry.

dj-database-url parses; this adds what the demo needs on top: a relative sqlite file is relative
to the project (every process, whatever its working directory, opens the same file), only the
engines the demo installs are accepted, and errors never repeat the URL (it may hold a password).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

SUPPORTED_ENGINES = frozenset({"django.db.backends.sqlite3", "django.db.backends.postgresql"})


def parse_database_url(url: str, *, base_dir: Path) -> dict[str, Any]:
    """Return the DATABASES["default"] dict for `url`.

    `sqlite:///name.sqlite3` is relative to `base_dir`; `sqlite:////abs/path` is absolute;
    `sqlite://:memory:` and `sqlite:///:memory:` are in-memory. Postgres URLs may carry libpq
    options as query parameters (e.g. `?sslmode=require`).
    """
    scheme = urlsplit(url.strip()).scheme or "(none)"
    unsupported = ImproperlyConfigured(
        f"DATABASE_URL: unsupported scheme {scheme!r}; use sqlite:///<file> or postgres://..."
    )
    try:
        config: dict[str, Any] = dict(dj_database_url.parse(url.strip()))
    except dj_database_url.UnknownSchemeError:
        raise unsupported from None
    except ValueError:  # dj-database-url's messages may quote the URL: say what, not which
        raise ImproperlyConfigured(
            "DATABASE_URL: not a valid URL (is the port a number, the password %-quoted?)"
        ) from None
    engine = config.get("ENGINE")
    if engine not in SUPPORTED_ENGINES:
        raise unsupported
    if engine == "django.db.backends.postgresql" and not config.get("NAME"):
        raise ImproperlyConfigured("DATABASE_URL: a postgres URL needs a database name")
    if engine == "django.db.backends.sqlite3" and config["NAME"] != ":memory:":
        config["NAME"] = str(base_dir / config["NAME"])  # an absolute NAME stays as it is
    return config
