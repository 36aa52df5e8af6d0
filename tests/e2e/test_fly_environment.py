"""End-to-end: what the Machines of `flyfn dev` see in their environment, as on Fly.

On Fly an app Machine gets the image's ENV, fly.toml's `[env]`, the app's secrets and Fly's
variables (`FLY_PROCESS_GROUP` among them); a Machine created through the API (a function
Machine) gets its own `config.env`, the secrets and Fly's variables, without `FLY_PROCESS_GROUP`.
Neither ever sees the shell that ran `fly deploy`.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.stack import running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_machines_see_what_fly_gives_them_and_nothing_of_the_shell(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("E2E_SHELL_ONLY", "from-the-shell")  # the shell that runs flyfn dev
    with running_stack(3600, secrets={"E2E_SECRET": "from-a-secret"}) as dev:
        app = httpx.get(f"{dev.url}/environment/", timeout=60)
        # A cold start that outlasts the replay timeout on a loaded machine falls back to the app
        # Machine (a right answer, not this test's point): ask until a function Machine answers.
        deadline = time.monotonic() + 120  # safety bound
        while True:
            function = httpx.get(f"{dev.url}/environment/serverless/", timeout=60)
            if function.status_code != 200 or function.json()["group"] is not None:
                break
            assert time.monotonic() < deadline, "too slow: no function Machine answered"
            time.sleep(0.5)
        app_machine = dev.app_machine()["id"]
        log = "\n".join(dev.lines)
    assert app.status_code == 200, app.text
    assert function.status_code == 200, function.text
    assert app.json() == {
        "E2E_SHELL_ONLY": None,
        "E2E_GROUP_ENV": "from-fly-toml",
        "E2E_SECRET": "from-a-secret",
        "FLY_PROCESS_GROUP": "app",
        "machine": app_machine,
        "group": None,
    }
    seen = function.json()
    assert seen["group"] == "default", log
    assert seen["machine"] != app_machine
    assert {name: seen[name] for name in app.json() if name.isupper()} == {
        "E2E_SHELL_ONLY": None,
        "E2E_GROUP_ENV": "from-fly-toml",  # the group's "env" forwards it
        "E2E_SECRET": "from-a-secret",
        "FLY_PROCESS_GROUP": None,  # unset on a Machine created through the API
    }
