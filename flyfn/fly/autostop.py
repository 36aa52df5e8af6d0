"""Fly's autostop modes: what Fly Proxy does to an idle Machine of a service."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

__all__ = ["AUTOSTOP_MODES", "AutostopMode", "autostop_from_bool", "lenient_autostop", "strongest"]

# In the order settings messages list them: the default first.
AutostopMode = Literal["stop", "suspend", "off"]
AUTOSTOP_MODES: frozenset[str] = frozenset(get_args(AutostopMode))


def autostop_from_bool(value: object) -> object:
    """fly.toml and older API answers spell autostop as a boolean: false = off, true = stop.
    Any other value is returned unchanged."""
    if isinstance(value, bool):
        return "stop" if value else "off"
    return value


def lenient_autostop(value: object) -> object:
    """An autostop as any API answer spells it, lower-cased: booleans, and the `"true"`/`"yes"`
    and `"false"`/`"no"` strings an older spec conversion produced. Unknown modes are kept: a
    newer API must not break reading a Machine."""
    value = autostop_from_bool(value)
    if not isinstance(value, str):
        return value
    lowered = value.strip().lower()
    if lowered in {"false", "no"}:
        return "off"
    if lowered in {"true", "yes"}:
        return "stop"
    return lowered


def strongest(modes: Iterable[str]) -> AutostopMode:
    """The mode Fly Proxy applies to a Machine whose services name `modes`: suspend over stop
    over off."""
    found = set(modes)
    return "suspend" if "suspend" in found else "stop" if "stop" in found else "off"
