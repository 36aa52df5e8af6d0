"""The demo store as a newcomer and Fly meet it: its own tests, the Dockerfile's start command,
fly.toml, and `scripts/demo` (what `make demo` runs).

The store app's own tests need the demo's settings, not tests.settings, so they run in a
subprocess from demo_store/ (its pytest.ini; the tests are in demo_store/store/tests/).
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import subprocess
import time
import tomllib
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from pypdf import PdfReader

from flyfn.machine_dir import remove_machine_dir
from tests.demo_support import BIN, DEMO, PYTHON, ROOT, demo_env, manage, serving
from tests.support_machines_api import free_loopback_port
from tests.support_postgres import Database


# A safety bound, not an expectation: the store's suite takes seconds (minutes on a loaded machine).
@pytest.mark.e2e
@pytest.mark.timeout(660)
def test_store_app_tests_pass(tmp_path: Path, postgres_database: Database) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=DEMO,  # its pytest.ini: the demo's settings and the store tests
        env=demo_env(tmp_path, postgres_database),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert " passed" in done.stdout


def dockerfile_start() -> tuple[list[str], Path]:
    """The Dockerfile's CMD (exec form) and its WORKDIR mapped from /app to this checkout."""
    workdir, cmd = "/", None
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword == "WORKDIR":
            workdir = rest.strip()
        elif keyword == "CMD":
            cmd = json.loads(rest)
    assert isinstance(cmd, list), "the Dockerfile needs an exec-form CMD"
    assert workdir.startswith("/app"), workdir
    return cmd, ROOT / Path(workdir).relative_to("/app")


