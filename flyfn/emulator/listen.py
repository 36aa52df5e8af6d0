"""The image's command on this computer: where it listens, rewritten to a Machine's own port.

On Fly each Machine has its own network, so every Machine's server binds the same
`0.0.0.0:<internal_port>`. Locally the Machines share one loopback, so the command's listen
address is rewritten to a port of the Machine's own: `--port 8000` (uvicorn, granian, daphne's
`-p`), `--host 0.0.0.0`, and `--bind 0.0.0.0:8000` / `-b :8000` (gunicorn, hypercorn, daphne),
also inside an `sh -c '...'` command. A command that names no listen address on the internal port
cannot be run locally, and `ListenAddressError` says so.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

__all__ = ["ListenAddressError", "bind_locally"]

_PORT_FLAGS = frozenset({"--port", "-p"})
_HOST_FLAGS = frozenset({"--host"})
_BIND_FLAGS = frozenset({"--bind", "-b"})
_SHELLS = frozenset({"sh", "/bin/sh", "bash", "/bin/bash"})


class ListenAddressError(ValueError):
    """The command does not say where it listens in a way `flyfn dev` can rewrite."""


def bind_locally(argv: Sequence[str], internal_port: int, host: str, port: int) -> list[str]:
    """`argv` listening on `host:port` instead of `<any>:internal_port`."""
    if len(argv) >= 3 and argv[0] in _SHELLS and argv[1] == "-c":
        script, found = _rewrite_script(argv[2], internal_port, host, port)
        if found:
            return [*argv[:2], script, *argv[3:]]
    else:
        rewritten, found = _rewrite(list(argv), internal_port, host, port)
        if found:
            return rewritten
    raise ListenAddressError(
        f"flyfn dev cannot tell where {shlex.join(argv)!r} listens: it needs the internal port "
        f"{internal_port} in the command (--port {internal_port}, --bind 0.0.0.0:{internal_port} "
        f"or -b :{internal_port}), so that each local Machine gets a port of its own"
    )


def _rewrite_script(script: str, internal_port: int, host: str, port: int) -> tuple[str, bool]:
    """The same rewrite inside a shell script, in place (its operators and quoting untouched)."""
    count = 0
    internal = re.escape(str(internal_port))

    def sub(pattern: str, replacement: str, text: str, *, counts: bool) -> str:
        nonlocal count
        text, n = re.subn(pattern, replacement, text)
        count += n if counts else 0
        return text

    script = sub(
        rf"(?<!\S)(--port|-p)([ =]){internal}(?![\w.])", rf"\g<1>\g<2>{port}", script, counts=True
    )
    script = sub(
        rf"(?<!\S)(--bind|-b)([ =])\S*:{internal}(?![\w.])",
        rf"\g<1>\g<2>{host}:{port}",
        script,
        counts=True,
    )
    script = sub(r"(?<!\S)(--host)([ =])[^\s;&|]+", rf"\g<1>\g<2>{host}", script, counts=False)
    return script, count > 0


def _rewrite(argv: list[str], internal_port: int, host: str, port: int) -> tuple[list[str], bool]:
    out: list[str] = []
    found = False
    index = 0
    while index < len(argv):
        arg = argv[index]
        flag, eq, inline = arg.partition("=")
        takes_value = flag in _PORT_FLAGS | _HOST_FLAGS | _BIND_FLAGS
        if not takes_value:
            out.append(arg)
            index += 1
            continue
        if eq:
            value, consumed = inline, 1
        elif index + 1 < len(argv):
            value, consumed = argv[index + 1], 2
        else:
            out.append(arg)
            index += 1
            continue
        new_value = value
        if flag in _PORT_FLAGS and value == str(internal_port):
            new_value, found = str(port), True
        elif flag in _HOST_FLAGS:
            new_value = host
        elif flag in _BIND_FLAGS:
            _address, colon, bound_port = value.rpartition(":")
            if colon and bound_port == str(internal_port):
                new_value, found = f"{host}:{port}", True
            elif not colon:  # daphne's -b HOST (with -p PORT)
                new_value = host
        out.extend([f"{flag}={new_value}"] if eq else [flag, new_value])
        index += consumed
    return out, found
