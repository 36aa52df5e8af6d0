"""Child processes of the end-to-end tests: the environment they start with, and, through psutil,
a `flyfn dev` stack's descendants, Machine pids and liveness."""

from __future__ import annotations

import os
from collections.abc import Mapping

import psutil

from flyfn.machine_dir import MACHINE_DIRS_ENV

# A process is identified by (pid, creation time) so a reused pid is never mistaken for it.
Proc = tuple[int, float]

_GONE = (psutil.NoSuchProcess, psutil.AccessDenied)

# What a child must not inherit from the test process by default: a Fly identity (FLY_MACHINE_ID,
# FLY_APP_NAME...) or flyfn's settings would make it another Machine than the test means.
INHERITED_IDENTITY = ("FLY_", "FLYFN_")


def child_env(
    drop: tuple[str, ...] = INHERITED_IDENTITY, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """This process's environment (or `environ`) without the variables named `drop*`, except
    `FLYFN_MACHINE_DIRS` (not an identity: where this test session's Machines keep their
    directories)."""
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if k == MACHINE_DIRS_ENV or not k.startswith(drop)}


def identity(pid: int) -> Proc | None:
    try:
        return (pid, psutil.Process(pid).create_time())
    except _GONE:
        return None


def alive(proc: Proc) -> bool:
    """Whether the very process `proc` names still runs (a zombie counts as gone)."""
    try:
        process = psutil.Process(proc[0])
        return process.create_time() == proc[1] and process.status() != psutil.STATUS_ZOMBIE
    except _GONE:
        return False


def descendants(root: int) -> set[Proc]:
    """Every live process below `root` (Machines run in their own sessions, not its group)."""
    try:
        children = psutil.Process(root).children(recursive=True)
    except _GONE:
        return set()
    found: set[Proc] = set()
    for child in children:
        try:
            found.add((child.pid, child.create_time()))
        except _GONE:
            continue
    return found


def machine_pid(root: int, machine_id: str) -> int | None:
    """The live process below `root` that runs the Machine `machine_id`, if any."""
    for proc in descendants(root):
        try:
            environ = psutil.Process(proc[0]).environ()
        except _GONE:
            continue
        if environ.get("FLY_MACHINE_ID") == machine_id and alive(proc):
            return proc[0]
    return None
