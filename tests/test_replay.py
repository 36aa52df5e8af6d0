"""flyfn.replay: fly-replay codec round trips, src/failed parsing, hostile input, signed state."""

from __future__ import annotations

import contextlib
import json
import string
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flyfn.replay import (
    REPLAY_JSON_CONTENT_TYPE,
    FlyReplay,
    ReplayFailed,
    ReplayHeaderError,
    ReplaySource,
    _fields,
    _split,
    _split_quoted,
    format_duration,
    parse_duration,
    sign_state,
    verify_state,
)

# Characters a bare field value may hold (printable ASCII minus space, quote, ';', ',', '\').
TOKEN_CHARS = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in '";,\\')

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
regions = st.lists(st.from_regex(r"[a-z0-9]{1,5}", fullmatch=True), min_size=1, max_size=4)
tokens = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=60)
durations = st.builds(
    lambda n, unit: f"{n}{unit}", st.integers(1, 100_000), st.sampled_from(["ms", "s", "m"])
)
extra_keys = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda k: k not in FlyReplay.KNOWN
)
# Extra values may need quoting (separators and spaces inside), but never hold quotes or '\'.
extra_values = st.text(alphabet=TOKEN_CHARS + " ,;", min_size=1, max_size=20).filter(
    lambda v: v.strip(" ") == v
)
separators = st.sampled_from([";", ",", "; ", ", ", " ;", " , "])


@st.composite
def replays(draw: st.DrawFn) -> FlyReplay:
    extras = draw(st.dictionaries(extra_keys, extra_values, max_size=3))
    return FlyReplay(
        instance=draw(st.none() | ids),
        prefer_instance=draw(st.none() | ids),
        app=draw(st.none() | ids),
        region=tuple(draw(st.one_of(st.just([]), regions))),
        elsewhere=draw(st.booleans()),
        state=draw(st.none() | tokens),
        timeout=draw(st.none() | durations),
        fallback=draw(st.none() | st.sampled_from(["force_self", "prefer_self"])),
        extra=tuple(extras.items()),
    )


def non_empty(replay: FlyReplay) -> bool:
    return bool(replay.to_json())


# --------------------------------------------------------------------------- fly-replay


def test_parses_the_example_from_flys_docs() -> None:
    replay = FlyReplay.parse("instance=e286de4f711e86;timeout=10s;fallback=force_self")
    assert replay == FlyReplay(instance="e286de4f711e86", timeout="10s", fallback="force_self")
    assert replay.timeout_seconds == 10.0
    assert replay.has_target


def test_region_list_is_quoted_and_read_back_in_order() -> None:
    replay = FlyReplay(region=("iad", "ord", "any"))
    assert replay.to_header() == 'region="iad,ord,any"'
    assert FlyReplay.parse('region="iad,ord,any"').region == ("iad", "ord", "any")
    assert FlyReplay.parse("region=iad").region == ("iad",)
    assert FlyReplay(region=("syd",)).to_header() == "region=syd"
    # Unquoted lists are read too (commas also separate fields, but a bare word continues the list).
    assert FlyReplay.parse("region=iad,ord,any;timeout=5s").region == ("iad", "ord", "any")


def test_elsewhere_is_written_only_when_true() -> None:
    assert FlyReplay(elsewhere=True).to_header() == "elsewhere=true"
    assert FlyReplay.parse("elsewhere=true").elsewhere is True
    assert FlyReplay.parse("elsewhere=false;app=x").elsewhere is False
    with pytest.raises(ReplayHeaderError):
        FlyReplay(elsewhere=False).to_header()  # nothing to send


@settings(max_examples=300)
@given(replays().filter(non_empty))
def test_header_round_trip(replay: FlyReplay) -> None:
    assert FlyReplay.parse(replay.to_header()) == replay


@settings(max_examples=300)
@given(replays())
def test_json_round_trip(replay: FlyReplay) -> None:
    assert FlyReplay.from_json(replay.to_json_bytes()) == replay
    assert FlyReplay.from_json(json.dumps(replay.to_json())) == replay
    assert FlyReplay.from_json(replay.to_json()) == replay


@given(replays().filter(lambda r: bool(r.to_json()) and not r.extra), separators)
def test_header_fields_may_be_separated_by_commas(replay: FlyReplay, sep: str) -> None:
    # Only the quoted region list holds a separator character inside a value.
    assert FlyReplay.parse(replay.to_header().replace(";", sep)) == replay


