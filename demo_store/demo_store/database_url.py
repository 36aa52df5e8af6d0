"""Turns a `DATABASE_URL` (sqlite:/// or postgres://) into a Django DATABASES entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

POSTGRES_SCHEMES = frozenset({"postgres", "postgresql", "pgsql"})


def parse_database_url(url: str, *, base_dir: Path) -> dict[str, Any]:
    """Return the DATABASES["default"] dict for `url`.

    `sqlite:///name.sqlite3` is relative to `base_dir` (so every process, whatever its working
    directory, opens the same file); `sqlite:////abs/path` is absolute; `sqlite://:memory:` and
    `sqlite:///:memory:` are in-memory. Postgres URLs may carry libpq options as query parameters
    (e.g. `?sslmode=require`). Errors never repeat the URL, which may hold a password.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": _sqlite_name(parts.path, base_dir)}
    if scheme in POSTGRES_SCHEMES:
        name = unquote(parts.path.lstrip("/"))
        if not name:
            raise ImproperlyConfigured("DATABASE_URL: a postgres URL needs a database name")
        try:
            port = parts.port
        except ValueError as exc:
            raise ImproperlyConfigured("DATABASE_URL: the port is not a number") from exc
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": unquote(parts.hostname or ""),
            "PORT": str(port or ""),
            "OPTIONS": dict(parse_qsl(parts.query)),
        }
    shown = scheme or "(none)"
    raise ImproperlyConfigured(
        f"DATABASE_URL: unsupported scheme {shown!r}; use sqlite:///<file> or postgres://..."
    )


def _sqlite_name(path: str, base_dir: Path) -> str:
    # urlsplit("sqlite://:memory:") leaves the path empty and the netloc ":memory:".
    if path in ("", "/", "/:memory:"):
        return ":memory:"
    relative = path[1:]  # the slash after "sqlite://" separates authority and path
    file = Path(unquote(relative))
    return str(file if file.is_absolute() else base_dir / file)
