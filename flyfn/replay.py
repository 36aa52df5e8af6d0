"""The fly-replay protocol: header/JSON codec, fly-replay-src / fly-replay-failed parsing, signed
state."""

from __future__ import annotations

import re

__all__ = ["ReplayHeaderError", "format_duration", "parse_duration"]


class ReplayHeaderError(ValueError):
    """A fly-replay, fly-replay-src or fly-replay-failed value (or a field of one) is invalid."""


# Fly reads durations like Go's time.ParseDuration; flyfn only emits the common units.
_DURATION_RE = re.compile(r"^(\d{1,9}(?:\.\d{1,6})?)(ms|s|m|h)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``"10s"``, ``"800ms"``, ``"1.5s"`` or ``"2m"``."""
    match = _DURATION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ReplayHeaderError(
            f"invalid duration {text!r}: expected a number and a unit ms, s, m or h, e.g. '10s'"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest exact duration string for ``seconds`` (whole seconds as "Ns", else "Nms")."""
    if seconds <= 0:
        raise ReplayHeaderError(f"a duration must be positive, got {seconds!r}")
    millis = round(seconds * 1000)
    if millis == 0:
        raise ReplayHeaderError(f"a duration must be at least 1ms, got {seconds!r}")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"
