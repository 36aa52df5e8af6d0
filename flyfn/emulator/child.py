"""A Machine's process, the child side of `ProcessRuntime`: serves the project's ASGI app with
uvicorn on the listening socket it is handed, or becomes the image's command, and never outlives
the runtime that started it.

`python -m flyfn.emulator.child --parent-pid P --app module:attr --fd N [--log-level L]
[--stop-timeout S]`: on SIGINT or SIGTERM uvicorn stops accepting and lets the requests in flight
finish for up to S seconds (the Machine's stop_config timeout; the runtime kills it after that).
`python -m flyfn.emulator.child --parent-pid P -- ARGV...` (the image's command, exec'd)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_ASGI_APP", "DEFAULT_STOP_TIMEOUT", "main"]

#: Served when no ASGI application is named: Django's own, for DJANGO_SETTINGS_MODULE.
DEFAULT_ASGI_APP = "django"
DEFAULT_STOP_TIMEOUT = 5.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Make sure this process never outlives the runtime that started it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)

    # Portable fallback: stdin is a pipe from the parent; EOF means the parent is gone.
    def watch_stdin() -> None:
        with contextlib.suppress(OSError, ValueError):
            while os.read(0, 4096):
                pass
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(DEFAULT_STOP_TIMEOUT)
            os._exit(1)

    threading.Thread(target=watch_stdin, name="flyfn-parent-watch", daemon=True).start()


def _load_app(spec: str) -> Any:
    if spec == DEFAULT_ASGI_APP:
        from django.core.asgi import get_asgi_application

        return get_asgi_application()
    return spec  # uvicorn imports "module:attr" itself


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flyfn.emulator.child")
    parser.add_argument("--app", default=DEFAULT_ASGI_APP, help="module:attr, or 'django'")
    parser.add_argument("--fd", type=int, help="listening socket to serve on")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT)
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- ARGV: exec the image's command"
    )
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command:
        # The parent-death signal survives exec: the image's server dies with the runtime too.
        try:
            os.execvp(command[0], command)  # noqa: S606 (argv, no shell)
        except OSError as exc:
            sys.exit(f"flyfn dev: cannot run the image's command {command[0]!r}: {exc.strerror}")
    if args.fd is None:
        parser.error("--fd is required without a command")

    import uvicorn

    sock = socket.socket(fileno=args.fd)
    config = uvicorn.Config(
        _load_app(args.app),
        log_level=args.log_level,
        access_log=False,
        lifespan="auto",
        timeout_graceful_shutdown=max(1, math.ceil(args.stop_timeout)),
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down for: a clean stop
        sys.exit(0)


if __name__ == "__main__":
    main()