def test_json_form_carries_transform_and_unknown_keys() -> None:
    body = {
        "app": "api",
        "region": ["syd", "iad"],
        "transform": {"path": "/v2/x", "set_headers": [{"name": "a", "value": "b"}]},
        "cache": {"ttl": 30},
    }
    replay = FlyReplay.from_json(json.dumps(body).encode())
    assert replay.app == "api"
    assert replay.region == ("syd", "iad")
    assert replay.transform == body["transform"]
    assert dict(replay.extra) == {"cache": {"ttl": 30}}
    assert replay.to_json()["region"] == "syd,iad"
    with pytest.raises(ReplayHeaderError, match="JSON form"):
        replay.to_header()
    assert REPLAY_JSON_CONTENT_TYPE == "application/vnd.fly.replay+json"


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        ("", "no fields"),
        ("instance", "not a key=value"),
        ('region="iad', "unterminated"),
        ("instance=a;instance=b", "twice"),
        ("timeout=forever", "timeout"),
        ("timeout=0s", "timeout"),
        ("fallback=somewhere", "fallback"),
        ("elsewhere=maybe", "elsewhere"),
        ("instance=a b", "instance"),
        ("app=x,ord", "not a key=value"),
        ("region=iad,o d", "not a key=value"),
        ('state="a,b"', "state"),
        ("instance=\x00", "control"),
        ("app=caf\u00e9", "non-ASCII"),
        ("x" * 9000, "longer"),
    ],
)
def test_invalid_headers_raise_a_clear_error(header: str, fragment: str) -> None:
    with pytest.raises(ReplayHeaderError, match=fragment):
        FlyReplay.parse(header)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"instance": "a;b"},
        {"state": "has space"},
        {"state": ""},
        {"region": "iad"},
        {"region": ("iad,ord",)},
        {"timeout": "10"},
        {"fallback": "force"},
        {"extra": (("instance", "x"),)},
        {"extra": (("Bad Key", "x"),)},
    ],
)
def test_building_an_invalid_replay_fails_early(kwargs: dict[str, object]) -> None:
    with pytest.raises(ReplayHeaderError):
        FlyReplay(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=500)
@given(st.text(max_size=300))
def test_hostile_headers_raise_only_replay_header_errors(text: str) -> None:
    for parse in (FlyReplay.parse, ReplaySource.parse, ReplayFailed.parse):
        with contextlib.suppress(ReplayHeaderError):
            parse(text)


@settings(max_examples=300)
@given(st.text(alphabet=TOKEN_CHARS + ' ;,="\t', max_size=120))
def test_header_like_garbage_raises_only_replay_header_errors(text: str) -> None:
    for parse in (FlyReplay.parse, ReplaySource.parse, ReplayFailed.parse):
        with contextlib.suppress(ReplayHeaderError):
            parse(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from([*FlyReplay.KNOWN, "other"]), json_values, max_size=5))
def test_hostile_json_objects_raise_only_replay_header_errors(body: dict[str, object]) -> None:
    with contextlib.suppress(ReplayHeaderError):
        FlyReplay.from_json(json.dumps(body))


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_hostile_json_bytes_raise_only_replay_header_errors(body: bytes) -> None:
    with contextlib.suppress(ReplayHeaderError):
        FlyReplay.from_json(body)


@pytest.mark.parametrize(
    "body", [b"[" * 100_000, b"1" * 5000, b"\xff\xfe", b"[]", b'"x"', b"x" * 70_000]
)
def test_pathological_json_is_rejected_cleanly(body: bytes) -> None:
    with pytest.raises(ReplayHeaderError):
        FlyReplay.from_json(body)


# --------------------------------------------------------------------------- src / failed


def test_replay_src_with_both_separators() -> None:
    expected = ReplaySource(instance="0e1f2a", region="iad", t=1712345678901234, state="s.1")
    assert ReplaySource.parse("instance=0e1f2a;region=iad;t=1712345678901234;state=s.1") == expected
    assert ReplaySource.parse("instance=0e1f2a,region=iad,t=1712345678901234,state=s.1") == expected
    assert (
        ReplaySource.parse(" instance=0e1f2a , region=iad ; t=1712345678901234;state=s.1 ")
        == expected
    )


