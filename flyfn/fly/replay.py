"""The fly-replay protocol as Fly Proxy defines it: the `fly-replay` header and JSON forms and the
`fly-replay-src` / `fly-replay-failed` request headers, emitted and parsed.

- `FlyReplay`: every field Fly documents (instance, prefer_instance, app, region, elsewhere,
  state, timeout, fallback, transform), as a `fly-replay` header or an
  `application/vnd.fly.replay+json` body; unknown fields are kept in `extra`.
- `ReplaySource` / `ReplayFailed`: the `fly-replay-src` and `fly-replay-failed` request
  headers Fly Proxy adds (both `;` and `,` accepted as separators, as Fly's docs disagree).

The library emits replays and reads the two request headers; the emulator's proxy parses replays
and writes the headers. Parsing hostile input raises `ReplayHeaderError` (a ValueError) and nothing
else. Django-free; flyfn's signed `state` is `flyfn.replay_state`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from flyfn.fly.durations import DurationError, parse_duration

__all__ = [
    "FALLBACKS",
    "MAX_HEADER_LENGTH",
    "MAX_JSON_LENGTH",
    "FlyReplay",
    "ReplayFailed",
    "ReplayHeaderError",
    "ReplaySource",
]

FALLBACKS = frozenset({"force_self", "prefer_self"})
# A placeholder state marking where a per-request state goes in a prebuilt header.
_STATE_SLOT = "flyfn-state-slot"

# Far above anything Fly or flyfn emits; bounds the work hostile input can cause.
MAX_HEADER_LENGTH = 8192
MAX_JSON_LENGTH = 65536


class ReplayHeaderError(ValueError):
    """A fly-replay, fly-replay-src or fly-replay-failed value (or a field of one) is invalid."""


# --------------------------------------------------------------------------- field syntax

# A bare value: printable ASCII without space, quote, separators or backslash ('=' is allowed: a
# field is split at its first '=').
_TOKEN_RE = re.compile(r"^[!#-+\--:<-\[\]-~]+$")
_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_REGION_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_INT_RE = re.compile(r"^[0-9]{1,19}$")


def _split(
    value: object, what: str, separators: str, *, list_key: str | None = None
) -> list[tuple[str, str]]:
    """`key=value` fields of a header value; values may be double-quoted (then may hold commas).

    A bare word right after a `list_key` field continues its comma list (`region=iad,ord`).
    """
    if not isinstance(value, str):
        raise ReplayHeaderError(f"{what}: expected a string, got {type(value).__name__}")
    if len(value) > MAX_HEADER_LENGTH:
        raise ReplayHeaderError(f"{what}: longer than {MAX_HEADER_LENGTH} characters")
    if '"' not in value:  # the usual case: no quoting, so one pass of C code splits it
        bad = _BAD_CHAR_RE.search(value)
        if bad is not None:
            raise ReplayHeaderError(f"{what}: control or non-ASCII character {bad.group()!r}")
        segments = _separators_re(separators).split(value)
    else:
        segments = _split_quoted(value, what, separators)
    return _fields(segments, what, list_key)


# A character no header field may hold (tab aside, only printable ASCII is allowed).
_BAD_CHAR_RE = re.compile(r"[^\t\x20-\x7e]")


@functools.lru_cache(maxsize=8)
def _separators_re(separators: str) -> re.Pattern[str]:
    return re.compile(f"[{re.escape(separators)}]")


def _split_quoted(value: str, what: str, separators: str, *, strict: bool = True) -> list[str]:
    """The segments of a value with double quotes: separators inside quotes are kept.

    Not `strict`: characters are not checked and an unterminated quote runs to the end.
    """
    segments: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
            current.append(char)
        elif not quoted and char in separators:
            segments.append("".join(current))
            current = []
        elif strict and (
            (ord(char) < 0x20 and char != "\t") or ord(char) == 0x7F or ord(char) > 0x7E
        ):
            raise ReplayHeaderError(f"{what}: control or non-ASCII character {char!r}")
        else:
            current.append(char)
    if quoted and strict:
        raise ReplayHeaderError(f"{what}: unterminated quoted value")
    segments.append("".join(current))
    return segments


def _fields(segments: list[str], what: str, list_key: str | None) -> list[tuple[str, str]]:
    """The `key=value` fields of a header value's segments (see `_split`)."""
    fields: list[tuple[str, str]] = []
    seen: set[str] = set()
    for segment in segments:
        segment = segment.strip(" \t")
        if not segment:
            continue
        key, eq, raw = segment.partition("=")
        if not eq and fields and fields[-1][0] == list_key and _TOKEN_RE.fullmatch(segment):
            fields[-1] = (fields[-1][0], f"{fields[-1][1]},{segment}")
            continue
        key = key.strip(" \t").lower()
        raw = raw.strip(" \t")
        if not eq or not _KEY_RE.fullmatch(key):
            raise ReplayHeaderError(f"{what}: {segment[:40]!r} is not a key=value field")
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1]
        if '"' in raw:
            raise ReplayHeaderError(f"{what}: misplaced quote in field {key!r}")
        if key in seen:
            raise ReplayHeaderError(f"{what}: field {key!r} given twice")
        seen.add(key)
        fields.append((key, raw))
    if not fields:
        raise ReplayHeaderError(f"{what}: no fields")
    return fields


