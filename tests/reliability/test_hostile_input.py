"""Hostile input: fuzzed header parsers and FLYFN settings, forged replay headers, fallback floods.

A client may send any `fly-replay-src` / `fly-replay-failed` it likes (whether Fly Proxy strips
them is unconfirmed). None of that may make a function Machine run a view it is not for, skip the
signature check, or make the app Machine run more local fallbacks at once than the group's bound.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.http import HttpResponseBase
from django.test import AsyncClient, Client, override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_django.fixtures import Settings

from flyfn import fly_serverless, replay_record
from flyfn.conf import FlyfnSettings, SettingsError, load_settings
from flyfn.fly.replay import FlyReplay, ReplayFailed, ReplayHeaderError, ReplaySource
from flyfn.machine_role import MAIN, function, override_role
from flyfn.pool.cache import FORGET_MIN_INTERVAL
from flyfn.pool.choice import ReplayTarget
from flyfn.pool.manager import PoolManager, set_manager
from flyfn.registry import registry
from flyfn.replay_state import sign_state
from tests.reliability.answers import classify
from tests.reliability.views import FLOOD_VIEWS, Concurrency
from tests.support_machines_api import MachinesAPI
from tests.support_middleware import DEFAULT_MACHINE, issued, routing_manager
from tests.support_pools import StaticPools, installed

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(autouse=True)
def project(settings: Settings) -> Iterator[StaticPools]:
    settings.MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
    settings.ROOT_URLCONF = "tests.reliability.views"
    with installed(routing_manager(flood=ReplayTarget(instance=DEFAULT_MACHINE))) as manager:
        yield manager


def src(
    method: str = "GET",
    path: str = "/routing/pdf/",
    group: str = "pdf",
    *,
    secret: str | None = None,
    age: float = 0,
) -> str:
    state = sign_state(secret or django_settings.SECRET_KEY, method, path, group, time.time() - age)
    return ReplaySource(instance="0e1f2a3b4c5d6e", region="iad", t=1, state=state).to_header()


# ------------------------------------------------------------------------------ header parsers

# What HTTP can carry in a header value (latin-1 without CR/LF), weighted towards the syntax.
header_chars = st.one_of(
    st.sampled_from(list(';,="\\ \t=')),
    st.characters(min_codepoint=0x20, max_codepoint=0xFF),
    st.characters(codec="utf-8"),
)
header_text = st.text(header_chars, max_size=200)
field_names = st.sampled_from(
    ["instance", "region", "t", "state", "app", "reason", "elapsed_ms", "replay_source", "x"]
)
near_valid = st.lists(
    st.tuples(field_names, st.text(header_chars, max_size=30), st.sampled_from([";", ",", " ; "])),
    min_size=1,
    max_size=6,
).map(lambda fields: "".join(f"{k}={v}{sep}" for k, v, sep in fields))
PARSERS = (FlyReplay.parse, ReplaySource.parse, ReplayFailed.parse)


@FUZZ
@given(st.one_of(header_text, near_valid))
def test_header_parsers_accept_or_raise_replay_header_error(value: str) -> None:
    for parse in PARSERS:
        try:
            parsed = parse(value)
        except ReplayHeaderError:
            continue
        # Whatever was read can be written back, and reads the same.
        assert parse(parsed.to_header()) == parsed


@pytest.mark.parametrize("parse", PARSERS)
def test_oversized_and_nested_headers_are_refused_cheaply(parse: Any) -> None:
    for value in ("state=" + "a" * 100_000, '"' * 50_001, "a=b;" * 20_000, "x=" + '""' * 10_000):
        begun = time.process_time()
        with pytest.raises(ReplayHeaderError):
            parse(value)
        assert time.process_time() - begun < 1.0  # a bound on work, far above the real cost


# ----------------------------------------------------------------------------- FLYFN settings

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=8),
    st.sampled_from(["10s", "800ms", "stop", "suspend", "off", "local", "error", "app", "GET"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), inner, max_size=4),
    ),
    max_leaves=12,
)
TOP_KEYS = [
    "APP_NAME", "API_HOSTNAME", "API_TOKEN", "IMAGE_REF", "VIEWS", "REPLAY_BODY_LIMIT",
    "CACHE_TTL", "SIGN_REPLAYS", "GROUPS",
]  # fmt: skip
GROUP_KEYS = [
    "guest", "machines", "autostop", "internal_port", "region", "env", "strategy", "app",
    "replay_timeout", "fallback", "fallback_concurrency",
]  # fmt: skip
group_options = st.dictionaries(
    st.one_of(st.sampled_from(GROUP_KEYS), st.text(max_size=8)), values, max_size=5
)
flyfn_dicts = st.dictionaries(
    st.one_of(st.sampled_from(TOP_KEYS), st.text(max_size=8)),
    st.one_of(
        values,
        st.dictionaries(
            st.one_of(st.text(max_size=10), st.integers(), st.none(), st.booleans()),
            group_options,
            max_size=3,
        ),
    ),
    max_size=6,
)


def settings_outcome(flyfn: Any, seed: Any = None) -> FlyfnSettings | SettingsError:
    try:
        return load_settings(flyfn, seed, environ={})
    except SettingsError as exc:
        return exc


@FUZZ
@given(st.one_of(flyfn_dicts, values))
def test_any_flyfn_value_is_a_model_or_a_settings_error_naming_a_key(flyfn: Any) -> None:
    outcome = settings_outcome(flyfn)
    if isinstance(outcome, SettingsError):
        assert outcome.issues
        for issue in outcome.issues:
            assert issue.key.startswith(("FLYFN", "env ")), issue
            assert issue.message
        return
    assert isinstance(outcome, FlyfnSettings)
    for name in outcome.groups:  # a valid model is usable as such
        group = outcome.group(name)
        assert group.machines >= 1
        assert math.isfinite(group.replay_timeout_seconds)
        assert group.replay_timeout_seconds > 0


@FUZZ
@given(values)
def test_any_seed_setting_is_views_or_a_settings_error_naming_it(seed: Any) -> None:
    outcome = settings_outcome(None, seed)
    if isinstance(outcome, SettingsError):
        assert all(i.key.startswith("FLY_MACHINES_SERVERLESS_FUNCTIONS") for i in outcome.issues)
    else:
        assert isinstance(outcome, FlyfnSettings)


# ------------------------------------------------------------- forged headers, function Machine

# What a function Machine answers each case: never its serverless view without a valid state. A
# replay whose state does not verify ends in a 503 (bounced back it would only come round again);
# one without a state is sent on unless it is a fallback already; an ordinary view runs when it
# cannot be sent on.
FUNCTION_CASES = {
    "unsigned": ("GET", "/routing/pdf/", None, "elsewhere"),
    "garbage src": ("GET", "/routing/pdf/", "state=;;;==", "unavailable"),
    "malformed state": ("GET", "/routing/pdf/", "instance=x;state=flyfn1.1.abc", "unavailable"),
    "expired": ("GET", "/routing/pdf/", src(age=3600), "unavailable"),
    "from the future": ("GET", "/routing/pdf/", src(age=-3600), "unavailable"),
    "wrong path": ("GET", "/routing/pdf/", src(path="/routing/upload/"), "unavailable"),
    "wrong method": ("GET", "/routing/pdf/", src(method="POST"), "unavailable"),
    "wrong group": ("GET", "/routing/pdf/", src(group="default"), "unavailable"),
    "wrong secret": ("GET", "/routing/pdf/", src(secret="not-the-secret-key"), "unavailable"),
    "state of another request": ("HEAD", "/routing/pdf/", src(), "unavailable"),
    # Sent here by a Machine already (fly-replay-src): bouncing again could go round the function
    # Machines until Fly's replay limit, so an ordinary view goes straight to an app Machine (or,
    # as a fallback, which cannot be replayed again, runs where it is).
    "non-serverless view": ("GET", "/plain/", src(path="/plain/"), "replay"),
    "method not serverless": ("GET", "/routing/upload/", src(path="/routing/upload/"), "replay"),
}
ORDINARY = {"non-serverless view": b"plain", "method not serverless": b"upload form"}


@pytest.mark.parametrize("failed", [None, "instance=e286de4f711e86;reason=timeout"])
@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
@pytest.mark.parametrize("case", list(FUNCTION_CASES))
async def test_forged_src_never_runs_a_serverless_view_on_a_function_machine(
    case: str, kind: str, failed: str | None
) -> None:
    method, path, header, expected = FUNCTION_CASES[case]
    headers = {
        k: v for k, v in {"fly-replay-src": header, "fly-replay-failed": failed}.items() if v
    }
    if failed and expected in ("elsewhere", "replay"):  # a fallback cannot be sent on again
        expected = "view" if case in ORDINARY else "unavailable"
    with override_role(function("pdf")):
        response = await send(kind, method, path, headers)
    assert classify(response, ORDINARY.get(case, b"")) == expected


async def test_a_validly_signed_replay_does_run() -> None:
    """The control of the cases above: the same request, correctly signed, runs."""
    with override_role(function("pdf")):
        for kind in ("wsgi", "asgi"):
            response = await send(kind, "GET", "/routing/pdf/", {"fly-replay-src": src()})
            assert classify(response, b"pdf") == "view"


@pytest.mark.parametrize("failed", [None, "instance=9080e6e9c5d987;reason=no_candidate"])
@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
async def test_another_groups_view_never_runs_on_a_function_machine(
    kind: str, failed: str | None
) -> None:
    """`report` is of group default; a pdf Machine sends it to an app Machine unsigned (or
    refuses a fallback for it): it never runs it, nor signs it, nor changes default's Machines."""
    headers = {"fly-replay-src": src(path="/routing/report/", group="pdf")}
    if failed:
        headers["fly-replay-failed"] = failed
    with override_role(function("pdf")):
        response = await send(kind, "GET", "/routing/report/", headers)
    assert classify(response, b"report 0") == ("unavailable" if failed else "replay")
    if not failed:
        assert "state=" not in response["fly-replay"]


