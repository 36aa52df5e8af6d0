"""ProcessRuntime: emulated Machines as real processes (tests/e2e/echo_app.py boots in ~0.3 s)."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest

from flyfn.emulator.logline import machine_label
from flyfn.emulator.process_groups import kill_group
from flyfn.emulator.roles import is_function_machine
from flyfn.emulator.state import MachinesEmulator
from flyfn.emulator.supervisor import ProcessRuntime, listening_socket
from flyfn.machine_dir import machine_dir
from flyfn.machines.models import (
    CreateMachineRequest,
    Machine,
    MachineConfig,
    MachineRestart,
)
from tests.support_wait import wait_for

ROOT = Path(__file__).resolve().parent.parent
ECHO = "tests.e2e.echo_app:app"
APP = "supervised"
Stack = tuple[MachinesEmulator, ProcessRuntime]  # what the `stack` fixture yields

pytestmark = pytest.mark.timeout(300)


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _suspended(pid: int) -> bool:
    return psutil.Process(pid).status() == psutil.STATUS_STOPPED


@pytest.fixture
def output() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
async def stack(output: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    # Inherited identity must not leak into a Machine.
    monkeypatch.setenv("FLYFN_GROUP", "leaked")
    monkeypatch.setenv("FLY_MACHINE_ID", "leaked")
    runtime = ProcessRuntime(
        ECHO,
        api_hostname="http://127.0.0.1:9",
        api_token="secret-token",
        cwd=ROOT,
        output=output,
        boot_timeout=60,
    )
    emulator = MachinesEmulator(runtime=runtime, region="local", default_app=APP)
    runtime.attach(emulator)
    try:
        yield emulator, runtime
    finally:
        await emulator.aclose()
        await runtime.aclose(grace=1.0)
        assert runtime.pids() == {}


async def _create(
    emulator: MachinesEmulator, env: dict[str, str] | None = None, **config: object
) -> Machine:
    request = CreateMachineRequest(
        config=MachineConfig(image="local/proj:dev-1", env=env, **config)
    )
    machine = await emulator.create(APP, request)
    await emulator.wait_for_state(APP, machine.id, "settled", timeout=60)
    return emulator.get(APP, machine.id)


async def _running(
    emulator: MachinesEmulator, runtime: ProcessRuntime, **config: object
) -> tuple[Machine, int]:
    """A settled Machine and the pid of its process (which must exist)."""
    machine = await _create(emulator, None, **config)
    pid = runtime.pid(machine.id)
    assert pid is not None
    return machine, pid


async def _stop(emulator: MachinesEmulator, machine_id: str) -> Machine:
    await emulator.stop(APP, machine_id)
    return await emulator.wait_for_state(APP, machine_id, "stopped", timeout=60)


async def _suspend(emulator: MachinesEmulator, machine_id: str) -> None:
    await emulator.suspend(APP, machine_id)
    await emulator.wait_for_state(APP, machine_id, "suspended", timeout=60)


async def _get(runtime: ProcessRuntime, machine_id: str) -> dict[str, object]:
    address = runtime.address(machine_id)
    assert address is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://{address[0]}:{address[1]}/hello")
    data: dict[str, object] = response.json()
    return data


@pytest.mark.e2e
async def test_machine_runs_with_flys_environment(stack: Stack, output: io.StringIO) -> None:
    emulator, runtime = stack
    machine = await _create(emulator, env={"FLYFN_GROUP": "pdf", "EXTRA": "1"})
    assert machine.state == "started"
    data = await _get(runtime, machine.id)
    env = data["env"]
    assert isinstance(env, dict)
    assert env["FLY_APP_NAME"] == APP
    assert env["FLY_MACHINE_ID"] == env["FLY_ALLOC_ID"] == machine.id
    assert env["FLY_IMAGE_REF"] == "local/proj:dev-1"
    assert env["FLY_REGION"] == env["PRIMARY_REGION"] == "local"
    assert env["FLY_PRIVATE_IP"] == machine.private_ip
    assert env["FLY_API_HOSTNAME"] == "http://127.0.0.1:9"
    assert env["FLY_API_TOKEN"] == "secret-token"
    assert env["FLYFN_GROUP"] == "pdf"  # the config's env, not the inherited one
    assert is_function_machine(machine)
    assert machine_label(machine) == f"fn:{machine.id[:4]}"
    assert "secret-token" not in repr(runtime)


@pytest.mark.e2e
async def test_inherited_identity_is_scrubbed(stack: Stack) -> None:
    emulator, runtime = stack
    machine = await _create(emulator)
    env = (await _get(runtime, machine.id))["env"]
    assert isinstance(env, dict)
    assert "FLYFN_GROUP" not in env
    assert env["FLY_MACHINE_ID"] == machine.id
    assert machine_label(machine).startswith("main:")


@pytest.mark.e2e
async def test_stop_ends_the_whole_process_group(stack: Stack) -> None:
    emulator, runtime = stack
    machine, pid = await _running(emulator, runtime)
    assert not _gone(pid)
    await _stop(emulator, machine.id)
    assert _gone(pid)
    assert runtime.address(machine.id) is None
    # Started again: a new process that answers.
    await emulator.start_and_wait(APP, machine.id, timeout=60)
    assert runtime.pid(machine.id) not in (None, pid)
    assert (await _get(runtime, machine.id))["machine"] == machine.id


@pytest.mark.e2e
async def test_suspend_freezes_and_resume_thaws(stack: Stack) -> None:
    emulator, runtime = stack
    machine, pid = await _running(emulator, runtime)
    await _suspend(emulator, machine.id)
    assert _suspended(pid)
    assert not runtime.is_running(machine.id)
    await emulator.start_and_wait(APP, machine.id, timeout=60)
    assert runtime.pid(machine.id) == pid  # the same process, thawed
    assert not _suspended(pid)
    assert (await _get(runtime, machine.id))["machine"] == machine.id


@pytest.mark.e2e
async def test_suspended_machine_can_be_stopped(stack: Stack) -> None:
    emulator, runtime = stack
    machine, pid = await _running(emulator, runtime)
    await _suspend(emulator, machine.id)
    await _stop(emulator, machine.id)
    assert _gone(pid)


@pytest.mark.e2e
async def test_dead_process_is_reported_and_machine_stops(stack: Stack) -> None:
    emulator, runtime = stack
    machine, pid = await _running(emulator, runtime, restart=MachineRestart(policy="no"))
    os.kill(pid, signal.SIGKILL)
    stopped = await emulator.wait_for_state(APP, machine.id, "stopped", timeout=60)
    exits = [e for e in stopped.events or [] if e.type == "exit"]
    assert exits
    assert isinstance(exits[0].request, dict)
    assert exits[0].request["exit_event"]["exit_code"] == 128 + signal.SIGKILL
    assert runtime.pids() == {}


@pytest.mark.e2e
async def test_dead_process_is_restarted_by_default_policy(stack: Stack) -> None:
    emulator, runtime = stack
    machine, pid = await _running(emulator, runtime)
    os.kill(pid, signal.SIGKILL)
    assert await runtime.reap(machine.id)
    await emulator.wait_for_state(APP, machine.id, "started", timeout=60)
    assert runtime.pid(machine.id) not in (None, pid)


@pytest.mark.e2e
async def test_failing_command_fails_the_machine_with_its_output(
    stack: Stack, output: io.StringIO
) -> None:
    emulator, runtime = stack
    machine = await _create(emulator, env={"ECHO_EXIT_ON_BOOT": "3", "FLYFN_GROUP": "x"})
    assert machine.state == "failed"
    start_events = [e for e in machine.events or [] if e.status == "failed"]
    assert start_events
    assert isinstance(start_events[0].request, dict)
    assert "exited during boot with code 3" in start_events[0].request["error"]
    assert f"fn:{machine.id[:4]} | echo app: refusing to boot" in output.getvalue()
    assert runtime.pids() == {}


@pytest.mark.e2e
async def test_concurrent_launches_make_one_process(stack: Stack) -> None:
    emulator, runtime = stack
    machine = await _create(emulator)
    current = await _stop(emulator, machine.id)
    await asyncio.gather(*(runtime.launch(APP, current) for _ in range(5)))
    assert list(runtime.pids()) == [machine.id]


CHILD_SCRIPT = """
import asyncio, sys
from flyfn.emulator.supervisor import ProcessRuntime
from flyfn.machines.models import Machine, MachineConfig

