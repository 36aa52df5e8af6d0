"""`python -m flyfn.emulator.secrets`: `fly secrets` for a running `flyfn dev`.

`set NAME=VALUE ...` and `unset NAME ...` change the app's secrets in the emulated Machines API,
then, as `fly secrets set` does, update (and so restart) the app's Fly Launch Machines, those
whose metadata has `fly_platform_version=v2`: `flyfn dev`'s app Machine. Machines created through
the API (function Machines) are left alone and get the new values at their next start or update,
as on Fly. `--stage` only stores the values. `list` shows names and digests, never values.

The running stack is found through the file it writes while it runs (`stack_file`: the API's
loopback address and token, readable by this user only), or given with `--api` and the
`FLYFN_DEV_TOKEN` environment variable. Values are never printed.

The file is trusted only in a private directory (`flyfn.machine_dir.private_dir`: this user's, not
a symlink, and here mode 0700) and only when it is itself this user's regular file, mode 0600 at
most, not a symlink: in a shared temp dir another user could have made `flyfn-dev-<uid>/` first
and planted a stack of their own, which would receive the secrets (issue 23).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import stat
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx

from flyfn.machine_dir import private_dir
from flyfn.machines.client import COMMAND_RATE_LIMIT_RETRIES, AsyncMachinesClient
from flyfn.machines.errors import MachinesError
from flyfn.machines.models import Machine, UpdateMachineRequest

__all__ = [
    "DevStackInfo",
    "StackDirError",
    "main",
    "read_stack_file",
    "stack_dir",
    "stack_file",
    "write_stack_file",
]

DEV_TOKEN_ENV = "FLYFN_DEV_TOKEN"  # noqa: S105 (the name of an env var)
FLY_LAUNCH_METADATA = ("fly_platform_version", "v2")
# Long enough for a Django app Machine to boot again after its update.
RESTART_WAIT_SECONDS = 60
# An app's name names a file: Fly's are lowercase letters, digits and dashes.
_APP_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_MAX_STACK_FILE = 64 * 1024


@dataclass(frozen=True)
class DevStackInfo:
    """Where a running `flyfn dev` serves its Machines API."""

    app: str
    api: str
    token: str
    pid: int

    def __repr__(self) -> str:  # never the token
        return f"DevStackInfo(app={self.app!r}, api={self.api!r}, pid={self.pid})"


class StackDirError(OSError):
    """The stack files' directory is not private to this user: nothing in it is trusted."""


