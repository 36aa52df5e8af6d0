"""The Fly Machines API, emulated: a plain ASGI app (`create_app`) serving a `MachinesEmulator` with
the paths, status codes and JSON bodies of Fly's spec, and the `python -m flyfn.emulator.api` CLI.

The state machine, leases and the `MachineRuntime` seam live in `flyfn.emulator.state` and are
re-exported here. No web framework: the runtime dependencies stay Django, httpx and pydantic;
uvicorn (the `emulator` extra) is imported by the CLI only.
"""

from __future__ import annotations

import argparse
import enum
import hmac
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote

from pydantic import BaseModel, ValidationError

from flyfn.emulator.asgi import ASGIApp, Receive, Scope, Send
from flyfn.emulator.state import (
    EmulatorError,
    MachineRuntime,
    MachinesEmulator,
    StateOnlyRuntime,
    new_ulid,
)
from flyfn.emulator.validation import (
    check_body,
    check_env_name,
    check_secret_name,
    check_secret_values,
    parse_json,
)
from flyfn.fly.durations import parse_go_duration
from flyfn.fly.env import FLY_API_TOKEN, env_value
from flyfn.fly.headers import FLY_REQUEST_ID, LEASE_NONCE, NEXT_CURSOR
from flyfn.fly.limits import MAX_PAGE_SIZE, MAX_WAIT_TIMEOUT
from flyfn.machines.models import (
    CreateLeaseRequest,
    CreateMachineRequest,
    MetadataValue,
    StopRequest,
    UpdateMachineRequest,
)

__all__ = [
    "FLY_RATE_LIMITS",
    "MAX_BODY_BYTES",
    "ASGIApp",
    "EmulatorApp",
    "EmulatorError",
    "MachineRuntime",
    "MachinesEmulator",
    "RateLimit",
    "StateOnlyRuntime",
    "create_app",
    "main",
    "omit_zero",
]

