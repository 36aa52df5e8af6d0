"""Fly's vocabulary (flyfn.fly): durations, autostop modes, environment variables, the API's
address."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flyfn.fly.api_host import api_url, is_loopback_url, is_private
from flyfn.fly.autostop import autostop_from_bool, lenient_autostop, strongest
from flyfn.fly.durations import (
    DurationError,
    format_duration,
    go_duration,
    parse_duration,
    parse_go_duration,
)
from flyfn.fly.env import env_value

# --------------------------------------------------------------------------- short durations


@given(st.integers(1, 10**7))
def test_duration_round_trip(millis: int) -> None:
    text = format_duration(millis / 1000)
    assert parse_duration(text) == pytest.approx(millis / 1000)


@pytest.mark.parametrize(
    ("text", "seconds"), [("10s", 10.0), ("800ms", 0.8), ("1.5s", 1.5), ("2m", 120.0)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "-1s", "1d", "0s", "1e3s", " 1 s"])
def test_invalid_durations(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"), [(10, "10s"), (0.8, "800ms"), (1.5, "1500ms"), (0.0004, None), (0, None)]
)
def test_format_duration(seconds: float, text: str | None) -> None:
    if text is None:
        with pytest.raises(DurationError):
            format_duration(seconds)
    else:
        assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1h", 3600.0), ("999999999ms", 999999.999), ("0.5m", 30.0), ("1.000001s", 1.000001)],
)
def test_every_unit_and_the_limits(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["1000000000s", "1.0000001s", "0.0s", "0ms", "10S", 10])
def test_durations_beyond_the_limits(text: object) -> None:
    with pytest.raises(DurationError, match="invalid duration"):
        parse_duration(text)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- Go durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5), ("2h", 7200.0), ("5", 5.0), ("1.5s", 1.5)],
)
def test_parse_go_duration(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "10x", "s10"])
def test_parse_go_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(DurationError):
        parse_go_duration(text)


@pytest.mark.parametrize(
    "text",
    ["nan", "inf", "-inf", "infinity", "NaN", "nans", "infs", "1e3", "1e3s", "1_0", "1_0s",
     "\u0663", "\u0663s", "\uff15s", "1\u0660s", "-5", "+5", "-5s", " 5", "5s ", "\t5s",
     "9" * 400, "9" * 400 + "h", "2562048h"],
)  # fmt: skip
def test_a_go_duration_has_the_rule_of_flyfns_own_durations(text: str) -> None:
    # Issue 23: ASCII digits, finite, no sign or space, within Go's int64 nanoseconds: what the
    # emulator's API accepts is what flyfn's own `parse_duration` would.
    with pytest.raises(DurationError, match=r"invalid duration|empty duration"):
        parse_go_duration(text)


def test_the_longest_go_duration_is_read() -> None:
    assert parse_go_duration("2562047h") == 2562047 * 3600.0


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (10_000_000_000, "10s"),
        (90_000_000_000, "90s"),
        (120_000_000_000, "2m"),
        (500_000_000, "500ms"),
        (1_500, "1500ns"),
        ({"time.Duration": 3_600_000_000_000}, "1h"),
        ("30s", "30s"),
    ],
)
def test_go_duration_spells_the_apis_forms_as_a_string(value: object, text: str) -> None:
    assert go_duration(value) == text


def test_a_boolean_is_no_duration() -> None:
    with pytest.raises(DurationError):
        go_duration(True)


def test_zero_nanoseconds_is_spelt_in_nanoseconds() -> None:
    assert go_duration(0) == "0ns"
    assert parse_go_duration(str(go_duration(0))) == 0.0


@pytest.mark.parametrize("text", ["1s 2s", "1sx2s", "2s5"])
def test_a_go_duration_is_read_whole(text: str) -> None:
    # A part after a gap is no part of the duration: the text is refused, not cut short.
    with pytest.raises(DurationError, match=f"invalid duration {text!r}"):
        parse_go_duration(text)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: parse_go_duration(" "), "empty duration"),
        (lambda: parse_go_duration("soon"), "invalid duration 'soon'"),
        (lambda: go_duration({"time.Duration": False}), "a duration cannot be a boolean"),
    ],
)
def test_each_go_duration_error_message(call: Callable[[], object], message: str) -> None:
    with pytest.raises(DurationError) as info:
        call()
    assert str(info.value) == message


# --------------------------------------------------------------------------- autostop


def test_autostop_booleans_are_flytoml_spellings() -> None:
    assert (autostop_from_bool(True), autostop_from_bool(False)) == ("stop", "off")
    assert autostop_from_bool("STOP") == "STOP"  # strict callers see the value as written


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("no", "off"),
        ("False", "off"),
        ("yes", "stop"),
        (" Suspend ", "suspend"),
        ("later", "later"),
    ],
)
def test_lenient_autostop_reads_every_spelling_an_api_answer_had(value: str, mode: str) -> None:
    assert lenient_autostop(value) == mode


def test_the_strongest_autostop_of_a_machines_services() -> None:
    assert strongest([]) == "off"
    assert strongest(["off", "stop"]) == "stop"
    assert strongest(["stop", "suspend", "off"]) == "suspend"


# --------------------------------------------------------------------------- env and API address


def test_a_blank_variable_counts_as_unset() -> None:
    assert env_value({"X": "  "}, "X") is None
    assert env_value({}, "X") is None
    assert env_value({"X": " v "}, "X") == "v"


def test_is_loopback_url() -> None:
    assert is_loopback_url("http://127.0.0.1:8000")
    assert is_loopback_url("http://[::1]")
    assert is_loopback_url("http://localhost:4280")
    assert is_loopback_url("http://[::ffff:127.0.0.1]:4280")
    # RFC 6761 says *.localhost is loopback, but a resolver may ask DNS: only what cannot leave.
    assert not is_loopback_url("http://app.localhost")
    assert not is_loopback_url("http://localhost.example.com")
    assert not is_loopback_url("http://[::1")
    assert not is_loopback_url("http://10.1.1.1")
    assert not is_loopback_url("no url")


def test_private_addresses_are_flys_network_and_this_computer() -> None:
    assert is_private("http://_api.internal:4280")
    assert is_private("http://localhost:4280")
    assert not is_private("http://api.machines.dev")
    assert not is_private("http://[::1")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("_api.internal:4280", "http://_api.internal:4280"),
        ("127.0.0.1:4280", "http://127.0.0.1:4280"),
        ("[::1]:4280", "http://[::1]:4280"),
        ("localhost:4280/", "http://localhost:4280"),
        ("api.machines.dev", "https://api.machines.dev"),
        (" https://api.machines.dev/ ", "https://api.machines.dev"),
    ],
)
def test_api_url_gives_a_bare_host_its_scheme(given: str, expected: str) -> None:
    assert api_url(given) == expected
