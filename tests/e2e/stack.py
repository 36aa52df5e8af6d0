"""The e2e project under `manage.py flyfn dev`, as the e2e tests start, read and stop it."""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from flyfn.emulator.process_groups import kill_group
from tests.support_dev import DevProcess, banner_api, list_machines, start_project
from tests.support_machines_api import free_loopback_port
from tests.support_procs import Proc, descendants
from tests.support_wait import wait_for

T = TypeVar("T")
PROJECT = Path(__file__).resolve().parent / "project"
TOKEN = "e2e-dev-token"
APP = "e2eproj"


class Dev(DevProcess):
    """A running `flyfn dev` of the e2e project and what it printed."""

    def machines(self, **params: str) -> list[dict[str, Any]]:
        return list_machines(self.api, APP, TOKEN, **params)

    def app_machine(self) -> dict[str, Any]:
        (machine,) = [
            m for m in self.machines() if "FLYFN_GROUP" not in (m["config"].get("env") or {})
        ]
        return machine

    def group_machines(self, group: str) -> list[dict[str, Any]]:
        return self.machines(**{"metadata.flyfn_group": group})

    def log_for(self, path: str, since: int) -> str:
        """The proxy's log line of a request for `path` printed after line `since` (in a stack of
        several regions, after the region it entered at: `[syd] GET ...`)."""
        line = re.compile(rf"(\[[a-z0-9]+\] )?GET {re.escape(path)} ")
        return wait_for(
            lambda: next((ln for ln in self.lines[since:] if line.match(ln)), ""),
            60,
            f"the log line of {path}",
        )

    def was_stopped(self, machine_id: str, since: int) -> bool:
        """Whether autostop stopped or suspended Machine `machine_id` after line `since`."""
        return any(
            ln.startswith(f"autostop: fn:{machine_id[:4]} ")
            and (" stopped " in ln or " suspended " in ln)
            for ln in self.lines[since:]
        )

    def descendants(self) -> set[Proc]:
        return descendants(self.process.pid)

    def stop(self, sig: signal.Signals) -> int:
        self.process.send_signal(sig)  # the command only, not its process group
        return self.process.wait(timeout=15)


def start_stack(
    time_scale: float, secrets: Mapping[str, str] | None = None, args: Sequence[str] = ()
) -> Dev:
    port = free_loopback_port()
    lines: list[str] = []
    process = start_project(
        PROJECT,
        "e2eproj.settings",
        TOKEN,
        port=port,
        time_scale=time_scale,
        lines=lines,
        secrets=secrets,
        args=args,
    )
    dev = Dev(process, port, lines)
    dev.api = banner_api(process, lines, cleanup=lambda: kill_stack(dev))
    return dev


@contextlib.contextmanager
def running_stack(
    time_scale: float, secrets: Mapping[str, str] | None = None, args: Sequence[str] = ()
) -> Iterator[Dev]:
    """A started stack (autostop's pass every 300 / `time_scale` s; `secrets`: the app's
    secrets; `args`: more options of `flyfn dev`), killed on the way out if it still runs (a
    test may have stopped it)."""
    stack = start_stack(time_scale, secrets, args)
    try:
        yield stack
    finally:
        if stack.process.poll() is None:
            kill_stack(stack)


def kill_stack(dev: Dev) -> None:
    """Last resort: everything the command started, whatever state it is in."""
    pids = {pid for pid, _ in dev.descendants()} | {dev.process.pid}
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            kill_group(pid, sig)
    dev.process.wait(timeout=10)
