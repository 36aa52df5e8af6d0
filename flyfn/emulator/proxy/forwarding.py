"""HTTP between the local Fly Proxy and Machines: the headers Fly adds and drops, reading a
Machine's fly-replay answer, streaming its answer to the client, and the proxy's error pages."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import httpx

from flyfn.emulator.asgi import Scope, Send
from flyfn.emulator.logline import RequestLog
from flyfn.emulator.proxy.bodies import ReadAhead
from flyfn.emulator.proxy.errors import ProxyError
from flyfn.emulator.proxy.routing import Directive, directive_of
from flyfn.fly.headers import (
    FLY_CLIENT_IP,
    FLY_FORCE_INSTANCE_ID,
    FLY_FORWARDED_PORT,
    FLY_PREFERRED_INSTANCE_UNAVAILABLE,
    FLY_REGION,
    FLY_REPLAY,
    FLY_REQUEST_ID,
    REPLAY_JSON_CONTENT_TYPE,
)
from flyfn.fly.replay import FlyReplay, ReplayHeaderError

__all__ = [
    "HOP_BY_HOP",
    "discard",
    "error_page",
    "header",
    "read_replay",
    "redirect",
    "request_headers",
    "respond",
    "upstream_headers",
]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers only the proxy sets (a client's values are replaced).
_PROXY_REQUEST_HEADERS = frozenset(
    {
        FLY_REQUEST_ID,
        FLY_REGION,
        FLY_CLIENT_IP,
        FLY_FORWARDED_PORT,
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-ssl",
        FLY_PREFERRED_INSTANCE_UNAVAILABLE,
        FLY_FORCE_INSTANCE_ID,
    }
)
_FLY_REQUEST_ID_BYTES = FLY_REQUEST_ID.encode()
_VIA = "1.1 fly.io"
# A replay response's ignored body is read (keeping its connection) up to this many bytes.
_DISCARD_LIMIT = 64 * 1024
_REPLAY_JSON_LIMIT = 64 * 1024


def header(scope: Scope, name: str) -> str | None:
    """The client's value of one request header."""
    key = name.encode()
    for k, v in scope["headers"]:
        if k.lower() == key:
            return str(v.decode("latin-1"))
    return None


def request_headers(scope: Scope, request_id: str, region: str) -> list[tuple[str, str]]:
    """The client's headers as a Machine gets them: hop-by-hop ones dropped, Fly's added."""
    raw: list[tuple[str, str]] = [
        (k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
    ]
    listed = _connection_tokens(v for k, v in raw if k.lower() == "connection")
    drop = HOP_BY_HOP | listed | _PROXY_REQUEST_HEADERS | {"content-length"}
    client_ip = (scope.get("client") or ("127.0.0.1", 0))[0]
    server_port = (scope.get("server") or ("127.0.0.1", 80))[1]
    forwarded_for = [v for k, v in raw if k.lower() == "x-forwarded-for"]
    via = [v for k, v in raw if k.lower() == "via"]
    headers = [(k, v) for k, v in raw if k.lower() not in drop | {"x-forwarded-for", "via"}]
    headers.extend(
        [
            (FLY_REQUEST_ID, request_id),
            (FLY_REGION, region),
            (FLY_CLIENT_IP, client_ip),
            (FLY_FORWARDED_PORT, str(server_port)),
            ("x-forwarded-for", ", ".join([*forwarded_for, client_ip])),
            ("x-forwarded-proto", scope.get("scheme", "http")),
            ("x-forwarded-port", str(server_port)),
            ("via", ", ".join([*via, _VIA])),
        ]
    )
    return headers


def upstream_headers(pairs: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(_header_bytes(k), _header_bytes(v)) for k, v in pairs]


async def read_replay(response: httpx.Response) -> Directive | None:
    """The replay a Machine's response asks for, or None for an answer to pass on."""
    value = response.headers.get(FLY_REPLAY)
    if value is not None:
        try:
            return directive_of(FlyReplay.parse(value))
        except ReplayHeaderError as exc:
            raise ProxyError("PA03", 502, f"invalid fly-replay: {exc}") from exc
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != REPLAY_JSON_CONTENT_TYPE:
        return None
    raw = b""
    async for chunk in response.aiter_raw():
        raw += chunk
        if len(raw) > _REPLAY_JSON_LIMIT:
            raise ProxyError("PA03", 502, "fly-replay JSON body too large")
    try:
        return directive_of(FlyReplay.from_json(raw))
    except ReplayHeaderError as exc:
        raise ProxyError("PA03", 502, f"invalid fly-replay: {exc}") from exc


async def discard(response: httpx.Response) -> None:
    """Drop a replay response: its body (Fly ignores it) is read when small, so that the Machine's
    keep-alive connection goes back to the pool instead of being closed and opened again."""
    read = 0
    try:
        if not response.is_stream_consumed:  # the JSON form's body is read already
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read > _DISCARD_LIMIT:
                    break
    except httpx.HTTPError:
        pass  # the connection is closed below; the replay goes on
    finally:
        await response.aclose()


async def respond(
    send: Send,
    response: httpx.Response,
    body_ahead: ReadAhead,
    machine_id: str,
    request_id: str,
    log: RequestLog,
) -> None:
    """Stream a Machine's answer to the client (and close it)."""
    try:
        listed = _connection_tokens(response.headers.get_list("connection"))
        headers = [
            (k, v)
            for k, v in response.headers.raw
            if k.lower().decode("latin-1") not in HOP_BY_HOP | listed
            and k.lower() not in (_FLY_REQUEST_ID_BYTES, b"x-flyfn-machine")
        ]
        headers.append((_FLY_REQUEST_ID_BYTES, request_id.encode()))
        headers.append((b"x-flyfn-machine", machine_id.encode()))
        headers.append((b"via", _VIA.encode()))
        log.status = response.status_code
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        try:
            async for chunk in body_ahead.chunks():
                log.size += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError:
            # Too late for an error page: leave the response incomplete so the client's
            # connection is closed rather than a truncated body looking whole.
            log.broke_off()
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await body_ahead.aclose()
        await response.aclose()


async def error_page(send: Send, exc: ProxyError, request_id: str, machine_id: str | None) -> None:
    """The proxy's own short plain answer, with its Fly-style code."""
    body = f"{exc.code}: {exc.message}\nfly-request-id: {request_id}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (_FLY_REQUEST_ID_BYTES, request_id.encode()),
        (b"x-flyfn-proxy-error", exc.code.encode()),
        (b"via", _VIA.encode()),
    ]
    if machine_id is not None:
        headers.append((b"x-flyfn-machine", machine_id.encode()))
    with contextlib.suppress(Exception):  # the response may already have started
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def redirect(send: Send, location: str, request_id: str) -> None:
    """Fly Proxy's answer to plain http on a `force_https` port: 301 to the https address."""
    headers = [
        (b"location", _header_bytes(location)),
        (b"content-length", b"0"),
        (_FLY_REQUEST_ID_BYTES, request_id.encode()),
        (b"via", _VIA.encode()),
    ]
    await send({"type": "http.response.start", "status": 301, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _header_bytes(text: str) -> bytes:
    # Header text arrives as latin-1 (so any byte a client sent goes on unchanged, non-ASCII
    # included); a value set by a replay's JSON transform may need UTF-8.
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode()


def _connection_tokens(values: Iterable[str]) -> frozenset[str]:
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())
