"""AsyncMachinesClient: the typed async Fly Machines API client (configuration, retries, errors).

Retry policy (`DEFAULT_MAX_RETRIES` extra attempts, overridable per client and per call; 429s
count apart, against `rate_limit_retries`, which defaults to the same number):

* Always safe, so retried for every operation: HTTP 429 (the request was rejected before doing
  anything; `Retry-After` is honoured, capped at `MAX_RETRY_AFTER`), and failures to connect
  (`ConnectError`, `ConnectTimeout`, `PoolTimeout`: the request never left).
* Idempotent operations also retry 5xx answers, read/write timeouts and broken connections:
  list, get, wait, metadata get/set/delete (set is an upsert), start, stop, suspend (they converge
  on a state), destroy, lease refresh and lease release.
* `create_machine` (and `start_machine`) also retry an answer whose body says
  `"status": "insufficient_capacity"`; create does **not** retry 5xx or read timeouts, which could
  create a second Machine.
* `update_machine` and `acquire_lease` are not idempotent: only the always-safe cases above.

A retried call whose earlier attempt did reach the API can see that attempt's effect: e.g. a destroy
retried after a broken connection may end in NotFound, a stop in an error about the state.

Backoff is exponential (`BACKOFF_BASE * 2**attempt`, capped at `BACKOFF_MAX`) with jitter;
sleeps go through `client._sleep` so tests can patch them. The API token is only ever placed in
the `Authorization` header: it is absent from logs, errors and the reprs of the client and config.
"""

# ruff: noqa: ASYNC109  (the agreed interface: every operation takes an HTTP `timeout=`)
from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from flyfn.fly.api_host import CLEAR_TEXT_HINT, DEFAULT_API_HOSTNAME, api_url, clear_text_problem
from flyfn.fly.env import FLY_API_HOSTNAME, FLY_API_TOKEN, FLY_APP_NAME, env_value
from flyfn.fly.headers import FLY_REQUEST_ID, LEASE_NONCE, NEXT_CURSOR
from flyfn.fly.limits import MAX_PAGE_SIZE, MAX_WAIT_TIMEOUT
from flyfn.machines.errors import (
    InsecureApiHostError,
    InvalidResponseError,
    MachinesConnectionError,
    MachinesError,
    MachinesStatusError,
    MachinesTimeoutError,
    error_for_status,
)
from flyfn.machines.models import (
    CreateLeaseRequest,
    CreateMachineRequest,
    ErrorResponse,
    Lease,
    Machine,
    MetadataValue,
    StartMachineResponse,
    StopRequest,
    UpdateMachineRequest,
    WaitMachineResponse,
)

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_MAX",
    "COMMAND_RATE_LIMIT_RETRIES",
    "DEFAULT_API_HOSTNAME",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "LEASE_NONCE_HEADER",
    "MAX_RETRY_AFTER",
    "MAX_WAIT_TIMEOUT",
    "NEXT_CURSOR_HEADER",
    "REQUEST_ID_HEADER",
    "WAIT_HTTP_SLACK",
    "ApiCallHook",
    "ApiOutcome",
    "AsyncMachinesClient",
    "MachinesClientConfig",
    "parse_retry_after",
]

logger = logging.getLogger("flyfn.machines")

DEFAULT_TIMEOUT: Final = httpx.Timeout(30.0, connect=10.0)
DEFAULT_MAX_RETRIES: Final = 2
COMMAND_RATE_LIMIT_RETRIES: Final = 10
"""429 retries for a command someone waits for (a deploy's release command, `status`, `gc`): it
shares the app's rate limits (about 1 request/s per action) with the running Machines, so it
outlasts a burst of 429s, each retried after the API's `Retry-After`, instead of failing the
deploy. Other failures keep `DEFAULT_MAX_RETRIES`: a broken API fails the command quickly."""
BACKOFF_BASE: Final = 0.5
"""Seconds before the first retry (doubled per attempt, then jittered)."""
BACKOFF_MAX: Final = 8.0
MAX_RETRY_AFTER: Final = 30.0
"""The longest `Retry-After` the client honours (seconds); longer hints are capped."""
WAIT_HTTP_SLACK: Final = 10.0
"""Extra read time given to a `wait` request beyond its server-side timeout."""

