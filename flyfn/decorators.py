"""`@fly_serverless`: marks a Django view to run on its group's function Machines."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from flyfn.names import validate_group_name
from flyfn.registry import normalize_methods, registry

__all__ = ["fly_serverless"]

V = TypeVar("V", bound=Callable[..., Any])


@overload
def fly_serverless(methods: V, /) -> V: ...


@overload
def fly_serverless(
    methods: Iterable[str] | str = ("GET",), *, group: str = "default"
) -> Callable[[V], V]: ...


def fly_serverless(
    methods: Iterable[str] | str | Callable[..., Any] = ("GET",), *, group: str = "default"
) -> Any:
    """Mark a view serverless: requests for it with one of `methods` run on group `group`.

    Use as `@fly_serverless` (GET), `@fly_serverless(["GET", "POST"], group="pdf")` or
    `fly_serverless(methods=["POST"])(SomeView.as_view())`. Works on sync and async function
    views, `as_view()` results and class-based view classes (then every `as_view()` of that
    class is serverless). `HEAD` follows `GET`. The view is returned unchanged (same object):
    only the registry and the middleware know. An unknown method or group name raises ValueError
    here, at import time.
    """
    if callable(methods) and not isinstance(methods, str):
        # Bare @fly_serverless: the "methods" argument is the view.
        registry.register(methods, ("GET",), "default")
        return methods
    # Validate now, so a typo fails at import time even if the decorator is never applied.
    normalized = _validated(methods, group)

    def decorate(view: V) -> V:
        if not callable(view):
            raise TypeError(f"@fly_serverless expects a view, got {view!r}")
        registry.register(view, normalized, group)
        return view

    return decorate


def _validated(methods: Iterable[str] | str, group: str) -> frozenset[str]:
    try:
        normalized = normalize_methods(methods)
        validate_group_name(group)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"@fly_serverless: {exc}") from None
    return normalized
