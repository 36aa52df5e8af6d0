"""flyfn dev's helpers: the project's image ref and ASGI app, and a clean refusal of a busy port."""

from __future__ import annotations

import io
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flyfn.emulator.dev import DevOptions, image_ref, project_asgi_app, run_dev
from flyfn.emulator.supervisor import DEFAULT_ASGI_APP

E2E_PROJECT = Path(__file__).resolve().parent / "e2e" / "project"


def test_image_ref_follows_the_sources(tmp_path: Path) -> None:
    (tmp_path / "views.py").write_text("A = 1\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.py").write_text("ignored\n")
    first = image_ref("My_Shop", tmp_path)
    assert first.startswith("local/my-shop:dev-")
    assert len(first.rsplit("-", 1)[1]) == 12
    assert image_ref("My_Shop", tmp_path) == first  # same sources, same image
    (tmp_path / ".git" / "x.py").write_text("still ignored\n")
    assert image_ref("My_Shop", tmp_path) == first
    (tmp_path / "views.py").write_text("A = 2\n")
    assert image_ref("My_Shop", tmp_path) != first  # an edit is a new deploy


@pytest.fixture
def e2e_on_path() -> Iterator[None]:
    sys.path.insert(0, str(E2E_PROJECT))
    try:
        yield
    finally:
        sys.path.remove(str(E2E_PROJECT))


@pytest.mark.usefixtures("e2e_on_path")
def test_project_asgi_app_is_the_settings_packages_asgi_module() -> None:
    assert project_asgi_app("e2eproj.settings") == "e2eproj.asgi:application"


def test_project_asgi_app_defaults_to_djangos() -> None:
    assert project_asgi_app("tests.settings") == DEFAULT_ASGI_APP  # tests/ has no asgi.py
    assert project_asgi_app("settings") == DEFAULT_ASGI_APP


def test_busy_port_is_refused_before_anything_starts() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = io.StringIO()
        assert run_dev(DevOptions(port=port), out=out) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.getvalue()
