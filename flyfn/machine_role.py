"""Where this process runs: its role (local / main / function) and its Machine, from the env.

The role is read once, at start-up (first use), and cached: the environment of a Machine does not
change while it runs. Tests change it with `override_role()` or by editing the environment and
calling `reset()`.

- **function(g)**: `FLYFN_GROUP=g` (set by flyfn on every function Machine), or the seed's
  `IS_FLY_MACHINE_SERVERLESS=true` (group `default`).
- **main**: `FLY_APP_NAME` is set (Fly sets it on every Machine; the emulator does too).
- **local**: neither (`runserver`, tests): every view runs here.

`FLYFN["APP_NAME"]` deliberately does not make a process "main": it names the app to manage (e.g.
for `manage.py flyfn prepare` from a laptop), while the role says where the process itself runs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from flyfn import process_state
from flyfn.fly.env import (
    FLY_ALLOC_ID,
    FLY_APP_NAME,
    FLY_IMAGE_REF,
    FLY_MACHINE_ID,
    FLY_PRIVATE_IP,
    FLY_REGION,
    GROUP_ENV,
    SEED_ENV,
    env_value,
)
from flyfn.names import validate_group_name

__all__ = [
    "GROUP_ENV",
    "LOCAL",
    "MAIN",
    "SEED_ENV",
    "MachineEnv",
    "Role",
    "RoleError",
    "current_env",
    "current_role",
    "detect_env",
    "detect_role",
    "function",
    "override_role",
    "reset",
]

_TRUE = frozenset({"1", "true", "yes", "on"})

RoleKind = Literal["local", "main", "function"]


class RoleError(ValueError):
    """The environment names an invalid function group."""


@dataclass(frozen=True, slots=True)
class Role:
    """What this process does: `kind` is local, main or function; `group` is set for
    function."""

    kind: RoleKind
    group: str | None = None

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    @property
    def is_main(self) -> bool:
        return self.kind == "main"

    @property
    def is_function(self) -> bool:
        return self.kind == "function"

    def __str__(self) -> str:
        return f"function({self.group})" if self.kind == "function" else self.kind


LOCAL = Role("local")
MAIN = Role("main")


def function(group: str) -> Role:
    """The role of a function Machine of `group`."""
    return Role("function", validate_group_name(group))


@dataclass(frozen=True, slots=True)
class MachineEnv:
    """The Fly variables of this process's Machine (None off Fly)."""

    app_name: str | None = None
    machine_id: str | None = None
    region: str | None = None
    image_ref: str | None = None
    private_ip: str | None = None


def detect_role(environ: Mapping[str, str] | None = None) -> Role:
    """The role the environment describes (`os.environ` by default); RoleError for a bad group."""
    env = os.environ if environ is None else environ
    group = env_value(env, GROUP_ENV)
    if group is not None:
        try:
            return function(group)
        except ValueError as exc:
            raise RoleError(f"{GROUP_ENV}: {exc}") from None
    if (env_value(env, SEED_ENV) or "").lower() in _TRUE:
        return function("default")
    if env_value(env, FLY_APP_NAME) is not None:
        return MAIN
    return LOCAL


def detect_env(environ: Mapping[str, str] | None = None) -> MachineEnv:
    """The Machine the environment describes (`os.environ` by default)."""
    env = os.environ if environ is None else environ
    return MachineEnv(
        app_name=env_value(env, FLY_APP_NAME),
        machine_id=env_value(env, FLY_MACHINE_ID) or env_value(env, FLY_ALLOC_ID),
        region=env_value(env, FLY_REGION),
        image_ref=env_value(env, FLY_IMAGE_REF),
        private_ip=env_value(env, FLY_PRIVATE_IP),
    )


_lock = threading.Lock()
_role: Role | None = None
_env: MachineEnv | None = None
process_state.register(__name__, "this process's role and Machine variables (read once)")


def current_role() -> Role:
    """This process's role, detected from `os.environ` on first use and cached."""
    global _role
    role = _role
    if role is None:
        with _lock:
            if _role is None:
                _role = detect_role()
            role = _role
    return role


def current_env() -> MachineEnv:
    """This process's Machine variables, read from `os.environ` on first use and cached."""
    global _env
    env = _env
    if env is None:
        with _lock:
            if _env is None:
                _env = detect_env()
            env = _env
    return env


def reset() -> None:
    """Forget the cached role and Machine variables: the next use reads the environment again."""
    global _role, _env
    with _lock:
        _role = None
        _env = None


@contextmanager
def override_role(role: Role, env: MachineEnv | None = None) -> Iterator[Role]:
    """Within the block, `current_role()` is `role` (and `current_env()` is `env` if
    given)."""
    global _role, _env
    with _lock:
        saved = (_role, _env)
        _role = role
        if env is not None:
            _env = env
    try:
        yield role
    finally:
        with _lock:
            _role, _env = saved