def stack_dir() -> Path:
    """Where a running `flyfn dev` describes itself: `$XDG_RUNTIME_DIR/flyfn-dev` when the session
    has a runtime directory (this user's own), else `<temp dir>/flyfn-dev-<uid>`."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime):
        return Path(runtime) / "flyfn-dev"
    return Path(tempfile.gettempdir()) / f"flyfn-dev-{os.getuid()}"


def stack_file(app: str) -> Path:
    """The file a running `flyfn dev` of `app` describes itself in (in a directory only this user
    can read, as it holds the emulated API's token)."""
    if not _APP_FILE_RE.fullmatch(app):
        raise ValueError(f"{app[:64]!r} is not an app name")
    return stack_dir() / f"{app}.json"


def _private_stack_dir() -> Path:
    """`stack_dir()`, made if need be; StackDirError when it is not this user's directory of
    mode 0700 (a symlink, another user's, or open to others)."""
    directory = stack_dir()
    if private_dir(directory):
        mode = stat.S_IMODE(os.lstat(directory).st_mode)
        if not mode & 0o077:
            return directory
    raise StackDirError(
        f"{directory} is not a private directory of this user (mode 0700, not a symlink): "
        "its stack files are not trusted"
    )


def write_stack_file(info: DevStackInfo) -> Path:
    """Describe the running stack for `python -m flyfn.emulator.secrets` (StackDirError when the
    directory is not private)."""
    name = stack_file(info.app).name
    if private_dir(stack_dir()):  # ours: close it to others if an older version left it open
        os.chmod(stack_dir(), 0o700)
    path = _private_stack_dir() / name
    data = {"app": info.app, "api": info.api, "token": info.token, "pid": info.pid}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        json.dump(data, handle)
    return path


def _read_private_file(path: Path) -> str | None:
    """The file's text when it is this user's regular file, mode 0600 at most, not a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_uid != os.geteuid()
            or stat.S_IMODE(info.st_mode) & 0o077
        ):
            return None
        return handle.read(_MAX_STACK_FILE).decode("utf-8", errors="replace")


def read_stack_file(app: str) -> DevStackInfo | None:
    """The running stack of `app`, or None when none runs (its file is missing or stale) or its
    file cannot be trusted (see the module's docstring)."""
    if not _APP_FILE_RE.fullmatch(app):
        return None
    try:
        path = _private_stack_dir() / f"{app}.json"
        text = _read_private_file(path)
        if text is None:
            return None
        data = json.loads(text)
        info = DevStackInfo(
            str(data["app"]), str(data["api"]), str(data["token"]), int(data["pid"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.app != app:
        return None
    try:
        os.kill(info.pid, 0)
    except (ProcessLookupError, PermissionError):
        # Gone, or another user's process now has the pid: not a stack of ours.
        return None
    return info


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flyfn.emulator.secrets",
        description="Set, unset or list the app secrets of a running `flyfn dev`.",
    )
    parser.add_argument("--app", default=None, help="the app (default: the only running stack's)")
    parser.add_argument("--api", default=None, help=f"the API's URL (token: ${DEV_TOKEN_ENV})")
    actions = parser.add_subparsers(dest="action", required=True)
    put = actions.add_parser("set", help="set NAME=VALUE pairs and restart the app Machines")
    put.add_argument("pairs", nargs="+", metavar="NAME=VALUE")
    put.add_argument("--stage", action="store_true", help="store only; restart nothing")
    unset = actions.add_parser("unset", help="unset NAMEs and restart the app Machines")
    unset.add_argument("names", nargs="+", metavar="NAME")
    unset.add_argument("--stage", action="store_true", help="store only; restart nothing")
    actions.add_parser("list", help="names and digests (never values)")
    return parser


class SecretsCommandError(Exception):
    """A clear message for the user; never a value or the token."""


def _pairs(pairs: Sequence[str]) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SecretsCommandError(f"expected NAME=VALUE, got {name or pair[:20]!r}=...")
        values[name] = value
    return values


def _locate(app: str | None, api: str | None) -> DevStackInfo:
    if api is not None:
        if not app:
            raise SecretsCommandError("--api needs --app")
        token = os.environ.get(DEV_TOKEN_ENV)
        if not token:
            raise SecretsCommandError(f"--api needs the stack's token in ${DEV_TOKEN_ENV}")
        return DevStackInfo(app, api, token, 0)
    try:
        directory = _private_stack_dir()
    except StackDirError as exc:
        raise SecretsCommandError(str(exc)) from None
    if app is None:
        running = [
            info
            for path in sorted(directory.glob("*.json"))
            if (info := read_stack_file(path.stem)) is not None
        ]
        if len(running) != 1:
            names = ", ".join(info.app for info in running) or "none"
            raise SecretsCommandError(f"name the app with --app (running flyfn dev: {names})")
        return running[0]
    info = read_stack_file(app)
    if info is None:
        raise SecretsCommandError(f"no running flyfn dev for app {app!r}")
    return info


async def _restart_fly_launch_machines(info: DevStackInfo, app: str, out: TextIO) -> int:
    """Update each Fly Launch Machine with its own config, as `fly secrets set` does: a started
    one restarts (and boots with the new values), a stopped one stays stopped."""
    key, value = FLY_LAUNCH_METADATA
    async with AsyncMachinesClient(
        app,
        api_token=info.token,
        api_hostname=info.api,
        rate_limit_retries=COMMAND_RATE_LIMIT_RETRIES,
    ) as client:
        launched: list[Machine] = await client.list_machines(metadata={key: value})
        for machine in launched:
            assert machine.config is not None
            started = machine.state == "started"
            updated = await client.update_machine(
                machine.id,
                UpdateMachineRequest(config=machine.config, skip_launch=not started),
            )
            if started:
                await client.wait_machine(
                    machine.id,
                    state="started",
                    version=updated.current_version,
                    wait_timeout=RESTART_WAIT_SECONDS,
                )
            out.write(f"  Machine {machine.id} updated{' and restarted' if started else ''}\n")
    return len(launched)


async def run(argv: Sequence[str], out: TextIO) -> None:
    args = _parser().parse_args(argv)
    info = _locate(args.app, args.api)
    app = args.app or info.app
    headers = {"Authorization": f"Bearer {info.token}"}
    async with httpx.AsyncClient(base_url=info.api, headers=headers, timeout=30) as http:
        url = f"/v1/apps/{app}/secrets"
        if args.action == "list":
            response = await http.get(url)
        else:
            values: Mapping[str, str | None] = (
                _pairs(args.pairs) if args.action == "set" else dict.fromkeys(args.names)
            )
            response = await http.post(url, json={"values": values})
        if response.status_code >= 400:
            with contextlib.suppress(ValueError):
                raise SecretsCommandError(f"the API refused: {response.json()['error']}")
            raise SecretsCommandError(f"the API answered {response.status_code}")
        listed = response.json()["secrets"]
    if args.action == "list":
        for secret in listed:
            out.write(f"{secret['name']}\t{secret['digest']}\t{secret['updated_at']}\n")
        return
    out.write(f"secrets {args.action}: {', '.join(values)}\n")
    if args.stage:
        out.write("staged: Machines get them at their next start or update\n")
        return
    count = await _restart_fly_launch_machines(info, app, out)
    out.write(
        f"{count} app Machine(s) restarted; function Machines get the new values at their "
        "next start or update, as on Fly\n"
    )


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    stream = out if out is not None else sys.stdout
    try:
        asyncio.run(run(sys.argv[1:] if argv is None else argv, stream))
    except SecretsCommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: the flyfn dev API is unreachable ({type(exc).__name__})", file=sys.stderr)
        return 1
    except MachinesError as exc:  # the API's answer, named (its message carries no secret)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