MAX_BODY_BYTES = 1 << 20
STOP_SIGNALS = frozenset(
    {"SIGHUP", "SIGINT", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGTERM"}
)

logger = logging.getLogger(__name__)

_M = TypeVar("_M", bound=BaseModel)

_SECRETS_ROUTE = re.compile(r"^/v1/apps/(?P<app>[^/]+)/secrets(?:/(?P<name>[^/]+))?/?$")
_ROUTE = re.compile(
    r"^/v1/apps/(?P<app>[^/]+)/machines"
    r"(?:/(?P<machine>[^/]+)(?:/(?P<action>[a-z_]+)(?:/(?P<key>[^/]+))?)?)?/?$"
)


# -- rate limiting -------------------------------------------------------------------------------


@dataclass
class RateLimit:
    """Fly's Machines API rate limits as token buckets: `rate` requests/s with a `burst` per action,
    scoped per app for list and create (`/v1/apps/{app}/machines`) and per Machine for every other
    action; reading one Machine (get) has the more generous `get_rate`/`get_burst`. Excess is a 429
    whose `Retry-After` says when the bucket has a token again (fly.io/docs/machines/api:
    "1 req/s per action, burst 3; Get Machine 5 req/s, burst 10")."""

    rate: float = 1.0
    burst: int = 3
    get_rate: float = 5.0
    get_burst: int = 10
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[tuple[str, ...], tuple[float, float]] = field(default_factory=dict, repr=False)

    def check(self, key: tuple[str, ...], *, is_get: bool) -> float | None:
        """Take a token; None when allowed, else the seconds until one is available."""
        rate, burst = (self.get_rate, self.get_burst) if is_get else (self.rate, self.burst)
        now = self.clock()
        tokens, last = self._buckets.get(key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return None
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / rate


class _FlyLimits(enum.Enum):
    FLY = "fly"


FLY_RATE_LIMITS = _FlyLimits.FLY
"""`create_app`'s default: a fresh `RateLimit()` with Fly's numbers. Only focused unit tests pass
`rate_limit=None` (no limits); everything else, `flyfn dev` included, runs within Fly's limits."""


# -- requests and responses ----------------------------------------------------------------------


@dataclass
class _Request:
    method: str
    app: str
    machine: str | None
    action: str | None
    key: str | None
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes

    def param(self, name: str) -> str | None:
        for key, value in self.query:
            if key == name:
                return value
        return None

    def flag(self, name: str) -> bool:
        value = self.param(name)
        lowered = "" if value is None else value.strip().lower()
        if lowered in ("", "false", "0", "no"):
            return False
        if lowered in ("true", "1", "yes"):
            return True
        raise EmulatorError(400, f"invalid boolean for {name}: {value!r}")

    def json(self) -> Any:
        return parse_json(self.body)

    def model(
        self,
        model: type[_M],
        *,
        schema: str,
        required: bool = True,
        data: Any = None,
        enum_status: int = 422,
    ) -> _M:
        """The body as `model` (`data`: the already parsed body), checked first against Fly's
        rules for the spec's `schema` (`flyfn.emulator.validation`); 400/422 with the reason."""
        if data is None:
            data = self.json()
        if data is None and not required:
            data = {}
        data = check_body(schema, data, enum_status=enum_status)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise EmulatorError(400, f"invalid request body: {_brief(exc)}") from exc


@dataclass
class _Response:
    status: int
    body: Any = None  # JSON-able, a pydantic model, or None for no body
    headers: list[tuple[str, str]] = field(default_factory=list)


def _brief(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def _wire(body: Any) -> Any:
    if isinstance(body, BaseModel):
        return omit_zero(body.model_dump(mode="json", exclude_none=True))
    if isinstance(body, list):
        return [_wire(item) for item in body]
    return body


# Fields whose value is a map: its entries are data and kept as they are (Go's `omitempty` leaves
# out empty fields of a struct, never the entries of a map), or free-form JSON.
_MAP_FIELDS = frozenset({"env", "metadata", "labels", "request"})


def omit_zero(value: Any) -> Any:
    """`value` without the fields at their zero value (null, false, 0, "", {}, []), as Fly's API
    answers: its Go types carry `omitempty` (e.g. `auto_destroy: false` and an empty `env` are
    left out). Lists keep every item; maps (`env`, `metadata`, ...) keep every entry."""
    if isinstance(value, list):
        return [omit_zero(item) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key in _MAP_FIELDS:
            kept = item
        elif key == "checks" and isinstance(item, dict):  # name -> check: entries kept
            kept = {name: omit_zero(check) for name, check in item.items()}
        elif key == "headers" and isinstance(item, dict):  # http_options.response: a map
            kept = item
        else:
            kept = omit_zero(item)
        if not _is_zero(kept):
            out[key] = kept
    return out


def _is_zero(value: Any) -> bool:
    if value is None or value is False:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    return isinstance(value, (str, dict, list)) and len(value) == 0


_OK = {"ok": True}


# -- the ASGI app --------------------------------------------------------------------------------


class EmulatorApp:
    """The ASGI application; `emulator` is the state it serves (usable in-process alongside)."""

    def __init__(
        self,
        emulator: MachinesEmulator,
        *,
        token: str,
        rate_limit: RateLimit | _FlyLimits | None = FLY_RATE_LIMITS,
    ) -> None:
        if not token:
            raise ValueError("the emulator needs a non-empty API token")
        self.emulator = emulator
        self._token = token.encode()
        self.rate_limit = RateLimit() if isinstance(rate_limit, _FlyLimits) else rate_limit

    def __repr__(self) -> str:  # never the token
        return f"EmulatorApp({self.emulator!r}, rate_limit={self.rate_limit!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise RuntimeError(f"unsupported ASGI scope type {scope['type']!r}")
        request_id = f"{new_ulid()}-{self.emulator.region}"
        try:
            response = await self._handle(scope, receive)
        except EmulatorError as exc:
            response = _Response(exc.status, exc.body())
        except Exception:
            logger.exception("emulator error on %s %s", scope.get("method"), scope.get("path"))
            response = _Response(500, {"error": "internal emulator error"})
        await _send(send, response, request_id)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.emulator.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, scope: Scope, receive: Receive) -> _Response:
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        if not self._authorized(headers.get("authorization")):
            return _Response(401, {"error": "You must be authenticated to view this."})
        raw_path = _raw_path(scope)
        match = _ROUTE.match(raw_path)
        if match is None:
            secrets_match = _SECRETS_ROUTE.match(raw_path)
            if secrets_match is None:
                return _Response(404, {"error": "not found"})
            body = await _read_body(receive)
            return self._secrets(
                scope["method"].upper(),
                unquote(secrets_match["app"]),
                _unquote(secrets_match["name"]),
                body,
            )
        body = await _read_body(receive)
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        request = _Request(
            method=scope["method"].upper(),
            app=unquote(match["app"]),
            machine=_unquote(match["machine"]),
            action=match["action"],
            key=_unquote(match["key"]),
            query=query,
            headers=headers,
            body=body,
        )
        handler = self._route(request)
        if self.rate_limit is not None:
            # Per app for list and create (no Machine in the path), else per Machine and action.
            key = (request.app, request.machine or "", handler.__name__)
            is_get = handler == self._get_machine
            retry_after = self.rate_limit.check(key, is_get=is_get)
            if retry_after is not None:
                return _Response(
                    429,
                    {"error": "rate limit exceeded"},
                    [("retry-after", str(max(1, math.ceil(retry_after))))],
                )
        return await handler(request)

    def _authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, credential = header.strip().partition(" ")
        if scheme.lower() not in ("bearer", "flyv1"):
            return False
        return hmac.compare_digest(credential.strip().encode(), self._token)

    def _route(self, r: _Request) -> Callable[[_Request], Awaitable[_Response]]:
        table: Mapping[str, Callable[[_Request], Awaitable[_Response]]]
        if r.machine is None:
            table = {"GET": self._list, "POST": self._create}
        elif r.action is None:
            table = {"GET": self._get_machine, "POST": self._update, "DELETE": self._destroy}
        elif r.key is not None:
            if r.action != "metadata":
                raise EmulatorError(404, "not found")
            table = {
                "GET": self._get_metadata_key,
                "POST": self._set_metadata,
                "DELETE": self._delete_metadata,
            }
        else:
            table = {
                "start": {"POST": self._start},
                "stop": {"POST": self._stop},
                "suspend": {"POST": self._suspend},
                "wait": {"GET": self._wait},
                "lease": {
                    "GET": self._get_lease,
                    "POST": self._acquire_lease,
                    "DELETE": self._release_lease,
                },
                "metadata": {"GET": self._get_metadata},
                "events": {"GET": self._events},
            }.get(r.action, {})
            if not table:
                raise EmulatorError(404, "not found")
        handler = table.get(r.method)
        if handler is None:
            raise EmulatorError(405, f"method {r.method} not allowed")
        return handler

    # -- app secrets (`/v1/apps/{app}/secrets`; values are set, never answered) -----------------

    def _secrets(self, method: str, app: str, name: str | None, body: bytes) -> _Response:
        emulator = self.emulator
        if name is None:
            if method == "GET":
                return _Response(200, {"secrets": [s.to_json() for s in emulator.secrets(app)]})
            if method != "POST":
                raise EmulatorError(405, f"method {method} not allowed")
            version = emulator.set_secrets(app, check_secret_values(parse_json(body)))
            listed = [s.to_json() for s in emulator.secrets(app)]
            return _Response(200, {"secrets": listed, "version": version})
        check_env_name("secret name", name)
        if method == "GET":
            return _Response(200, emulator.secret(app, name).to_json())
        if method == "DELETE":
            emulator.secret(app, name)  # 404 when there is none
            return _Response(200, {"version": emulator.set_secrets(app, {name: None})})
        if method != "POST":
            raise EmulatorError(405, f"method {method} not allowed")
        check_secret_name("secret name", name)
        value = check_body("SetAppSecretRequest", parse_json(body) or {}).get("value")
        if value is None:
            raise EmulatorError(400, "invalid body: value is required")
        version = emulator.set_secrets(app, {name: value})
        return _Response(201, {**emulator.secret(app, name).to_json(), "version": version})

    # -- handlers (one per operation of the spec) ------------------------------------------------

    async def _list(self, r: _Request) -> _Response:
        states = [s for v in (val for key, val in r.query if key == "state") for s in v.split(",")]
        metadata = {
            key.removeprefix("metadata."): value
            for key, value in r.query
            if key.startswith("metadata.") and len(key) > len("metadata.")
        }
        filters: dict[str, Any] = {
            "include_deleted": r.flag("include_deleted"),
            "region": r.param("region") or None,
            "states": [s.strip() for s in states if s.strip()] or None,
            "metadata": metadata or None,
            "summary": r.flag("summary"),
            "include_leases": r.flag("include_leases"),
        }
        limit_text, cursor = r.param("limit"), r.param("cursor")
        if limit_text is None and not cursor:
            return _Response(200, self.emulator.list(r.app, **filters))
        limit = MAX_PAGE_SIZE
        if limit_text is not None:
            try:
                limit = int(limit_text)
            except ValueError as exc:
                raise EmulatorError(400, f"invalid limit: {limit_text!r}") from exc
            # Fly treats limit as advisory: out-of-range values are clamped, not refused.
            limit = min(max(limit, 1), MAX_PAGE_SIZE)
        page, next_cursor = self.emulator.list_page(r.app, limit=limit, cursor=cursor, **filters)
        headers = [(NEXT_CURSOR, next_cursor)] if next_cursor else []
        return _Response(200, page, headers)

    async def _create(self, r: _Request) -> _Response:
        data = r.json()
        if isinstance(data, dict) and data.get("config") is None:
            raise EmulatorError(422, "invalid config.image: an image is required")
        request = r.model(CreateMachineRequest, schema="CreateMachineRequest", data=data)
        return _Response(200, await self.emulator.create(r.app, request))

    async def _get_machine(self, r: _Request) -> _Response:
        machine = self.emulator.get(r.app, _need(r.machine), include_lease=r.flag("include_leases"))
        return _Response(200, machine)

    async def _update(self, r: _Request) -> _Response:
        data = r.json()
        if isinstance(data, dict) and data.get("config") is None:
            raise EmulatorError(422, "invalid config.image: an image is required")
        request = r.model(UpdateMachineRequest, schema="UpdateMachineRequest", data=data)
        machine = await self.emulator.update(
            r.app, _need(r.machine), request, lease_nonce=r.headers.get(LEASE_NONCE)
        )
        return _Response(200, machine)

    async def _destroy(self, r: _Request) -> _Response:
        await self.emulator.destroy(r.app, _need(r.machine), force=r.flag("force"))
        return _Response(200, _OK)

    async def _start(self, r: _Request) -> _Response:
        return _Response(200, await self.emulator.start(r.app, _need(r.machine)))

    async def _stop(self, r: _Request) -> _Response:
        request = r.model(StopRequest, schema="StopRequest", required=False, enum_status=400)
        if request.signal is not None and request.signal.upper() not in STOP_SIGNALS:
            raise EmulatorError(400, f"invalid signal {request.signal!r}")
        timeout = None
        if request.timeout is not None:
            try:
                timeout = parse_go_duration(request.timeout)
            except ValueError as exc:
                raise EmulatorError(400, f"invalid timeout {request.timeout!r}") from exc
        await self.emulator.stop(
            r.app,
            _need(r.machine),
            signal=request.signal.upper() if request.signal else None,
            timeout=timeout,
        )
        return _Response(200, _OK)

    async def _suspend(self, r: _Request) -> _Response:
        await self.emulator.suspend(r.app, _need(r.machine))
        return _Response(200, _OK)

    async def _wait(self, r: _Request) -> _Response:
        machine_id = _need(r.machine)
        state = r.param("state") or "started"
        timeout = float(MAX_WAIT_TIMEOUT)
        timeout_text = r.param("timeout")
        if timeout_text:
            try:
                timeout = parse_go_duration(timeout_text)  # "30", "30s": one rule for all
            except ValueError as exc:
                raise EmulatorError(400, f"invalid timeout {timeout_text!r}") from exc
            if not timeout > 0:
                raise EmulatorError(400, "invalid timeout: must be a positive number of seconds")
            timeout = min(timeout, MAX_WAIT_TIMEOUT)  # Fly blocks 60 s at most
        version = r.param("version") or r.param("instance_id") or None
        await self.emulator.wait_for_state(r.app, machine_id, state, timeout, version=version)
        return _Response(200, self.emulator.wait_response(r.app, machine_id))

    async def _get_lease(self, r: _Request) -> _Response:
        return _Response(200, self.emulator.get_lease(r.app, _need(r.machine)))

    async def _acquire_lease(self, r: _Request) -> _Response:
        request = r.model(CreateLeaseRequest, schema="CreateLeaseRequest", required=False)
        lease = await self.emulator.acquire_lease(
            r.app,
            _need(r.machine),
            ttl=request.ttl,
            description=request.description,
            nonce=r.headers.get(LEASE_NONCE),
        )
        return _Response(201, lease)

    async def _release_lease(self, r: _Request) -> _Response:
        nonce = r.headers.get(LEASE_NONCE)
        if not nonce:
            raise EmulatorError(400, f"the {LEASE_NONCE} header is required")
        await self.emulator.release_lease(r.app, _need(r.machine), nonce=nonce)
        return _Response(200, _OK)

    async def _get_metadata(self, r: _Request) -> _Response:
        return _Response(200, self.emulator.get_metadata(r.app, _need(r.machine)))

    async def _get_metadata_key(self, r: _Request) -> _Response:
        metadata = self.emulator.get_metadata(r.app, _need(r.machine))
        key = _need(r.key)
        if key not in metadata:
            raise EmulatorError(404, f"metadata key {key!r} not found")
        return _Response(200, {"value": metadata[key]})

    async def _set_metadata(self, r: _Request) -> _Response:
        request = r.model(MetadataValue, schema="upsertMetadataKeyRequest")
        if request.value is None:
            raise EmulatorError(400, "invalid request body: value is required")
        await self.emulator.set_metadata(r.app, _need(r.machine), _need(r.key), request.value)
        return _Response(204)

    async def _delete_metadata(self, r: _Request) -> _Response:
        await self.emulator.delete_metadata(r.app, _need(r.machine), _need(r.key))
        return _Response(204)

    async def _events(self, r: _Request) -> _Response:
        return _Response(200, self.emulator.events(r.app, _need(r.machine)))


def create_app(
    emulator: MachinesEmulator,
    *,
    token: str,
    rate_limit: RateLimit | _FlyLimits | None = FLY_RATE_LIMITS,
) -> EmulatorApp:
    """The ASGI app serving `emulator` to clients presenting `token` (as `Bearer <token>`), within
    Fly's rate limits (a `RateLimit()` of its own) unless given other limits; `rate_limit=None`
    turns them off, a switch for focused unit tests only."""
    return EmulatorApp(emulator, token=token, rate_limit=rate_limit)


def _raw_path(scope: Scope) -> str:
    # Route on the undecoded path so an encoded "/" inside a metadata key stays in its segment.
    raw = scope.get("raw_path")
    if raw:
        return bytes(raw).split(b"?", 1)[0].decode("latin-1")
    return quote(scope["path"], safe="/")


def _unquote(segment: str | None) -> str | None:
    return None if segment is None else unquote(segment)


def _need(value: str | None) -> str:
    # The route regex guarantees the segment; this only narrows the type.
    if value is None:
        raise EmulatorError(404, "not found")
    return value


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise EmulatorError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _send(send: Send, response: _Response, request_id: str) -> None:
    headers = [(FLY_REQUEST_ID.encode(), request_id.encode())]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
    payload = b""
    if response.status != 204 and response.body is not None:
        payload = json.dumps(_wire(response.body), separators=(",", ":")).encode()
        headers.append((b"content-type", b"application/json; charset=utf-8"))
    headers.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# -- CLI -----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flyfn.emulator.api",
        description="Serve an emulated Fly Machines API (state only) on a local port.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4280)
    parser.add_argument(
        "--token",
        default=None,
        help="the API token clients must present (default: $FLY_API_TOKEN; prefer the "
        "environment, command lines are visible to other users)",
    )
    parser.add_argument("--app", default=None, help="the default app name (informational)")
    parser.add_argument("--region", default="local")
    parser.add_argument("--log-level", default="warning")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator with uvicorn until interrupted."""
    args = _parser().parse_args(argv)
    token = args.token or env_value(os.environ, FLY_API_TOKEN)
    if not token:
        print("error: give --token or set FLY_API_TOKEN", file=sys.stderr)
        return 2
    try:
        import uvicorn
    except ImportError:
        print(
            "error: the emulator CLI needs uvicorn: pip install 'flyfn[emulator]'", file=sys.stderr
        )
        return 2
    emulator = MachinesEmulator(region=args.region, default_app=args.app)
    app = create_app(emulator, token=token)  # within Fly's rate limits, always
    app_note = f" (app {args.app})" if args.app else ""
    print(
        f"flyfn Machines API emulator on http://{args.host}:{args.port}{app_note}",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on"
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
