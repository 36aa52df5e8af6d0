"""Fly Proxy's autostop in the emulator (`flyfn.emulator.proxy.autostop`), pure: the pass's plan
on plain Machines with the load injected, `Autostop.once` over a state-only emulator with an
injected clock, and PM08 (no autostart of a stopping or failed Machine) in the proxy's routing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from flyfn.emulator.proxy import balancer
from flyfn.emulator.proxy.autostop import DEFAULT_AUTOSTOP_INTERVAL, Autostop, Stop, plan
from flyfn.emulator.proxy.errors import Unreachable
from flyfn.emulator.proxy.load import Load
from flyfn.emulator.proxy.routing import Destination, pick, step_for, unavailable_detail
from flyfn.emulator.state import MachinesEmulator, StateOnlyRuntime
from flyfn.fly.replay import ReplayFailed
from flyfn.machines.models import (
    CreateMachineRequest,
    Machine,
    MachineConfig,
    MachinePort,
    MachineService,
    MachineServiceConcurrency,
    StopConfig,
)
from tests.support_proxy import APP, Stack, proxy_stack, replay_once


def service(
    *, autostop: str = "stop", min_running: int | None = None, soft: int | None = None
) -> MachineService:
    return MachineService(
        protocol="tcp",
        internal_port=8000,
        autostop=autostop,
        min_machines_running=min_running,
        ports=[MachinePort(port=80, handlers=["http"])],
        concurrency=MachineServiceConcurrency(type="requests", soft_limit=soft) if soft else None,
    )


def machine(
    machine_id: str,
    state: str = "started",
    *,
    group: str | None = "g",
    region: str = "ams",
    autostop: str = "stop",
    min_running: int | None = None,
    soft: int | None = None,
    process_group: str | None = None,
) -> Machine:
    env = {"FLYFN_GROUP": group} if group else None
    metadata = {"fly_process_group": process_group} if process_group else None
    return Machine(
        id=machine_id,
        state=state,
        region=region,
        config=MachineConfig(
            image="local/p:1",
            env=env,
            metadata=metadata,
            services=[service(autostop=autostop, min_running=min_running, soft=soft)],
        ),
    )


def loads(**by_id: int) -> Callable[[str], int]:
    return lambda machine_id: by_id.get(machine_id, 0)


def one_pass(
    machines: list[Machine],
    load: Callable[[str], int] | None = None,
    idle_since: Callable[[str], float] | None = None,
    *,
    primary_region: str = "ams",
) -> list[str]:
    stops = plan(
        machines,
        load=load or loads(),
        in_flight=loads(),
        idle_since=idle_since or (lambda _: 0.0),
        region="ams",
        primary_region=primary_region,
    )
    return [s.machine.id for s in stops]


# -- the plan of one pass ----------------------------------------------------------------------


def test_fly_runs_a_pass_every_five_minutes() -> None:
    assert DEFAULT_AUTOSTOP_INTERVAL == 300.0


def test_a_lone_machine_stops_only_at_zero_load() -> None:
    assert one_pass([machine("a")], loads(a=1)) == []
    assert one_pass([machine("a")], loads(a=0)) == ["a"]


def test_one_machine_per_region_and_role_per_pass() -> None:
    fleet = [machine("a"), machine("b"), machine("c")]
    assert len(one_pass(fleet)) == 1
    # Each region, each function group and each process group is apart.
    fleet += [
        machine("d", region="fra"),
        machine("e", region="fra"),
        machine("f", group="other"),
        machine("g", group=None, process_group="app"),
        machine("h", group=None, process_group="worker"),
    ]
    stopped = one_pass(fleet)
    assert len(stopped) == 5
    assert len(set(stopped) & {"a", "b", "c"}) == 1
    assert len(set(stopped) & {"d", "e"}) == 1
    assert {"f", "g", "h"} <= set(stopped)


def test_successive_passes_stop_idle_machines_one_at_a_time() -> None:
    fleet = {m.id: m for m in (machine("a"), machine("b"), machine("c"))}
    order = []
    for _ in range(3):
        (stopped,) = one_pass(list(fleet.values()))
        order.append(stopped)
        fleet[stopped] = machine(stopped, "stopped")
    assert sorted(order) == ["a", "b", "c"]
    assert one_pass(list(fleet.values())) == []


def test_excess_counts_the_machines_over_their_soft_limit() -> None:
    fleet = [machine("a", soft=2), machine("b", soft=2), machine("c", soft=2)]
    # excess = 3 - (0 + 1) = 2: one goes, the least loaded, even with requests in flight.
    assert one_pass(fleet, loads(a=2, b=1, c=2)) == ["b"]
    # excess = 3 - (1 + 1) = 1: still one.
    assert one_pass(fleet, loads(a=3, b=1, c=2)) == ["b"]
    # excess = 3 - (2 + 1) = 0: none.
    assert one_pass(fleet, loads(a=3, b=1, c=5)) == []
    # At the soft limit is not over it.
    assert one_pass(fleet, loads(a=2, b=2, c=2)) != []


def test_fly_s_default_soft_limit_is_twenty() -> None:
    fleet = [machine("a"), machine("b")]
    assert one_pass(fleet, loads(a=21, b=20)) == []  # 2 - (1 + 1)
    assert one_pass(fleet, loads(a=20, b=19)) == ["b"]


def test_ties_go_to_the_machine_idle_longest() -> None:
    fleet = [machine("a"), machine("b"), machine("c")]
    since = {"a": 50.0, "b": 10.0, "c": 30.0}
    assert one_pass(fleet, loads(), since.__getitem__) == ["b"]
    assert one_pass(fleet, loads(b=1), since.__getitem__) == ["c"]


def test_min_machines_running_holds_in_the_primary_region_only() -> None:
    primary = [machine("a", min_running=1)]
    elsewhere = [machine("b", region="fra", min_running=1)]
    assert one_pass(primary + elsewhere, primary_region="ams") == ["b"]
    assert one_pass(primary + elsewhere, primary_region="fra") == ["a"]
    two = [machine("a", min_running=1), machine("c", min_running=1)]
    assert len(one_pass(two)) == 1  # down to one, then kept
    assert one_pass([machine("a", min_running=0)]) == ["a"]  # 0 stops them all


def test_only_started_machines_with_autostop_are_considered() -> None:
    fleet = [
        machine("a", autostop="off"),
        machine("b", "stopped"),
        machine("c", "starting"),
        machine("d", "suspended"),
    ]
    assert one_pass(fleet) == []
    # The off one is no peer either: the lone autostopping Machine stops only when idle.
    assert one_pass([machine("a", autostop="off"), machine("e")], loads(e=1)) == []


def test_suspend_mode_is_planned_as_a_suspend() -> None:
    (stop,) = plan(
        [machine("a", autostop="suspend")],
        load=loads(),
        in_flight=loads(),
        idle_since=lambda _: 0.0,
        region="ams",
        primary_region="ams",
    )
    assert stop == Stop(machine("a", autostop="suspend"), "suspend", 0)


def test_a_machine_to_suspend_with_requests_in_flight_is_planned_as_a_stop() -> None:
    started = [machine("a", autostop="suspend"), machine("b", autostop="suspend")]
    (stop,) = plan(
        started,
        load=loads(a=1, b=1),
        in_flight=loads(a=1, b=1),
        idle_since=lambda machine_id: {"a": 0.0, "b": 1.0}[machine_id],
        region="ams",
        primary_region="ams",
    )
    assert stop == Stop(started[0], "stop", 1, 2)


# -- load: the peak since the previous pass ----------------------------------------------------


def test_load_is_the_peak_since_the_previous_pass() -> None:
    load = Load(clock=lambda: 0.0)
    assert load.peak("a") == 0
    load.begin("a")
    load.begin("a")
    load.end("a")
    assert load.peak("a") == 2
    load.new_pass()
    assert load.peak("a") == 1  # still one in flight
    load.end("a")
    assert load.peak("a") == 1  # it had one since the pass
    load.new_pass()
    assert load.peak("a") == 0
    load.wait("b")  # waiting for the Machine to start counts too
    assert load.peak("b") == 1


# -- Autostop.once over the emulator ------------------------------------------------------------


class Recording(StateOnlyRuntime):
    def __init__(self) -> None:
        self.stops: list[tuple[str, str, float]] = []
        self.suspends: list[str] = []

    async def stop(self, app: str, machine: Machine, signal: str, timeout: float) -> None:
        self.stops.append((machine.id, signal, timeout))

    async def suspend(self, app: str, machine: Machine) -> None:
        self.suspends.append(machine.id)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[MachinesEmulator, Recording]]:
    runtime = Recording()
    # A still clock: every Machine started "at" the pass before the first one (no grace pass).
    machines = MachinesEmulator(runtime=runtime, region="ams", clock=Clock())
    try:
        yield machines, runtime
    finally:
        await machines.aclose()


async def create(
    machines: MachinesEmulator,
    *,
    group: str = "g",
    autostop: str = "stop",
    stop_config: StopConfig | None = None,
    region: str | None = None,
) -> Machine:
    created = await machines.create(
        APP,
        CreateMachineRequest(
            region=region,
            config=MachineConfig(
                image="local/p:1",
                env={"FLYFN_GROUP": group},
                services=[service(autostop=autostop)],
                stop_config=stop_config,
            ),
        ),
    )
    await machines.settle()
    return created


async def test_once_stops_one_per_pass_and_logs_the_pass(
    emulator: tuple[MachinesEmulator, Recording],
) -> None:
    machines, _ = emulator
    clock = Clock()
    events: list[str] = []
    autostop = Autostop(
        machines, Load(clock), apps={APP}, region="ams", interval=0, on_event=events.append
    )
    for _ in range(3):
        await create(machines)
    stopped = []
    for _ in range(4):
        clock.now += 300
        stopped += await autostop.once()
        await machines.settle()
    assert len(stopped) == len(set(stopped)) == 3
    assert [m.state for m in machines.list(APP)] == ["stopped"] * 3
    assert [e.split("(")[1] for e in events] == [
        "pass 1, one of 3 started)",
        "pass 2, one of 2 started)",
        "pass 3)",
    ]
    assert autostop.passes == 4


async def test_a_machine_busy_since_the_previous_pass_is_not_stopped_alone(
    emulator: tuple[MachinesEmulator, Recording],
) -> None:
    machines, _ = emulator
    clock = Clock()
    load = Load(clock)
    autostop = Autostop(machines, load, apps={APP}, region="ams", interval=0)
    fn = await create(machines)
    load.begin(fn.id)
    clock.now += 1
    load.end(fn.id)  # served between two passes
    assert await autostop.once(now=clock.now + 300) == []
    assert await autostop.once(now=clock.now + 600) == [fn.id]


async def test_suspend_mode_suspends(emulator: tuple[MachinesEmulator, Recording]) -> None:
    machines, runtime = emulator
    autostop = Autostop(machines, Load(Clock()), apps={APP}, region="ams", interval=0)
    fn = await create(machines, autostop="suspend")
    assert await autostop.once() == [fn.id]
    await machines.settle()
    assert runtime.suspends == [fn.id]
    assert machines.get(APP, fn.id).state == "suspended"


async def test_a_machine_to_suspend_with_requests_in_flight_is_stopped_instead(
    emulator: tuple[MachinesEmulator, Recording],
) -> None:
    machines, runtime = emulator
    clock = Clock()
    load = Load(clock)
    events: list[str] = []
    autostop = Autostop(
        machines, load, apps={APP}, region="ams", interval=0, on_event=events.append
    )
    for _ in range(2):  # excess 1: one of them goes, each with a request in flight
        load.begin((await create(machines, autostop="suspend")).id)
    clock.now += 300
    (acted,) = await autostop.once()
    await machines.settle()
    assert runtime.suspends == []
    assert [stop[0] for stop in runtime.stops] == [acted]
    assert machines.get(APP, acted).state == "stopped"
    assert " stopped at load 1 " in events[0]


async def test_min_machines_running_uses_the_primary_region(
    emulator: tuple[MachinesEmulator, Recording],
) -> None:
    machines, _ = emulator
    kept = await machines.create(
        APP,
        CreateMachineRequest(
            config=MachineConfig(
                image="local/p:1",
                env={"FLYFN_GROUP": "g"},
                services=[service(min_running=1)],
            ),
        ),
    )
    await machines.settle()
    primary = Autostop(machines, Load(Clock()), apps={APP}, region="ams", interval=0)
    assert await primary.once() == []
    other = Autostop(
        machines, Load(Clock()), apps={APP}, region="ams", primary_region="fra", interval=0
    )
    assert await other.once() == [kept.id]


async def test_a_stop_by_autostop_uses_the_stop_config(
    emulator: tuple[MachinesEmulator, Recording],
) -> None:
    machines, runtime = emulator
    autostop = Autostop(machines, Load(Clock()), apps={APP}, region="ams", interval=0)
    default = await create(machines, group="a")
    configured = await create(
        machines, group="b", stop_config=StopConfig(signal="SIGTERM", timeout="30s")
    )
    clamped = await create(machines, group="c", stop_config=StopConfig(timeout="10m"))
    assert len(await autostop.once()) == 3
    await machines.settle()
    assert sorted(runtime.stops) == sorted(
        [
            (default.id, "SIGINT", 5.0),
            (configured.id, "SIGTERM", 30.0),
            (clamped.id, "SIGINT", 300.0),
        ]
    )


async def test_a_machine_started_since_the_previous_pass_gets_one_pass_of_grace() -> None:
    """Booted for requests that have not reached it yet (they wait for its start): it is not
    stopped by the very next pass, only once a whole pass went by without load."""
    clock = Clock()
    machines = MachinesEmulator(region="ams", clock=clock)
    autostop = Autostop(machines, Load(clock), apps={APP}, region="ams", interval=0)
    clock.now += 1.0
    fn = await create(machines, group="a")
    assert await autostop.once() == []  # started after the previous pass
    clock.now += 1.0
    assert await autostop.once() == [fn.id]  # a whole pass without load


async def test_the_loop_runs_passes_every_interval() -> None:
    machines = MachinesEmulator(region="ams")
    autostop = Autostop(machines, Load(), apps={APP}, region="ams", interval=0.01)
    autostop.start()
    try:
        # A safety bound only: the loop's passes are counted, not timed.
        for _ in range(1000):
            if autostop.passes >= 2:
                break
            await asyncio.sleep(0.01)
        assert autostop.passes >= 2
    finally:
        await autostop.aclose()
        await machines.aclose()


def test_no_loop_without_an_interval() -> None:
    autostop = Autostop(MachinesEmulator(), Load(), apps={APP}, interval=0)
    autostop.start()
    assert autostop._task is None


# -- PM08: the proxy does not autostart a stopping or failed Machine ---------------------------


@pytest.mark.parametrize("state", ["stopping", "suspending", "failed"])
def test_a_non_startable_machine_is_not_started_for_a_request(state: str) -> None:
    target = machine("a", state, group=None)
    assert step_for(target, answering=False) == "skip"
    assert "PM08" in unavailable_detail(target)
    assert balancer.candidate(target, port=80, load=0, answering=False, region="ams") is None
    with pytest.raises(Unreachable) as raised:
        pick(
            Destination(app=APP),
            [target],
            home_app=APP,
            region="ams",
            load=loads(),
            answering=lambda _: False,
            unavailable=set(),
        )
    assert raised.value.reason == "no_candidate"


@pytest.mark.parametrize("state", ["stopped", "suspended", "created"])
def test_a_stopped_machine_is_still_autostarted(state: str) -> None:
    assert step_for(machine("a", state, group=None), answering=False) == "start"


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async with proxy_stack(balance_function_machines=False) as running:
        yield running


async def test_a_replay_to_a_stopping_machine_fails_to_its_fallback(stack: Stack) -> None:
    main = await stack.machine()
    fn = await stack.machine(group="default")
    stack.fleet.handlers[main.id] = replay_once(f"instance={fn.id};fallback=force_self")
    stopped = asyncio.Event()

    async def slow_stop(app: str, machine: Machine, signal: str, timeout: float) -> None:
        await stopped.wait()

    stack.fleet.stop = slow_stop  # type: ignore[method-assign]
    await stack.emulator.stop(APP, fn.id)
    assert stack.emulator.get(APP, fn.id).state == "stopping"
    try:
        response = await stack.client.get("/")
    finally:
        stopped.set()
    assert response.status_code == 200
    assert response.headers["x-flyfn-machine"] == main.id
    failed = ReplayFailed.parse(response.json()["headers"]["fly-replay-failed"])
    assert (failed.instance, failed.reason) == (fn.id, "no_candidate")
    assert stack.fleet.launches.count(fn.id) == 1  # never started again for the request


async def test_a_replay_to_a_failed_machine_is_not_autostarted(stack: Stack) -> None:
    main, fn = await stack.replay_pair(
        "instance={fn};fallback=force_self", started=False, launch_fails=True
    )
    await stack.client.get("/")  # its autostart fails: failed
    assert stack.emulator.get(APP, fn.id).state == "failed"
    launches = stack.fleet.launches.count(fn.id)
    response = await stack.client.get("/")
    assert response.headers["x-flyfn-machine"] == main.id
    assert "reason=no_candidate" in response.json()["headers"]["fly-replay-failed"]
    assert stack.fleet.launches.count(fn.id) == launches
    # The Machines API's own start endpoint still starts it.
    stack.fleet.fail_launch.discard(fn.id)
    await stack.emulator.start(APP, fn.id)
    await stack.emulator.settle()
    assert stack.emulator.get(APP, fn.id).state == "started"
