"""How `flyfn dev` writes what happens: a request's route line, Machine labels, autostop events.

A request prints as one line: `GET /r/ main:0e1f → replay → fn:9a2c (cold 1.8s) 200 2 KB 31ms`.
Every piece of that text, and the proxy's other event lines, is formatted here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flyfn.emulator.roles import is_function_machine

if TYPE_CHECKING:
    from flyfn.machines.models import Machine

__all__ = ["RequestLog", "autostop_event", "cold_note", "machine_label"]


def machine_label(machine: Machine) -> str:
    """`main:0e1f` for an app Machine, `fn:9a2c` for a function Machine."""
    return f"{'fn' if is_function_machine(machine) else 'main'}:{machine.id[:4]}"


def cold_note(boot_seconds: float | None) -> str:
    """` (cold 1.8s)` after the label of a Machine serving its first request."""
    return f" (cold {boot_seconds:.1f}s)" if boot_seconds is not None else " (cold)"


def autostop_event(
    machine: Machine,
    mode: str,
    idle_seconds: float,
    *,
    load: int = 0,
    at: int | None = None,
    started: int = 1,
) -> str:
    """`autostop: fn:9a2c stopped after 3s idle (pass 4)`; one of several started Machines of
    its role, stopped with requests since the previous pass: `... stopped at load 2 (pass 4,
    one of 3 started)`."""
    verb = "suspended" if mode == "suspend" else "stopped"
    why = f"at load {load}" if load else f"after {idle_seconds:.0f}s idle"
    notes = [f"pass {at}"] if at is not None else []
    if started > 1:
        notes.append(f"one of {started} started")
    where = f" ({', '.join(notes)})" if notes else ""
    return f"autostop: {machine_label(machine)} {verb} {why}{where}"


@dataclass
class RequestLog:
    """The route of one request, printed by `flyfn dev` as one line."""

    method: str
    path: str
    hops: list[str] = field(default_factory=list)
    status: int | None = None
    size: int = 0
    seconds: float = 0.0
    error: str | None = None
    machine_id: str | None = None  # the last Machine that answered
    # The edge region it entered at, in a stack of several regions (then hops name theirs).
    region: str | None = None

    def reached(self, machine: Machine, note: str = "") -> None:
        """A Machine got the request (`note`: its cold start, if any)."""
        where = f"@{machine.region}" if self.region and machine.region else ""
        self.hops.append(machine_label(machine) + where + note)
        self.machine_id = machine.id

    def unreachable(self, label: str, reason: str) -> None:
        """A delivery failed: `fn:9a2c ✗ timeout`."""
        self.hops.append(f"{label} ✗ {reason}")

    def fell_back(self) -> None:
        self.hops.append("fallback")

    def resent(self) -> None:
        self.hops.append("resent")

    def replayed(self, *, elsewhere: bool) -> None:
        self.hops.append("elsewhere" if elsewhere else "replay")

    def refused(self, code: str, status: int) -> None:
        """The proxy answered itself with an error page."""
        self.status = status
        self.error = code
        self.hops.append(code)

    def client_gone(self) -> None:
        self.error = "client went away"

    def broke_off(self) -> None:
        """The Machine's answer ended early, after the client had its headers."""
        self.error = "PU02 upstream closed mid-response"

    def __str__(self) -> str:
        route = " → ".join(self.hops) if self.hops else "proxy"
        status = str(self.status) if self.status is not None else "---"
        tail = f" ({self.error})" if self.error else ""
        edge = f"[{self.region}] " if self.region else ""
        return (
            f"{edge}{self.method} {self.path} {route} {status} {_size_text(self.size)} "
            f"{_seconds_text(self.seconds)}{tail}"
        )


def _size_text(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def _seconds_text(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"