@FUZZ
@given(src_header=header_text, failed=st.one_of(st.none(), header_text))
def test_fuzzed_replay_headers_never_run_a_function_view(
    src_header: str, failed: str | None
) -> None:
    headers = {"fly-replay-src": src_header} if src_header else {}
    if failed:
        headers["fly-replay-failed"] = failed
    client = Client()
    with override_role(function("pdf")):
        own = client.get("/routing/pdf/", headers=headers)
        other = client.get("/plain/", headers=headers)
    assert classify(own, b"") in {"elsewhere", "replay", "unavailable"}  # never the view
    assert "state=" not in own.get("fly-replay", "")  # never signed on a function Machine
    # Sent on with `elsewhere` only when nothing says it was replayed or bounced here before; with
    # a fly-replay-src, straight to an app Machine; a fallback runs here.
    expected = "elsewhere" if not headers else "view" if failed else "replay"
    assert classify(other, b"plain") == expected


@FUZZ
@given(failed=header_text.filter(bool))
def test_fuzzed_replay_failed_on_the_app_machine_is_a_fallback(failed: str) -> None:
    replay_record.reset()  # each example starts with no replay on record
    client = Client()
    with override_role(MAIN):
        forged = client.get("/routing/pdf/", headers={"fly-replay-failed": failed})
        assert classify(client.get("/routing/pdf/"), b"pdf") == "replay"
        response = client.get("/routing/pdf/", headers={"fly-replay-failed": failed})
    assert classify(forged, b"pdf") == "unavailable"  # no replay of it was issued
    assert classify(response, b"pdf") == "view"  # the group's fallback: run here, bounded


