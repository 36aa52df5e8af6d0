"""Machine pools against the emulated Machines API on loopback: creation, convergence, caching."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from django.test import override_settings

from flyfn.conf import get_settings
from flyfn.machine_role import MachineEnv, function, override_role
from flyfn.machines import Machine, MachineConfig
from flyfn.pool.choice import RankOrder, ReplayTarget
from flyfn.pool.converge import converge, is_outdated, machine_version
from flyfn.pool.listing import MachineListing
from flyfn.pool.manager import PoolManager
from flyfn.pool.spec import PoolSpec, image_hash, new_client, spec_for
from tests.support_machines_api import EMULATOR_APP, EMULATOR_TOKEN, MachinesAPI, serve_machines_api
from tests.support_pools import installed

IMAGE = "registry.fly.io/testapp:deployment-1"
NEW_IMAGE = "registry.fly.io/testapp:deployment-2"


@pytest.fixture
def fly(machines_api: MachinesAPI, pool_manager: PoolManager) -> Iterator[MachinesAPI]:
    """flyfn pointed at the emulator, with long-lived caches (tests decide when they expire)."""
    with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=3600)):
        yield machines_api


def instance(target: ReplayTarget | None) -> str:
    assert target is not None
    assert target.instance is not None
    return target.instance


def test_cold_pool_creates_a_machine_as_specified(
    machines_api: MachinesAPI, pool_manager: PoolManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORWARDED_SETTING", "s3")
    groups = {
        "pdf": {
            # A size Fly accepts: 2 performance CPUs need 4096-16384 MB.
            "guest": {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096},
            "autostop": "suspend",
            "internal_port": 8080,
            "env": ["FORWARDED_SETTING", "NOT_SET_ANYWHERE"],
        }
    }
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups)):
        machine_id = instance(pool_manager.wait_target("pdf", 10))
        version = spec_for(get_settings(), "pdf", {"FORWARDED_SETTING": "s3"}).version

    [machine] = machines_api.machines(group="pdf")
    assert machine.id == machine_id
    assert machine.name == f"flyfn-pdf-{image_hash(IMAGE)}-0"
    config = machine.config
    assert config is not None
    assert config.image == IMAGE
    assert config.env == {"FLYFN_GROUP": "pdf", "FORWARDED_SETTING": "s3"}
    assert config.metadata == {
        "flyfn_group": "pdf",
        "flyfn_version": version,
    }
    assert config.guest is not None
    assert (config.guest.cpu_kind, config.guest.cpus, config.guest.memory_mb) == (
        "performance",
        2,
        4096,
    )
    [service] = config.services or []
    assert service.internal_port == 8080
    assert service.autostart is True
    assert service.autostop == "suspend"
    assert [(p.port, p.handlers) for p in service.ports or []] == [
        (80, ["http"]),
        (443, ["tls", "http"]),
    ]
    assert config.restart is not None
    assert config.restart.policy == "on-failure"


def test_warm_pool_makes_no_api_call(fly: MachinesAPI, pool_manager: PoolManager) -> None:
    first = instance(pool_manager.wait_target("default", 10))
    calls = len(fly.calls)
    targets = {instance(pool_manager.get_target("default")) for _ in range(1000)}
    assert targets == {first}
    assert len(fly.calls) == calls


def test_concurrent_misses_share_one_operation(fly: MachinesAPI, pool_manager: PoolManager) -> None:
    start = threading.Barrier(20)
    results: list[str] = []

    def request() -> None:
        start.wait()
        results.append(instance(pool_manager.wait_target("default", 20)))

    threads = [threading.Thread(target=request) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 20
    assert len(set(results)) == 1
    # One convergence: list, create, re-list.
    assert (fly.list_calls, fly.create_calls) == (2, 1)


async def test_async_misses_share_one_operation(
    fly: MachinesAPI, pool_manager: PoolManager
) -> None:
    targets = await asyncio.gather(*(pool_manager.aget_target("default", 20) for _ in range(20)))
    assert len({instance(t) for t in targets}) == 1
    assert (fly.list_calls, fly.create_calls) == (2, 1)


@pytest.fixture
def unlimited_api() -> Iterator[MachinesAPI]:
    """The emulator without rate limits: for the racing tests, whose twenty pools stand for twenty
    processes on as many Machines all listing at once (more than Fly's burst of 3: the rate limits
    are tested in tests/test_rate_limits.py; here only convergence under races is)."""
    with serve_machines_api(rate_limits=False) as api:
        yield api


@pytest.mark.parametrize("count", [1, 3])
def test_twenty_racing_pools_in_threads_converge(unlimited_api: MachinesAPI, count: int) -> None:
    machines_api = unlimited_api
    managers = [PoolManager() for _ in range(20)]
    start = threading.Barrier(20)
    results: list[ReplayTarget | None] = []

    def cold_request(manager: PoolManager) -> None:
        start.wait()
        results.append(manager.wait_target("default", 30))

    settings = machines_api.flyfn_settings(GROUPS={"default": {"machines": count}})
    try:
        with override_settings(FLYFN=settings):
            threads = [threading.Thread(target=cold_request, args=(m,)) for m in managers]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
    finally:
        for manager in managers:
            manager.close()
    machines = machines_api.machines(group="default")
    assert len(machines) == count
    assert {instance(t) for t in results} <= {m.id for m in machines}
    assert len(results) == 20


RACER = textwrap.dedent(
    """
    import sys
    from flyfn.conf import load_settings
    from flyfn.pool.manager import PoolManager

    settings = load_settings(
        {"APP_NAME": sys.argv[1], "API_HOSTNAME": sys.argv[2], "API_TOKEN": sys.argv[3],
         "IMAGE_REF": sys.argv[4], "GROUPS": {"default": {"machines": int(sys.argv[5])}}},
        environ={},
    )
    manager = PoolManager(settings=lambda: settings)
    print("ready", flush=True)
    sys.stdin.readline()  # the start signal: every racer begins at once
    target = manager.wait_target("default", 30)
    print(target.instance if target else "none", flush=True)
    manager.close()
    """
)


@pytest.fixture
def unlimited_socket_api() -> Iterator[MachinesAPI]:
    """`unlimited_api` on a real socket, for the racers in other processes."""
    with serve_machines_api(rate_limits=False, on_socket=True) as api:
        yield api


@pytest.mark.e2e
@pytest.mark.parametrize("count", [2])
def test_twenty_racing_processes_converge(unlimited_socket_api: MachinesAPI, count: int) -> None:
    machines_api = unlimited_socket_api
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    args = [EMULATOR_APP, machines_api.url, EMULATOR_TOKEN, IMAGE, str(count)]
    racers: list[subprocess.Popen[str]] = []
    try:
        for _ in range(20):
            racers.append(
                subprocess.Popen(
                    [sys.executable, "-c", RACER, *args],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                    cwd=root,
                )
            )
        for racer in racers:
            assert racer.stdout is not None
            assert racer.stdout.readline().strip() == "ready"
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.write("go\n")
            racer.stdin.flush()
        outputs = [racer.communicate(timeout=60)[0].strip() for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait(5)
    machines = machines_api.machines(group="default")
    assert len(machines) == count
    assert set(outputs) <= {m.id for m in machines}
    assert all(racer.returncode == 0 for racer in racers)


def test_extra_machines_are_destroyed_keeping_the_lowest_names(
    fly: MachinesAPI, pool_manager: PoolManager
) -> None:
    spec = spec_for(get_settings(), "default")
    config = spec.config.model_dump(mode="json", exclude_none=True)
    made = {fly.create(name=f"{spec.name_prefix}{n}", config=config).name for n in (2, 0, 1)}
    assert len(made) == 3
    kept = instance(pool_manager.wait_target("default", 10))
    [machine] = fly.machines(group="default")
    assert (machine.id, machine.name) == (kept, f"{spec.name_prefix}0")


def test_routes_only_to_machines_of_its_own_image(
    machines_api: MachinesAPI, pool_manager: PoolManager
) -> None:
    with override_settings(FLYFN=machines_api.flyfn_settings(IMAGE, CACHE_TTL=3600)):
        old = instance(pool_manager.wait_target("default", 10))
    with override_settings(FLYFN=machines_api.flyfn_settings(NEW_IMAGE, CACHE_TTL=3600)):
        new = instance(pool_manager.wait_target("default", 10))
    assert new != old
    images = {m.id: m.config.image for m in machines_api.machines(group="default") if m.config}
    # The old image's Machine stays: app Machines still on that image route to it (gc removes it).
    assert images == {old: IMAGE, new: NEW_IMAGE}


def test_vanished_machine_leaves_the_cache_and_is_replaced(
    fly: MachinesAPI, pool_manager: PoolManager
) -> None:
    first = instance(pool_manager.wait_target("default", 10))
    fly.destroy(first)
    assert pool_manager.forget("default", first)
    future = pool_manager.pool("default").refresh()
    assert future is not None
    future.result(10)
    second = instance(pool_manager.get_target("default"))
    assert second != first
    assert [m.id for m in fly.machines(group="default")] == [second]


def test_a_flood_of_forged_failures_costs_one_list(
    fly: MachinesAPI, pool_manager: PoolManager
) -> None:
    # `fly-replay-failed` is unauthenticated: the first one naming a Machine drops it at once, the
    # rest within FORGET_MIN_INTERVAL are ignored (else a forged flood means a list per request).
    first = instance(pool_manager.wait_target("default", 10))
    lists = fly.list_calls
    assert pool_manager.forget("default", first)
    again = pool_manager.wait_target("default", 10)
    assert instance(again) == first  # it was alive after all: listed again
    for _ in range(50):
        assert not pool_manager.forget("default", first)
    assert instance(pool_manager.get_target("default")) == first
    assert fly.list_calls == lists + 1


def test_stale_cache_is_served_while_it_refreshes(
    machines_api: MachinesAPI, pool_manager: PoolManager
) -> None:
    # A tiny TTL: every read after the first is stale, which is what this test needs.
    with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=0.001)):
        first = instance(pool_manager.wait_target("default", 10))
        pool = pool_manager.pool("default")
        # Reads of the tiny-TTL cache may have started a refresh: let it end (listing `first`)
        # before the destroy, so that the next one is the only one that sees it gone.
        settled = pool.refresh()
        assert settled is not None
        settled.result(10)
        machines_api.destroy(first)
        assert instance(pool.target()) == first  # stale: served, and a refresh starts behind it
        future = pool.refresh()  # join that refresh
        assert future is not None
        future.result(10)
        assert instance(pool_manager.get_target("default")) != first


def test_app_strategy_keeps_machines_in_the_group_app(
    machines_api: MachinesAPI, pool_manager: PoolManager
) -> None:
    groups = {"batch": {"strategy": "app", "app": "testapp-fns", "machines": 2}}
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups)):
        target = pool_manager.wait_target("batch", 10)
    assert target == ReplayTarget(app="testapp-fns")
    assert len(machines_api.machines("testapp-fns", group="batch")) == 2
    assert machines_api.machines(group="batch") == []


def test_unreachable_api_gives_no_target_and_logs_once_per_burst(
    pool_manager: PoolManager, caplog: pytest.LogCaptureFixture
) -> None:
    settings = {
        "APP_NAME": EMULATOR_APP,
        "API_HOSTNAME": "http://127.0.0.1:9",  # discard port: nothing listens
        "API_TOKEN": "secret-token-value",
        "IMAGE_REF": IMAGE,
    }
    with override_settings(FLYFN=settings), caplog.at_level(logging.ERROR, "flyfn.pool"):
        assert pool_manager.wait_target("default", 10) is None
        # Within the back-off, cold requests fall back at once without calling the API again.
        assert pool_manager.wait_target("default", 10) is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "secret-token-value" not in caplog.text


def test_missing_token_gives_no_target(
    pool_manager: PoolManager, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLY_API_TOKEN", raising=False)
    settings = {"APP_NAME": EMULATOR_APP, "API_HOSTNAME": "http://127.0.0.1:9", "IMAGE_REF": IMAGE}
    with override_settings(FLYFN=settings), caplog.at_level(logging.ERROR, "flyfn.pool"):
        assert pool_manager.wait_target("default", 5) is None
    assert "FLY_API_TOKEN" in caplog.text


# ------------------------------------------------------------------ version, region, drift


def test_the_version_digests_what_the_machines_depend_on_never_the_values(
    machines_api: MachinesAPI,
) -> None:
    groups = {"pdf": {"env": ["FORWARDED"], "secrets": ["DATABASE_URL"]}}
    environ = {"FORWARDED": "f1", "DATABASE_URL": "postgres://u:pw-one@db/x"}

    def version(key: str = "key-one", image: str = IMAGE, **env: str) -> str:
        flyfn = machines_api.flyfn_settings(image, GROUPS=groups)
        with override_settings(FLYFN=flyfn, SECRET_KEY=key):
            spec = spec_for(get_settings(), "pdf", {**environ, **env})
        assert spec.config.metadata is not None
        assert spec.config.metadata["flyfn_version"] == spec.version
        metadata = json.dumps(spec.config.metadata)
        for value in (key, "pw-one", "f1"):
            assert value not in metadata  # never the values themselves
        return spec.version

    base = version()
    assert version() == base  # the same in every process
    others = [
        version(key="key-two"),
        version(FORWARDED="f2"),
        version(DATABASE_URL="postgres://u:pw-two@db/x"),
        version(image=NEW_IMAGE),
    ]
    assert len({base, *others}) == 5
    # A variable nobody named changes nothing.
    assert version(UNRELATED="x") == base


def test_machines_are_created_in_the_creating_machines_region(
    machines_api: MachinesAPI,
) -> None:
    groups = {"pinned": {"region": "syd"}}
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=groups)):
        settings = get_settings()
        assert spec_for(settings, "default", {"FLY_REGION": "ams"}).region == "ams"
        assert spec_for(settings, "pinned", {"FLY_REGION": "ams"}).region == "syd"
        assert spec_for(settings, "default", {}).region is None  # off Fly: Fly's own choice


def test_pool_creates_machines_in_fly_region(
    machines_api: MachinesAPI, pool_manager: PoolManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLY_REGION", "fra")
    with override_settings(FLYFN=machines_api.flyfn_settings()):
        instance(pool_manager.wait_target("default", 10))
    assert [m.region for m in machines_api.machines(group="default")] == ["fra"]


def test_a_new_secret_key_updates_the_machines_and_an_old_app_machine_leaves_them(
    machines_api: MachinesAPI,
) -> None:
    flyfn = machines_api.flyfn_settings()
    with override_settings(FLYFN=flyfn, SECRET_KEY="the-old-key"):
        old = spec_for(get_settings(), "default")
    with override_settings(FLYFN=flyfn, SECRET_KEY="the-new-key"):
        settings = get_settings()
        new = spec_for(settings, "default")

    async def scenario() -> None:
        async with new_client(settings) as client:
            [machine] = (await converge(client, old)).machines
            # An app Machine restarted with the new key (`fly secrets set`) after that Machine
            # last changed (the API's times have whole seconds).
            restarted = replace(new, started=time.time() + 2)
            done = await converge(client, restarted)
            assert (done.updated, [m.id for m in done.machines]) == ([machine.id], [machine.id])
            [updated] = machines_api.machines(group="default")
            assert machine_version(updated) == new.version
            # An app Machine still running the old key does not undo it: the Machine changed
            # after that app Machine read its secrets, so it has them at least as new.
            still_old = replace(old, started=time.time() - 3600)
            assert (await converge(client, still_old)).updated == []
            assert (await converge(client, restarted)).updated == []  # nothing left to do

    asyncio.run(scenario())
    assert machines_api.count("POST", r"/v1/apps/[^/]+/machines/[^/]+") == 1  # one update
    assert "the-new-key" not in repr(machines_api.machines(group="default"))


def test_values_the_api_leaves_out_are_not_drift(machines_api: MachinesAPI) -> None:
    with override_settings(FLYFN=machines_api.flyfn_settings()):
        spec = spec_for(get_settings(), "default")
    answered = spec.config.model_dump(mode="json", exclude_none=True)
    # Fly's API omits zero values (fly-go's omitempty).
    del answered["auto_destroy"]
    del answered["services"][0]["min_machines_running"]
    machine = Machine(id="m1", config=MachineConfig.model_validate(answered))
    assert not is_outdated(machine, spec.config.model_copy(update={"processes": []}))
    # ... but a value that differs still is.
    answered["auto_destroy"] = True
    assert is_outdated(Machine(id="m1", config=MachineConfig.model_validate(answered)), spec.config)


# --------------------------------------------------------------------------- elastic groups

ELASTIC = {"pdf": {"max_machines": 3, "concurrency": {"soft_limit": 10, "hard_limit": 12}}}


def test_an_elastic_group_keeps_its_max_machines_and_replays_to_the_first(
    machines_api: MachinesAPI, pool_manager: PoolManager
) -> None:
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=ELASTIC, CACHE_TTL=3600)):
        first = instance(pool_manager.wait_target("pdf", 10))
        assert instance(pool_manager.get_target("pdf")) == first  # the same one every time
        members = pool_manager.pool("pdf").members()
    machines = sorted(machines_api.machines(group="pdf"), key=_by_name)
    assert members == tuple(m.id for m in machines)
    assert len(members) == 3
    assert members[0] == first
    # Only the entry is launched; the others wait stopped until load reaches them.
    assert [m.state for m in machines][1:] == ["created", "created"]
    assert machines[0].state != "created"
    for machine in machines:
        assert machine.config is not None
        [service] = machine.config.services or []
        assert service.concurrency is not None
        assert service.concurrency.model_dump(exclude_none=True) == {
            "type": "requests",
            "soft_limit": 10,
            "hard_limit": 12,
        }


class EveryMember(RankOrder):
    """Another choice of Machines: the app Machines replay to every Machine of a group in turn."""

    def targets(self, spec: PoolSpec, members: Sequence[str]) -> tuple[ReplayTarget, ...]:
        return tuple(ReplayTarget(instance=m) for m in members)


def test_how_machines_are_chosen_is_the_managers_choice(machines_api: MachinesAPI) -> None:
    manager = PoolManager(choice=EveryMember())
    try:
        with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=ELASTIC, CACHE_TTL=3600)):
            manager.wait_target("pdf", 10)
            picked = [instance(manager.get_target("pdf")) for _ in range(6)]
            members = manager.members("pdf")
    finally:
        manager.close()
    assert len(members) == 3
    # Each Machine in turn (the turn that found the first target counts too).
    assert sorted(picked[:3]) == sorted(members)
    assert picked[3:] == picked[:3]


def test_without_concurrency_the_services_keep_flys_defaults(fly: MachinesAPI) -> None:
    [service] = spec_for(get_settings(), "default").config.services or []
    assert service.concurrency is None


def test_a_function_machine_reads_its_group_and_never_changes_it(
    machines_api: MachinesAPI, pool_manager: PoolManager
) -> None:
    with override_settings(FLYFN=machines_api.flyfn_settings(GROUPS=ELASTIC, CACHE_TTL=3600)):
        with override_role(function("pdf")):
            future = pool_manager.pool("pdf").refresh()
            assert future is not None
            future.result(10)
            assert pool_manager.pool("pdf").members() == ()  # nothing there: nothing created
            # An empty cache asks again behind the call: let that look end in this role too.
            again = pool_manager.pool("pdf").refresh()
            assert again is not None
            again.result(10)
        assert machines_api.machines(group="pdf") == []
        instance(pool_manager.wait_target("pdf", 10))  # an app Machine creates them
        made = tuple(m.id for m in sorted(machines_api.machines(group="pdf"), key=_by_name))
        reader = PoolManager()
        try:
            with installed(reader), override_role(function("pdf")):
                future = reader.pool("pdf").refresh()
                assert future is not None
                future.result(10)
                assert reader.pool("pdf").members() == made
        finally:
            reader.close()


def test_a_function_machine_never_creates_another_groups_machines(
    machines_api: MachinesAPI, pool_manager: PoolManager
) -> None:
    """A function Machine only reads pools: asked for another group's target (nothing in flyfn
    asks it that any more), it finds what exists and creates nothing, with another group's
    settings or a stale secret of its own."""
    flyfn = machines_api.flyfn_settings(GROUPS=ELASTIC, CACHE_TTL=3600)
    with override_settings(FLYFN=flyfn), override_role(function("default")):
        assert pool_manager.wait_target("pdf", 10) is None
    assert machines_api.machines(group="pdf") == []
    assert machines_api.create_calls == 0
    assert {method for method, _ in machines_api.calls} == {"GET"}


def _by_name(machine: Machine) -> str:
    return machine.name or ""


def test_every_change_to_a_group_is_a_pool_event(
    machines_api: MachinesAPI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flyfn.events.pool")
    flyfn = machines_api.flyfn_settings()
    with override_settings(FLYFN=flyfn, SECRET_KEY="the-old-key"):
        old = spec_for(get_settings(), "default")
    with override_settings(FLYFN=flyfn, SECRET_KEY="the-new-key"):
        settings = get_settings()
        new = replace(spec_for(settings, "default"), started=time.time() + 2)
    extra: list[str] = []

    async def scenario() -> None:
        async with new_client(settings) as client:
            [machine] = (await converge(client, old)).machines
            config = old.config.model_dump(mode="json", exclude_none=True)
            extra.append(machines_api.create(name=f"{old.name_prefix}7", config=config).id)
            done = await converge(client, new)
            assert done.updated == [machine.id]
            extra.insert(0, machine.id)

    asyncio.run(scenario())
    changes = [
        (r.flyfn_action, r.flyfn_machine, r.flyfn_group)  # type: ignore[attr-defined]
        for r in caplog.records
    ]
    created, stray = extra
    assert changes == [
        ("create", created, "default"),
        ("destroy", stray, "default"),
        ("update", created, "default"),
    ]
    for secret in ("the-new-key", "the-old-key"):
        assert secret not in caplog.text


def test_a_function_machine_sends_to_a_started_app_machine_of_the_shared_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listing = MachineListing(None)
    manager = PoolManager(listing=listing, random=lambda: 0.0)
    refreshed: list[str] = []
    monkeypatch.setattr(manager, "refresh", refreshed.append)

    def machine(machine_id: str, state: str, **metadata: str) -> Machine:
        return Machine(id=machine_id, state=state, config=MachineConfig(metadata=metadata))

    try:
        with override_role(function("pdf"), MachineEnv(app_name="app1", machine_id="fn0")):
            assert manager.app_machine() is None  # no list yet: one is asked for
            assert refreshed == ["pdf"]
            listing.write(
                "app1",
                time.time(),
                [
                    machine("fn1", "started", flyfn_group="pdf"),  # a function Machine: never
                    machine("app2", "stopped", fly_process_group="app"),
                    machine("app3", "started", fly_process_group="app"),
                    machine("app4", "destroyed", fly_process_group="app"),
                ],
            )
            assert manager.app_machine() == "app3"  # a started one first
            assert refreshed == ["pdf"]  # the list is fresh: nothing more asked
            listing.write("app1", time.time(), [machine("app2", "stopped", fly_process_group="a")])
            assert manager.app_machine() == "app2"  # Fly Proxy starts a stopped one
    finally:
        manager.close()
