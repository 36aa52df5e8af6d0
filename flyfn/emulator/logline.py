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

__all__ = ["RequestLog", "autostop_event", "cold_note", "failed_hop", "machine_label"]


def machine_label(machine: Machine) -> str:
    """`main:0e1f` for an app Machine, `fn:9a2c` for a function Machine."""
    return f"{'fn' if is_function_machine(machine) else 'main'}:{machine.id[:4]}"


def cold_note(boot_seconds: float | None) -> str:
    """` (cold 1.8s)` after the label of a Machine serving its first request."""
    return f" (cold {boot_seconds:.1f}s)" if boot_seconds is not None else " (cold)"


def failed_hop(label: str, reason: str) -> str:
    """A hop that could not be delivered: `fn:9a2c ✗ timeout`."""
    return f"{label} ✗ {reason}"


def autostop_event(machine: Machine, mode: str, idle_seconds: float) -> str:
    verb = "suspended" if mode == "suspend" else "stopped"
    return f"autostop: {machine_label(machine)} {verb} after {idle_seconds:.0f}s idle"


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

    def __str__(self) -> str:
        route = " → ".join(self.hops) if self.hops else "proxy"
        status = str(self.status) if self.status is not None else "---"
        tail = f" ({self.error})" if self.error else ""
        return (
            f"{self.method} {self.path} {route} {status} {_size_text(self.size)} "
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
