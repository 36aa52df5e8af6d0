"""Elastic groups: the sibling decision, and a function Machine at its soft limit sending replays on
(flyfn.elastic through the middleware)."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import AbstractContextManager

import pytest
from django.conf import settings as django_settings
from django.test import Client
from pytest_django.fixtures import Settings as SettingsWrapper

from flyfn.elastic import MAX_SIBLING_HOPS, SiblingReplay, sibling_hops, sibling_target
from flyfn.fly.replay import FlyReplay, ReplayFailed, ReplaySource
from flyfn.in_flight import in_flight
from flyfn.machine_role import MachineEnv, Role, function, override_role
from flyfn.replay_state import sign_state, verify_state
from tests.support_pools import StaticPools, installed

GROUP = ["m0", "m1", "m2"]


# --------------------------------------------------------------------------- the decision


def test_the_chain_goes_to_the_next_machine_in_rank_order() -> None:
    assert sibling_target(GROUP, "m0", 0) == SiblingReplay("m1", 1)
    assert sibling_target(GROUP, "m1", 1) == SiblingReplay("m2", 2)
    # An entry Machine that is not the first (machines > 1) wraps around.
    assert sibling_target(GROUP, "m2", 0) == SiblingReplay("m0", 1)


def test_at_the_end_of_the_chain_the_overflow_goes_to_a_random_sibling_to_run_there() -> None:
    rng = random.Random(7)
    picks = {sibling_target(GROUP, "m2", 2, rng) for _ in range(50)}
    assert picks == {SiblingReplay("m0", 3), SiblingReplay("m1", 3)}


def test_a_run_here_hop_a_lone_machine_or_a_stranger_runs_the_request() -> None:
    assert sibling_target(GROUP, "m1", 3) is None
    assert sibling_target(["m0"], "m0", 0) is None
    assert sibling_target(GROUP, "zz", 0) is None
    assert sibling_target(GROUP, None, 0) is None


def test_the_chain_fits_fly_proxys_ten_replays() -> None:
    members = [f"m{n}" for n in range(30)]
    assert sibling_hops(30) == MAX_SIBLING_HOPS
    hop, me, replays = 0, "m0", 1  # the app Machine's replay
    while (sibling := sibling_target(members, me, hop)) is not None:
        me, hop, replays = sibling.machine_id, sibling.hop, replays + 1
    # One more for a request an app Machine got from another group's function Machine.
    assert replays + 1 <= 10
    assert sibling_hops(1) == 0


def test_the_in_flight_count_holds_the_soft_limit_unless_forced() -> None:
    counter = in_flight("count-test", 2)
    assert counter.acquire()
    assert counter.acquire()
    assert not counter.acquire()
    counter.hold()
    assert counter.active == 3
    for _ in range(3):
        counter.release()
    assert counter.active == 0


# --------------------------------------------------------------------------- the middleware


@pytest.fixture
def elastic(settings: SettingsWrapper) -> Iterator[StaticPools]:
    settings.MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
    settings.FLYFN = {
        "GROUPS": {"pdf": {"max_machines": 3, "concurrency": {"soft_limit": 1, "hard_limit": 3}}}
    }
    with installed(StaticPools(machines={"pdf": GROUP})) as manager:
        yield manager


def replayed(path: str, hop: int = 0, method: str = "GET") -> dict[str, str]:
    """The headers of a request an app Machine (or a sibling, `hop` > 0) replayed."""
    state = sign_state(django_settings.SECRET_KEY, method, path, "pdf", hop=hop)
    return {"fly-replay-src": ReplaySource(instance="a", region="iad", state=state).to_header()}


def on_machine(machine_id: str) -> AbstractContextManager[Role]:
    return override_role(function("pdf"), MachineEnv(machine_id=machine_id))


def busy() -> None:
    """One request of `pdf` already in flight here: the soft limit (1) is reached."""
    assert in_flight("pdf", 1).acquire()


@pytest.fixture(autouse=True)
def idle() -> Iterator[None]:
    counter = in_flight("pdf", 1)
    counter.active = 0
    yield
    counter.active = 0


def test_below_the_soft_limit_a_replay_runs_here_and_leaves_the_count(
    elastic: StaticPools,
) -> None:
    with on_machine("m0"):
        response = Client().get("/routing/pdf/", headers=replayed("/routing/pdf/"))
    assert response.content == b"pdf"
    assert "fly-replay" not in response
    assert in_flight("pdf", 1).active == 0


def test_at_the_soft_limit_a_replay_goes_on_to_the_next_machine_one_hop_further(
    elastic: StaticPools, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="flyfn.events.replay")
    busy()
    with on_machine("m0"):
        response = Client().get("/routing/pdf/", headers=replayed("/routing/pdf/"))
    [event] = caplog.records
    assert (event.flyfn_group, event.flyfn_machine) == ("pdf", "m1")  # type: ignore[attr-defined]
    replay = FlyReplay.parse(response["fly-replay"])
    assert replay.instance == "m1"
    assert replay.fallback == "force_self"  # comes back here should m1 be unreachable
    assert replay.timeout == "10s"
    check = verify_state(
        replay.state, django_settings.SECRET_KEY, "GET", "/routing/pdf/", "pdf", max_age=40
    )
    assert check
    assert check.hop == 1
    assert in_flight("pdf", 1).active == 1  # only the request that was already running


def test_the_last_machine_sends_the_overflow_to_a_sibling_which_runs_it(
    elastic: StaticPools,
) -> None:
    busy()
    with on_machine("m2"):
        response = Client().get("/routing/pdf/", headers=replayed("/routing/pdf/", hop=2))
    replay = FlyReplay.parse(response["fly-replay"])
    assert replay.instance in {"m0", "m1"}
    check = verify_state(
        replay.state, django_settings.SECRET_KEY, "GET", "/routing/pdf/", "pdf", max_age=40
    )
    assert check.hop == 3
    with on_machine(replay.instance or ""):
        ran = Client().get("/routing/pdf/", headers=replayed("/routing/pdf/", hop=3))
    assert ran.content == b"pdf"  # run here, although this Machine is at its soft limit too
    assert in_flight("pdf", 1).active == 1


def test_a_hop_count_is_signed_a_forged_one_is_refused(elastic: StaticPools) -> None:
    busy()
    headers = replayed("/routing/pdf/", hop=1)
    forged = headers["fly-replay-src"].replace(".h1.", ".h5.")
    with on_machine("m1"):
        response = Client().get("/routing/pdf/", headers={"fly-replay-src": forged})
    assert response.status_code == 503


def test_a_streaming_response_stays_in_flight_until_its_last_byte(
    elastic: StaticPools,
) -> None:
    with on_machine("m0"):
        response = Client().get("/routing/pages/", headers=replayed("/routing/pages/"))
        assert response.streaming
        assert in_flight("pdf", 1).active == 1  # still sending
        chunks = list(response.streaming_content)  # type: ignore[attr-defined]
    assert b"".join(chunks) == b"page 1\npage 2\n"
    assert in_flight("pdf", 1).active == 0


def test_a_send_on_that_failed_comes_back_and_runs_here(
    elastic: StaticPools, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="flyfn.events.fallback")
    busy()
    with on_machine("m0"):
        sent = Client().get("/routing/pdf/", headers=replayed("/routing/pdf/"))
        assert FlyReplay.parse(sent["fly-replay"]).instance == "m1"
        failed = ReplayFailed(instance="m1", reason="no_candidate").to_header()
        back = Client().get("/routing/pdf/", headers={"fly-replay-failed": failed})
    assert back.content == b"pdf"
    assert elastic.forgotten == [("pdf", "m1")]
    reasons = [getattr(r, "flyfn_reason", None) for r in caplog.records]
    assert "replay_failed" in reasons
    assert in_flight("pdf", 1).active == 1


def test_a_failed_header_for_a_request_never_sent_on_is_not_run(elastic: StaticPools) -> None:
    failed = ReplayFailed(instance="m1", reason="timeout").to_header()
    with on_machine("m0"):
        response = Client().get("/routing/pdf/", headers={"fly-replay-failed": failed})
    assert response.status_code == 503
    assert elastic.forgotten == []


def test_the_app_strategy_leaves_spreading_to_fly_proxy(
    elastic: StaticPools, settings: SettingsWrapper
) -> None:
    settings.FLYFN = {
        "GROUPS": {
            "pdf": {"strategy": "app", "app": "fn-app", "concurrency": {"soft_limit": 1}},
        }
    }
    busy()
    with on_machine("m0"):
        response = Client().get("/routing/pdf/", headers=replayed("/routing/pdf/"))
    assert response.content == b"pdf"


def test_without_concurrency_a_function_machine_runs_everything(
    elastic: StaticPools, settings: SettingsWrapper
) -> None:
    settings.FLYFN = {"GROUPS": {"pdf": {"machines": 3}}}
    crowded = in_flight("pdf", 20)  # as if Fly's default soft limit applied: it does not
    for _ in range(25):
        crowded.hold()
    try:
        with on_machine("m0"):
            response = Client().get("/routing/pdf/", headers=replayed("/routing/pdf/"))
    finally:
        crowded.active = 0
    assert response.content == b"pdf"
    assert "fly-replay" not in response