def _check(value: str | None, pattern: re.Pattern[str], what: str) -> None:
    if value is not None and (not isinstance(value, str) or not pattern.fullmatch(value)):
        raise ReplayHeaderError(f"{what}: invalid value {value!r}")


# What a quoted header value may hold: printable ASCII and space, without quote or backslash.
_QUOTABLE_RE = re.compile(r"^[ !#-\[\]-~]*$")


def _quote_if_needed(value: str) -> str:
    return value if _TOKEN_RE.fullmatch(value) else f'"{value}"'


def _join(fields: Iterable[tuple[str, str]]) -> str:
    return ";".join(f"{key}={value}" for key, value in fields)


def _int(value: str, what: str) -> int:
    if not _INT_RE.fullmatch(value):
        raise ReplayHeaderError(f"{what}: expected a non-negative integer, got {value[:40]!r}")
    return int(value)


def _extras(extra: Iterable[tuple[str, Any]], known: Iterable[str], what: str) -> None:
    names = set(known)
    seen: set[str] = set()
    for key, _value in extra:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or key.lower() != key:
            raise ReplayHeaderError(f"{what}: invalid extra field name {key!r}")
        if key in names:
            raise ReplayHeaderError(f"{what}: extra field {key!r} duplicates a known field")
        if key in seen:
            raise ReplayHeaderError(f"{what}: extra field {key!r} given twice")
        seen.add(key)


# C0 controls (CR and LF among them), DEL and C1 controls: never in a value flyfn sends or accepts.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Bounds the walk of a nested JSON value (the JSON parser has its own recursion limit).
_MAX_JSON_ITEMS = 10_000


def _no_controls(value: object, what: str) -> None:
    """Refuse a control character in `value` or in any string (key or value) nested in it."""
    stack = [value]
    items = 0
    while stack:
        item = stack.pop()
        items += 1
        if items > _MAX_JSON_ITEMS:
            raise ReplayHeaderError(f"{what}: more than {_MAX_JSON_ITEMS} nested values")
        if isinstance(item, str):
            bad = _CONTROL_RE.search(item)
            if bad is not None:
                raise ReplayHeaderError(f"{what}: control character {bad.group()!r}")
        elif isinstance(item, Mapping):
            for key, nested in item.items():
                stack.append(key)
                stack.append(nested)
        elif isinstance(item, list | tuple):
            stack.extend(item)


# --------------------------------------------------------------------------- fly-replay


