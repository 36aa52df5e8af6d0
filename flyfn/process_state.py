"""The list of every piece of state a flyfn process holds, and one way to reset it on an event.

Each module keeps its own state; it registers it here with its name and, per event, how it is
reset: `settings` (Django's `setting_changed` for the settings the piece watches; flyfn.conf
connects the one receiver), `fork` (in a forked child: one `os.register_at_fork` hook) and `tests`
(between tests: the suite's conftest). A piece registered without resets lives as long as the
process. Imports no Django.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["EVENTS", "Event", "Piece", "ProcessState", "described", "pieces", "register", "reset"]

Event = Literal["settings", "fork", "tests"]
EVENTS: tuple[Event, ...] = ("settings", "fork", "tests")
Reset = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Piece:
    """One piece of process state: its owning module, what it is, and its reset per event."""

    owner: str
    name: str
    resets: Mapping[Event, Reset] = field(default_factory=dict)
    # The Django settings whose change resets it (its `settings` reset runs for these only).
    watched: frozenset[str] = frozenset()

    def described(self) -> str:
        """One line: the piece and the events that reset it."""
        events = ", ".join(
            f"settings ({', '.join(sorted(self.watched))})" if event == "settings" else event
            for event in EVENTS
            if event in self.resets
        )
        return (
            f"{self.owner}: {self.name} (reset on: {events or 'nothing, lives with the process'})"
        )


class ProcessState:
    """The registered pieces, in registration order (their resets run in that order)."""

    def __init__(self) -> None:
        self._pieces: dict[tuple[str, str], Piece] = {}
        self._lock = threading.Lock()

    def add(self, piece: Piece) -> None:
        """Add `piece` (one of the same owner and name is replaced in place)."""
        with self._lock:
            self._pieces[piece.owner, piece.name] = piece

    def pieces(self) -> list[Piece]:
        with self._lock:
            return list(self._pieces.values())

    def reset(self, reason: Event, setting: str | None = None) -> list[Piece]:
        """Run every reset registered for `reason` (for `settings`, those watching `setting`);
        returns the pieces reset."""
        if (reason == "settings") != (setting is not None):
            raise ValueError("a settings reset names the setting that changed, only it")
        done = []
        for piece in self.pieces():
            reset = piece.resets.get(reason)
            if reset is None or (setting is not None and setting not in piece.watched):
                continue
            reset()
            done.append(piece)
        return done

    def described(self) -> list[str]:
        return [piece.described() for piece in self.pieces()]


_state = ProcessState()


# The process's registry, as functions (`process_state.register(__name__, ...)`).
def register(
    owner: str,
    name: str,
    *,
    settings: Reset | None = None,
    watched: Collection[str] = (),
    fork: Reset | None = None,
    tests: Reset | None = None,
) -> None:
    """Register (or register again, replacing it in place) `owner`'s (a module's `__name__`)
    piece of process state `name` with its resets."""
    if (settings is None) != (not watched):
        raise ValueError(f"{owner}: {name}: a settings reset goes with the settings it watches")
    given: dict[Event, Reset | None] = {"settings": settings, "fork": fork, "tests": tests}
    resets = {event: reset for event, reset in given.items() if reset is not None}
    _state.add(Piece(owner, name, resets, frozenset(watched)))


def pieces() -> list[Piece]:
    """The process's registered pieces, in registration order."""
    return _state.pieces()


def reset(reason: Event, setting: str | None = None) -> list[Piece]:
    """Reset the process's pieces registered for `reason` (`setting`: the one that changed)."""
    return _state.reset(reason, setting)


def described() -> list[str]:
    """What this process holds, a line per piece (ARCHITECTURE.md lists them)."""
    return _state.described()


def _after_fork_in_child() -> None:
    # The one fork hook: a forked child (a worker) drops what its parent's threads and locks held,
    # this registry's own lock first (a parent thread may have held it at the fork).
    _state._lock = threading.Lock()
    _state.reset("fork")


os.register_at_fork(after_in_child=_after_fork_in_child)
