"""What the cross-process tests of the replay record run in other OS processes (spawned: each
imports this module afresh), as a Machine's worker processes would."""

from __future__ import annotations

import os
from typing import Any

SECRET = "flyfn-tests-not-secret"


def key_of(n: int) -> str:
    from flyfn.replay_record import replay_key

    return replay_key(SECRET, "GET", f"/receipts/{n}.pdf", "", "")


def _machine(base: str, machine_id: str) -> Any:
    """This process's record of the Machine `machine_id`, found as a worker finds it: from
    FLY_MACHINE_ID in its environment, under the records' directory (`base` here)."""
    from flyfn import machine_dir, replay_record
    from flyfn.machine_role import detect_env

    machine_dir.base_dir = base
    os.environ["FLY_MACHINE_ID"] = machine_id
    return replay_record.machine_record(detect_env().machine_id)


def record(base: str, machine_id: str, count: int, results: Any) -> None:
    """A worker issuing `count` replays."""
    machine = _machine(base, machine_id)
    results.put(("recorded", [machine.add(key_of(n), 30.0) for n in range(count)]))


def consume(base: str, machine_id: str, count: int, start: Any, name: str, results: Any) -> None:
    """A worker receiving a fallback for each of `count` replays, started with the others."""
    machine = _machine(base, machine_id)
    start.wait(60)
    results.put((name, [n for n in range(count) if machine.take(key_of(n))]))


def replay_through_the_middleware(base: str, machine_id: str, results: Any) -> None:
    """A worker of an app Machine answering `GET /routing/pdf/` with its replay."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django

    django.setup()
    from django.test import Client, override_settings

    from flyfn import machine_dir
    from flyfn.machine_role import MAIN, MachineEnv, override_role
    from tests.support_middleware import routing_manager
    from tests.support_pools import installed

    machine_dir.base_dir = base
    middleware = ["flyfn.middleware.FlyReplayMiddleware"]
    with (
        installed(routing_manager()),
        override_role(MAIN, MachineEnv(machine_id=machine_id)),
        override_settings(MIDDLEWARE=middleware),
    ):
        response = Client().get("/routing/pdf/")
    results.put(response.get("fly-replay"))