@dataclass(frozen=True, slots=True)
class FlyReplay:
    """A `fly-replay` instruction. Constructing one validates it; `to_header()` / `to_json()`
    emit it and `parse()` / `from_json()` read it back (unknown fields are kept in `extra`).

    `region` is a tuple of region codes in order of preference (several are written as a quoted
    comma list). `transform` (path / header changes) exists only in the JSON form.
    """

    instance: str | None = None
    prefer_instance: str | None = None
    app: str | None = None
    region: tuple[str, ...] = ()
    elsewhere: bool = False
    state: str | None = None
    timeout: str | None = None
    fallback: str | None = None
    transform: Mapping[str, Any] | None = field(default=None, hash=False)
    extra: tuple[tuple[str, Any], ...] = field(default=(), hash=False)

    KNOWN: ClassVar[tuple[str, ...]] = (
        "instance",
        "prefer_instance",
        "app",
        "region",
        "elsewhere",
        "state",
        "timeout",
        "fallback",
        "transform",
    )

    def __post_init__(self) -> None:
        _check(self.instance, _NAME_RE, "fly-replay instance")
        _check(self.prefer_instance, _NAME_RE, "fly-replay prefer_instance")
        _check(self.app, _NAME_RE, "fly-replay app")
        if isinstance(self.region, str) or not isinstance(self.region, tuple):
            raise ReplayHeaderError("fly-replay region: expected a tuple of region codes")
        for code in self.region:
            _check(code, _REGION_RE, "fly-replay region")
        if not isinstance(self.elsewhere, bool):
            raise ReplayHeaderError("fly-replay elsewhere: expected a bool")
        if self.state is not None and (
            not isinstance(self.state, str) or not _TOKEN_RE.fullmatch(self.state)
        ):
            raise ReplayHeaderError(
                "fly-replay state: must be printable ASCII without spaces, quotes, ';', ',' or '\\'"
            )
        if self.timeout is not None:
            try:
                parse_duration(self.timeout)
            except DurationError as exc:
                raise ReplayHeaderError(f"fly-replay timeout: {exc}") from None
        if self.fallback is not None and self.fallback not in FALLBACKS:
            raise ReplayHeaderError(
                f"fly-replay fallback: must be force_self or prefer_self, got {self.fallback!r}"
            )
        if self.transform is not None:
            if not isinstance(self.transform, Mapping):
                raise ReplayHeaderError("fly-replay transform: expected a JSON object")
            _no_controls(self.transform, "fly-replay transform")
        if not isinstance(self.extra, tuple):
            raise ReplayHeaderError("fly-replay extra: expected a tuple of (name, value) pairs")
        _extras(self.extra, self.KNOWN, "fly-replay")
        _no_controls(self.extra, "fly-replay extra")

    @property
    def timeout_seconds(self) -> float | None:
        """`timeout` in seconds, or None when absent."""
        return parse_duration(self.timeout) if self.timeout is not None else None

    @property
    def has_target(self) -> bool:
        """Whether it says where to go (instance, prefer_instance, app, region or elsewhere)."""
        return bool(
            self.instance or self.prefer_instance or self.app or self.region or self.elsewhere
        )

    # ------------------------------------------------------------- header form

    def to_header(self) -> str:
        """The `fly-replay` header value, e.g. `instance=e286de4f711e86;timeout=10s`."""
        if self.transform is not None:
            raise ReplayHeaderError("fly-replay transform needs the JSON form (to_json)")
        fields: list[tuple[str, str]] = []
        for key in ("instance", "prefer_instance", "app"):
            value = getattr(self, key)
            if value is not None:
                fields.append((key, value))
        if self.region:
            joined = ",".join(self.region)
            fields.append(("region", joined if len(self.region) == 1 else f'"{joined}"'))
        if self.elsewhere:
            fields.append(("elsewhere", "true"))
        for key in ("state", "timeout", "fallback"):
            value = getattr(self, key)
            if value is not None:
                fields.append((key, value))
        for key, value in self.extra:
            if not isinstance(value, str) or not _QUOTABLE_RE.fullmatch(value):
                raise ReplayHeaderError(f"fly-replay extra field {key!r}: not a header value")
            fields.append((key, _quote_if_needed(value)))
        if not fields:
            raise ReplayHeaderError("fly-replay: no fields to send")
        return _join(fields)

    def to_header_around_state(self) -> tuple[str, str]:
        """`(head, tail)` such that `head + state + tail` is the header of this replay with
        `state` set, for any valid state: build the constant part once, append a signed state per
        request (the hot path of the middleware)."""
        header = replace(self, state=_STATE_SLOT).to_header()
        head, slot, tail = header.partition(f"state={_STATE_SLOT}")
        if not slot or _STATE_SLOT in tail:
            raise ReplayHeaderError("fly-replay: cannot place the state in this header")
        return head + "state=", tail

    @classmethod
    def parse(cls, header: str) -> FlyReplay:
        """Read a `fly-replay` header value (`;` or `,` between fields)."""
        values: dict[str, Any] = {}
        extra: list[tuple[str, Any]] = []
        for key, raw in _split(header, "fly-replay", ";,", list_key="region"):
            if key == "region":
                values["region"] = _regions(raw)
            elif key == "elsewhere":
                values["elsewhere"] = _bool(raw, "fly-replay elsewhere")
            elif key in cls.KNOWN and key != "transform":
                values[key] = raw
            else:
                extra.append((key, raw))
        return cls(**values, extra=tuple(extra))

    # ------------------------------------------------------------- JSON form

    def to_json(self) -> dict[str, Any]:
        """The `application/vnd.fly.replay+json` body as a dict (`json.dumps` it)."""
        body: dict[str, Any] = {}
        for key in ("instance", "prefer_instance", "app"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        if self.region:
            body["region"] = ",".join(self.region)
        if self.elsewhere:
            body["elsewhere"] = True
        for key in ("state", "timeout", "fallback"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        if self.transform is not None:
            body["transform"] = dict(self.transform)
        body.update(self.extra)
        return body

    def to_json_bytes(self) -> bytes:
        """The JSON body, encoded."""
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, body: bytes | str | Mapping[str, Any]) -> FlyReplay:
        """Read an `application/vnd.fly.replay+json` body (bytes, text or an already-parsed
        dict)."""
        data: Any = body
        if isinstance(body, bytes | str):
            if len(body) > MAX_JSON_LENGTH:
                raise ReplayHeaderError(f"fly-replay JSON: longer than {MAX_JSON_LENGTH} bytes")
            try:
                data = json.loads(body)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, deep nesting
                reason = type(exc).__name__
                raise ReplayHeaderError(f"fly-replay JSON: not valid JSON ({reason})") from None
        if not isinstance(data, Mapping):
            raise ReplayHeaderError("fly-replay JSON: expected an object")
        values: dict[str, Any] = {}
        extra: list[tuple[str, Any]] = []
        for key, value in data.items():
            if not isinstance(key, str):
                raise ReplayHeaderError("fly-replay JSON: keys must be strings")
            if key == "region":
                values["region"] = _json_regions(value)
            elif key == "elsewhere":
                values["elsewhere"] = (
                    value if isinstance(value, bool) else _bool(value, "fly-replay elsewhere")
                )
            elif key == "transform":
                values["transform"] = value
            elif key in cls.KNOWN:
                if not isinstance(value, str):
                    raise ReplayHeaderError(f"fly-replay JSON {key}: expected a string")
                values[key] = value
            else:
                extra.append((key, value))
        return cls(**values, extra=tuple(extra))


def _regions(raw: str) -> tuple[str, ...]:
    codes = tuple(code.strip(" \t") for code in raw.split(","))
    if not codes or any(not code for code in codes):
        raise ReplayHeaderError(f"fly-replay region: invalid list {raw[:40]!r}")
    return codes


def _json_regions(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return _regions(value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ReplayHeaderError("fly-replay JSON region: expected a string or a list of strings")


def _bool(value: object, what: str) -> bool:
    if isinstance(value, str) and value.lower() in {"true", "false"}:
        return value.lower() == "true"
    raise ReplayHeaderError(f"{what}: expected true or false, got {str(value)[:40]!r}")


# --------------------------------------------------------------------------- src / failed


def _lenient(value: str | None, what: str) -> None:
    # Values Fly Proxy writes: any bare token (quotes are removed by the parser).
    if value is not None and (not isinstance(value, str) or not _TOKEN_RE.fullmatch(value)):
        raise ReplayHeaderError(f"{what}: invalid value {value!r}")


class _Fields:
    """The fields of a `fly-replay-src` / `fly-replay-failed` value: bare-token strings, one
    non-negative integer `number`, extra ones; `order` is how a header value lists them. One per
    class, so that the key sets and messages are not rebuilt for every request's header."""

    __slots__ = ("known", "number", "number_what", "order", "strings", "what")

    def __init__(self, what: str, order: tuple[str, ...], number: str) -> None:
        self.what = what
        self.order = order
        self.number = number
        self.number_what = f"{what} {number}"
        self.strings = tuple(key for key in order if key != number)
        self.known = frozenset(order)

    def check(self, item: ReplaySource | ReplayFailed) -> None:
        """Validate a constructed value."""
        for key in self.strings:
            _lenient(getattr(item, key), f"{self.what} {key}")
        value = getattr(item, self.number)
        if value is not None and (type(value) is not int or value < 0):
            raise ReplayHeaderError(f"{self.number_what}: expected a non-negative integer")
        _extras(item.extra, self.known, self.what)
        for _key, extra_value in item.extra:
            _lenient(extra_value, self.what)

    def read(self, header: str) -> tuple[dict[str, Any], tuple[tuple[str, str], ...]]:
        """The known fields and the extra ones of a header value (`;` or `,` between).

        Strict about the fields it knows (each at most once, with a valid value: the construction
        checks them). A field it does not know is kept in `extra` when it is a plain
        `key=token` and ignored otherwise: Fly Proxy may add fields, and one flyfn cannot read
        must not make a replayed request unreadable.
        """
        if not isinstance(header, str):
            raise ReplayHeaderError(f"{self.what}: expected a string, got {type(header).__name__}")
        if len(header) > MAX_HEADER_LENGTH:
            raise ReplayHeaderError(f"{self.what}: longer than {MAX_HEADER_LENGTH} characters")
        if '"' in header:
            segments = _split_quoted(header, self.what, ";,", strict=False)
        else:
            segments = _separators_re(";,").split(header)
        values: dict[str, Any] = {}
        extra: list[tuple[str, str]] = []
        for segment in segments:
            key, eq, raw = segment.partition("=")
            key = key.strip(" \t").lower()
            raw = raw.strip(" \t")
            if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                raw = raw[1:-1]
            if key in self.known:
                if not eq:
                    raise ReplayHeaderError(f"{self.what}: {key!r} is not a key=value field")
                if key in values:
                    raise ReplayHeaderError(f"{self.what}: field {key!r} given twice")
                values[key] = _int(raw, self.number_what) if key == self.number else raw
            elif (
                eq
                and _KEY_RE.fullmatch(key)
                and _TOKEN_RE.fullmatch(raw)
                and all(key != name for name, _ in extra)
            ):
                extra.append((key, raw))
        return values, tuple(extra)

    def header(self, item: ReplaySource | ReplayFailed) -> str:
        """The `;`-separated value: the fields that are set, in `order`, then the extra ones."""
        fields = [
            (key, str(getattr(item, key))) for key in self.order if getattr(item, key) is not None
        ]
        return _join([*fields, *item.extra]) if fields or item.extra else ""


@dataclass(frozen=True, slots=True)
class ReplaySource:
    """The `fly-replay-src` request header of a replayed request.

    `t` is the replay time in Unix microseconds; `state` is what the sender put in
    `fly-replay`.
    """

    instance: str | None = None
    region: str | None = None
    t: int | None = None
    state: str | None = None
    extra: tuple[tuple[str, str], ...] = ()

    _FIELDS: ClassVar[_Fields] = _Fields(
        "fly-replay-src", ("instance", "region", "t", "state"), "t"
    )

    def __post_init__(self) -> None:
        self._FIELDS.check(self)

    @classmethod
    def parse(cls, header: str) -> ReplaySource:
        """Read a `fly-replay-src` value (`;` or `,` between fields)."""
        values, extra = cls._FIELDS.read(header)
        return cls(**values, extra=extra)

    def to_header(self) -> str:
        """The header value, `;`-separated (what the emulator's proxy sends)."""
        return self._FIELDS.header(self)


@dataclass(frozen=True, slots=True)
class ReplayFailed:
    """The `fly-replay-failed` request header of a fallback request.

    `reason` is `timeout`, `retries_exhausted` or `no_candidate` (others are kept as given);
    `instance` / `app` / `region` name the replay target that failed.
    """

    instance: str | None = None
    app: str | None = None
    region: str | None = None
    replay_source: str | None = None
    reason: str | None = None
    elapsed_ms: int | None = None
    extra: tuple[tuple[str, str], ...] = ()

    REASONS: ClassVar[frozenset[str]] = frozenset({"timeout", "retries_exhausted", "no_candidate"})
    _FIELDS: ClassVar[_Fields] = _Fields(
        "fly-replay-failed",
        ("instance", "app", "region", "replay_source", "reason", "elapsed_ms"),
        "elapsed_ms",
    )

    def __post_init__(self) -> None:
        self._FIELDS.check(self)

    @classmethod
    def parse(cls, header: str) -> ReplayFailed:
        """Read a `fly-replay-failed` value (`;` or `,` between fields)."""
        values, extra = cls._FIELDS.read(header)
        return cls(**values, extra=extra)

    def to_header(self) -> str:
        """The header value, `;`-separated (what the emulator's proxy sends)."""
        return self._FIELDS.header(self)