# The API's header names, under the names this module has always exported.
LEASE_NONCE_HEADER: Final = LEASE_NONCE
NEXT_CURSOR_HEADER: Final = NEXT_CURSOR
REQUEST_ID_HEADER: Final = FLY_REQUEST_ID
USER_AGENT: Final = "flyfn-machines-client"

# How one request ended: its HTTP status, or a timeout or broken connection (no status).
ApiOutcome = int | Literal["timeout", "connection"]
# Called after each request (each retry is one) with its operation (`list_machines`, ...), outcome
# and seconds taken: how the caller observes the client (flyfn's pool logs and counts them).
ApiCallHook = Callable[[str, ApiOutcome, float], None]


_ModelT = TypeVar("_ModelT", bound=BaseModel)
_T = TypeVar("_T")
_MACHINE_LIST: Final = TypeAdapter(list[Machine])
_METADATA: Final = TypeAdapter[dict[str, str] | None](dict[str, str] | None)


@dataclass(frozen=True)
class MachinesClientConfig:
    """The resolved settings of a client; `repr` (and `str`) never show the token."""

    app_name: str | None
    api_hostname: str
    api_token: str | None = field(repr=False)
    timeout: httpx.Timeout
    max_retries: int
    rate_limit_retries: int

    @property
    def has_token(self) -> bool:
        return bool(self.api_token)

    @classmethod
    def resolve(
        cls,
        app_name: str | None = None,
        *,
        api_token: str | None = None,
        api_hostname: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
        rate_limit_retries: int | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> MachinesClientConfig:
        """Argument > environment (FLY_APP_NAME, FLY_API_TOKEN, FLY_API_HOSTNAME) > default."""
        env = os.environ if environ is None else environ
        if max_retries is not None and max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if rate_limit_retries is not None and rate_limit_retries < 0:
            raise ValueError("rate_limit_retries must be >= 0")
        retries = DEFAULT_MAX_RETRIES if max_retries is None else max_retries
        return cls(
            app_name=app_name or env_value(env, FLY_APP_NAME),
            api_hostname=api_url(
                api_hostname or env_value(env, FLY_API_HOSTNAME) or DEFAULT_API_HOSTNAME
            ),
            api_token=api_token or env_value(env, FLY_API_TOKEN),
            timeout=_as_timeout(timeout) or DEFAULT_TIMEOUT,
            max_retries=retries,
            rate_limit_retries=retries if rate_limit_retries is None else rate_limit_retries,
        )


def _as_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout | None:
    if timeout is None or isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout)


@dataclass(frozen=True)
class _Retry:
    """Which failures one operation may retry (see the module docstring)."""

    idempotent: bool
    capacity: bool = False