def test_replay_failed_with_both_separators() -> None:
    header = "instance=9a2c;app=shop;region=ord;replay_source=0e1f;reason=timeout;elapsed_ms=10012"
    expected = ReplayFailed(
        instance="9a2c",
        app="shop",
        region="ord",
        replay_source="0e1f",
        reason="timeout",
        elapsed_ms=10012,
    )
    assert ReplayFailed.parse(header) == expected
    assert ReplayFailed.parse(header.replace(";", ",")) == expected
    # A reason Fly adds later is kept, not rejected.
    assert ReplayFailed.parse("reason=brand_new").reason == "brand_new"


@pytest.mark.parametrize(
    ("parse", "header"),
    [
        (ReplaySource.parse, "t=soon"),
        (ReplaySource.parse, "t=-1"),
        (ReplaySource.parse, "instance"),
        (ReplayFailed.parse, "elapsed_ms=1.5"),
        (ReplayFailed.parse, "reason=a;reason=b"),
    ],
)
def test_invalid_src_and_failed_headers(parse: object, header: str) -> None:
    with pytest.raises(ReplayHeaderError):
        parse(header)  # type: ignore[operator]


src_fields = st.fixed_dictionaries(
    {},
    optional={
        "instance": ids,
        "region": st.from_regex(r"[a-z]{3}", fullmatch=True),
        "t": st.integers(0, 2**62),
        "state": tokens,
    },
)


@given(src_fields, st.lists(separators, min_size=4, max_size=4))
def test_replay_src_round_trip(fields: dict[str, object], seps: list[str]) -> None:
    source = ReplaySource(**fields)  # type: ignore[arg-type]
    if not fields:
        return
    assert ReplaySource.parse(source.to_header()) == source
    pairs = [f"{k}={v}" for k, v in fields.items()]
    mixed = pairs[0] + "".join(sep + pair for sep, pair in zip(seps, pairs[1:], strict=False))
    assert ReplaySource.parse(mixed) == source


failed_fields = st.fixed_dictionaries(
    {},
    optional={
        "instance": ids,
        "app": ids,
        "region": st.from_regex(r"[a-z]{3}", fullmatch=True),
        "replay_source": ids,
        "reason": st.sampled_from(sorted(ReplayFailed.REASONS)),
        "elapsed_ms": st.integers(0, 10**9),
    },
)


@given(failed_fields, st.lists(separators, min_size=6, max_size=6))
def test_replay_failed_round_trip(fields: dict[str, object], seps: list[str]) -> None:
    failed = ReplayFailed(**fields)  # type: ignore[arg-type]
    if not fields:
        return
    assert ReplayFailed.parse(failed.to_header()) == failed
    pairs = [f"{k}={v}" for k, v in fields.items()]
    mixed = pairs[0] + "".join(sep + pair for sep, pair in zip(seps, pairs[1:], strict=False))
    assert ReplayFailed.parse(mixed) == failed


# --------------------------------------------------------------------------- durations


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
    with pytest.raises(ReplayHeaderError):
        parse_duration(text)


# --------------------------------------------------------------------------- signed state

SECRET = "django-insecure-test-secret"
NOW = 1_700_000_000.0


def test_signed_state_verifies_for_the_same_request() -> None:
    state = sign_state(SECRET, "GET", "/receipts/7.pdf", "pdf", now=NOW)
    assert FlyReplay(state=state).to_header()  # usable as a header field as is
    check = verify_state(state, SECRET, "GET", "/receipts/7.pdf", "pdf", max_age=40, now=NOW + 5)
    assert check.ok
    assert check
    assert check.reason is None


@pytest.mark.parametrize(
    ("method", "path", "group", "secret"),
    [
        ("POST", "/receipts/7.pdf", "pdf", SECRET),
        ("GET", "/receipts/8.pdf", "pdf", SECRET),
        ("GET", "/receipts/7.pdf", "default", SECRET),
        ("GET", "/receipts/7.pdf", "pdf", "another-secret"),
    ],
)
def test_signed_state_is_bound_to_method_path_group_and_secret(
    method: str, path: str, group: str, secret: str
) -> None:
    state = sign_state(SECRET, "GET", "/receipts/7.pdf", "pdf", now=NOW)
    check = verify_state(state, secret, method, path, group, max_age=40, now=NOW)
    assert not check
    assert check.reason == "signature mismatch"


