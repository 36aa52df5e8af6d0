"""flyfn dev's helpers: the project's image ref and ASGI app, a clean refusal of a busy port, and
the banner (with its warning when the proxy is reachable from other computers)."""

from __future__ import annotations

import io
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flyfn.emulator.child import DEFAULT_ASGI_APP
from flyfn.emulator.dev import DevOptions, DevStack, image_ref, project_asgi_app, run_dev
from flyfn.machines.models import Machine

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


@pytest.mark.parametrize(
    ("host", "warned"),
    [("127.0.0.1", False), ("::1", False), ("localhost", False), ("0.0.0.0", True), ("::", True)],
)
def test_the_banner_warns_when_the_proxy_is_reachable_from_other_computers(
    tmp_path: Path, host: str, warned: bool
) -> None:
    out = io.StringIO()
    stack = DevStack(
        DevOptions(host=host, root=tmp_path), settings_module="proj.settings", out=out, app_name="a"
    )
    stack._banner(
        Machine(id="0e1f2a3b4c5d6e", state="started"),
        1.0,
        "http://127.0.0.1:4280",
        "http://127.0.0.1:4281/",
    )
    text = out.getvalue()
    assert "live       http://127.0.0.1:4281/" in text
    assert ("WARNING: the proxy listens on" in text) is warned
    assert "python -m flyfn.emulator.secrets --app a set NAME=VALUE" in text


def test_the_time_scale_divides_fly_s_autostop_period(tmp_path: Path) -> None:
    out = io.StringIO()
    stack = DevStack(
        DevOptions(time_scale=60, root=tmp_path),
        settings_module="p.settings",
        out=out,
        app_name="a",
    )
    stack._banner(Machine(id="0e1f2a3b4c5d6e", state="started"), 1.0, "http://x", "http://y/")
    assert "autostop   a pass every 5s (time-scale 60)" in out.getvalue()
    assert DevOptions().time_scale == 1


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan")])
def test_a_time_scale_must_be_positive(scale: float) -> None:
    with pytest.raises(ValueError, match="time_scale"):
        DevOptions(time_scale=scale)
