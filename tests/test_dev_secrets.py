"""App secrets under `flyfn dev`: kept apart from the Machines' config, delivered at boot, and set
while the stack runs with `python -m flyfn.emulator.secrets`, which (as `fly secrets set`)
restarts only the Fly Launch Machines; function Machines see new values at their next start or
update. Values never appear in answers, output or reprs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import uvicorn

from flyfn.emulator import secrets as secrets_cli
from flyfn.emulator.api import create_app
from flyfn.emulator.dev import DevSetupError, read_secrets_file
from flyfn.emulator.secrets import (
    DevStackInfo,
    SecretsCommandError,
    read_stack_file,
    stack_file,
    write_stack_file,
)
from flyfn.emulator.state import AppSecret, MachinesEmulator
from flyfn.emulator.supervisor import ProcessRuntime
from flyfn.machines.errors import RateLimited
from flyfn.machines.models import CreateMachineRequest, Machine, MachineConfig, UpdateMachineRequest
from tests.support_machines_api import EMULATOR_TOKEN
from tests.support_wait import until

APP = "secretsapp"
ROOT = Path(__file__).resolve().parent.parent
VALUE = "s3cr3t-Xq9-never-shown"
pytestmark = pytest.mark.timeout(180)


# -- the API ---------------------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[tuple[MachinesEmulator, httpx.AsyncClient]]:
    emulator = MachinesEmulator()
    transport = httpx.ASGITransport(app=create_app(emulator, token=EMULATOR_TOKEN))
    headers = {"Authorization": f"Bearer {EMULATOR_TOKEN}"}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://api", headers=headers
    ) as client:
        yield emulator, client
    await emulator.aclose()


async def test_secrets_are_set_listed_and_unset_without_ever_answering_values(
    http: tuple[MachinesEmulator, httpx.AsyncClient],
) -> None:
    emulator, client = http
    url = f"/v1/apps/{APP}/secrets"
    answer = await client.post(url, json={"values": {"SECRET_KEY": VALUE, "DATABASE_URL": "x"}})
    assert answer.status_code == 200
    assert answer.json()["version"] == 1
    listed = (await client.get(url)).json()["secrets"]
    assert [s["name"] for s in listed] == ["DATABASE_URL", "SECRET_KEY"]
    assert all(set(s) == {"name", "digest", "created_at", "updated_at"} for s in listed)
    one = (await client.get(f"{url}/SECRET_KEY")).json()
    assert one["digest"] == listed[1]["digest"]
    posted = await client.post(f"{url}/SECRET_KEY", json={"value": "rotated"})
    assert posted.status_code == 201
    assert posted.json()["digest"] != one["digest"]
    assert (await client.post(url, json={"values": {"DATABASE_URL": None}})).status_code == 200
    assert (await client.delete(f"{url}/SECRET_KEY")).json() == {"version": 4}
    assert (await client.get(url)).json() == {"secrets": []}
    assert (await client.get(f"{url}/SECRET_KEY")).status_code == 404
    assert emulator.secrets_version(APP) == 4
    for response in (answer, posted):
        assert VALUE not in response.text
        assert "rotated" not in response.text


async def test_secret_names_are_checked(http: tuple[MachinesEmulator, httpx.AsyncClient]) -> None:
    _, client = http
    url = f"/v1/apps/{APP}/secrets"
    assert (await client.post(url, json={"values": {"1BAD": "x"}})).status_code == 400
    refused = await client.post(url, json={"values": {"LD_PRELOAD": "/tmp/x.so"}})
    assert refused.status_code == 422
    assert "LD_PRELOAD" in refused.json()["error"]
    assert (await client.post(f"{url}/PYTHONPATH", json={"value": "x"})).status_code == 422
    assert (await client.post(url, json={"values": {"A": 5}})).status_code == 400
    assert (await client.post(url, json={"values": {}})).status_code == 400
    assert (await client.post(url, content=b"[" * 10_000)).status_code == 400


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("FLYFN_GROUP", "group"),
        ("FLYFN_HOME_APP", "group or home app"),
        ("HTTPS_PROXY", "connections"),
        ("SSL_CERT_FILE", "connections"),
        ("DYLD_INSERT_LIBRARIES", "code runs"),
        ("GCONV_PATH", "code runs"),
        ("HOME", "code runs"),
    ],
)
async def test_a_secret_cannot_change_a_machines_group_nor_what_runs(
    http: tuple[MachinesEmulator, httpx.AsyncClient], name: str, words: str
) -> None:
    # Issue 23: FLYFN_GROUP is flyfn's, in a function Machine's config.env; a secret must not
    # change it (nor run code on the host, nor redirect the Machine's connections).
    emulator, client = http
    url = f"/v1/apps/{APP}/secrets"
    for response in (
        await client.post(url, json={"values": {name: "x"}}),
        await client.post(f"{url}/{name}", json={"value": "x"}),
    ):
        assert response.status_code == 422, response.text
        assert name in response.json()["error"]
        assert words in response.json()["error"]
    assert emulator.secrets(APP) == []


async def test_fly_api_secrets_are_accepted_and_left_to_the_runtime(
    http: tuple[MachinesEmulator, httpx.AsyncClient],
) -> None:
    # On Fly FLY_API_TOKEN is a usual secret (`fly secrets set FLY_API_TOKEN=...`); locally the
    # runtime's values win at boot (tests/test_supervisor.py), so it is accepted, not refused.
    _, client = http
    values = {"FLY_API_TOKEN": "fo1_x", "FLY_API_HOSTNAME": "https://api.machines.dev"}
    response = await client.post(f"/v1/apps/{APP}/secrets", json={"values": values})
    assert response.status_code == 200


def test_a_secrets_file_is_held_to_the_same_names(tmp_path: Path) -> None:
    path = tmp_path / ".dev-secrets"
    path.write_text("SECRET_KEY=x\nFLYFN_GROUP=admin\n")
    with pytest.raises(DevSetupError, match="FLYFN_GROUP"):
        read_secrets_file(path)
    path.write_text("SECRET_KEY=x\nLD_PRELOAD=/tmp/evil.so\n")
    with pytest.raises(DevSetupError, match="LD_PRELOAD"):
        read_secrets_file(path)
    path.write_text("SECRET_KEY=x\nFLY_API_TOKEN=fo1_x\n")
    assert read_secrets_file(path) == {"SECRET_KEY": "x", "FLY_API_TOKEN": "fo1_x"}


def test_a_secret_repr_never_shows_its_value() -> None:
    secret = AppSecret("SECRET_KEY", VALUE, 1.0, 1.0)
    assert VALUE not in repr(secret)
    assert VALUE not in str(secret.to_json())
    info = DevStackInfo("app", "http://127.0.0.1:1", "tok-Zq81", 1)
    assert "tok-Zq81" not in repr(info)


# -- delivered at boot, set while running ----------------------------------------------------------


@dataclass
class Stack:
    emulator: MachinesEmulator
    runtime: ProcessRuntime
    app_machine: Machine
    function_machine: Machine

    def environ(self, machine: Machine) -> dict[str, str]:
        pid = self.runtime.pids()[machine.id]
        return psutil.Process(pid).environ()


@pytest.fixture
async def stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[Stack]:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    runtime = ProcessRuntime(
        "tests.e2e.echo_app:app", cwd=ROOT, output=io.StringIO(), boot_timeout=20
    )
    emulator = MachinesEmulator(runtime=runtime, default_app=APP)
    runtime.attach(emulator)
    emulator.set_secrets(APP, {"SECRET_KEY": "first"})
    config = uvicorn.Config(
        create_app(emulator, token=EMULATOR_TOKEN),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    try:
        await until(lambda: server.started)
        port = server.servers[0].sockets[0].getsockname()[1]
        api = f"http://127.0.0.1:{port}"
        write_stack_file(DevStackInfo(APP, api, EMULATOR_TOKEN, os.getpid()))
        launch = {"fly_process_group": "app", "fly_platform_version": "v2"}
        machines = []
        for metadata, env in ((launch, None), ({"flyfn_group": "pdf"}, {"FLYFN_GROUP": "pdf"})):
            created = await emulator.create(
                APP,
                CreateMachineRequest(
                    config=MachineConfig(image="local/p:1", metadata=metadata, env=env)
                ),
            )
            machines.append(await emulator.wait_for_state(APP, created.id, "started", 20))
        yield Stack(emulator, runtime, machines[0], machines[1])
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        await emulator.aclose()
        await runtime.aclose(grace=1.0)


@pytest.mark.e2e
async def test_secrets_are_delivered_at_boot_apart_from_the_config(stack: Stack) -> None:
    assert stack.environ(stack.app_machine)["SECRET_KEY"] == "first"
    assert stack.environ(stack.function_machine)["SECRET_KEY"] == "first"
    config = stack.emulator.get(APP, stack.function_machine.id).config
    assert config is not None
    assert "SECRET_KEY" not in (config.env or {})


@pytest.mark.e2e
async def test_setting_secrets_restarts_only_fly_launch_machines(stack: Stack) -> None:
    app_pid = stack.runtime.pids()[stack.app_machine.id]
    function_pid = stack.runtime.pids()[stack.function_machine.id]
    out = io.StringIO()
    await secrets_cli.run(["--app", APP, "set", f"SECRET_KEY={VALUE}", "NEW=1"], out)
    # The app Machine was updated and booted again with the new values ...
    assert stack.runtime.pids()[stack.app_machine.id] != app_pid
    assert stack.environ(stack.app_machine)["SECRET_KEY"] == VALUE
    assert stack.environ(stack.app_machine)["NEW"] == "1"
    # ... the function Machine runs on, with the values it booted with ...
    assert stack.runtime.pids()[stack.function_machine.id] == function_pid
    assert stack.environ(stack.function_machine)["SECRET_KEY"] == "first"
    assert "NEW" not in stack.environ(stack.function_machine)
    # ... until its next update (or start).
    fn = stack.emulator.get(APP, stack.function_machine.id)
    assert fn.config is not None
    await stack.emulator.update(APP, fn.id, UpdateMachineRequest(config=fn.config))
    await stack.emulator.settle()
    assert stack.environ(stack.function_machine)["SECRET_KEY"] == VALUE
    text = out.getvalue()
    assert "secrets set: SECRET_KEY, NEW" in text
    assert "1 app Machine(s) restarted" in text
    assert VALUE not in text


@pytest.mark.e2e
async def test_staged_secrets_restart_nothing_and_list_shows_no_values(stack: Stack) -> None:
    pids = dict(stack.runtime.pids())
    out = io.StringIO()
    await secrets_cli.run(["--app", APP, "set", "--stage", f"SECRET_KEY={VALUE}"], out)
    await secrets_cli.run(["--app", APP, "list"], out)
    assert stack.runtime.pids() == pids
    assert "staged" in out.getvalue()
    assert "SECRET_KEY\t" in out.getvalue()
    assert VALUE not in out.getvalue()


def test_the_command_says_when_no_stack_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert read_stack_file("nope") is None
    assert secrets_cli.main(["--app", "nope", "set", "A=1"]) == 1
    assert "no running flyfn dev for app 'nope'" in capsys.readouterr().err
    assert secrets_cli.main(["--app", "nope", "set", "novalue"]) == 1
    assert secrets_cli.main(["--api", "http://127.0.0.1:9", "list"]) == 1
    assert "--api needs --app" in capsys.readouterr().err


def test_an_api_error_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def rate_limited(argv: list[str], out: io.StringIO) -> None:
        raise RateLimited(
            status=429, method="GET", path="/v1/apps/a/machines", error="rate limit exceeded"
        )

    monkeypatch.setattr(secrets_cli, "run", rate_limited)
    assert secrets_cli.main(["--app", "a", "set", "A=1"]) == 1
    err = capsys.readouterr().err
    assert err == "error: GET /v1/apps/a/machines -> HTTP 429: rate limit exceeded\n"


# -- the stack file: only this user's, in a private directory (issue 23) -------------------------

OTHER_UID = 65534  # nobody: another local user


def stack_dir() -> Path:
    return stack_file(APP).parent


@pytest.fixture
def temp_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return tmp_path


@contextlib.asynccontextmanager
async def capturing_server() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A planted stack's API: it keeps whatever it is sent."""
    captured: list[bytes] = []

    async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            captured.append(await asyncio.wait_for(reader.read(65536), 5))
        writer.write(b"HTTP/1.1 500 x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(keep, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", captured
    finally:
        server.close()
        await server.wait_closed()


def plant(directory: Path, api: str, *, pid: int | None = None) -> Path:
    """What another local user can leave in a shared temp dir: a stack file pointing at their own
    server, with a live pid."""
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"{APP}.json"
    data = {"app": APP, "api": api, "token": "planted", "pid": pid or os.getpid()}
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return path


async def assert_refused_and_nothing_captured(api: str, captured: list[bytes]) -> None:
    assert read_stack_file(APP) is None
    with pytest.raises(SecretsCommandError):
        await secrets_cli.run(["--app", APP, "set", "STRIPE_SECRET_KEY=sk_live_123"], io.StringIO())
    with pytest.raises(SecretsCommandError):
        await secrets_cli.run(["set", "STRIPE_SECRET_KEY=sk_live_123"], io.StringIO())
    assert captured == []


@pytest.mark.skipif(os.geteuid() != 0, reason="making another user's directory needs root")
async def test_a_stack_directory_another_user_made_is_not_trusted(temp_dir: Path) -> None:
    async with capturing_server() as (api, captured):
        planted = plant(stack_dir(), api)
        os.chown(planted, OTHER_UID, -1)
        os.chown(stack_dir(), OTHER_UID, -1)
        await assert_refused_and_nothing_captured(api, captured)
        with pytest.raises(OSError, match="not a private directory"):
            write_stack_file(DevStackInfo(APP, api, "tok", os.getpid()))


@pytest.mark.skipif(os.geteuid() != 0, reason="making another user's file needs root")
async def test_a_stack_file_another_user_owns_is_not_trusted(temp_dir: Path) -> None:
    async with capturing_server() as (api, captured):
        os.chown(plant(stack_dir(), api), OTHER_UID, -1)
        await assert_refused_and_nothing_captured(api, captured)


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o755, 0o750])
async def test_a_stack_directory_open_to_others_is_not_trusted(temp_dir: Path, mode: int) -> None:
    async with capturing_server() as (api, captured):
        plant(stack_dir(), api)
        stack_dir().chmod(mode)
        await assert_refused_and_nothing_captured(api, captured)


