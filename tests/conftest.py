"""Shared pytest fixtures of flyfn's test suite (one section per area; add yours below)."""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import re
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import hypothesis
import pytest

from flyfn.elastic import SiblingReplay
from flyfn.emulator.api import EmulatorApp, MachinesEmulator, RateLimit, create_app
from flyfn.machines.client import AsyncMachinesClient
from flyfn.machines.models import Machine
from flyfn.pool.choice import MachineChoice, RankOrder, ReplayTarget
from flyfn.pool.manager import PoolManager, Pools, set_manager
from tests.support_emulator import VirtualClock, in_process
from tests.support_postgres import SQLITE_ENV, Database, Postgres, session_root
from tests.support_wait import wait_for

# -- Machines API emulator (owner: emulator-api) -------------------------------------------------

EMULATOR_TOKEN = "emulator-test-token"
EMULATOR_APP = "testapp"
EMULATOR_BASE_URL = "http://machines.emulator"
# Fly's Machines API spec, three versions, part of the repository (see its README).
FLY_SPEC_DIR = Path(__file__).resolve().parent / "fly_spec"


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def emulator() -> AsyncIterator[MachinesEmulator]:
    """A fresh state-only emulator; its background transitions are cancelled afterwards."""
    emu = MachinesEmulator(default_app=EMULATOR_APP)
    try:
        yield emu
    finally:
        await emu.aclose()


@pytest.fixture
def emulator_app(emulator: MachinesEmulator) -> EmulatorApp:
    """The emulated API without rate limits: for focused unit tests of its answers (everything
    else, `create_app()` without `rate_limit` included, runs within Fly's limits)."""
    return create_app(emulator, token=EMULATOR_TOKEN, rate_limit=None)