def test_signed_state_expires_and_rejects_the_future() -> None:
    state = sign_state(SECRET, "GET", "/x", "pdf", now=NOW)
    assert verify_state(state, SECRET, "GET", "/x", "pdf", max_age=40, now=NOW + 40).ok
    expired = verify_state(state, SECRET, "GET", "/x", "pdf", max_age=40, now=NOW + 41)
    assert expired.reason == "state expired"
    future = verify_state(state, SECRET, "GET", "/x", "pdf", max_age=40, now=NOW - 3600)
    assert future.reason == "state issued in the future"


def test_rotated_secret_still_verifies_through_fallbacks() -> None:
    state = sign_state("old-secret", "GET", "/x", "pdf", now=NOW)
    assert not verify_state(state, SECRET, "GET", "/x", "pdf", max_age=40, now=NOW)
    assert verify_state(
        state, SECRET, "GET", "/x", "pdf", max_age=40, now=NOW, fallback_secrets=["old-secret"]
    )


def test_tampered_state_fails() -> None:
    state = sign_state(SECRET, "GET", "/x", "pdf", now=NOW)
    prefix, issued, mac = state.split(".")
    later = f"{prefix}.{int(issued) + 1}.{mac}"
    assert verify_state(later, SECRET, "GET", "/x", "pdf", max_age=40, now=NOW).reason == (
        "signature mismatch"
    )
    flipped = state[:-1] + ("A" if state[-1] != "A" else "B")
    assert not verify_state(flipped, SECRET, "GET", "/x", "pdf", max_age=40, now=NOW)


@pytest.mark.parametrize("state", [None, "", "flyfn1", "flyfn1.x.y", "v0.1.abc", "a" * 500])
def test_missing_or_malformed_state(state: str | None) -> None:
    check = verify_state(state, SECRET, "GET", "/x", "pdf", max_age=40, now=NOW)
    assert not check
    assert check.reason in {"no signed state", "malformed state"}


@settings(max_examples=300)
@given(st.text(max_size=200), st.text(max_size=50), st.text(max_size=50))
def test_verify_never_raises(state: str, method: str, path: str) -> None:
    assert not verify_state(state, SECRET, method, path, "pdf", max_age=40, now=NOW)


@given(
    st.sampled_from(["GET", "POST", "DELETE"]),
    st.text(max_size=80),
    st.from_regex(r"[a-z]{1,10}", fullmatch=True),
)
def test_sign_verify_round_trip_for_any_path(method: str, path: str, group: str) -> None:
    state = sign_state(SECRET, method, path, group, now=NOW)
    assert verify_state(state, SECRET, method, path, group, max_age=1, now=NOW)


def test_sign_state_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        sign_state("", "GET", "/x", "pdf")


def test_token_chars_cover_base64url() -> None:
    # Signed states are base64url: every character must be a bare header token.
    assert set(string.ascii_letters + string.digits + "-_.") <= set(TOKEN_CHARS)


def test_an_unknown_field_with_an_empty_value_round_trips() -> None:
    replay = FlyReplay.parse("a=;instance=e286de4f711e86")
    assert replay.extra == (("a", ""),)
    assert FlyReplay.parse(replay.to_header()) == replay


def _outcome(parse: Callable[[], object]) -> object:
    try:
        return parse()
    except ReplayHeaderError as exc:
        return ("error", str(exc))


_PIECES = [*"abz=;, \t_-.0\x00\x7f", "é", "region=", "state=x", "t=1"]


@settings(max_examples=300, deadline=None)
@given(value=st.lists(st.sampled_from(_PIECES), max_size=20).map("".join))
def test_unquoted_values_split_as_the_quote_aware_loop_splits_them(value: str) -> None:
    """`_split`'s fast path (no quotes: one regex split) gives what the character loop gives,
    fields and errors alike."""
    for separators, list_key in ((";,", "region"), (";,", None), (";", None)):

        def fast(seps: str = separators, key: str | None = list_key) -> object:
            return _split(value, "h", seps, list_key=key)

        def loop(seps: str = separators, key: str | None = list_key) -> object:
            return _fields(_split_quoted(value, "h", seps), "h", key)

        assert _outcome(fast) == _outcome(loop)