_IDEMPOTENT: Final = _Retry(idempotent=True)
_IDEMPOTENT_CAPACITY: Final = _Retry(idempotent=True, capacity=True)
_CREATE: Final = _Retry(idempotent=False, capacity=True)
_UNSAFE: Final = _Retry(idempotent=False)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait for a `Retry-After` value (seconds or HTTP-date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        current = datetime.now(UTC).timestamp() if now is None else now
        seconds = when.timestamp() - current
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


class AsyncMachinesClient:
    """Async client of the Fly Machines API with one httpx connection pool.

    Use as `async with AsyncMachinesClient("my-app") as client: ...` (or call `aclose()`).
    Every operation accepts keyword-only `app` (another app than the client's), `timeout` and
    `max_retries` overrides (a call's override counts its 429s too). `on_api_call` is told of
    every request sent (see `ApiCallHook`).
    """

    def __init__(
        self,
        app_name: str | None = None,
        *,
        api_token: str | None = None,
        api_hostname: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
        rate_limit_retries: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        on_api_call: ApiCallHook | None = None,
    ) -> None:
        self.config = MachinesClientConfig.resolve(
            app_name,
            api_token=api_token,
            api_hostname=api_hostname,
            timeout=timeout,
            max_retries=max_retries,
            rate_limit_retries=rate_limit_retries,
        )
        # A transport of the caller's own that is not httpx's network one (httpx.ASGITransport,
        # MockTransport: tests, the emulator in process) sends nothing over a network.
        if transport is None or isinstance(transport, httpx.AsyncHTTPTransport):
            problem = clear_text_problem(self.config.api_hostname)
            if problem is not None:
                raise InsecureApiHostError(
                    f"refusing the Machines API at {problem}. {CLEAR_TEXT_HINT}"
                )
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.config.api_token:
            headers["Authorization"] = f"Bearer {self.config.api_token}"
        self._http = httpx.AsyncClient(
            base_url=self.config.api_hostname,
            headers=headers,
            timeout=self.config.timeout,
            transport=transport,
        )
        # Injectable for tests: patch to record delays instead of sleeping.
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._random: Callable[[], float] = random.random
        self.max_retry_after: float = MAX_RETRY_AFTER
        self._on_api_call = on_api_call

    def __repr__(self) -> str:
        token = "set" if self.config.has_token else "unset"
        return (
            f"AsyncMachinesClient(app_name={self.config.app_name!r}, "
            f"api_hostname={self.config.api_hostname!r}, token={token})"
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    async def wait_retry_after(self, seconds: float) -> None:
        """Wait out a 429's `Retry-After` outside a call (a caller's own back-off), as the client
        waits between its retries."""
        await self._sleep(seconds)

    # -- machines -----------------------------------------------------------------------------

    async def list_machines(
        self,
        *,
        metadata: Mapping[str, str] | None = None,
        region: str | None = None,
        state: str | Sequence[str] | None = None,
        include_deleted: bool = False,
        include_leases: bool = False,
        summary: bool = False,
        page_size: int | None = None,
        app: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> list[Machine]:
        """All Machines matching the filters, following `fly-next-cursor` pages transparently."""
        params: dict[str, str] = {}
        for key, value in (metadata or {}).items():
            params[f"metadata.{key}"] = value
        if region:
            params["region"] = region
        if state:
            params["state"] = state if isinstance(state, str) else ",".join(state)
        if include_deleted:
            params["include_deleted"] = "true"
        if include_leases:
            params["include_leases"] = "true"
        if summary:
            params["summary"] = "true"
        if page_size is not None:
            if not 1 <= page_size <= MAX_PAGE_SIZE:
                raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
            params["limit"] = str(page_size)
        path = self._machines_path(app)
        machines: list[Machine] = []
        seen_cursors: set[str] = set()
        while True:
            response = await self._request(
                "GET", path, "list_machines", _IDEMPOTENT, params=params,
                timeout=timeout, max_retries=max_retries,
            )  # fmt: skip
            page: list[Machine] = self._parse_adapter(
                _MACHINE_LIST, "list of Machine", response, "list_machines"
            )
            machines.extend(page)
            cursor = response.headers.get(NEXT_CURSOR_HEADER)
            if not cursor:
                return machines
            if cursor in seen_cursors:
                # A repeated cursor would loop forever: the API is misbehaving.
                raise InvalidResponseError(
                    method="GET", path=path, operation="list_machines",
                    detail=f"{NEXT_CURSOR_HEADER} repeated a previous cursor",
                )  # fmt: skip
            seen_cursors.add(cursor)
            params = {**params, "cursor": cursor}

    async def get_machine(
        self,
        machine_id: str,
        *,
        app: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> Machine:
        response = await self._request(
            "GET", self._machine_path(app, machine_id), "get_machine", _IDEMPOTENT,
            timeout=timeout, max_retries=max_retries,
        )  # fmt: skip
        return self._parse_model(Machine, response, "get_machine")

    async def create_machine(
        self,
        request: CreateMachineRequest,
        *,
        app: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> Machine:
        response = await self._request(
            "POST", self._machines_path(app), "create_machine", _CREATE, json=request.to_wire(),
            timeout=timeout, max_retries=max_retries,
        )  # fmt: skip
        return self._parse_model(Machine, response, "create_machine")

    async def update_machine(
        self,
        machine_id: str,
        request: UpdateMachineRequest,
        *,
        lease_nonce: str | None = None,
        app: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> Machine:
        """Replace the Machine's config (send it in full); pass `lease_nonce` when leased."""
        response = await self._request(
            "POST", self._machine_path(app, machine_id), "update_machine", _UNSAFE,
            json=request.to_wire(), headers=_nonce_header(lease_nonce),
            timeout=timeout, max_retries=max_retries,
        )  # fmt: skip
        return self._parse_model(Machine, response, "update_machine")

    async def start_machine(
        self,
        machine_id: str,
        *,
        app: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> StartMachineResponse:
        response = await self._request(
            "POST", self._machine_path(app, machine_id, "start"), "start_machine",
            _IDEMPOTENT_CAPACITY, timeout=timeout, max_retries=max_retries,
        )  # fmt: skip
        if not response.content.strip():
            return StartMachineResponse()
        return self._parse_model(StartMachineResponse, response, "start_machine")

    async def stop_machine(
        self,
        machine_id: str,
        *,
        signal: str | None = None,
        stop_timeout: str | None = None,
        app: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> None:
        """Stop the Machine; `stop_timeout` is a Go duration (`"30s"`) before SIGKILL."""
        body = StopRequest(signal=signal, timeout=stop_timeout).to_wire()
        await self._request(
            "POST", self._machine_path(app, machine_id, "stop"), "stop_machine", _IDEMPOTENT,
            json=body, timeout=timeout, max_retries=max_retries,
        )  # fmt: skip

    async def suspend_machine(
        self,
        machine_id: str,
        *,
        app: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> None:
        await self._request(
            "POST", self._machine_path(app, machine_id, "suspend"), "suspend_machine",
            _IDEMPOTENT, timeout=timeout, max_retries=max_retries,
        )  # fmt: skip

    async def wait_machine(
        self,
        machine_id: str,
        *,
        state: str = "started",
        wait_timeout: float = MAX_WAIT_TIMEOUT,
        version: str | None = None,
        instance_id: str | None = None,
        app: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> WaitMachineResponse:
        """Block until the Machine reaches `state`; WaitTimeout (408) after `wait_timeout`.

        `wait_timeout` is rounded up to whole seconds and capped at `MAX_WAIT_TIMEOUT` (the
        API's limit). `instance_id` is the deprecated name of `version`.
        """
        seconds = min(MAX_WAIT_TIMEOUT, max(1, math.ceil(wait_timeout)))
        params = {"state": state, "timeout": str(seconds)}
        if version:
            params["version"] = version
        if instance_id:
            params["instance_id"] = instance_id
        if timeout is None:
            # The server holds the request up to `seconds`: the read timeout must outlast it.
            base = self.config.timeout
            timeout = httpx.Timeout(
                connect=base.connect,
                read=seconds + WAIT_HTTP_SLACK,
                write=base.write,
                pool=base.pool,
            )
        response = await self._request(
            "GET", self._machine_path(app, machine_id, "wait"), "wait_machine", _IDEMPOTENT,
            params=params, timeout=timeout, max_retries=max_retries,
        )  # fmt: skip
        return self._parse_model(WaitMachineResponse, response, "wait_machine")

    async def destroy_machine(
        self,
        machine_id: str,
        *,
        force: bool = False,
        app: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> None:
        await self._request(
            "DELETE", self._machine_path(app, machine_id), "destroy_machine", _IDEMPOTENT,
            params={"force": "true"} if force else None, timeout=timeout, max_retries=max_retries,
        )  # fmt: skip

    # -- leases -------------------------------------------------------------------------------

    async def acquire_lease(
        self,
        machine_id: str,
        *,
        ttl: int,
        description: str | None = None,
        app: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> Lease:
        """Take the Machine's lease for `ttl` seconds; Conflict (409) while someone holds it."""
        body = CreateLeaseRequest(ttl=ttl, description=description).to_wire()
        response = await self._request(
            "POST", self._machine_path(app, machine_id, "lease"), "acquire_lease", _UNSAFE,
            json=body, timeout=timeout, max_retries=max_retries,
        )  # fmt: skip
        return self._parse_model(Lease, response, "acquire_lease")

    async def refresh_lease(
        self,
        machine_id: str,
        *,
        nonce: str,
        ttl: int,
        app: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> Lease:
        response = await self._request(
            "POST", self._machine_path(app, machine_id, "lease"), "refresh_lease", _IDEMPOTENT,
            json=CreateLeaseRequest(ttl=ttl).to_wire(), headers=_nonce_header(nonce),
            timeout=timeout, max_retries=max_retries,
        )  # fmt: skip
        return self._parse_model(Lease, response, "refresh_lease")

    async def release_lease(
        self,
        machine_id: str,
        *,
        nonce: str,
        app: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> None:
        await self._request(
            "DELETE", self._machine_path(app, machine_id, "lease"), "release_lease", _IDEMPOTENT,
            headers=_nonce_header(nonce), timeout=timeout, max_retries=max_retries,
        )  # fmt: skip

    # -- metadata -----------------------------------------------------------------------------

    async def get_metadata(
        self,
        machine_id: str,
        *,
        app: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> dict[str, str]:
        response = await self._request(
            "GET", self._machine_path(app, machine_id, "metadata"), "get_metadata", _IDEMPOTENT,
            timeout=timeout, max_retries=max_retries,
        )  # fmt: skip
        return self._parse_adapter(_METADATA, "object of strings", response, "get_metadata") or {}

    async def set_metadata(
        self,
        machine_id: str,
        key: str,
        value: str,
        *,
        app: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> None:
        await self._request(
            "POST", self._machine_path(app, machine_id, "metadata", key), "set_metadata",
            _IDEMPOTENT, json=MetadataValue(value=value).to_wire(),
            timeout=timeout, max_retries=max_retries,
        )  # fmt: skip

    async def delete_metadata(
        self,
        machine_id: str,
        key: str,
        *,
        app: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> None:
        await self._request(
            "DELETE", self._machine_path(app, machine_id, "metadata", key), "delete_metadata",
            _IDEMPOTENT, timeout=timeout, max_retries=max_retries,
        )  # fmt: skip

    # -- plumbing -----------------------------------------------------------------------------

    def _app(self, app: str | None) -> str:
        name = app or self.config.app_name
        if not name:
            raise ValueError(f"no Fly app name: pass app_name/app= or set {FLY_APP_NAME}")
        return name

    def _machines_path(self, app: str | None) -> str:
        return f"/v1/apps/{quote(self._app(app), safe='')}/machines"

    def _machine_path(self, app: str | None, machine_id: str, *rest: str) -> str:
        if not machine_id:
            raise ValueError("machine_id must not be empty")
        parts = [self._machines_path(app), quote(machine_id, safe="")]
        parts.extend(quote(part, safe="") for part in rest)
        return "/".join(parts)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": between half and all of the capped delay."""
        delay = min(BACKOFF_MAX, BACKOFF_BASE * 2.0**attempt)
        return delay / 2 + self._random() * delay / 2

    def _called(self, operation: str, outcome: ApiOutcome, started: float) -> None:
        """Report one request to `on_api_call`, if any (`started`: its `time.monotonic()`)."""
        if self._on_api_call is not None:
            self._on_api_call(operation, outcome, time.monotonic() - started)

    async def _request(
        self,
        method: str,
        path: str,
        operation: str,
        retry: _Retry,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
    ) -> httpx.Response:
        retries = self.config.max_retries if max_retries is None else max(0, max_retries)
        rate_limit_retries = self.config.rate_limit_retries if max_retries is None else retries
        request_timeout: httpx.Timeout = _as_timeout(timeout) or self.config.timeout
        attempt = rate_limited = 0  # retries spent on other failures, and on 429s
        while True:
            error: MachinesError
            delay: float | None = None
            limited = False
            started = time.monotonic()
            try:
                response = await self._http.request(
                    method, path, params=params, json=json, headers=headers,
                    timeout=request_timeout,
                )  # fmt: skip
            except httpx.TimeoutException as exc:
                self._called(operation, "timeout", started)
                never_sent = isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
                error = MachinesTimeoutError(
                    f"{method} {path}: timed out ({type(exc).__name__})", method=method, path=path
                )
                retryable = never_sent or retry.idempotent
                cause: BaseException = exc
            except httpx.TransportError as exc:
                self._called(operation, "connection", started)
                never_sent = isinstance(exc, httpx.ConnectError)
                error = MachinesConnectionError(
                    f"{method} {path}: {type(exc).__name__}: {exc}", method=method, path=path
                )
                retryable = never_sent or (
                    retry.idempotent and isinstance(exc, httpx.NetworkError | httpx.ProtocolError)
                )
                cause = exc
            else:
                self._called(operation, response.status_code, started)
                if response.status_code < 400:
                    return response
                status_error = self._status_error(response, method, path)
                error = cause = status_error
                limited = response.status_code == 429
                retryable = (
                    limited
                    or (response.status_code >= 500 and retry.idempotent)
                    or (retry.capacity and status_error.insufficient_capacity)
                )
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                if retry_after is not None:
                    delay = min(retry_after, self.max_retry_after)
            spent, allowed = (rate_limited, rate_limit_retries) if limited else (attempt, retries)
            if not retryable or spent >= allowed:
                if error is cause:
                    raise error
                raise error from cause
            if delay is None:
                delay = self._backoff(spent)
            if limited:
                rate_limited += 1
            else:
                attempt += 1
            logger.warning(
                "%s failed (%s); retry %d/%d in %.2fs", operation, error, spent + 1, allowed, delay
            )
            await self._sleep(delay)

    @staticmethod
    def _status_error(response: httpx.Response, method: str, path: str) -> MachinesStatusError:
        error_text: str | None = None
        error_status: str | None = None
        try:
            body = ErrorResponse.model_validate(response.json())
            error_text, error_status = body.error, body.status
        except (ValueError, ValidationError):
            # Not the JSON error shape (a proxy's HTML page, plain text): keep its text.
            error_text = response.text.strip() or None
        return error_for_status(
            response.status_code,
            method=method,
            path=path,
            error=error_text,
            error_status=error_status,
            request_id=response.headers.get(REQUEST_ID_HEADER),
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )

    @staticmethod
    def _decode(response: httpx.Response, operation: str) -> Any:
        try:
            return response.json()
        except ValueError:
            content_type = response.headers.get("content-type", "none")
            raise InvalidResponseError(
                method=response.request.method,
                path=response.request.url.path,
                operation=operation,
                detail=f"body is not JSON ({content_type}, {len(response.content)} bytes)",
            ) from None

    @classmethod
    def _parse_model(
        cls, model: type[_ModelT], response: httpx.Response, operation: str
    ) -> _ModelT:
        data = cls._decode(response, operation)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise _invalid(response, operation, model.__name__, exc) from None

    @classmethod
    def _parse_adapter(
        cls, adapter: TypeAdapter[_T], expected: str, response: httpx.Response, operation: str
    ) -> _T:
        data = cls._decode(response, operation)
        try:
            return adapter.validate_python(data)
        except ValidationError as exc:
            raise _invalid(response, operation, expected, exc) from None


def _invalid(
    response: httpx.Response, operation: str, expected: str, exc: ValidationError
) -> InvalidResponseError:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return InvalidResponseError(
        method=response.request.method,
        path=response.request.url.path,
        operation=operation,
        detail=f"expected {expected}: {where}: {first['msg']}{more}",
    )


def _nonce_header(nonce: str | None) -> dict[str, str] | None:
    return {LEASE_NONCE_HEADER: nonce} if nonce else None
