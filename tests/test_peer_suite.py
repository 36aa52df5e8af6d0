"""A peer's suite (issue 22): django-tasks-db's own tests, run with FlyMachinesBackend in place of
its DatabaseBackend.

The suite is not copied into this repository: the installed version's sdist is fetched at test
time (it ships `tests/tests.py`), and the modules it needs that live only in its repository (the
settings, the test tasks, manage.py) are written here, in the test's temporary directory. Every
`"django_tasks_db.DatabaseBackend"` setting of the suite names `flyfn.tasks.FlyMachinesBackend`
instead; the suite runs in a subprocess on a database of the session's PostgreSQL server. The test
asserts the exact set of tests that behave differently (docs/background-tasks.md lists each with
its reason): a new failure, or a difference that went away, fails it.

Deselect with `-m "not peer"`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import warnings
from pathlib import Path

import pytest

from tests.support_postgres import SQLITE_ENV, Postgres
from tests.support_procs import child_env

pytestmark = [pytest.mark.peer, pytest.mark.e2e, pytest.mark.timeout(1500)]

PEER = "django-tasks-db"
# Safety bounds (seconds), not speed tests.
DOWNLOAD_BOUND = 300
SUITE_BOUND = 1200

# The peer's tests that fail with FlyMachinesBackend, each with why (docs/background-tasks.md has
# the same table). Ids are `Class.test`.
_PRUNE = (
    "prune_db_task_results deletes results through Django's collector, which also deletes their "
    "flyfn leases and retried runs' errors (TaskLease, TaskFailure, on_delete=CASCADE): 6 queries "
    "where the suite counts 3"
)
_SENDER = (
    "task_enqueued's sender is the backend's class: FlyMachinesBackend, where the suite expects "
    "DatabaseBackend"
)
EXPECTED_DIFFERENCES: dict[str, str] = {
    "DatabaseBackendPruneTaskResultsTestCase.test_failed_min_age": _PRUNE,
    "DatabaseBackendPruneTaskResultsTestCase.test_failed_min_age_zero": _PRUNE,
    "DatabaseBackendPruneTaskResultsTestCase.test_min_age": _PRUNE,
    "DatabaseBackendPruneTaskResultsTestCase.test_only_prunes_specified_queue": _PRUNE,
    "DatabaseBackendPruneTaskResultsTestCase.test_prune_all_queues": _PRUNE,
    "DatabaseBackendPruneTaskResultsTestCase.test_prunes_tasks": _PRUNE,
    "DatabaseBackendTestCase.test_database_backend_app_missing": (
        "with INSTALLED_APPS=[] the backend's check adds flyfn.E012 ('flyfn.tasks' missing) to "
        "django-tasks-db's error: 2 errors where the suite counts 1"
    ),
    "DatabaseBackendTestCase.test_check": (
        "the suite's TASKS names no OPTIONS['beyond_horizon']: the backend's check warns "
        "flyfn.W005 (a task scheduled more than 15 minutes ahead runs on time only if an app "
        "Machine is up then): 1 message where the suite counts 0"
    ),
    "DatabaseBackendTestCase.test_enqueue_task": _SENDER,
    "DatabaseBackendTestCase.test_enqueue_task_async": _SENDER,
}

# The suite's tests that give a db_worker subprocess a fixed wall-clock time to start (one second)
# before they look, and a couple of seconds to stop: on a loaded machine one may fail for that
# alone. A failing one is run again on its own, up to RERUNS times; one that still fails is
# reported as a warning, not a failure (this suite has no wall-clock thresholds of its own).
TIMED = frozenset(
    f"DatabaseWorkerProcessTestCase.{name}"
    for name in (
        "test_interrupt_no_tasks",
        "test_interrupt_signals",
        "test_repeat_ctrl_c",
        "test_kill",
        "test_system_exit_task",
        "test_keyboard_interrupt_task",
        "test_multiple_workers",
    )
)
RERUNS = 2

# What pip prints when it cannot reach the index at all (as opposed to any other failure).
_UNREACHABLE = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
)


def fetch_suite(into: Path) -> Path:
    """The installed django-tasks-db's sdist, downloaded and unpacked into `into`; its root."""
    version = importlib.metadata.version(PEER)
    command = [sys.executable, "-m", "pip", "download", f"{PEER}=={version}"]
    command += ["--no-binary", ":all:", "--no-deps", "--disable-pip-version-check", "-d"]
    command += [str(into)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=DOWNLOAD_BOUND, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"the package index did not answer in {DOWNLOAD_BOUND}s: {PEER} not fetched")
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if any(sign in output for sign in _UNREACHABLE):
            pytest.skip(f"the package index is unreachable: {PEER}'s sdist not fetched")
        pytest.fail(f"pip download {PEER}=={version} failed:\n{output[-3000:]}")
    (sdist,) = into.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(into, filter="data")
    root = into / sdist.name.removesuffix(".tar.gz")
    assert (root / "tests" / "tests.py").is_file(), f"{sdist.name} ships no tests/tests.py"
    return root


