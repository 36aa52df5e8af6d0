"""flyfn.fly.replay and flyfn.replay_state: fly-replay codec round trips, src/failed parsing,
hostile input, signed state."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import json
import string
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.utils.crypto import salted_hmac
from hypothesis import given, settings
from hypothesis import strategies as st

import flyfn.fly.replay as codec_module
import flyfn.replay_state as state_module
from flyfn.fly.durations import DurationError, format_duration, parse_duration
from flyfn.fly.headers import REPLAY_JSON_CONTENT_TYPE
from flyfn.fly.replay import (
    MAX_HEADER_LENGTH,
    MAX_JSON_LENGTH,
    FlyReplay,
    ReplayFailed,
    ReplayHeaderError,
    ReplaySource,
    _fields,
    _split,
    _split_quoted,
)
from flyfn.replay_state import (
    MAX_CLOCK_SKEW,
    MAX_STATE_AGE,
    MAX_STATE_HOP,
    STATE_BODY_DIGEST_LIMIT,
    StateCheck,
    _mac,
    _message,
    body_binding,
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


# --------------------------------------------------------------------------- header safety (#16)


@pytest.mark.parametrize(
    "text", ["\u0661\u0660s", "\uff11\uff10s", "1\u0660ms", "10s\n", "\r\n10s", " 10s"]
)
def test_durations_take_ascii_digits_and_nothing_around_them(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)
    with pytest.raises(ReplayHeaderError):
        FlyReplay(instance="abc", timeout=text)


@pytest.mark.parametrize("bad", ["a\r\nb", "a\nb", "a\rb", "a\x00b", "a\tb", "a\x7fb", "a\x85b"])
@pytest.mark.parametrize(
    "field", ["instance", "prefer_instance", "app", "state", "timeout", "fallback"]
)
def test_replay_fields_refuse_control_characters(field: str, bad: str) -> None:
    with pytest.raises(ReplayHeaderError, match=f"fly-replay {field}"):
        FlyReplay(**{field: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["a\r\nb", "a\nb", "a\x00b", "a\tb", "a\x7fb", "a\x9bb"])
def test_replay_regions_extras_and_transform_refuse_control_characters(bad: str) -> None:
    with pytest.raises(ReplayHeaderError, match="region"):
        FlyReplay(region=("iad", bad))
    with pytest.raises(ReplayHeaderError, match="control character"):
        FlyReplay(instance="abc", extra=(("note", bad),))
    with pytest.raises(ReplayHeaderError, match="control character"):
        FlyReplay(instance="abc", extra=(("cache", {"ttl": [1, {"k": bad}]}),))
    with pytest.raises(ReplayHeaderError, match="control character"):
        FlyReplay(instance="abc", transform={"set_headers": [{"name": "x", "value": bad}]})
    with pytest.raises(ReplayHeaderError, match="control character"):
        FlyReplay(instance="abc", transform={bad: "x"})
    with pytest.raises(ReplayHeaderError, match="control character"):
        FlyReplay.from_json({"instance": "abc", "note": bad})


def test_replay_extras_must_be_unique_and_a_tuple() -> None:
    with pytest.raises(ReplayHeaderError, match="twice"):
        FlyReplay(instance="abc", extra=(("note", "a"), ("note", "b")))
    with pytest.raises(ReplayHeaderError, match="tuple"):
        FlyReplay(instance="abc", extra=[("note", "a")])  # type: ignore[arg-type]


def test_a_nested_extra_that_is_too_big_is_refused_cleanly() -> None:
    with pytest.raises(ReplayHeaderError, match="nested values"):
        FlyReplay(instance="abc", extra=(("big", list(range(20_000))),))


@pytest.mark.parametrize("value", ["caf\u00e9", 'say "hi"', "back\\slash", 5, None])
def test_an_extra_the_header_form_cannot_carry_is_refused_by_to_header(value: object) -> None:
    replay = FlyReplay(instance="abc", extra=(("note", value),))
    with pytest.raises(ReplayHeaderError, match="not a header value"):
        replay.to_header()
    assert replay.to_json()["note"] == value  # the JSON form carries it


def test_extras_in_the_header_form_are_quoted_when_needed() -> None:
    replay = FlyReplay(instance="abc", extra=(("note", "a b,c"), ("tag", "x")))
    assert replay.to_header() == 'instance=abc;note="a b,c";tag=x'


# --------------------------------------------------------------------------- the codec (#17)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("app", "x;instance=y"),
        ("app", "x,y"),
        ("app", ""),
        ("prefer_instance", "a;fallback=force_self"),
        ("prefer_instance", "a b"),
        ("instance", "-leading-dash"),
    ],
)
def test_names_that_would_add_header_fields_are_refused(field: str, value: str) -> None:
    with pytest.raises(ReplayHeaderError, match=f"fly-replay {field}: invalid value"):
        FlyReplay(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "header",
    [
        "instance=a;;fallback=force_self;timeout=5s",
        "instance=a; ;fallback=force_self;timeout=5s",
        ";instance=a,,fallback=force_self;timeout=5s;",
    ],
)
def test_empty_segments_drop_no_field(header: str) -> None:
    assert FlyReplay.parse(header) == FlyReplay(instance="a", fallback="force_self", timeout="5s")


def test_to_json_is_the_documented_body() -> None:
    replay = FlyReplay(
        instance="e286de4f711e86",
        prefer_instance="0e1f",
        app="api",
        region=("syd", "iad"),
        elsewhere=True,
        state="s.1",
        timeout="800ms",
        fallback="prefer_self",
        transform={"path": "/v2/x", "set_headers": [{"name": "a", "value": "b"}]},
        extra=(("cache", {"ttl": 30}),),
    )
    assert replay.to_json() == {
        "instance": "e286de4f711e86",
        "prefer_instance": "0e1f",
        "app": "api",
        "region": "syd,iad",
        "elsewhere": True,
        "state": "s.1",
        "timeout": "800ms",
        "fallback": "prefer_self",
        "transform": {"path": "/v2/x", "set_headers": [{"name": "a", "value": "b"}]},
        "cache": {"ttl": 30},
    }
    assert json.loads(replay.to_json_bytes()) == replay.to_json()
    assert FlyReplay(elsewhere=False, app="api").to_json() == {"app": "api"}


def test_transform_must_be_an_object() -> None:
    with pytest.raises(ReplayHeaderError, match="transform: expected a JSON object"):
        FlyReplay(instance="abc", transform=["path"])  # type: ignore[arg-type]
    with pytest.raises(ReplayHeaderError, match="transform"):
        FlyReplay.from_json({"instance": "abc", "transform": "path=/x"})


def test_json_fields_must_be_strings() -> None:
    with pytest.raises(ReplayHeaderError, match="fly-replay JSON instance: expected a string"):
        FlyReplay.from_json({"instance": 5})
    assert FlyReplay.from_json({"elsewhere": "true"}).elsewhere is True
    assert FlyReplay.from_json({"elsewhere": False, "app": "a"}).elsewhere is False


@pytest.mark.parametrize(
    ("replay", "head", "tail"),
    [
        (
            FlyReplay(instance="abc", timeout="10s", fallback="force_self"),
            "instance=abc;state=",
            ";timeout=10s;fallback=force_self",
        ),
        (FlyReplay(app="fn-app"), "app=fn-app;state=", ""),
        (FlyReplay(), "state=", ""),
        (FlyReplay(instance="abc", state="old"), "instance=abc;state=", ""),
        (FlyReplay(app="a", extra=(("note", "x y"),)), "app=a;state=", ';note="x y"'),
    ],
)
def test_header_around_state_splits_at_the_state(replay: FlyReplay, head: str, tail: str) -> None:
    assert replay.to_header_around_state() == (head, tail)
    assert FlyReplay.parse(f"{head}flyfn2.1.x{tail}").state == "flyfn2.1.x"


def test_header_around_state_needs_the_header_form() -> None:
    with pytest.raises(ReplayHeaderError, match="JSON form"):
        FlyReplay(instance="abc", transform={"path": "/x"}).to_header_around_state()
    with pytest.raises(ReplayHeaderError, match="cannot place the state"):
        FlyReplay(instance="abc", extra=(("note", "flyfn-state-slot"),)).to_header_around_state()


def test_has_target_and_timeout_seconds() -> None:
    assert not FlyReplay(state="x", timeout="1s").has_target
    for target in (
        {"instance": "a"},
        {"prefer_instance": "a"},
        {"app": "a"},
        {"region": ("iad",)},
        {"elsewhere": True},
    ):
        assert FlyReplay(**target).has_target
    assert FlyReplay().timeout_seconds is None
    assert FlyReplay(timeout="1.5s").timeout_seconds == 1.5


@pytest.mark.parametrize(
    "kwargs",
    [{"elsewhere": "true"}, {"region": ["iad"]}, {"state": 5}, {"instance": 5}, {"fallback": ""}],
)
def test_building_a_replay_of_the_wrong_types_fails(kwargs: dict[str, object]) -> None:
    with pytest.raises(ReplayHeaderError):
        FlyReplay(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ src / failed (#17, #11)


@pytest.mark.parametrize(
    ("cls", "kwargs", "fragment"),
    [
        (ReplaySource, {"instance": "a b"}, "fly-replay-src instance"),
        (ReplaySource, {"region": "x;y"}, "fly-replay-src region"),
        (ReplaySource, {"state": "a,b"}, "fly-replay-src state"),
        (ReplaySource, {"state": "a\r\nb"}, "fly-replay-src state"),
        (ReplaySource, {"state": ""}, "fly-replay-src state"),
        (ReplaySource, {"t": -1}, "fly-replay-src t"),
        (ReplaySource, {"t": "5"}, "fly-replay-src t"),
        (ReplaySource, {"t": True}, "fly-replay-src t"),
        (ReplaySource, {"extra": (("instance", "x"),)}, "duplicates a known field"),
        (ReplaySource, {"extra": (("Note", "x"),)}, "invalid extra field name"),
        (ReplaySource, {"extra": (("note", "a b"),)}, "fly-replay-src: invalid value"),
        (ReplayFailed, {"app": "a;b"}, "fly-replay-failed app"),
        (ReplayFailed, {"replay_source": "a b"}, "fly-replay-failed replay_source"),
        (ReplayFailed, {"reason": 'a"b'}, "fly-replay-failed reason"),
        (ReplayFailed, {"elapsed_ms": -5}, "fly-replay-failed elapsed_ms"),
        (ReplayFailed, {"elapsed_ms": 1.5}, "fly-replay-failed elapsed_ms"),
    ],
)
def test_src_and_failed_validate_on_construction(
    cls: type[ReplaySource | ReplayFailed], kwargs: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ReplayHeaderError, match=fragment):
        cls(**kwargs)  # type: ignore[arg-type]


def test_src_and_failed_keep_unknown_fields_and_write_them_back() -> None:
    source = ReplaySource.parse("instance=a;hop=2;state=s.1;via=iad")
    assert source == ReplaySource(instance="a", state="s.1", extra=(("hop", "2"), ("via", "iad")))
    assert source.to_header() == "instance=a;state=s.1;hop=2;via=iad"
    failed = ReplayFailed.parse("reason=timeout,elapsed_ms=5,attempts=3")
    assert failed == ReplayFailed(reason="timeout", elapsed_ms=5, extra=(("attempts", "3"),))
    assert failed.to_header() == "reason=timeout;elapsed_ms=5;attempts=3"
    assert ReplaySource().to_header() == ""
    assert ReplaySource(extra=(("a", "b"),)).to_header() == "a=b"


@pytest.mark.parametrize(
    "noise",
    [
        "flag",  # no value
        'note="a b, c"',  # a value that is not a bare token
        "note=caf\u00e9",  # not ASCII
        "note=a\x01b",  # a control character
        "Bad Key=1",  # not a field name
        "=1",
        "hop=1;hop=2",  # an unknown field twice: the first is kept
        'odd="unterminated',
    ],
)
def test_src_ignores_fields_it_cannot_read_and_keeps_the_state(noise: str) -> None:
    for header in (f"instance=a;state=s.1;{noise}", f"{noise};instance=a;state=s.1"):
        if noise.startswith('odd="') and header.startswith(noise):
            continue  # an unterminated quote runs to the end: nothing after it is read
        source = ReplaySource.parse(header)
        assert (source.instance, source.state) == ("a", "s.1")
        assert all(key == "hop" for key, _ in source.extra)
    assert ReplaySource.parse("instance=a;hop=1;hop=2").extra == (("hop", "1"),)


@pytest.mark.parametrize(
    "header",
    [
        "state=a;state=b",  # twice
        'state="a b"',  # not a token
        "state=caf\u00e9",
        "state=a\x00",
        "state",  # no value
        "t=1;t=2",
        "state=a;instance=x y",
    ],
)
def test_src_stays_strict_about_the_fields_it_knows(header: str) -> None:
    with pytest.raises(ReplayHeaderError):
        ReplaySource.parse(header)


def test_src_parse_refuses_non_strings_and_huge_values() -> None:
    with pytest.raises(ReplayHeaderError, match="expected a string"):
        ReplaySource.parse(b"state=x")  # type: ignore[arg-type]
    with pytest.raises(ReplayHeaderError, match="longer than"):
        ReplaySource.parse("x" * 9000)
    assert ReplaySource.parse("") == ReplaySource()
    assert ReplaySource.parse(' STATE = "s.1" ').state == "s.1"


# --------------------------------------------------------------------------- state bindings (#16)

QUERY = "page=2&size=a4"
BODY = body_binding(11, b"hello world")


def signed(**kw: Any) -> str:
    return sign_state(SECRET, "POST", "/x", "pdf", now=NOW, query=QUERY, body=BODY, **kw)


def check(state: str, *, now: float = NOW, max_age: float = 40, **kw: object) -> StateCheck:
    args: dict[str, Any] = {"query": QUERY, "body": BODY, **kw}
    return verify_state(state, SECRET, "POST", "/x", "pdf", max_age=max_age, now=now, **args)


def test_the_state_binds_the_query_string() -> None:
    assert check(signed()) == StateCheck(True)
    for query in ("", "page=3&size=a4", "size=a4&page=2", QUERY + "&x=1"):
        assert check(signed(), query=query) == StateCheck(False, "signature mismatch")


def test_the_state_binds_the_body() -> None:
    for body in (
        "",
        body_binding(11, b"hello World"),
        body_binding(12, b"hello world!"),
        body_binding(11),
    ):
        assert check(signed(), body=body) == StateCheck(False, "signature mismatch")


def test_the_query_string_and_path_cannot_trade_characters() -> None:
    state = sign_state(SECRET, "GET", "/x", "pdf", now=NOW, query="a=1")
    assert not verify_state(state, SECRET, "GET", "1\n/x", "pdf", max_age=40, now=NOW, query="a=")
    assert not verify_state(state, SECRET, "GET", "/x", "pdf", max_age=40, now=NOW, query="a=1\n")


def test_body_binding() -> None:
    assert body_binding(0) == body_binding(0, b"") == ""
    assert body_binding(5) == "5"
    assert body_binding(5, b"hello") == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    limit = STATE_BODY_DIGEST_LIMIT
    assert body_binding(limit, b"x" * limit).startswith("sha256:")
    assert body_binding(limit + 1, b"x" * (limit + 1)) == str(limit + 1)


def test_a_state_is_never_accepted_beyond_the_cap() -> None:
    state = signed()
    assert check(state, now=NOW + MAX_STATE_AGE, max_age=10**9) == StateCheck(True)
    too_old = check(state, now=NOW + MAX_STATE_AGE + 1, max_age=10**9)
    assert too_old == StateCheck(False, "state expired")


# --------------------------------------------------------------------------- verify verdicts (#17)


def test_each_verdict_of_verify_state() -> None:
    state = signed()
    assert check(state, now=NOW + 40) == StateCheck(True)
    assert check(state, now=NOW + 40.5) == StateCheck(False, "state expired")
    assert check(state, now=NOW - MAX_CLOCK_SKEW) == StateCheck(True)
    assert check(state, now=NOW - MAX_CLOCK_SKEW - 1) == StateCheck(
        False, "state issued in the future"
    )
    assert check("") == StateCheck(False, "no signed state")
    assert check(None) == StateCheck(False, "no signed state")  # type: ignore[arg-type]
    assert check(123) == StateCheck(False, "malformed state")  # type: ignore[arg-type]
    assert check(state + "A" * 100) == StateCheck(False, "malformed state")
    assert check(state.replace("flyfn2", "flyfn1")) == StateCheck(False, "malformed state")
    assert verify_state(
        state, SECRET, "GET", "/x", "pdf", max_age=40, now=NOW, query=QUERY, body=BODY
    ) == StateCheck(False, "signature mismatch")


def test_state_checks_are_truthy_only_when_ok() -> None:
    assert bool(StateCheck(True)) is True
    assert bool(StateCheck(False, "x")) is False


def test_an_empty_secret_never_verifies_a_state_macd_with_an_empty_key() -> None:
    forged = f"flyfn2.{int(NOW)}.{_mac('', _message(int(NOW), 'GET', '/x', 'pdf', '', ''))}"
    assert not verify_state(forged, "", "GET", "/x", "pdf", max_age=40, now=NOW)
    fallback = verify_state(
        forged, SECRET, "GET", "/x", "pdf", max_age=40, now=NOW, fallback_secrets=[""]
    )
    assert fallback == StateCheck(False, "signature mismatch")


@pytest.mark.parametrize(
    ("forged", "real"),
    [
        # A newline in the method, group or body binding would shift the fields of the message
        # into another request's: each pair below has the very same message.
        ({"method": "GET\nA", "group": "b", "body": "0:"}, {"group": "A", "body": "b"}),
        ({"method": "GET", "group": "a\nb", "body": "0:"}, {"group": "a", "body": "b"}),
        ({"method": "GET", "group": "a", "body": "b\n0:"}, {"group": "a", "body": "b"}),
    ],
)
def test_a_newline_in_method_group_or_body_never_verifies(
    forged: dict[str, str], real: dict[str, str]
) -> None:
    state = sign_state(SECRET, "GET", "0:\n/p", real["group"], now=NOW, body=real["body"])
    method, group, body = forged["method"], forged["group"], forged["body"]
    assert _message(int(NOW), method, "/p", group, "", body) == _message(
        int(NOW), "GET", "0:\n/p", real["group"], "", real["body"]
    )
    verdict = verify_state(state, SECRET, method, "/p", group, max_age=40, now=NOW, body=body)
    assert verdict == StateCheck(False, "signature mismatch")
    with pytest.raises(ValueError, match="newlines"):
        sign_state(SECRET, method, "/p", group, now=NOW, body=body)


def test_a_state_is_signed_with_the_clock_when_no_time_is_given() -> None:
    before = int(time.time())
    state = sign_state(SECRET, "GET", "/x", "pdf")
    issued = int(state.split(".")[1])
    assert before <= issued <= int(time.time())
    assert verify_state(state, SECRET, "GET", "/x", "pdf", max_age=60)


# --------------------------------------------------------------------------- hops (elastic groups)


def test_a_state_carries_its_hop_count_signed() -> None:
    state = sign_state(SECRET, "GET", "/x", "pdf", now=NOW, hop=3)
    assert state.startswith(f"flyfn2.{int(NOW)}.h3.")
    assert verify_state(state, SECRET, "GET", "/x", "pdf", max_age=40, now=NOW) == StateCheck(
        True, hop=3
    )
    # A function Machine cannot raise or drop the count without the key: it is in the message.
    for forged in (state.replace(".h3.", ".h4."), state.replace(".h3.", ".")):
        verdict = verify_state(forged, SECRET, "GET", "/x", "pdf", max_age=40, now=NOW)
        assert verdict == StateCheck(False, "signature mismatch")
    plain = sign_state(SECRET, "GET", "/x", "pdf", now=NOW)
    assert plain.count(".") == 2  # an app Machine's state (hop 0) names no hop
    added = plain.replace(f".{int(NOW)}.", f".{int(NOW)}.h1.")
    verdict = verify_state(added, SECRET, "GET", "/x", "pdf", max_age=40, now=NOW)
    assert verdict == StateCheck(False, "signature mismatch")


def test_the_hop_count_is_the_first_line_of_the_message_from_hop_1() -> None:
    assert _message(7, "get", "/p", "g", "q=1", "") == "7\nGET\ng\n\n3:q=1\n/p"
    assert _message(7, "get", "/p", "g", "q=1", "", 2) == "h2\n7\nGET\ng\n\n3:q=1\n/p"


def test_hop_counts_run_from_0_to_99() -> None:
    last = sign_state(SECRET, "GET", "/x", "pdf", now=NOW, hop=99)
    assert verify_state(last, SECRET, "GET", "/x", "pdf", max_age=40, now=NOW).hop == 99
    for hop in (-1, 100):
        with pytest.raises(ValueError, match=rf"hop must be 0 to 99 \(got {hop}\)"):
            sign_state(SECRET, "GET", "/x", "pdf", now=NOW, hop=hop)


# --------------------------------------------------------------------------- messages (#17)

# Every error names what is wrong in words a user can act on: pinned here, one per raise site.
ERROR_MESSAGES = [
    (
        "parse_duration('x')",
        "invalid duration 'x': expected a positive number and a unit ms, s, m or h, e.g. '10s'",
    ),
    ("format_duration(0)", "a duration must be positive, got 0"),
    ("format_duration(0.0001)", "a duration must be at least 1ms, got 0.0001"),
    ("FlyReplay.parse(5)", "fly-replay: expected a string, got int"),
    ("FlyReplay.parse('x'*8193)", "fly-replay: longer than 8192 characters"),
    (
        "FlyReplay.parse('note=\"a\\x01\";app=x')",
        "fly-replay: control or non-ASCII character '\\x01'",
    ),
    ("FlyReplay.parse('note=\"a')", "fly-replay: unterminated quoted value"),
    ("FlyReplay.parse('instance')", "fly-replay: 'instance' is not a key=value field"),
    (
        "FlyReplay.parse('n'*50)",
        "fly-replay: 'nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn' is not a key=value field",
    ),
    ("FlyReplay.parse('note=a\"b\"')", "fly-replay: misplaced quote in field 'note'"),
    ("FlyReplay.parse('app=a;app=b')", "fly-replay: field 'app' given twice"),
    (
        "FlyReplay.parse('transform=x')",
        "fly-replay: extra field 'transform' duplicates a known field",
    ),
    (
        "FlyReplay.parse('elsewhere=' + 'y'*50)",
        "fly-replay elsewhere: expected true or false, got " + repr("y" * 40),
    ),
    ("FlyReplay(region='iad')", "fly-replay region: expected a tuple of region codes"),
    ("FlyReplay(region=('i d',))", "fly-replay region: invalid value 'i d'"),
    ("FlyReplay(elsewhere=1)", "fly-replay elsewhere: expected a bool"),
    (
        "FlyReplay(state='a b')",
        "fly-replay state: must be printable ASCII without spaces, quotes, ';', ',' or '\\'",
    ),
    (
        "FlyReplay(timeout='1')",
        "fly-replay timeout: invalid duration '1': expected a positive number and a unit "
        "ms, s, m or h, e.g. '10s'",
    ),
    ("FlyReplay(transform=[1])", "fly-replay transform: expected a JSON object"),
    ("FlyReplay(transform={'a': 'b\\n'})", "fly-replay transform: control character '\\n'"),
    ("FlyReplay(extra=[])", "fly-replay extra: expected a tuple of (name, value) pairs"),
    (
        "FlyReplay(extra=(('instance','x'),))",
        "fly-replay: extra field 'instance' duplicates a known field",
    ),
    ("FlyReplay(extra=((5,'x'),))", "fly-replay: invalid extra field name 5"),
    ("FlyReplay(extra=(('n','\\n'),))", "fly-replay extra: control character '\\n'"),
    ("FlyReplay(transform={}).to_header()", "fly-replay transform needs the JSON form (to_json)"),
    ("FlyReplay().to_header()", "fly-replay: no fields to send"),
    ("FlyReplay.from_json(b'x'*65537)", "fly-replay JSON: longer than 65536 bytes"),
    ("FlyReplay.from_json(b'{')", "fly-replay JSON: not valid JSON (JSONDecodeError)"),
    ("FlyReplay.from_json(b'[]')", "fly-replay JSON: expected an object"),
    ("FlyReplay.from_json({1: 'x'})", "fly-replay JSON: keys must be strings"),
    (
        "FlyReplay.from_json({'elsewhere': 'maybe'})",
        "fly-replay elsewhere: expected true or false, got 'maybe'",
    ),
    ("FlyReplay.from_json({'region': 'iad,,ord'})", "fly-replay region: invalid list 'iad,,ord'"),
    (
        "FlyReplay.from_json({'region': ['iad', 5]})",
        "fly-replay JSON region: expected a string or a list of strings",
    ),
    (
        "FlyReplay.from_json({'region': []})",
        "fly-replay JSON region: expected a string or a list of strings",
    ),
    ("ReplaySource.parse(5)", "fly-replay-src: expected a string, got int"),
    ("ReplaySource.parse('state')", "fly-replay-src: 'state' is not a key=value field"),
    ("ReplaySource.parse('state=a;state=b')", "fly-replay-src: field 'state' given twice"),
    ("ReplaySource.parse('t=x')", "fly-replay-src t: expected a non-negative integer, got 'x'"),
    ("ReplaySource.parse('state=\"\"')", "fly-replay-src state: invalid value ''"),
    (
        "ReplaySource(extra=(('instance','x'),))",
        "fly-replay-src: extra field 'instance' duplicates a known field",
    ),
    (
        "ReplayFailed(elapsed_ms=-1)",
        "fly-replay-failed elapsed_ms: expected a non-negative integer",
    ),
    (
        "sign_state('', 'GET', '/', 'g')",
        "sign_state needs a non-empty secret (settings.SECRET_KEY)",
    ),
    (
        "sign_state('s', 'GET', '/', 'a\\nb')",
        "sign_state: method, group and body binding cannot contain newlines",
    ),
]


ERROR_MESSAGES += [
    (
        "FlyReplay(app='a', extra=(('n', 'flyfn-state-slot'),)).to_header_around_state()",
        "fly-replay: cannot place the state in this header",
    ),
]
ERROR_MESSAGES += [  # long values are shown cut at 40 characters
    (
        "ReplaySource.parse('t=' + 'x' * 50)",
        f"fly-replay-src t: expected a non-negative integer, got {'x' * 40!r}",
    ),
    (
        "FlyReplay.from_json({'region': ',' + 'i' * 50})",
        f"fly-replay region: invalid list {',' + 'i' * 39!r}",
    ),
]


@pytest.mark.parametrize(("code", "message"), ERROR_MESSAGES)
def test_each_error_message(code: str, message: str) -> None:
    namespace = {
        "FlyReplay": FlyReplay,
        "ReplaySource": ReplaySource,
        "ReplayFailed": ReplayFailed,
        "parse_duration": parse_duration,
        "format_duration": format_duration,
        "sign_state": sign_state,
    }
    with pytest.raises((ReplayHeaderError, ValueError)) as info:
        eval(code, namespace)  # noqa: S307 - the expressions above, nothing else
    assert str(info.value) == message


def test_mac_is_djangos_salted_hmac_of_the_message() -> None:
    state_module._keyed_hmac.cache_clear()  # derive each key here, not in an earlier test
    for secret in ("s", "x" * 100, b"\xff raw", "\u00fcn\u00efc\u00f6d\u00e9"):
        message = _message(1_700_000_000, "post", "/x", "pdf", "a=1", body_binding(1, b"x"))
        digest = salted_hmac(
            "flyfn.replay.state", message, secret=secret, algorithm="sha256"
        ).digest()
        assert _mac(secret, message) == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@settings(max_examples=60, deadline=None)
@given(
    secret=st.text(min_size=1, max_size=80),
    path=st.text(max_size=200),
    issued=st.integers(min_value=0, max_value=10**12),
)
def test_mac_is_djangos_salted_hmac_for_any_input(secret: str, path: str, issued: int) -> None:
    message = _message(issued, "POST", path, "default", "", "")
    try:
        digest = salted_hmac("flyfn.replay.state", message, secret=secret, algorithm="sha256")
    except UnicodeEncodeError:  # lone surrogates: both refuse them
        with pytest.raises(UnicodeEncodeError):
            _mac(secret, message)
        return
    expected = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    assert _mac(secret, message) == expected


@settings(max_examples=80, deadline=None)
@given(
    method=st.sampled_from(["GET", "post", "DELETE"]),
    path=st.text(max_size=120),
    group=st.sampled_from(["default", "pdf", "a-b_1"]),
    query=st.text(max_size=40),
    body=st.sampled_from(["", "17", "sha256:" + "ab" * 32]),
    issued=st.integers(min_value=0, max_value=10**12 - 1),  # 12 digits, as a state holds
    hop=st.integers(min_value=0, max_value=MAX_STATE_HOP),
)
def test_sign_state_is_the_mac_of_the_message_verify_state_checks(
    method: str, path: str, group: str, query: str, body: str, issued: int, hop: int
) -> None:
    """`sign_state` computes the MAC inline; `verify_state` with `_message` and `_mac`."""
    message = _message(issued, method, path, group, query, body, hop)
    try:
        mac = _mac("s", message)
    except UnicodeEncodeError:  # lone surrogates: sign_state refuses them too
        with pytest.raises(UnicodeEncodeError):
            sign_state("s", method, path, group, issued, query=query, body=body, hop=hop)
        return
    state = sign_state("s", method, path, group, issued, query=query, body=body, hop=hop)
    assert state == (f"flyfn2.{issued}.h{hop}.{mac}" if hop else f"flyfn2.{issued}.{mac}")
    check = verify_state(
        state, "s", method, path, group, max_age=60, now=issued, query=query, body=body
    )
    assert check.ok, check.reason
    assert check.hop == hop


@pytest.mark.parametrize("own", [True, False])
def test_mac_is_djangos_salted_hmac_with_pythons_own_sha256_or_without_it(
    monkeypatch: pytest.MonkeyPatch, own: bool
) -> None:
    if not own:  # a Python built without its own SHA-256: hashlib's (OpenSSL's)

        def missing(name: str) -> None:
            raise ImportError(name)

        monkeypatch.setattr(importlib, "import_module", missing)
    sha256 = state_module._own_sha256()
    if own and sha256 is hashlib.sha256:
        pytest.skip("this Python has no SHA-256 of its own")
    assert (sha256 is hashlib.sha256) is not own
    monkeypatch.setattr(state_module, "_SHA256", sha256)
    state_module._keyed_hmac.cache_clear()
    message = _message(1_700_000_000, "GET", "/x", "pdf", "", "")
    digest = salted_hmac("flyfn.replay.state", message, secret="s", algorithm="sha256").digest()
    assert _mac("s", message) == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    state_module._keyed_hmac.cache_clear()  # no other test gets this one's keyed states


def test_each_secret_signs_with_its_own_key() -> None:
    old = sign_state("old-secret", "GET", "/fn/", "pdf", now=NOW)
    new = sign_state("new-secret", "GET", "/fn/", "pdf", now=NOW)
    assert old != new
    assert verify_state(new, "new-secret", "GET", "/fn/", "pdf", max_age=40, now=NOW)
    assert not verify_state(old, "new-secret", "GET", "/fn/", "pdf", max_age=40, now=NOW)
    assert not verify_state(new, "old-secret", "GET", "/fn/", "pdf", max_age=40, now=NOW)


def test_the_limits_are_inclusive() -> None:
    assert FlyReplay.parse("note=" + "x" * (MAX_HEADER_LENGTH - 5)).extra[0][0] == "note"
    assert ReplaySource.parse("note=" + "x" * (MAX_HEADER_LENGTH - 5)).extra[0][0] == "note"
    with pytest.raises(ReplayHeaderError, match="longer than 8192"):
        ReplaySource.parse("x" * (MAX_HEADER_LENGTH + 1))
    body = b'{"note":"' + b"x" * (MAX_JSON_LENGTH - 11) + b'"}'
    assert len(body) == MAX_JSON_LENGTH
    assert FlyReplay.from_json(body).extra[0][0] == "note"
    assert body_binding(1) == "1"


def test_nested_values_are_counted_up_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec_module, "_MAX_JSON_ITEMS", 5)
    # The walk counts the extra tuple, the pair, the name, the list and its one item: 5.
    assert FlyReplay(app="a", extra=(("k", [1]),)).extra == (("k", [1]),)
    with pytest.raises(ReplayHeaderError, match="more than 5 nested values"):
        FlyReplay(app="a", extra=(("k", [1, 2]),))


def test_quoted_values_take_printable_ascii_only() -> None:
    assert FlyReplay.parse('note="a~b";app=x').extra == (("note", "a~b"),)
    for bad in ("\x7f", "\x80", "\u00e9"):
        with pytest.raises(ReplayHeaderError, match="control or non-ASCII"):
            FlyReplay.parse(f'note="a{bad}";app=x')


def test_only_spaces_and_tabs_around_fields_are_trimmed() -> None:
    assert FlyReplay.parse("instance=XaX").instance == "XaX"
    assert FlyReplay.parse(" \tinstance = a\t").instance == "a"
    assert ReplaySource.parse("state=XsX").state == "XsX"
    assert ReplaySource.parse('note="qX";state=aXb').state == "aXb"
    # Other whitespace is no separator: a known field keeps it, and is refused for it.
    with pytest.raises(ReplayHeaderError, match="state"):
        ReplaySource.parse("state=s.1\x0b")
    assert ReplaySource.parse("\x0bstate=s.1").state is None  # "\x0bstate" is no field of ours


def test_zero_is_a_valid_time_and_elapsed_time() -> None:
    assert ReplaySource(instance="a", t=0).t == 0
    assert ReplaySource.parse("instance=a;t=0").t == 0
    assert ReplayFailed(reason="timeout", elapsed_ms=0).elapsed_ms == 0
    assert ReplayFailed.parse("reason=timeout;elapsed_ms=0").elapsed_ms == 0
    with pytest.raises(ReplayHeaderError, match="t: expected a non-negative integer"):
        ReplaySource(instance="a", t=-1)
    with pytest.raises(ReplayHeaderError, match="elapsed_ms: expected a non-negative integer"):
        ReplayFailed(reason="timeout", elapsed_ms=-1)


def test_quotes_in_src_protect_separators() -> None:
    source = ReplaySource.parse('note="a;state=x";state=s.1')
    assert source.state == "s.1"


def test_the_json_body_is_compact() -> None:
    assert FlyReplay(instance="a", timeout="1s").to_json_bytes() == (
        b'{"instance":"a","timeout":"1s"}'
    )


def test_field_names_are_trimmed_of_spaces_and_tabs_only() -> None:
    assert FlyReplay.parse("Xnote=a;app=b").extra == (("xnote", "a"),)
    assert ReplaySource.parse("Xstate=s.1").state is None
    assert ReplaySource.parse("Xstate=s.1").extra == (("xstate", "s.1"),)


def test_region_lists_are_trimmed_of_spaces_and_tabs_only() -> None:
    assert FlyReplay.from_json({"region": " Xy ,\tord"}).region == ("Xy", "ord")
    with pytest.raises(ReplayHeaderError, match="fly-replay region: invalid value"):
        FlyReplay.from_json({"region": "iad,\u3000ord"})
