"""DATABASE_URL parsing for the demo's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from demo_store.database_url import parse_database_url
from django.core.exceptions import ImproperlyConfigured

BASE = Path("/srv/demo")


def test_sqlite_is_relative_to_the_project() -> None:
    parsed = parse_database_url("sqlite:///db.sqlite3", base_dir=BASE)
    assert (parsed["ENGINE"], parsed["NAME"]) == (
        "django.db.backends.sqlite3",
        "/srv/demo/db.sqlite3",
    )


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("sqlite:////var/lib/demo/x.db", "/var/lib/demo/x.db"),
        ("sqlite://:memory:", ":memory:"),
        ("sqlite:///:memory:", ":memory:"),
        ("sqlite://", ":memory:"),
    ],
)
def test_sqlite_absolute_and_memory(url: str, name: str) -> None:
    assert parse_database_url(url, base_dir=BASE)["NAME"] == name


def test_postgres_with_escaped_password_and_options() -> None:
    url = "postgres://shop:p%40ss%2Fword@db.internal:5433/store?sslmode=require"
    expected = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "store",
        "USER": "shop",
        "PASSWORD": "p@ss/word",
        "HOST": "db.internal",
        "PORT": 5433,
        "OPTIONS": {"sslmode": "require"},
    }
    parsed = parse_database_url(url, base_dir=BASE)
    assert {key: parsed[key] for key in expected} == expected
    assert parse_database_url("postgresql://u@h/d", base_dir=BASE)["PORT"] == ""


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:hunter2@h/d",
        "foo://u:hunter2@h/d",
        "postgres://u:hunter2@h/",
        "postgres://u:hunter2@h:x/d",
    ],
)
def test_errors_name_the_setting_but_never_repeat_the_url(url: str) -> None:
    with pytest.raises(ImproperlyConfigured, match="DATABASE_URL") as caught:
        parse_database_url(url, base_dir=BASE)
    assert "hunter2" not in str(caught.value)
