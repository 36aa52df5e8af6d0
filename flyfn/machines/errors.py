"""The exception tree of the Machines API client (one base class, status-keyed subclasses).

Every error carries the HTTP `method` and the URL `path` (never the host's credentials: the
token only ever travels in the Authorization header, which no error records).
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "Conflict",
    "InsecureApiHostError",
    "InvalidResponseError",
    "MachinesConnectionError",
    "MachinesError",
    "MachinesStatusError",
    "MachinesTimeoutError",
    "NotFound",
    "PreconditionFailed",
    "RateLimited",
    "ServerError",
    "Unauthorized",
    "Unprocessable",
    "WaitTimeout",
    "error_for_status",
]

# The API's error text is echoed into messages; bound it so a huge HTML error page stays readable.
_MAX_ERROR_TEXT = 500


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= _MAX_ERROR_TEXT:
        return text
    return text[:_MAX_ERROR_TEXT] + "..."


class InsecureApiHostError(ValueError):
    """The client refuses an API host that would get the token in clear text: plain http to a host
    other than Fly's private network (`_api.internal`) or this computer (see
    `flyfn.fly.api_host.in_clear`)."""


class MachinesError(Exception):
    """Base of every error the Machines client raises."""

    def __init__(self, message: str, *, method: str, path: str) -> None:
        super().__init__(message)
        self.method = method
        self.path = path


class MachinesConnectionError(MachinesError):
    """The API could not be reached (refused, reset, DNS, TLS...)."""


class MachinesTimeoutError(MachinesError):
    """The HTTP request timed out (connect, read, write or pool)."""


class InvalidResponseError(MachinesError):
    """A response body was not the JSON the operation expects."""

    def __init__(self, *, method: str, path: str, operation: str, detail: str) -> None:
        super().__init__(
            f"{operation}: invalid response to {method} {path}: {detail}", method=method, path=path
        )
        self.operation = operation
        self.detail = detail


class MachinesStatusError(MachinesError):
    """The API answered with an error status (4xx/5xx)."""

    def __init__(
        self,
        *,
        status: int,
        method: str,
        path: str,
        error: str | None = None,
        error_status: str | None = None,
        request_id: str | None = None,
    ) -> None:
        error = _clip(error)
        message = f"{method} {path} -> HTTP {status}"
        if error:
            message += f": {error}"
        if error_status and error_status != "unknown":
            message += f" (status={error_status})"
        if request_id:
            message += f" (request_id={request_id})"
        super().__init__(message, method=method, path=path)
        self.status = status
        self.error = error
        self.error_status = error_status
        self.request_id = request_id

    @property
    def insufficient_capacity(self) -> bool:
        """True when the API said the region has no capacity (create may retry)."""
        return self.error_status == "insufficient_capacity"


class BadRequest(MachinesStatusError):
    """400."""


class Unauthorized(MachinesStatusError):
    """401: missing or wrong token."""


class NotFound(MachinesStatusError):
    """404: no such app, Machine or key."""


class WaitTimeout(MachinesStatusError):
    """408: `wait` reached its timeout before the Machine reached the state."""


class Conflict(MachinesStatusError):
    """409: lease held, version changed, or (on create) no capacity."""


class PreconditionFailed(MachinesStatusError):
    """412."""


class Unprocessable(MachinesStatusError):
    """422."""


class RateLimited(MachinesStatusError):
    """429; `retry_after` is the server's hint in seconds, when it gave one."""

    def __init__(
        self,
        *,
        status: int,
        method: str,
        path: str,
        error: str | None = None,
        error_status: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(
            status=status,
            method=method,
            path=path,
            error=error,
            error_status=error_status,
            request_id=request_id,
        )
        self.retry_after = retry_after


class ServerError(MachinesStatusError):
    """5xx."""


_BY_STATUS: dict[int, type[MachinesStatusError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    408: WaitTimeout,
    409: Conflict,
    412: PreconditionFailed,
    422: Unprocessable,
}


def error_for_status(
    status: int,
    *,
    method: str,
    path: str,
    error: str | None = None,
    error_status: str | None = None,
    request_id: str | None = None,
    retry_after: float | None = None,
) -> MachinesStatusError:
    """Build the exception of the right class for an HTTP error status."""
    if status == 429:
        return RateLimited(
            status=status,
            method=method,
            path=path,
            error=error,
            error_status=error_status,
            request_id=request_id,
            retry_after=retry_after,
        )
    cls = ServerError if status >= 500 else _BY_STATUS.get(status, MachinesStatusError)
    return cls(
        status=status,
        method=method,
        path=path,
        error=error,
        error_status=error_status,
        request_id=request_id,
    )
