"""Day one from the wheel: flyfn built, installed alone into a fresh venv, in a new Django project.

The wheel is built from the sdist (so the sdist is complete too), installed with its `emulator`
extra into a virtual environment that sees nothing of this repository (dependencies come from
the package index), and used the way the README tells a new user: `django-admin startproject`,
`flyfn` in INSTALLED_APPS and its middleware, one view marked `@fly_serverless`,
`manage.py check`, then `manage.py flyfn dev`, where the marked view must be answered by a
function Machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.demo_support import stop_and_reap
from tests.support_dev import ROOT, banner_api, list_machines, start
from tests.support_machines_api import free_loopback_port
from tests.support_procs import child_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PROJECT = "dayone"  # `flyfn dev` names the local Fly app after the project
TOKEN = "wheel-test-dev-token"  # the emulated Machines API's token, loopback only
# Safety bounds, not expectations: building and installing from the index can be slow.
BUILD_TIMEOUT = 300
INSTALL_TIMEOUT = 400

VIEWS = """\
import os

from django.http import JsonResponse

from flyfn import fly_serverless


def where(request):
    return JsonResponse({"machine": os.environ.get("FLY_MACHINE_ID"), "group": None})


@fly_serverless
def hello(request):
    return JsonResponse(
        {"machine": os.environ.get("FLY_MACHINE_ID"), "group": os.environ.get("FLYFN_GROUP")}
    )
"""


def _run(command: list[str | Path], *, cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Run `command` to completion; its output, or AssertionError showing it."""
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{output}"
    return output


def _outside_env(venv: Path) -> dict[str, str]:
    """An environment that knows nothing of this repository or of a Fly Machine: the venv's
    `bin` first on PATH, no PYTHONPATH, no settings module."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DJANGO_SETTINGS_MODULE")
    env = {k: v for k, v in child_env().items() if k not in dropped}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    env: dict[str, str]

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel, built from the sdist, installed with `[emulator]` into a fresh venv."""
    work = tmp_path_factory.mktemp("wheel")
    dist = work / "dist"
    _run(
        [sys.executable, "-m", "build", "--outdir", dist, ROOT],
        cwd=work,
        env=_outside_env(work),
        timeout=BUILD_TIMEOUT,
    )
    (wheel,) = dist.glob("flyfn-*.whl")
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=work, env=_outside_env(work), timeout=120)
    env = _outside_env(venv)
    _run(
        [venv / "bin" / "python", "-m", "pip", "install", "-q", f"{wheel}[emulator]"],
        cwd=work,
        env=env,
        timeout=INSTALL_TIMEOUT,
    )
    return Installed(wheel, venv, env)


def test_the_wheel_holds_flyfn_typed_and_licensed_only(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    packages = {name.split("/")[0] for name in names if not name.startswith("flyfn-")}
    assert packages == {"flyfn"}, names
    assert "flyfn/py.typed" in names
    assert "flyfn/emulator/dev.py" in names
    assert "flyfn/emulator/spec/machines-requests.json" in names  # flyfn dev validates with it
    (licence,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert "MIT License" in zipfile.ZipFile(installed.wheel).read(licence).decode()


def test_flyfn_is_imported_from_the_venv_not_the_repository(installed: Installed) -> None:
    where = _run(
        [installed.python, "-c", "import flyfn, sys; print(flyfn.__file__, flyfn.__version__)"],
        cwd=installed.venv,
        env=installed.env,
        timeout=60,
    )
    path, version = where.split()
    assert Path(path).is_relative_to(installed.venv), path
    assert installed.wheel.name.startswith(f"flyfn-{version}-")


@pytest.fixture(scope="module")
def project(installed: Installed) -> Path:
    """`django-admin startproject dayone`, with flyfn installed and one view marked."""
    root = installed.venv.parent / "site"
    root.mkdir()
    _run(
        ["django-admin", "startproject", PROJECT, root],
        cwd=root,
        env=installed.env,
        timeout=60,
    )
    package = root / PROJECT
    settings = package / "settings.py"
    # startproject's template quotes with ' (Django 5.2) or " (later templates may): keep its own.
    text, apps = re.subn(
        r"^( +)(['\"])django\.contrib\.staticfiles\2,\n",
        r"\g<0>\1\2flyfn\2,\n",
        settings.read_text(),
        flags=re.MULTILINE,
    )
    text, middleware = re.subn(
        r"^( +)(['\"])django\.middleware\.security\.SecurityMiddleware\2,\n",
        r"\g<0>\1\2flyfn.middleware.FlyReplayMiddleware\2,\n",
        text,
        flags=re.MULTILINE,
    )
    assert (apps, middleware) == (1, 1), f"startproject's settings changed shape:\n{text}"
    settings.write_text(text)
    (package / "views.py").write_text(VIEWS)
    urls = package / "urls.py"
    urls.write_text(
        urls.read_text().replace(
            "urlpatterns = [",
            f"from {PROJECT} import views\n\nurlpatterns = [\n"
            "    path('', views.where),\n    path('hello/', views.hello),",
        )
    )
    return root


def test_manage_py_check_finds_no_issue(installed: Installed, project: Path) -> None:
    output = _run(
        [installed.python, "manage.py", "check"], cwd=project, env=installed.env, timeout=120
    )
    assert "System check identified no issues (0 silenced)." in output


@dataclass
class Dev:
    process: subprocess.Popen[str]
    url: str
    api: str
    lines: list[str]


@pytest.fixture
def dev(installed: Installed, project: Path) -> Iterator[Dev]:
    port = free_loopback_port()
    lines: list[str] = []
    env = {**installed.env, "FLYFN_DEV_TOKEN": TOKEN}
    process = start(
        [str(installed.python), "manage.py", "flyfn", "dev", "--port", str(port)],
        cwd=project,
        env=env,
        lines=lines,
    )
    try:
        api = banner_api(process, lines, cleanup=lambda: None, timeout=120)
        yield Dev(process, f"http://127.0.0.1:{port}", api, lines)
    finally:
        stop_and_reap(process)


def test_flyfn_dev_serves_the_marked_view_from_a_function_machine(dev: Dev) -> None:
    page = httpx.get(dev.url + "/", timeout=60)
    assert page.status_code == 200, page.text
    app_machine = page.json()["machine"]
    assert page.headers["x-flyfn-machine"] == app_machine

    response = httpx.get(dev.url + "/hello/", timeout=120)
    assert response.status_code == 200, response.text
    machine = response.headers["x-flyfn-machine"]
    assert response.json() == {"machine": machine, "group": "default"}
    assert machine != app_machine
    functions = list_machines(dev.api, PROJECT, TOKEN, **{"metadata.flyfn_group": "default"})
    assert [m["id"] for m in functions] == [machine]
    route = re.compile(rf"GET /hello/ main:{app_machine[:4]} → replay → fn:{machine[:4]} ")
    assert any(route.match(line) for line in dev.lines), "\n".join(dev.lines)
