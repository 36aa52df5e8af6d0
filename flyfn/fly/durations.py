"""Fly's durations: the short form flyfn writes ("10s", "800ms") and the Go form the API takes.

- `parse_duration` / `format_duration`: the form of a fly-replay `timeout` and of flyfn's
  settings; one number and one unit (ms, s, m, h), exact, positive.
- `parse_go_duration`: what Go's `time.ParseDuration` reads (`"1m30s"`, `"500us"`; no sign), and
  a bare number of seconds, as the Machines API accepts in a config. ASCII digits only, finite and
  within Go's range, as `parse_duration`: the emulator reads every duration with it.
- `go_duration`: the API's other spellings of a duration (integer nanoseconds, the old
  `{"time.Duration": ns}`) as a Go duration string.
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_GO_DURATION_SECONDS",
    "DurationError",
    "format_duration",
    "go_duration",
    "parse_duration",
    "parse_go_duration",
]


class DurationError(ValueError):
    """A duration is not in the form asked for."""


# ASCII digits only: `\d` would take Arabic-Indic or full-width digits and put non-ASCII into a
# header.
_DURATION_RE = re.compile(r"^([0-9]{1,9}(?:\.[0-9]{1,6})?)(ms|s|m|h)$")
# The same rule for Go durations: `float()` alone would also take "nan", "inf", "1e3", "1_0" and
# non-ASCII digits.
_GO_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_GO_PART_RE = re.compile(rf"({_GO_NUMBER})(ns|us|µs|ms|s|m|h)")
_GO_SECONDS_RE = re.compile(_GO_NUMBER)
# Go's time.Duration is an int64 of nanoseconds (about 292 years); Go refuses a longer one.
MAX_GO_DURATION_SECONDS = (2**63 - 1) / 1e9
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# The largest unit that divides a number of nanoseconds names it (Go prints "1m0s"; Fly reads both).
_NS_UNITS: tuple[tuple[int, str], ...] = (
    (3_600_000_000_000, "h"),
    (60_000_000_000, "m"),
    (1_000_000_000, "s"),
    (1_000_000, "ms"),
    (1_000, "us"),
)


def parse_duration(text: str) -> float:
    """Seconds in a duration such as `"10s"`, `"800ms"`, `"1.5s"` or `"2m"` (exactly:
    no surrounding space)."""
    match = _DURATION_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None or float(match.group(1)) == 0:
        raise DurationError(
            f"invalid duration {text!r}: expected a positive number and a unit ms, s, m or h, "
            "e.g. '10s'"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest exact duration string for `seconds` (whole seconds as "Ns", else "Nms")."""
    if seconds <= 0:
        raise DurationError(f"a duration must be positive, got {seconds!r}")
    millis = round(seconds * 1000)
    if millis == 0:
        raise DurationError(f"a duration must be at least 1ms, got {seconds!r}")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration (`"30s"`, `"1m30s"`, `"500ms"`); a bare number means
    seconds. Exactly: ASCII digits, no sign, no surrounding space, at most Go's ~292 years."""
    if not isinstance(text, str) or not text.strip():
        raise DurationError("empty duration")
    if _GO_SECONDS_RE.fullmatch(text):
        total = float(text)
    else:
        pos, total = 0, 0.0
        for match in _GO_PART_RE.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(text):
            raise DurationError(f"invalid duration {text[:40]!r}")
    if not total <= MAX_GO_DURATION_SECONDS:  # a 400-digit number is float('inf')
        raise DurationError(f"invalid duration {text[:40]!r}: longer than Go's ~292 years")
    return total


def go_duration(value: object) -> object:
    """A duration as the API spells it (Go string, integer nanoseconds, or the old
    `{"time.Duration": ns}`) as a Go duration string; other values are returned unchanged."""
    if isinstance(value, dict) and "time.Duration" in value:
        value = value["time.Duration"]
    if isinstance(value, bool):
        raise DurationError("a duration cannot be a boolean")
    if isinstance(value, int):
        return _format_nanoseconds(value)
    return value


def _format_nanoseconds(ns: int) -> str:
    for size, unit in _NS_UNITS:
        if ns % size == 0 and ns != 0:
            return f"{ns // size}{unit}"
    return f"{ns}ns"
