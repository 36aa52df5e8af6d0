"""The package imports and the test project answers."""

from __future__ import annotations

from django.test import Client

import flyfn


def test_package_imports() -> None:
    assert flyfn.__doc__


def test_plain_view_answers(client: Client) -> None:
    assert client.get("/plain/").content == b"plain"
