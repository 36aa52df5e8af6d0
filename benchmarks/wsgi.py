"""Calling a Django WSGI handler in process, as a WSGI server would: environ, call, read, close."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterable
from typing import Any

StartResponse = Callable[..., Any]
Handler = Callable[[dict[str, Any], StartResponse], Any]


def wsgi_environ(path: str) -> dict[str, Any]:
    """A GET request's environ template for `path` (copy it per request; wsgi.input is replaced)."""
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def call(handler: Handler, template: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    """One request: (status, lower-cased headers, body)."""
    status: list[str] = []
    headers: dict[str, str] = {}

    def start_response(s: str, h: Iterable[tuple[str, str]], exc_info: object = None) -> None:
        status.append(s)
        headers.update({k.lower(): v for k, v in h})

    environ = dict(template)
    environ["wsgi.input"] = io.BytesIO(b"")
    response = handler(environ, start_response)
    try:
        body = b"".join(response)
    finally:
        response.close()
    return int(status[0].split()[0]), headers, body


def ignore_start_response(status: str, headers: object, exc_info: object = None) -> None:
    return None


def call_quietly(handler: Handler, template: dict[str, Any]) -> None:
    """One request with nothing collected: the timed loops' unit of work."""
    environ = dict(template)
    environ["wsgi.input"] = io.BytesIO(b"")
    response = handler(environ, ignore_start_response)
    b"".join(response)
    response.close()


# The benchmark app Machine's id (what fly-replay-src names as the replaying Machine).
APP_MACHINE_ID = "0bench0app0001"


def bench_environ(api_url: str, token: str, app: str, middleware: str) -> dict[str, str]:
    """The env of an app Machine of the benchmark project (role "main") using the API at api_url."""
    return {
        "FLY_APP_NAME": app,
        "FLY_MACHINE_ID": APP_MACHINE_ID,
        "FLY_IMAGE_REF": "registry.fly.io/bench:deployment-1",
        "FLY_REGION": "local",
        "FLY_API_HOSTNAME": api_url,
        "FLY_API_TOKEN": token,
        "DJANGO_SETTINGS_MODULE": "benchmarks.benchsite.settings",
        "BENCH_MIDDLEWARE": middleware,
    }
