"""The seed's setting, `FLY_MACHINES_SERVERLESS_FUNCTIONS`, still honoured: a list of
`("app:url_name", ("GET", ...))` (a bare `"app:url_name"` means GET), all in the default group.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flyfn.registry import ServerlessView, normalize_methods
from flyfn.settings_errors import invalid, show

__all__ = ["SEED_SETTING", "seed_views"]

SEED_SETTING = "FLY_MACHINES_SERVERLESS_FUNCTIONS"


def seed_views(value: Any) -> dict[str, ServerlessView]:
    """The views the seed's setting declares, by url name."""
    if value is None:
        return {}
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise invalid(f'must be a list like [("app:url_name", ("GET",))] (got {show(value)})')
    views: dict[str, ServerlessView] = {}
    for index, entry in enumerate(value):
        if isinstance(entry, str):
            name, methods = entry, ("GET",)
        elif isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[0], str):
            name, methods = entry
        else:
            raise invalid(
                f'each entry must be ("app:url_name", ("GET", ...)) (got {show(entry)})',
                index=index,
            )
        if not name.strip():
            raise invalid("the url name is empty", index=index)
        try:
            normalized = normalize_methods(methods)
        except (TypeError, ValueError) as exc:
            raise invalid(str(exc), "method", index=index) from None
        views[name] = ServerlessView(methods=normalized, group="default", name=name)
    return views
