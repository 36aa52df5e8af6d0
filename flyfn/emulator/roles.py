"""What an emulated Machine is to flyfn: a function Machine of a group, or an app Machine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flyfn.fly.env import GROUP_ENV, SEED_ENV

if TYPE_CHECKING:
    from flyfn.machines.models import Machine

__all__ = ["group_of", "is_function_machine"]


def group_of(machine: Machine) -> str | None:
    """The function group the Machine serves (its config env's FLYFN_GROUP), if any."""
    env = machine.config.env if machine.config is not None else None
    return (env or {}).get(GROUP_ENV)


def is_function_machine(machine: Machine) -> bool:
    """A flyfn function Machine: its config env sets FLYFN_GROUP (or the seed's variable)."""
    env = (machine.config.env if machine.config is not None else None) or {}
    return GROUP_ENV in env or SEED_ENV in env