_SETTINGS = '''
"""The peer suite's settings: its repository's, with flyfn's apps (written by flyfn's test)."""
import os

import dj_database_url

ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.messages",
    "django.contrib.sessions",
    "django.contrib.staticfiles",
    "flyfn",
    "flyfn.tasks",
    "django_tasks_db",
    "tests",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
STATIC_URL = "/static/"
SECRET_KEY = "flyfn-peer-suite-not-secret"
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"])}
USE_TZ = True
TEST_RUNNER = "tests.peer_runner.RecordingRunner"
# The repository's DatabaseBackend, swapped.
TASKS = {"default": {"BACKEND": "flyfn.tasks.FlyMachinesBackend"}}
'''

_WORKER_SETTINGS = '''
"""db_worker's settings in the suite's worker tests: the test database."""
from tests.settings import *  # noqa: F403

TASKS = {"default": {"BACKEND": "flyfn.tasks.FlyMachinesBackend"}}
for db in DATABASES.values():  # noqa: F405
    db["NAME"] = "test_" + db["NAME"]
'''

_URLS = """
from django.contrib import admin
from django.urls import include, path

urlpatterns = [path("admin/", admin.site.urls), path("", include("flyfn.tasks.urls"))]
"""

_TASKS = '''
"""The task functions the peer suite enqueues."""
import time
from typing import Any

try:
    from django.tasks import TaskContext, task
except ImportError:  # Django 5.2: the django-tasks backport
    from django_tasks import TaskContext, task


@task()
def noop_task(*args: Any, **kwargs: Any) -> None:
    return None


@task
def noop_task_from_bare_decorator(*args: Any, **kwargs: Any) -> None:
    return None


@task()
async def noop_task_async(*args: Any, **kwargs: Any) -> None:
    return None


@task()
def calculate_meaning_of_life() -> int:
    return 42


@task()
def failing_task_value_error() -> None:
    raise ValueError("This task failed due to ValueError")


@task()
def failing_task_system_exit() -> None:
    raise SystemExit("This task failed due to SystemExit")


@task()
def failing_task_keyboard_interrupt() -> None:
    raise KeyboardInterrupt("This task failed due to KeyboardInterrupt")


@task()
def complex_exception() -> None:
    raise ValueError(ValueError("This task failed"))


@task()
def complex_return_value() -> Any:
    return lambda: True


@task()
def exit_task() -> None:
    exit(1)


@task()
def hang() -> None:
    time.sleep(300)


@task()
def sleep_for(seconds: float) -> None:
    time.sleep(seconds)


@task(takes_context=True)
def get_task_id(context: TaskContext) -> str:
    return context.task_result.id


@task(takes_context=True)
def test_context(context: TaskContext, attempt: int) -> None:
    assert isinstance(context, TaskContext)
    assert context.attempt == attempt
'''

_MANAGE = """
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""

# Records each test's outcome (a test any of whose subtests failed has failed) into the JSON
# file named by FLYFN_PEER_RESULTS.
_RUNNER = """
import json
import os
import unittest

from django.test.runner import DiscoverRunner


def _name(test):
    method = getattr(test, "_testMethodName", None)
    return f"{type(test).__name__}.{method}" if method else str(test)


def _why(err):
    kind, value, _ = err
    text = str(value).strip().splitlines()
    return f"{kind.__name__}: {text[0] if text else ''}"[:300]