# ---------------------------------------------------------------- fallback floods, app Machine

FLOOD = 40
BOUND = 3
FAILED = ReplayFailed(instance=DEFAULT_MACHINE, reason="timeout", elapsed_ms=10_000).to_header()


@pytest.fixture
def flood_settings() -> Iterator[None]:
    Concurrency.reset()
    groups = {"flood": {"fallback": "local", "fallback_concurrency": BOUND}}
    for view in FLOOD_VIEWS:
        fly_serverless(group="flood")(view)
    for path in ("/reliability/counted/", "/reliability/acounted/"):  # the replays that failed
        issued("GET", path, times=FLOOD + 1)  # one explains one fallback: the flood, then again
    try:
        with override_settings(FLYFN={"GROUPS": groups}), override_role(MAIN):
            yield
    finally:
        for view in FLOOD_VIEWS:
            registry.unregister(view)


def check_flood(responses: list[HttpResponseBase]) -> None:
    answers = [classify(r, b"counted") for r in responses]
    assert set(answers) <= {"view", "unavailable"}, answers
    assert 1 <= Concurrency.peak <= BOUND
    assert answers.count("view") == Concurrency.ran  # every view that ran answered
    assert answers.count("unavailable") >= FLOOD - BOUND * 4  # the rest were refused, not queued