async def test_a_symlinked_stack_directory_is_not_trusted(temp_dir: Path) -> None:
    async with capturing_server() as (api, captured):
        elsewhere = temp_dir / "elsewhere"
        plant(elsewhere, api)
        stack_dir().symlink_to(elsewhere)
        await assert_refused_and_nothing_captured(api, captured)


@pytest.mark.parametrize("mode", [0o644, 0o660, 0o604])
async def test_a_stack_file_open_to_others_is_not_trusted(temp_dir: Path, mode: int) -> None:
    async with capturing_server() as (api, captured):
        plant(stack_dir(), api).chmod(mode)
        await assert_refused_and_nothing_captured(api, captured)


async def test_a_symlinked_stack_file_is_not_trusted(temp_dir: Path) -> None:
    async with capturing_server() as (api, captured):
        target = plant(temp_dir / "elsewhere", api)
        stack_dir().mkdir(mode=0o700)
        stack_file(APP).symlink_to(target)
        await assert_refused_and_nothing_captured(api, captured)


def test_a_pid_of_another_users_process_is_no_stack_of_ours(
    temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_stack_file(DevStackInfo(APP, "http://127.0.0.1:9", "tok", 4242))

    def kill(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)
    assert read_stack_file(APP) is None


def test_the_stack_file_is_private_and_read_back(temp_dir: Path) -> None:
    path = write_stack_file(DevStackInfo(APP, "http://127.0.0.1:9", "tok", os.getpid()))
    assert path == temp_dir / f"flyfn-dev-{os.getuid()}" / f"{APP}.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    info = read_stack_file(APP)
    assert info is not None
    assert (info.api, info.token) == ("http://127.0.0.1:9", "tok")


def test_an_own_stack_directory_left_open_is_closed_when_written(temp_dir: Path) -> None:
    stack_dir().mkdir(mode=0o755)
    stack_dir().chmod(0o755)
    write_stack_file(DevStackInfo(APP, "http://127.0.0.1:9", "tok", os.getpid()))
    assert stack_dir().stat().st_mode & 0o777 == 0o700
    assert read_stack_file(APP) is not None


def test_the_session_runtime_directory_is_used_when_set(
    temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = temp_dir / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    path = write_stack_file(DevStackInfo(APP, "http://127.0.0.1:9", "tok", os.getpid()))
    assert path == runtime / "flyfn-dev" / f"{APP}.json"
    assert read_stack_file(APP) is not None


@pytest.mark.parametrize("app", ["../x", "a/b", ".hidden", ""])
def test_an_app_name_that_is_no_file_name_has_no_stack_file(temp_dir: Path, app: str) -> None:
    assert read_stack_file(app) is None
    with pytest.raises(ValueError, match="not an app name"):
        stack_file(app)
