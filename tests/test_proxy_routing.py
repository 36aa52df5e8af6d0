"""The local Fly Proxy's pure decisions (`flyfn.emulator.proxy.routing`), on plain data: which
Machine a delivery goes to, what to do with it, and where a replay or a failed delivery goes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from flyfn.emulator.proxy.errors import Full, ProxyError, Unreachable
from flyfn.emulator.proxy.routing import (
    MAX_REPLAYS,
    Delivery,
    Destination,
    Directive,
    check_replayable,
    check_target,
    directive_of,
    fallback_of,
    https_location,
    https_redirect,
    pick,
    preference_headers,
    replayed,
    step_for,
)
from flyfn.fly.replay import FlyReplay, ReplayFailed, ReplaySource
from flyfn.machines.models import (
    Machine,
    MachineConfig,
    MachinePort,
    MachineService,
    MachineServiceConcurrency,
)


def machine(
    machine_id: str,
    state: str = "started",
    *,
    group: str | None = None,
    region: str = "local",
    hard: int | None = None,
    autostart: bool = True,
) -> Machine:
    service = MachineService(
        protocol="tcp",
        internal_port=8000,
        autostart=autostart,
        ports=[MachinePort(port=80)],
        concurrency=MachineServiceConcurrency(type="requests", soft_limit=5, hard_limit=hard),
    )
    env = {"FLYFN_GROUP": group} if group else None
    return Machine(
        id=machine_id,
        state=state,
        region=region,
        config=MachineConfig(image="local/p:1", env=env, services=[service]),
    )


def choose(
    dest: Destination,
    machines: list[Machine],
    *,
    load: Callable[[str], int] = lambda _: 0,
    unavailable: frozenset[str] = frozenset(),
    balance_function_machines: bool = True,
) -> Machine:
    return pick(
        dest,
        machines,
        home_app="web",
        region="local",
        load=load,
        answering=lambda _: True,
        unavailable=set(unavailable),
        balance_function_machines=balance_function_machines,
    )


def fall(
    dest: Destination, delivery: Delivery, failure: Unreachable
) -> tuple[Destination, Delivery]:
    return fallback_of(
        dest, delivery, failure, elapsed=0.25, region="local", home_app="web", replay_timeout=30.0
    )


def test_pick_goes_to_the_forced_instance() -> None:
    a, b = machine("a"), machine("b")
    assert choose(Destination(app="web", instance="b"), [a, b]) is b


def test_a_forced_instance_at_its_hard_limit_is_full_and_a_missing_one_unreachable() -> None:
    a = machine("a", hard=1)
    with pytest.raises(Full):
        choose(Destination(app="web", instance="a"), [a], load=lambda _: 1)
    with pytest.raises(Unreachable) as gone:
        choose(Destination(app="web", instance="zz"), [a])
    assert gone.value.reason == "no_candidate"


def test_pick_leaves_out_excluded_unavailable_and_other_region_machines() -> None:
    a, b, c, d = machine("a"), machine("b"), machine("c", region="iad"), machine("d")
    dest = Destination(app="web", exclude=frozenset({"a"}), regions=("local",))
    assert choose(dest, [a, b, c, d], unavailable=frozenset({"d"})) is b


def test_pick_prefers_the_preferred_instance_and_says_when_it_could_not() -> None:
    a, b = machine("a"), machine("b")
    dest = Destination(app="web", prefer_instance="b")
    assert choose(dest, [a, b]) is b
    assert preference_headers(dest, b) == {}
    assert preference_headers(dest, a) == {"fly-preferred-instance-unavailable": "b"}


def test_every_machine_full_waits_and_none_at_all_is_unreachable_or_pa04() -> None:
    a = machine("a", hard=2)
    with pytest.raises(Full):
        choose(Destination(app="web"), [a], load=lambda _: 2)
    with pytest.raises(Unreachable):
        choose(Destination(app="web"), [])
    with pytest.raises(ProxyError) as missing:
        choose(Destination(app="other"), [])
    assert missing.value.code == "PA04"


def test_the_switch_keeps_ordinary_traffic_off_function_machines_when_there_is_an_app_one() -> None:
    fn, main = machine("f", group="pdf"), machine("m")
    picks = {choose(Destination(app="web"), [fn, main], balance_function_machines=False).id}
    assert picks == {"m"}
    assert choose(Destination(app="web"), [fn], balance_function_machines=False) is fn


def test_step_for_each_state() -> None:
    assert step_for(machine("a"), answering=True) == "deliver"
    assert step_for(machine("a"), answering=False) == "settle"
    assert step_for(machine("a", "starting"), answering=False) == "settle"
    assert step_for(machine("a", "stopped"), answering=False) == "start"
    assert step_for(machine("a", "stopped", autostart=False), answering=False) == "skip"
    assert step_for(machine("a", "destroyed"), answering=False) == "skip"


def test_check_target_takes_only_origin_form() -> None:
    check_target(b"/x?y=1")
    for target in (b"http://h/x", b"*", b"/x#frag"):
        with pytest.raises(ProxyError) as bad:
            check_target(target)
        assert (bad.value.code, bad.value.status) == ("PU04", 400)


def test_check_replayable_applies_fly_limits() -> None:
    plain = Delivery(path=b"/", headers=[])
    limits = {"body_limit": 10, "edge_buffer_limit": 100}
    check_replayable(plain, body_complete=True, body_size=10, replays=MAX_REPLAYS, **limits)
    cases = [
        (Delivery(path=b"/", headers=[], fallback=True), True, 0, 1, "PA03"),
        (plain, False, 0, 1, "PA01"),
        (plain, True, 11, 1, "PA03"),
        (plain, True, 0, MAX_REPLAYS + 1, "PA02"),
    ]
    for delivery, complete, size, replays, code in cases:
        with pytest.raises(ProxyError) as refused:
            check_replayable(
                delivery, body_complete=complete, body_size=size, replays=replays, **limits
            )
        assert refused.value.code == code


def test_replayed_carries_the_source_and_applies_the_transform() -> None:
    issuer = machine("m1")
    directive = directive_of(
        FlyReplay(
            app="fnapp",
            elsewhere=True,
            state="s1",
            timeout="5s",
            fallback="force_self",
            transform={
                "path": "/new",
                "set_headers": [{"name": "X-A", "value": "1"}],
                "delete_headers": ["x-gone"],
            },
        )
    )
    delivery = Delivery(
        path=b"/old", headers=[("x-gone", "1"), ("x-a", "0"), ("fly-replay-src", "old")]
    )
    dest, again = replayed(
        Destination(app="web", port=443),
        delivery,
        directive,
        issuer,
        region="local",
        replay_timeout=30.0,
        now_us=123,
    )
    assert dest == Destination(
        app="fnapp",
        exclude=frozenset({"m1"}),
        timeout=5.0,
        fallback="force_self",
        issuer=issuer,
        issuer_app="web",
        port=443,
    )
    assert again.path == b"/new"
    assert again.headers == [("X-A", "1")]
    src = ReplaySource.parse(again.extra["fly-replay-src"])
    assert (src.instance, src.region, src.t, src.state) == ("m1", "local", 123, "s1")


def test_a_transform_path_must_be_a_path() -> None:
    with pytest.raises(ProxyError):
        directive_of(FlyReplay(transform={"path": "relative"}))


def test_fallback_goes_back_to_the_issuer_once() -> None:
    issuer = machine("m1")
    dest = Destination(app="fnapp", fallback="force_self", issuer=issuer, issuer_app="web")
    failure = Unreachable("timeout", "did not start", "f1")
    delivery = Delivery(path=b"/x", headers=[("fly-replay-src", "s"), ("a", "b")])
    back, again = fall(dest, delivery, failure)
    assert back == Destination(app="web", instance="m1", timeout=30.0)
    assert again.fallback
    assert again.headers == [("a", "b")]
    failed = ReplayFailed.parse(again.extra["fly-replay-failed"])
    assert (failed.instance, failed.reason, failed.elapsed_ms) == ("f1", "timeout", 250)
    with pytest.raises(ProxyError) as twice:
        fall(back, again, failure)
    assert (twice.value.code, twice.value.status) == ("PC01", 502)
    nowhere = Unreachable("no_candidate", "none", None)
    with pytest.raises(ProxyError) as none:
        fall(Destination(app="web"), delivery, nowhere)
    assert (none.value.code, none.value.status) == ("PR04", 503)


# -- force_https ---------------------------------------------------------------------------------


def https_machine(force_https: bool | None, *, port: int = 80) -> Machine:
    service = MachineService(
        protocol="tcp",
        internal_port=8000,
        ports=[
            MachinePort(port=port, handlers=["http"], force_https=force_https),
            MachinePort(port=443, handlers=["tls", "http"]),
        ],
    )
    return Machine(id="m1", state="stopped", config=MachineConfig(image="i", services=[service]))


@pytest.mark.parametrize(
    ("scheme", "forwarded_port", "host", "expected"),
    [
        ("http", "80", "myapp.fly.dev", "https://myapp.fly.dev/a/b?q=1"),
        ("http", " 80 ", "myapp.fly.dev:80", "https://myapp.fly.dev/a/b?q=1"),  # the port goes
        ("http", "80", "[::1]:80", "https://[::1]/a/b?q=1"),
        # The local edge is plain http only: unmarked requests are never redirected.
        ("http", None, "localhost:8000", None),
        ("http", "443", "myapp.fly.dev", None),
        ("https", "80", "myapp.fly.dev", None),
        ("http", "80", None, None),
        ("http", "80", "  ", None),
    ],
)
def test_https_location_only_for_requests_that_came_in_on_plain_port_80(
    scheme: str, forwarded_port: str | None, host: str | None, expected: str | None
) -> None:
    assert https_location(scheme, forwarded_port, host, b"/a/b?q=1") == expected


def test_https_redirect_follows_the_machine_s_port_80_force_https() -> None:
    plain = Destination(app="a", https_location="https://h/x")
    assert https_redirect(https_machine(True), plain) == "https://h/x"
    assert https_redirect(https_machine(False), plain) is None
    assert https_redirect(https_machine(None), plain) is None
    # A port range holding 80 counts; a Machine without a service on the port delivers.
    ranged = https_machine(True, port=0)
    assert ranged.config is not None
    assert ranged.config.services
    ranged.config.services[0].ports = [MachinePort(start_port=70, end_port=90, force_https=True)]
    assert https_redirect(ranged, plain) == "https://h/x"
    assert https_redirect(https_machine(True, port=8080), plain) is None
    # Not marked as plain http (https, an unmarked local request, a replay): delivered.
    assert https_redirect(https_machine(True), Destination(app="a")) is None


def test_replays_and_fallbacks_are_never_redirected() -> None:
    dest = Destination(app="a", https_location="https://h/x")
    delivery = Delivery(path=b"/x", headers=[])
    issuer = Machine(id="main", region="local")
    new_dest, _ = replayed(
        dest,
        delivery,
        Directive(instance="m1"),
        issuer,
        region="local",
        replay_timeout=5.0,
        now_us=1,
    )
    assert https_redirect(https_machine(True), new_dest) is None
    failure = Unreachable("timeout", "slow", "m1")
    back, _ = fallback_of(
        replace(new_dest, fallback="prefer_self"),
        delivery,
        failure,
        elapsed=1.0,
        region="local",
        home_app="a",
        replay_timeout=5.0,
    )
    assert https_redirect(https_machine(True), back) is None