async def main():
    runtime = ProcessRuntime("tests.e2e.echo_app:app", boot_timeout=60)
    machine = Machine(id="0e1f2a3b4c5d6e", config=MachineConfig(image="x"))
    await runtime.launch("app", machine)
    print(runtime.pid(machine.id), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_machines_die_with_their_parent(sig: signal.Signals) -> None:
    """However the runtime's process ends, no Machine process outlives it."""
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    child_pid = None
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert not _gone(child_pid)
        parent.send_signal(sig)
        parent.wait(timeout=60)
        wait_for(lambda: _gone(child_pid), what=f"Machine process {child_pid} to die")
    finally:
        parent.kill()
        parent.wait(timeout=60)
        if child_pid is not None and not _gone(child_pid):
            kill_group(child_pid, signal.SIGKILL)


async def test_connections_accepted_on_a_listening_socket_disable_nagle() -> None:
    # Without TCP_NODELAY every keep-alive response after the first waits ~40 ms (delayed ACK).
    flags: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = writer.get_extra_info("socket")
        flags.append(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    sock = listening_socket("127.0.0.1", 0)
    server = await asyncio.start_server(handle, sock=sock)
    async with server:
        _, writer = await asyncio.open_connection(*sock.getsockname())
        for _ in range(100):
            if flags:
                break
            await asyncio.sleep(0.01)
        writer.close()
    assert flags == [1]


@pytest.mark.e2e
async def test_a_machines_directory_goes_with_it(stack: Stack) -> None:
    """What a Machine's processes kept in its directory (`flyfn.machine_dir`: the record of issued
    replays, the shared list) goes when it is destroyed, and every other one when the runtime
    closes, as Fly drops a Machine's file system."""
    emulator, runtime = stack
    destroyed, _ = await _running(emulator, runtime)
    kept, _ = await _running(emulator, runtime)
    paths = [machine_dir(m.id, "replays") for m in (destroyed, kept)]
    assert all(path is not None and path.is_dir() for path in paths)
    await emulator.destroy(APP, destroyed.id, force=True)
    await emulator.wait_for_state(APP, destroyed.id, "destroyed", timeout=60)
    assert paths[0] is not None
    assert not paths[0].parent.exists()
    assert paths[1] is not None
    assert paths[1].is_dir()
    await runtime.aclose(grace=1.0)
    assert not paths[1].parent.exists()


# -- what no secret changes (issue 23) ------------------------------------------------------------


async def test_no_secret_changes_the_api_a_machine_talks_to_nor_its_group() -> None:
    runtime = ProcessRuntime(
        ECHO, api_hostname="http://127.0.0.1:4280", api_token="local-token", base_env={}
    )
    emulator = MachinesEmulator(default_app=APP)
    runtime.attach(emulator)
    # Set past the API's checks (as a secrets file or an older stack could): the runtime still
    # boots the Machine with its own values.
    emulator.set_secrets(
        APP,
        {
            "FLYFN_GROUP": "admin",
            "FLYFN_HOME_APP": "elsewhere",
            "FLY_API_HOSTNAME": "http://capture.example",
            "FLY_API_TOKEN": "captured",
            "STRIPE_SECRET_KEY": "sk_test_1",
        },
    )
    env = {"FLYFN_GROUP": "pdf", "FLY_API_HOSTNAME": "http://config.example", "A": "1"}
    machine = Machine(id="m1", config=MachineConfig(image="local/p:1", env=env))
    seen = runtime.machine_env(APP, machine)
    assert seen["FLYFN_GROUP"] == "pdf"  # flyfn's own config.env value
    assert "FLYFN_HOME_APP" not in seen
    assert seen["FLY_API_HOSTNAME"] == "http://127.0.0.1:4280"
    assert seen["FLY_API_TOKEN"] == "local-token"
    assert (seen["STRIPE_SECRET_KEY"], seen["A"]) == ("sk_test_1", "1")
    # An app Machine (no group in its config) does not become a function Machine either.
    app_machine = Machine(id="m2", config=MachineConfig(image="local/p:1"))
    assert "FLYFN_GROUP" not in runtime.machine_env(APP, app_machine)
    await emulator.aclose()