@pytest.mark.usefixtures("flood_settings")
def test_a_flood_of_failed_replays_runs_at_most_the_bound_at_once_wsgi() -> None:
    start = threading.Barrier(FLOOD)
    responses: list[HttpResponseBase] = []
    lock = threading.Lock()

    def one() -> None:
        start.wait(10)
        response = Client().get("/reliability/counted/", headers={"fly-replay-failed": FAILED})
        with lock:
            responses.append(response)

    threads = [threading.Thread(target=one) for _ in range(FLOOD)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(responses) == FLOOD
    check_flood(responses)
    # Every slot came back: the next failed replay runs again.
    again = Client().get("/reliability/counted/", headers={"fly-replay-failed": FAILED})
    assert classify(again, b"counted") == "view"


@pytest.mark.usefixtures("flood_settings")
async def test_a_flood_of_failed_replays_runs_at_most_the_bound_at_once_asgi() -> None:
    client = AsyncClient()
    responses = await asyncio.gather(
        *(
            client.get("/reliability/acounted/", headers={"fly-replay-failed": FAILED})
            for _ in range(FLOOD)
        )
    )
    check_flood(list(responses))
    again = await client.get("/reliability/acounted/", headers={"fly-replay-failed": FAILED})
    assert classify(again, b"counted") == "view"


async def send(kind: str, method: str, path: str, headers: dict[str, str]) -> HttpResponseBase:
    if kind == "asgi":
        return await AsyncClient().generic(method, path, headers=headers)
    return await asyncio.to_thread(lambda: Client().generic(method, path, headers=headers))


# ------------------------------------------------- forged failures cannot flood the Machines API


def test_forged_failures_naming_the_cached_machine_cost_few_api_calls(
    machines_api: MachinesAPI, pool_manager: PoolManager
) -> None:
    set_manager(pool_manager)  # the real pool against the loopback emulator, not the static one
    with override_settings(FLYFN=machines_api.flyfn_settings(CACHE_TTL=3600)), override_role(MAIN):
        warm = Client().get("/routing/pdf/")
        assert classify(warm, b"pdf") == "replay"
        machine = FlyReplay.parse(warm["fly-replay"]).instance
        # As many replays on record as failures come (each explains one): the pool's own bound on
        # forgetting is what is tested here, not the record's.
        issued("GET", "/routing/pdf/", times=99)
        failed = ReplayFailed(instance=machine, reason="timeout").to_header()
        before = machines_api.list_calls
        begun = time.monotonic()
        answers = [
            classify(Client().get("/routing/pdf/", headers={"fly-replay-failed": failed}), b"pdf")
            for _ in range(100)
        ]
        elapsed = time.monotonic() - begun
        after = Client().get("/routing/pdf/")
    assert answers == ["view"] * 100
    assert machines_api.list_calls - before <= elapsed / FORGET_MIN_INTERVAL + 2
    assert classify(after, b"pdf") == "replay"  # and the pool still replays