class RecordingResult(unittest.TextTestResult):
    outcomes = {}

    def _set(self, test, outcome, why=""):
        name = _name(test)
        if self.outcomes.get(name, ("",))[0] != "failed":
            self.outcomes[name] = (outcome, why)

    def addSuccess(self, test):
        super().addSuccess(test)
        self._set(test, "passed")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._set(test, "failed", _why(err))

    def addError(self, test, err):
        super().addError(test, err)
        self._set(test, "failed", _why(err))

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._set(test, "failed", _why(err))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._set(test, "skipped", reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._set(test, "passed")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._set(test, "failed", "unexpected success")

    def stopTestRun(self):
        super().stopTestRun()
        with open(os.environ["FLYFN_PEER_RESULTS"], "w") as out:
            json.dump(self.outcomes, out, indent=1, sort_keys=True)


class RecordingRunner(DiscoverRunner):
    def get_resultclass(self):
        return RecordingResult

    def setup_test_environment(self, **kwargs):
        # This process stands for an app Machine: it enqueues, and its tasks are run by the
        # suite's db_worker, as on Fly by a function Machine. Off Fly flyfn's dispatcher would
        # run them in a thread of this process instead, racing the suite's db_worker (which of
        # the two claims a task first decides the outcome): held off.
        from flyfn.tasks.dispatch import Dispatcher

        Dispatcher.notify = lambda self, group=None: None
        super().setup_test_environment(**kwargs)

    def teardown_databases(self, old_config, **kwargs):
        # flyfn's runner threads still hold connections: end them, or the DROP is refused.
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        super().teardown_databases(old_config, **kwargs)
"""


def write_project(root: Path) -> None:
    """The modules the sdist's tests/tests.py needs, next to it, and its backend swapped."""
    tests = root / "tests"
    suite = tests / "tests.py"
    text = suite.read_text()
    original = '"django_tasks_db.DatabaseBackend"'
    assert original in text, "the suite no longer names its backend as expected"
    suite.write_text(text.replace(original, '"flyfn.tasks.FlyMachinesBackend"'))
    for name, source in {
        "__init__.py": "",
        "settings.py": _SETTINGS,
        "db_worker_test_settings.py": _WORKER_SETTINGS,
        "urls.py": _URLS,
        "tasks.py": _TASKS,
        "peer_runner.py": _RUNNER,
    }.items():
        (tests / name).write_text(textwrap.dedent(source).lstrip())
    (root / "manage.py").write_text(textwrap.dedent(_MANAGE).lstrip())


def run_suite(
    root: Path, database_url: str, labels: list[str]
) -> tuple[dict[str, tuple[str, str]], str]:
    """(each test's outcome and why, the run's output): the tests of `labels`."""
    results = root / "results.json"
    results.unlink(missing_ok=True)
    repository = Path(__file__).resolve().parent.parent
    env = child_env(("FLY_", "DJANGO_"))
    env |= {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": database_url,
        "FLYFN_PEER_RESULTS": str(results),
        # The peer's `tests` package first, then this checkout's flyfn.
        "PYTHONPATH": os.pathsep.join([str(root), str(repository)]),
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "manage", "test", *labels, "--noinput", "-v", "2"]
    done = subprocess.run(
        command,
        cwd=root,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SUITE_BOUND,
        check=False,
    )
    output = done.stdout + done.stderr
    assert results.is_file(), f"the peer suite recorded nothing:\n{output[-5000:]}"
    outcomes = {name: (o, why) for name, (o, why) in json.loads(results.read_text()).items()}
    return outcomes, output


@pytest.mark.skipif(bool(os.environ.get(SQLITE_ENV)), reason="the peer suite runs on PostgreSQL")
def test_peer_suite_with_flyfn_backend(tmp_path: Path, postgres: Postgres) -> None:
    root = fetch_suite(tmp_path)
    write_project(root)
    database = postgres.create_database("peer")
    try:
        outcomes, output = run_suite(root, database.url, ["tests"])
        for _ in range(RERUNS):
            again = [n for n in TIMED if outcomes.get(n, ("",))[0] == "failed"]
            if not again:
                break
            print(f"peer suite: timed tests run again: {', '.join(sorted(again))}")
            rerun, output = run_suite(root, database.url, [f"tests.tests.{n}" for n in again])
            outcomes |= rerun
    finally:
        postgres.drop_database(database)
    failed = {name: why for name, (o, why) in outcomes.items() if o == "failed"}
    passed = sorted(name for name, (o, _) in outcomes.items() if o == "passed")
    report = "\n".join(f"  {name}: {why}" for name, why in sorted(failed.items()))
    print(f"peer suite: {len(passed)} passed, {len(failed)} failed\n{report}")
    assert passed, f"no test of the peer suite passed:\n{output[-5000:]}"
    slow = sorted(set(failed) & TIMED)
    if slow:
        warnings.warn(
            f"peer suite: timed tests failed {RERUNS + 1} times (a loaded machine?): {slow}",
            stacklevel=1,
        )
    assert sorted(set(failed) - TIMED) == sorted(EXPECTED_DIFFERENCES), (
        f"the peer suite's differences changed:\n{report}\n\n{output[-8000:]}"
    )
