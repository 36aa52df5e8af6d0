"""What the cross-process tests of the replay record run in other OS processes (spawned: each
imports this module afresh), as a Machine's worker processes would."""

from __future__ import annotations

import os
import time
from typing import Any

SECRET = "flyfn-tests-not-secret"
# The time every process of these tests records and consumes at, whatever the wall clock says: a
# slow machine spawning them cannot make an entry expire.
NOW = 1_764_302_000.25
TTL = 16.0


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
    results.put(("recorded", [machine.add(key_of(n), TTL, now=NOW) for n in range(count)]))


def append(base: str, machine_id: str, first: int, count: int, start: Any, results: Any) -> None:
    """A worker issuing replays `first` to `first + count - 1` at the same time as the others,
    all into the same second's log."""
    machine = _machine(base, machine_id)
    start.wait(60)
    results.put(all(machine.add(key_of(n), TTL, now=NOW) for n in range(first, first + count)))


def consume(base: str, machine_id: str, count: int, start: Any, name: str, results: Any) -> None:
    """A worker receiving a fallback for each of `count` replays, started with the others."""
    machine = _machine(base, machine_id)
    start.wait(60)
    results.put((name, [n for n in range(count) if machine.take(key_of(n), now=NOW)]))


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
    # Before the replay is issued: its entry is live at this time, however long the test takes.
    issued_after = time.time()
    middleware = ["flyfn.middleware.FlyReplayMiddleware"]
    with (
        installed(routing_manager()),
        override_role(MAIN, MachineEnv(machine_id=machine_id)),
        override_settings(MIDDLEWARE=middleware),
    ):
        response = Client().get("/routing/pdf/")
    results.put((issued_after, response.get("fly-replay")))
