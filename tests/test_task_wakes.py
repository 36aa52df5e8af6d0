"""Task wakes, security (issue 23 item 5): an app Machine checks a wake's signature before it
replays it; a signed wake is usable once; the wake's answer carries no exception text. The
function Machine's view is called without the middleware (a replay's routing is its tests')."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import OperationalError
from django.test import AsyncClient
from django.urls import clear_url_caches
from pytest_django.fixtures import Settings as SettingsWrapper

from flyfn import machine_role
from flyfn.fly.headers import FLY_REPLAY
from flyfn.pool.choice import ReplayTarget
from flyfn.tasks import runner
from flyfn.tasks.dispatch import Dispatcher
from flyfn.tasks.wake import WAKE_HEADER, sign_wake
from tests.support_middleware import routing_manager
from tests.support_pools import StaticPools, installed
from tests.test_tasks import TASKS, _wake_views_leave_the_registry  # noqa: F401

TASKS_MACHINE = "3d8d9e1f2a4b6c"
URL = "/_flyfn/tasks/tasks/"
FUNCTION_ENV = machine_role.MachineEnv(app_name="testapp", machine_id="fn0123456789ab")


@pytest.fixture(autouse=True)
def _project(settings: SettingsWrapper, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.TASKS = TASKS
    settings.ROOT_URLCONF = "tests.tasks_urls"
    # Another module's tests may have taken the wake views out of the registry: URLs anew.
    import flyfn.tasks.urls
    import tests.tasks_urls

    importlib.reload(flyfn.tasks.urls)
    importlib.reload(tests.tasks_urls)
    clear_url_caches()
    monkeypatch.setattr(Dispatcher, "notify", lambda self, group=None: None)


@pytest.fixture
def manager() -> Iterator[StaticPools]:
    with installed(routing_manager(tasks=ReplayTarget(instance=TASKS_MACHINE))) as fake:
        yield fake


async def body(response: Any) -> str:
    chunks = response.streaming_content
    return b"".join([chunk async for chunk in chunks]).decode()


async def test_an_app_machine_refuses_an_unsigned_wake_without_replaying_it(
    manager: StaticPools, settings: SettingsWrapper
) -> None:
    settings.MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
    client = AsyncClient()
    with machine_role.override_role(machine_role.MAIN):
        for headers in ({}, {WAKE_HEADER: "forged"}, {WAKE_HEADER: sign_wake("pdf")}):
            response = await client.post(URL, headers=headers)
            assert response.status_code == 403, headers
            assert FLY_REPLAY not in response.headers
        signed = await client.post(URL, headers={WAKE_HEADER: sign_wake("tasks")})
    assert TASKS_MACHINE in signed.headers[FLY_REPLAY]


@pytest.mark.django_db(transaction=True)
async def test_a_signed_wake_is_used_once() -> None:
    header = {WAKE_HEADER: sign_wake("tasks")}
    client = AsyncClient()
    with machine_role.override_role(machine_role.function("tasks"), FUNCTION_ENV):
        first = await client.post(URL, headers=header)
        assert first.status_code == 200
        assert '"done": true' in await body(first)
        again = await client.post(URL, headers=header)
        assert again.status_code == 403
        assert b"already used" in again.content
        fresh = await client.post(URL, headers={WAKE_HEADER: sign_wake("tasks")})
        assert fresh.status_code == 200
        await body(fresh)


@pytest.mark.django_db(transaction=True)
async def test_a_failed_wake_logs_its_error_and_answers_without_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> int:
        raise OperationalError('connection to "db.internal" failed: password for user app')

    monkeypatch.setattr(runner, "run_until_idle", broken)
    caplog.set_level(logging.ERROR, logger="flyfn.tasks")
    with machine_role.override_role(machine_role.function("tasks"), FUNCTION_ENV):
        response = await AsyncClient().post(URL, headers={WAKE_HEADER: sign_wake("tasks")})
        text = await body(response)
    last = text.strip().splitlines()[-1]
    assert '"done": false' in last
    assert "db.internal" not in text
    assert "password" not in text
    assert "db.internal" in caplog.text
