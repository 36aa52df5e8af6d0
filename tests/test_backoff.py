"""`flyfn.backoff.Backoff`: the doubling pause and the bounds of a failure burst."""

from __future__ import annotations

from flyfn.backoff import Backoff


def test_the_pause_doubles_from_first_to_cap_and_a_burst_begins_once() -> None:
    backoff = Backoff(1.0, 5.0)
    began = [backoff.failed() for _ in range(5)]
    assert began == [True, False, False, False, False]
    assert backoff.delay == 5.0  # 1, 2, 4, then the cap


def test_a_success_ends_the_burst_and_the_next_failure_begins_another() -> None:
    backoff = Backoff(1.0, 30.0)
    assert not backoff.succeeded()  # no burst to end
    backoff.failed()
    backoff.failed()
    assert backoff.succeeded()
    assert backoff.delay == 0.0
    assert backoff.failed()
    assert backoff.delay == 1.0
