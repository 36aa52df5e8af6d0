"""Which views are serverless: `ServerlessView` records and the `Registry` that finds them.

Views get here two ways: `@fly_serverless` registers the view object itself (a function, an
`as_view()` result or a class-based view class), and settings declare views by url name
(`FLYFN["VIEWS"]`, `FLY_MACHINES_SERVERLESS_FUNCTIONS`). `Registry.lookup` is on the hot path
of every request: a dict hit for decorated views, a dict hit by url name for declared ones.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from flyfn.names import validate_group_name

__all__ = [
    "HTTP_METHODS",
    "Registry",
    "ServerlessView",
    "UrlRoute",
    "iter_url_names",
    "iter_url_routes",
    "normalize_methods",
    "registry",
]

# The verbs Django's View dispatches (View.http_method_names), upper-cased.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})

# How deep to follow functools.wraps chains (decorators stacked over a marked view).
_MAX_WRAPPED_DEPTH = 16


def normalize_methods(methods: Iterable[str] | str) -> frozenset[str]:
    """Upper-cased HTTP methods, with `HEAD` added when `GET` is there; ValueError names a bad
    one."""
    if isinstance(methods, str):
        methods = (methods,)
    if not isinstance(methods, Iterable):
        raise TypeError(f"methods must be a list of HTTP methods such as ['GET'], got {methods!r}")
    result: set[str] = set()
    for method in methods:
        if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
            allowed = ", ".join(sorted(HTTP_METHODS))
            raise ValueError(f"unknown HTTP method {method!r}; allowed: {allowed}")
        result.add(method.upper())
    if not result:
        raise ValueError("no HTTP method given; pass e.g. methods=['GET']")
    if "GET" in result:
        result.add("HEAD")
    return frozenset(result)


@dataclass(frozen=True, slots=True)
class ServerlessView:
    """A serverless view: the methods that are replayed (HEAD included with GET), its group and a
    name for humans (the view's dotted path, or the url name it was declared by)."""

    methods: frozenset[str]
    group: str
    name: str

    def allows(self, method: str) -> bool:
        """Whether a request with `method` is replayed to the group (other methods run
        locally)."""
        return method in self.methods


def view_name(view: object) -> str:
    """`module.qualname` of a view function or class, for messages and `flyfn status`."""
    target = getattr(view, "view_class", None) or view
    module = getattr(target, "__module__", None) or "?"
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{qualname}"


@dataclass(frozen=True, slots=True)
class UrlRoute:
    """A url pattern of the urlconf: its full route (as written, regex or path syntax), its names
    (`"namespace:name"`, the instance namespaces' form first; none when unnamed) and its view."""

    route: str
    names: tuple[str, ...]
    callback: Callable[..., Any]


def iter_url_routes(urlconf: str | None = None) -> Iterator[UrlRoute]:
    """Every url pattern of `urlconf` (default `ROOT_URLCONF`), includes followed.

    A pattern inside `include(..., namespace=...)` is named under its instance namespace and,
    when it differs, its application namespace too (as `reverse()` accepts both).
    """
    from django.urls import URLPattern, URLResolver, get_resolver

    def walk(patterns: Iterable[Any], route: str, prefixes: tuple[str, ...]) -> Iterator[UrlRoute]:
        for pattern in patterns:
            full = route + str(pattern.pattern)
            if isinstance(pattern, URLResolver):
                spaces = sorted(
                    {pattern.namespace, pattern.app_name} - {None},
                    key=lambda space: space != pattern.namespace,
                )
                inner = tuple(f"{p}{space}:" for space in spaces for p in prefixes)
                yield from walk(pattern.url_patterns, full, inner or prefixes)
            elif isinstance(pattern, URLPattern):
                names = tuple(f"{p}{pattern.name}" for p in prefixes) if pattern.name else ()
                yield UrlRoute(full, names, pattern.callback)

    yield from walk(get_resolver(urlconf).url_patterns, "", ("",))


def iter_url_names(urlconf: str | None = None) -> Iterator[tuple[str, Callable[..., Any]]]:
    """Every named url pattern as `("namespace:name", callback)`, nested namespaces included."""
    for route in iter_url_routes(urlconf):
        for name in route.names:
            yield name, route.callback


class Registry:
    """The serverless views of this process. Thread-safe; lookups take no lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._views: dict[Any, ServerlessView] = {}
        self._declared: dict[str, ServerlessView] = {}
        # Lookup results per view callable (hits and misses), cleared on every change.
        self._memo: dict[Any, ServerlessView | None] = {}
        # url-declared views resolved to their callbacks, computed on first use.
        self._declared_callbacks: dict[Any, ServerlessView] | None = None

    # ----------------------------------------------------------------- registering

    def register(
        self, view: object, methods: Iterable[str] | str = ("GET",), group: str = "default"
    ) -> ServerlessView:
        """Mark `view` (function, `as_view()` result or view class) serverless.

        Registering the same view again in the same group adds methods; in another group is an
        error.
        """
        normalized = normalize_methods(methods)
        validate_group_name(group)
        with self._lock:
            existing = self._views.get(view)
            if existing is not None and existing.group != group:
                raise ValueError(
                    f"{view_name(view)} is already serverless in group {existing.group!r}; "
                    f"it cannot also be in group {group!r}"
                )
            entry = ServerlessView(
                methods=normalized | (existing.methods if existing else frozenset()),
                group=group,
                name=view_name(view),
            )
            self._views[view] = entry
            self._memo = {}
        return entry

    def unregister(self, view: object) -> None:
        """Forget a decorated view (tests)."""
        with self._lock:
            self._views.pop(view, None)
            self._memo = {}

    def set_declared(self, views: Mapping[str, ServerlessView]) -> None:
        """Replace the views declared in settings (by url name); resolved lazily to callbacks."""
        with self._lock:
            self._declared = dict(views)
            self._declared_callbacks = None
            self._memo = {}

    def forget_urls(self) -> None:
        """Drop the url name → callback resolution (the urlconf changed)."""
        with self._lock:
            self._declared_callbacks = None
            self._memo = {}

    # ----------------------------------------------------------------- lookups

    def lookup(self, view: object, url_name: str | None = None) -> ServerlessView | None:
        """The `ServerlessView` for a resolved request, or None for an ordinary view.

        `view` is the resolved callback (`request.resolver_match.func`); `url_name` its
        `resolver_match.view_name`. Decorated views are found by the callback itself, its
        `view_class` (`as_view()` results) or a `__wrapped__` chain (decorators stacked above
        `@fly_serverless`); settings-declared views by `url_name`, or without it by resolving
        the declared names through the urlconf once.
        """
        if url_name is not None:
            declared = self._declared.get(url_name)
            if declared is not None:
                return declared
        memo = self._memo  # captured: a concurrent register() swaps in a fresh dict
        try:
            found = memo[view]
        except KeyError:
            found = memo[view] = self._find_decorated(view)
        except TypeError:  # an unhashable callable: look it up without memoising
            found = self._find_decorated(view)
        if found is None and url_name is None and self._declared:
            try:
                return self._callbacks().get(view)
            except TypeError:
                return None
        return found

    def _find_decorated(self, view: object) -> ServerlessView | None:
        views = self._views
        current: Any = view
        for _ in range(_MAX_WRAPPED_DEPTH):
            try:
                found = views.get(current)
                if found is None:
                    view_class = getattr(current, "view_class", None)
                    found = views.get(view_class) if view_class is not None else None
            except TypeError:
                found = None
            if found is not None:
                return found
            current = getattr(current, "__wrapped__", None)
            if current is None:
                break
        return None

    def _callbacks(self) -> dict[Any, ServerlessView]:
        callbacks = self._declared_callbacks
        if callbacks is None:
            callbacks = {}
            declared = self._declared
            for name, callback in iter_url_names():
                entry = declared.get(name)
                if entry is not None:
                    callbacks.setdefault(callback, entry)
            self._declared_callbacks = callbacks
        return callbacks

    def lookup_url_name(self, url_name: str) -> ServerlessView | None:
        """The settings-declared view with this url name ("app:url_name"), if any."""
        return self._declared.get(url_name)

    def decorated(self) -> dict[object, ServerlessView]:
        """Views marked with `@fly_serverless`: view object → record (a copy)."""
        return dict(self._views)

    def declared(self) -> dict[str, ServerlessView]:
        """Views declared in settings: url name → record (a copy)."""
        return dict(self._declared)

    def groups(self) -> frozenset[str]:
        """Every group some view is registered in."""
        return frozenset(v.group for v in (*self._views.values(), *self._declared.values()))

    def __len__(self) -> int:
        return len(self._views) + len(self._declared)


registry = Registry()
"""The process-wide registry that `@fly_serverless`, the settings and the middleware share."""
