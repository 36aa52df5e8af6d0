"""Shared pytest fixtures of flyfn's test suite (one section per area; add yours below)."""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import hypothesis
import pytest

from flyfn.emulator.api import EmulatorApp, MachinesEmulator, create_app
from flyfn.machines.client import AsyncMachinesClient
from flyfn.pool.manager import PoolManager
from tests.support_machines_api import (
    EMULATOR_APP,
    EMULATOR_BASE_URL,
    EMULATOR_TOKEN,
    MachinesAPI,
    serve_machines_api,
)
from tests.support_pools import installed
from tests.support_postgres import SQLITE_ENV, Database, Postgres, session_root

# -- Machines API emulator (owner: emulator-api) -------------------------------------------------


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


# -- pools, middleware, manage.py flyfn (owner: pool-middleware) ---------------------------------


@pytest.fixture
def machines_api() -> Iterator[MachinesAPI]:
    """A fresh emulator answering its loopback URL in process, counting the calls it receives."""
    with serve_machines_api() as api:
        yield api


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
    at the same time): this process's, and through `FLYFN_MACHINE_DIRS` those of the processes it
    starts (`flyfn dev` and its Machines, worker processes), so a killed stack leaves nothing in
    /dev/shm."""
    from flyfn import machine_dir

    base = str(tmp_path_factory.mktemp("machines-shm"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(machine_dir, "base_dir", base)
        patch.setenv(machine_dir.MACHINE_DIRS_ENV, base)
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