@pytest.fixture
async def emulator_http(emulator_app: EmulatorApp) -> AsyncIterator[httpx.AsyncClient]:
    """Raw HTTP to the emulator in process (ASGI), authorised."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=emulator_app),
        base_url=EMULATOR_BASE_URL,
        headers={"Authorization": f"Bearer {EMULATOR_TOKEN}"},
    ) as client:
        yield client


@pytest.fixture
async def emulator_client(emulator_app: EmulatorApp) -> AsyncIterator[AsyncMachinesClient]:
    """The real AsyncMachinesClient talking to the emulator in process (ASGI)."""
    async with AsyncMachinesClient(
        EMULATOR_APP,
        api_token=EMULATOR_TOKEN,
        api_hostname=EMULATOR_BASE_URL,
        transport=httpx.ASGITransport(app=emulator_app),
    ) as client:
        yield client


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    port = free_loopback_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="emulator-uvicorn", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), what="the server", step=0.02)
        if not server.started:
            raise RuntimeError("the server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# -- pools, middleware, manage.py flyfn (owner: pool-middleware) ---------------------------------

# Requests carrying this header are the test's own inspection, not counted as API calls.
_INSPECT_HEADER = "x-flyfn-test-inspect"


@dataclass
class MachinesAPI:
    """The emulator at a loopback URL, with every API call flyfn made to it (method, path)."""

    url: str
    calls: list[tuple[str, str]]
    http: httpx.Client

    def count(self, method: str, pattern: str = r"/v1/apps/[^/]+/machines") -> int:
        """How many calls with `method` had a path fully matching `pattern`."""
        regex = re.compile(pattern)
        return sum(1 for m, path in list(self.calls) if m == method and regex.fullmatch(path))

    @property
    def list_calls(self) -> int:
        return self.count("GET")

    @property
    def create_calls(self) -> int:
        return self.count("POST")

    def machines(self, app: str = EMULATOR_APP, *, group: str | None = None) -> list[Machine]:
        """The app's live Machines (optionally one flyfn group's), read without being counted."""
        params = {"metadata.flyfn_group": group} if group else {}
        response = self.http.get(f"/v1/apps/{app}/machines", params=params)
        response.raise_for_status()
        return [Machine.model_validate(m) for m in response.json()]

    def create(self, app: str = EMULATOR_APP, **body: Any) -> Machine:
        response = self.http.post(f"/v1/apps/{app}/machines", json=body)
        response.raise_for_status()
        return Machine.model_validate(response.json())

    def destroy(self, machine_id: str, app: str = EMULATOR_APP) -> None:
        self.http.delete(f"/v1/apps/{app}/machines/{machine_id}", params={"force": "true"})

    def flyfn_settings(
        self, image: str = "registry.fly.io/testapp:deployment-1", **extra: Any
    ) -> dict[str, Any]:
        """A FLYFN setting that points flyfn at this emulator."""
        return {
            "APP_NAME": EMULATOR_APP,
            "API_HOSTNAME": self.url,
            "API_TOKEN": EMULATOR_TOKEN,
            "IMAGE_REF": image,
            **extra,
        }


def _recording(app: Any, inspector: Any, calls: list[tuple[str, str]]) -> Any:
    """`app`, counting its calls; the test's own inspection goes to `inspector` (same emulator, no
    rate limits), so that it neither counts nor takes flyfn's share of the limits."""

    async def recorder(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if (_INSPECT_HEADER.encode(), b"1") in scope.get("headers", []):
                await inspector(scope, receive, send)
                return
            calls.append((scope["method"], scope["path"]))
        await app(scope, receive, send)

    return recorder


@contextmanager
def serve_machines_api(
    token: str = EMULATOR_TOKEN, *, rate_limits: bool = True, on_socket: bool = False
) -> Iterator[MachinesAPI]:
    """A fresh emulator accepting `token`, counting calls; within Fly's rate limits unless a focused
    test passes `rate_limits=False`. Its loopback URL is answered in process (every httpx client of
    this process reaches it, no server runs; the rate limits' time passes as flyfn's clients wait
    out a 429), or with `on_socket` by uvicorn in a thread (for other processes: e2e tests only)."""
    calls: list[tuple[str, str]] = []
    emulator = MachinesEmulator(default_app=EMULATOR_APP)
    # In process, Fly's limits run on a clock the Machines clients' Retry-After waits advance.
    clock = None if on_socket else VirtualClock()
    limits = RateLimit(clock=clock.now) if clock else RateLimit()
    app = create_app(emulator, token=token, rate_limit=limits if rate_limits else None)
    inspector = create_app(emulator, token=token, rate_limit=None)
    recording = _recording(app, inspector, calls)
    with contextlib.ExitStack() as stack:
        if on_socket:
            url = stack.enter_context(serve_in_thread(recording))
        else:
            url = f"http://127.0.0.1:{free_loopback_port()}"
            loop = stack.enter_context(in_process(url, recording, clock))
            # Its transitions run on that loop: cancelled there, before the loop stops.
            stack.callback(lambda: loop.submit(emulator.aclose()).result(10))
        http = stack.enter_context(
            httpx.Client(
                base_url=url,
                headers={"Authorization": f"Bearer {token}", _INSPECT_HEADER: "1"},
                timeout=10,
            )
        )
        yield MachinesAPI(url, calls, http)


@pytest.fixture
def machines_api() -> Iterator[MachinesAPI]:
    """A fresh emulator answering its loopback URL in process, counting the calls it receives."""
    with serve_machines_api() as api:
        yield api


Manager = TypeVar("Manager", bound=Pools)


@contextmanager
def installed(manager: Manager) -> Iterator[Manager]:
    """`manager` as flyfn's pool manager inside the block; the previous one again afterwards."""
    previous = set_manager(manager)
    try:
        yield manager
    finally:
        set_manager(previous)


class StaticPools:
    """`Pools` without any API: fixed targets and Machines per group, chosen from as flyfn does;
    records the Machines the middleware forgets and the groups it refreshes."""

    def __init__(
        self,
        targets: Mapping[str, ReplayTarget] | None = None,
        machines: Mapping[str, Sequence[str]] | None = None,
        choice: MachineChoice | None = None,
        app_machines: Sequence[str] = (),
    ) -> None:
        self.targets = dict(targets or {})
        self.app_machines = tuple(app_machines)
        self.machines = {group: tuple(ids) for group, ids in (machines or {}).items()}
        self.choice = choice or RankOrder()
        self.forgotten: list[tuple[str, str]] = []
        self.refreshed: list[str] = []

    def get_target(self, group: str) -> ReplayTarget | None:
        return self.targets.get(group)

    def wait_target(self, group: str, max_wait: float) -> ReplayTarget | None:
        return self.targets.get(group)

    async def aget_target(self, group: str, max_wait: float) -> ReplayTarget | None:
        return self.targets.get(group)

    def members(self, group: str) -> tuple[str, ...]:
        return self.machines.get(group, ())

    def sibling(self, group: str, me: str | None, hop: int) -> SiblingReplay | None:
        return self.choice.sibling(self.members(group), me, hop)

    def forget(self, group: str, machine_id: str) -> bool:
        self.forgotten.append((group, machine_id))
        return True

    def refresh(self, group: str) -> None:
        self.refreshed.append(group)

    def app_machine(self) -> str | None:
        return self.app_machines[0] if self.app_machines else None

    def wait_app_machine(self, max_wait: float) -> str | None:
        return self.app_machine()

    async def aget_app_machine(self, max_wait: float) -> str | None:
        return self.app_machine()


@pytest.fixture
def pool_manager() -> Iterator[PoolManager]:
    """A fresh process pool manager installed for the test, closed afterwards."""
    manager = PoolManager()
    try:
        with installed(manager):
            yield manager
    finally:
        manager.close()


# `make mutate` runs the property tests once per mutant: it sets this to fewer examples per test so
# that a module fits its time budget (each test's own settings stay the rule everywhere else).
_MUTATION_MAX_EXAMPLES = os.environ.get("FLYFN_MUTATION_MAX_EXAMPLES")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not _MUTATION_MAX_EXAMPLES:
        return
    for item in items:
        test = getattr(item, "obj", None)
        # Where @given/@settings keep a test's settings (what Hypothesis reads when it runs it).
        current = getattr(test, "_hypothesis_internal_use_settings", None)
        if isinstance(current, hypothesis.settings):
            limit = min(current.max_examples, int(_MUTATION_MAX_EXAMPLES))
            # mutmut traces every call: generation is slower than Hypothesis's checks expect.
            test._hypothesis_internal_use_settings = hypothesis.settings(  # type: ignore[union-attr]
                current,
                max_examples=limit,
                database=None,
                deadline=None,
                suppress_health_check=list(hypothesis.HealthCheck),
            )


# -- the unit set starts no process (owner: suite) ------------------------------------------------


class ChildProcessInUnitTest(RuntimeError):
    """A test not marked e2e tried to start a process."""


# Every way a test could start one: subprocess (asyncio's subprocesses and os.popen go through it),
# multiprocessing (its spawn and forkserver methods exec without subprocess), and os's own.
_SPAWNERS = [
    (subprocess.Popen, "_execute_child"),
    (multiprocessing.process.BaseProcess, "start"),
    *((os, name) for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system")),
]


@pytest.fixture(autouse=True)
def _no_child_process(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test not marked e2e that starts a child process: `make test-unit` (-m "not e2e")
    starts none. The session's PostgreSQL server, a session fixture set up before this one, is
    the suite's database rather than a process of a test."""
    if request.node.get_closest_marker("e2e") is not None:
        yield
        return
    attempts: list[str] = []

    def refuse(what: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            attempts.append(what)
            raise ChildProcessInUnitTest(
                f"{request.node.nodeid} started a child process ({what}): a test that needs one"
                " is end-to-end, mark it @pytest.mark.e2e (the unit set starts no process)"
            )

        return refused

    with pytest.MonkeyPatch.context() as patch:
        for owner, name in _SPAWNERS:
            if hasattr(owner, name):
                patch.setattr(owner, name, refuse(f"{getattr(owner, '__name__', owner)}.{name}"))
        yield
    if attempts:  # also when the code under test caught the error
        pytest.fail(f"{request.node.nodeid} tried to start a child process: {attempts[0]}")


# -- middleware (owner: routing) ------------------------------------------------------------------


@pytest.fixture(scope="session")
def _replay_records_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Machines' directories (records of issued replays, shared lists) live in this session's own
    temp dir, never in the shared /dev/shm or /tmp (other test runs may use the same Machine ids
    at the same time)."""
    from flyfn import machine_dir

    base = str(tmp_path_factory.mktemp("machines-shm"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(machine_dir, "base_dir", base)
        yield


@pytest.fixture(autouse=True)
def _fresh_process_state(_replay_records_dir: None) -> Iterator[None]:
    """Each test starts with the process state registered for `tests` reset: no replay on record
    (`fly-replay-failed` is believed only for one)."""
    from flyfn import process_state, replay_record  # noqa: F401  (registers the replay records)

    process_state.reset("tests")
    yield
    process_state.reset("tests")


# -- PostgreSQL (owner: tasks) --------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """The session's PostgreSQL server (tests/support_postgres.py), stopped at the end."""
    server = Postgres.start(session_root())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_database(postgres: Postgres) -> Iterator[Database]:
    """A fresh, empty database of the session's server for this test, dropped afterwards."""
    database = postgres.create_database()
    try:
        yield database
    finally:
        postgres.drop_database(database)


@pytest.fixture(scope="session")
def django_db_modify_db_settings(
    request: pytest.FixtureRequest, django_db_modify_db_settings_parallel_suffix: None
) -> None:
    """pytest-django's test database lives on the session's server (tests/settings.py points at
    it): start that server before pytest-django creates the database."""
    if not os.environ.get(SQLITE_ENV):
        request.getfixturevalue("postgres")


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """pytest-django's, and at the end, before it drops the test database: the connections that
    threads of flyfn.tasks still hold (the lease keeper's lives as long as the process) are
    closed by the server, or PostgreSQL would refuse the DROP."""
    yield
    from django.db import connection

    if connection.vendor == "postgresql":
        with django_db_blocker.unblock(), connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