@pytest.mark.e2e
def test_dockerfile_start_command_serves_the_store(
    tmp_path: Path, postgres_database: Database
) -> None:
    cmd, cwd = dockerfile_start()
    assert cmd[:2] == ["uvicorn", "demo_store.asgi:application"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == "8000"
    # What the image build and the release command do first: static files, schema, some data.
    env = demo_env(tmp_path, postgres_database)
    manage(env, "collectstatic", "--noinput", "-v", "0")
    manage(env, "migrate", "--noinput", "-v", "0")
    manage(env, "seed_store", "--purchases", "3")
    port = free_loopback_port()
    argv = [str(BIN / cmd[0]), *cmd[1:]]
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    base = f"http://127.0.0.1:{port}"
    with serving(argv, cwd=cwd, env=env, url=f"{base}/") as first:
        assert first.status_code == 302
        assert first.headers["location"] == "/purchases/"
        page = httpx.get(f"{base}/purchases/", timeout=10)
        assert page.status_code == 200
        assert "All 3 receipts" in page.text
        assert 'data-machine="local"' in page.text
        # Static files come hashed from the collected manifest, served by WhiteNoise.
        css_path = page.text.split('rel="stylesheet" href="', 1)[1].split('"', 1)[0]
        assert css_path != "/static/store/style.css"
        assert "machine-note" in httpx.get(f"{base}{css_path}", timeout=10).text
        bundle = httpx.get(f"{base}/purchases/receipts.pdf", timeout=30)
        assert bundle.status_code == 200
        assert bundle.headers["content-type"] == "application/pdf"
        assert bundle.content.startswith(b"%PDF-")
        assert int(bundle.headers["content-length"]) == len(bundle.content)


def test_fly_toml_releases_and_serves_what_the_dockerfile_runs() -> None:
    config = tomllib.loads((ROOT / "fly.toml").read_text())
    release = shlex.split(config["deploy"]["release_command"])
    assert release[:2] == ["sh", "-c"]
    steps = [shlex.split(step) for step in release[2].split("&&")]
    assert steps == [
        ["python", "manage.py", "migrate", "--noinput"],
        ["python", "manage.py", "flyfn", "prepare"],
    ]
    service = config["http_service"]
    cmd, _ = dockerfile_start()
    assert service["internal_port"] == int(cmd[cmd.index("--port") + 1])
    assert service["auto_stop_machines"] == "stop"
    assert service["auto_start_machines"] is True
    assert service["min_machines_running"] in (0, 1)
    assert "DEBUG" in config["env"]


@pytest.mark.e2e
def test_scripts_demo_serves_pages_and_replays_receipts(
    tmp_path: Path, postgres_database: Database
) -> None:
    port = free_loopback_port()
    env = demo_env(tmp_path, postgres_database, DEBUG="1", DEMO_PURCHASES="7")
    del env["SECRET_KEY"]  # the demo works without one (DEBUG's dev key)
    url = f"http://127.0.0.1:{port}/purchases/"
    with serving([str(ROOT / "scripts" / "demo"), str(port)], cwd=ROOT, env=env, url=url) as page:
        assert page.status_code == 200
        assert "All 7 receipts" in page.text
        # On the emulator the page and the receipt come from two different Machines.
        page_machine = re.search(r'data-machine="([^"]+)"', page.text)
        assert page_machine is not None
        assert page_machine.group(1) != "local"
        # Right after the deploy the app Machines' pools may still be listing within Fly's rate
        # limits: a receipt may then be drawn by the group's fallback on the app Machine (a right
        # answer). Asked again, it comes from a function Machine.
        deadline = time.monotonic() + 120  # safety bound
        while True:
            receipt = httpx.get(url + "7/receipt.pdf", timeout=60)
            assert receipt.status_code == 200
            text = PdfReader(BytesIO(receipt.content)).pages[0].extract_text()
            assert "Receipt 000007" in text
            footer = re.search(r"generated on Machine (\S+)", text)
            assert footer is not None
            assert footer.group(1) != "local"
            if footer.group(1) != page_machine.group(1):
                break
            assert time.monotonic() < deadline, "too slow: no receipt from a function Machine"
            time.sleep(1)


def check_demo(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "manage.py", "check", *args],
        cwd=DEMO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.e2e
def test_check_deploy_passes_on_the_production_settings(
    tmp_path: Path, postgres_database: Database
) -> None:
    # What fly.toml and the secrets give a Machine on Fly: DEBUG off, a real key, a token.
    env = demo_env(
        tmp_path,
        postgres_database,
        SECRET_KEY=secrets.token_urlsafe(50),
        FLY_APP_NAME="flyfn-demo-store",
        FLY_API_TOKEN="fm2_not_a_real_token",
    )
    done = check_demo(env, "--deploy", "--fail-level", "WARNING")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues (0 silenced)." in done.stdout


@pytest.mark.e2e
def test_the_development_secret_key_is_refused_on_fly(
    tmp_path: Path, postgres_database: Database
) -> None:
    env = demo_env(
        tmp_path, postgres_database, DEBUG="1", FLY_APP_NAME="flyfn-demo-store", FLY_API_TOKEN="t"
    )
    del env["SECRET_KEY"]
    done = check_demo(env)
    assert done.returncode != 0
    assert "SECRET_KEY must be set on Fly" in done.stderr
    explicit = check_demo(
        {**env, "SECRET_KEY": "demo-store-insecure-dev-key-only-used-when-DEBUG-is-on"}
    )
    assert "SECRET_KEY must be set on Fly" in explicit.stderr
    # Under `flyfn dev` (FLY_APP_NAME too, but the Machines API on this computer) it is allowed.
    local = check_demo({**env, "FLY_API_HOSTNAME": "http://127.0.0.1:4280"})
    assert local.returncode == 0, local.stdout + local.stderr


@pytest.mark.e2e
def test_the_demo_sums_its_workers_metrics_in_one_directory_per_machine(
    tmp_path: Path, postgres_database: Database
) -> None:
    # Two uvicorn workers per Machine: with metrics on, prometheus-client's multiprocess
    # directory is the Machine's own, set before any worker imports prometheus-client.
    machine_id = f"test{secrets.token_hex(5)}"
    show = ["shell", "-c", "import os; print(os.environ.get('PROMETHEUS_MULTIPROC_DIR'))"]
    base = demo_env(tmp_path, postgres_database, FLY_MACHINE_ID=machine_id)
    on = manage({**base, "FLYFN_METRICS_PORT": "9091"}, *show).strip().splitlines()[-1]
    machine = Path(on).parent
    try:
        assert machine.name == f"flyfn-{machine_id}", on
        assert Path(on).name == "metrics"
        assert Path(on).is_dir()
        off = manage(base, *show).strip().splitlines()[-1]
        assert off == "None"  # metrics off: prometheus-client as it comes
        own = str(tmp_path / "mine")
        chosen = {**base, "FLYFN_METRICS_PORT": "9091", "PROMETHEUS_MULTIPROC_DIR": own}
        assert manage(chosen, *show).strip().splitlines()[-1] == own  # the user's choice stands
    finally:
        remove_machine_dir(machine_id, base=str(machine.parent))
