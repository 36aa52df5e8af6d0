"""flyfn.process_state: every registered reset runs on its events and only on them, Django's
setting_changed and a fork reach them, and every module holding process state registers it."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest
from django.test import override_settings

from flyfn import process_state
from flyfn.legacy_setting import SEED_SETTING
from flyfn.process_state import Event, ProcessState
from tests.test_layers import imports_of

FLYFN_DIR = Path(__file__).resolve().parents[1] / "flyfn"


@pytest.fixture
def state(monkeypatch: pytest.MonkeyPatch) -> ProcessState:
    """A fresh registry as the process's, for the test."""
    fresh = ProcessState()
    monkeypatch.setattr(process_state, "_state", fresh)
    return fresh


def _recording() -> list[str]:
    """Registers three pieces (in the test's fresh registry) whose resets append their name to
    the returned list."""
    ran: list[str] = []
    process_state.register(
        "m.settings",
        "cache",
        settings=lambda: ran.append("settings cache"),
        watched={"FLYFN", "OTHER"},
        tests=lambda: ran.append("tests cache"),
    )
    process_state.register("m.fork", "threads", fork=lambda: ran.append("fork threads"))
    process_state.register("m.idle", "lives with the process")
    return ran


@pytest.mark.parametrize(
    ("reason", "setting", "expected"),
    [
        ("settings", "FLYFN", ["settings cache"]),
        ("settings", "OTHER", ["settings cache"]),
        ("settings", "ROOT_URLCONF", []),
        ("fork", None, ["fork threads"]),
        ("tests", None, ["tests cache"]),
    ],
)
def test_a_reset_runs_the_resets_registered_for_its_event_only(
    state: ProcessState, reason: Event, setting: str | None, expected: list[str]
) -> None:
    ran = _recording()
    done = state.reset(reason, setting)
    assert ran == expected
    assert len(done) == len(expected)


def test_resets_run_in_registration_order_and_registering_again_replaces_in_place(
    state: ProcessState,
) -> None:
    ran: list[str] = []
    process_state.register("a", "first", fork=lambda: ran.append("first"))
    process_state.register("b", "second", fork=lambda: ran.append("second"))
    process_state.register("a", "first", fork=lambda: ran.append("first again"))
    process_state.reset("fork")
    assert ran == ["first again", "second"]
    assert [piece.name for piece in state.pieces()] == ["first", "second"]


def test_a_settings_reset_goes_with_the_settings_it_watches(state: ProcessState) -> None:
    with pytest.raises(ValueError, match="watches"):
        process_state.register("a", "no settings named", settings=lambda: None)
    with pytest.raises(ValueError, match="watches"):
        process_state.register("a", "no settings reset", watched={"FLYFN"})
    assert state.pieces() == []
    with pytest.raises(ValueError, match="setting"):
        state.reset("settings")
    with pytest.raises(ValueError, match="setting"):
        state.reset("fork", "FLYFN")


@pytest.mark.usefixtures("state")
def test_described_lists_every_piece_with_its_events() -> None:
    _recording()
    assert process_state.described() == [
        "m.settings: cache (reset on: settings (FLYFN, OTHER), tests)",
        "m.fork: threads (reset on: fork)",
        "m.idle: lives with the process (reset on: nothing, lives with the process)",
    ]


@pytest.mark.usefixtures("state")
def test_djangos_setting_changed_reaches_the_pieces_watching_that_setting() -> None:
    ran = _recording()
    with override_settings(UNWATCHED=1):
        assert ran == []
    with override_settings(OTHER=1):
        assert ran == ["settings cache"]
    assert ran == ["settings cache", "settings cache"]  # and again as it is restored


@pytest.mark.usefixtures("state")
def test_the_fork_hook_runs_the_fork_resets() -> None:
    ran = _recording()
    process_state._after_fork_in_child()
    assert ran == ["fork threads"]


def test_the_process_pieces_reset_on_the_events_they_did_before() -> None:
    importlib.import_module("flyfn.tasks.dispatch")  # the others are imported by Django's setup
    importlib.import_module("flyfn.tasks.periodic")
    events = {
        (piece.owner, piece.name): (sorted(piece.resets), sorted(piece.watched))
        for piece in process_state.pieces()
        if piece.resets
    }
    assert events == {
        ("flyfn.conf", "validated settings"): (["settings"], ["FLYFN", SEED_SETTING]),
        ("flyfn.apps", "declared views in the registry"): (
            ["settings"],
            ["FLYFN", SEED_SETTING],
        ),
        ("flyfn.apps", "url names resolved by the registry"): (["settings"], ["ROOT_URLCONF"]),
        ("flyfn.replay_record", "issued-replay records and open logs"): (["fork", "tests"], []),
        ("flyfn.signed_requests", "SECRET_KEY as last read"): (["settings"], ["SECRET_KEY"]),
        ("flyfn.answers", "the replay responses' content type"): (
            ["settings"],
            ["DEFAULT_CHARSET"],
        ),
        ("flyfn.pool.manager", "the pool manager"): (["fork"], []),
        ("flyfn.tasks.dispatch", "task dispatchers"): (["fork"], []),
        ("flyfn.tasks.periodic", "schedules' ticker"): (["fork", "tests"], []),
    }


# Module-level state: a `global` statement, a fork hook, a settings receiver, an empty container.
_STATE_PATTERN = re.compile(
    r"^\s*global \w|register_at_fork\(|setting_changed\.connect\(|"
    r"^_\w+(: [^=]+)? = (\{\}|\[\]|set\(\))$",
    re.M,
)


def _modules_holding_state() -> list[str]:
    found = []
    for path in sorted(FLYFN_DIR.rglob("*.py")):
        if _STATE_PATTERN.search(path.read_text()):
            relative = path.relative_to(FLYFN_DIR.parent).with_suffix("")
            found.append(".".join(relative.parts))
    return [module for module in found if module != "flyfn.process_state"]


def test_the_pattern_finds_the_known_holders_of_state() -> None:
    assert {"flyfn.conf", "flyfn.replay_record", "flyfn.tasks.dispatch"} <= set(
        _modules_holding_state()
    )


@pytest.mark.parametrize("module", _modules_holding_state())
def test_every_module_holding_process_state_registers_it(module: str) -> None:
    importlib.import_module(module)
    assert module in {piece.owner for piece in process_state.pieces()}, (
        f"{module} holds module-level state: register it with flyfn.process_state"
    )


@pytest.mark.e2e
def test_a_forked_child_starts_without_its_parents_records_dispatchers_and_manager() -> None:
    from flyfn import replay_record
    from flyfn.pool import manager
    from flyfn.tasks import dispatch

    replay_record.machine_record(None)  # the parent holds a record
    assert replay_record._records
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it holds, then leave without pytest's teardown
        held = [
            name
            for name, kept in (
                ("records", bool(replay_record._records)),
                ("dispatchers", bool(dispatch._dispatchers)),
                ("manager", manager._manager is not None),
            )
            if kept
        ]
        os.write(write, ",".join(held).encode() or b"-")
        os._exit(0)
    os.close(write)
    try:
        reported = os.read(read, 1024).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert reported == "-"
    assert replay_record._records  # the parent keeps its own


def test_process_state_imports_no_django() -> None:
    assert not [
        name
        for name in imports_of(FLYFN_DIR / "process_state.py")
        if name == "django" or name.startswith("django.")
    ]


def _registering_modules() -> list[str]:
    return [
        ".".join(path.relative_to(FLYFN_DIR.parent).with_suffix("").parts)
        for path in sorted(FLYFN_DIR.rglob("*.py"))
        if "process_state.register(" in path.read_text()
    ]


def test_architecture_lists_every_piece() -> None:
    for module in _registering_modules():
        importlib.import_module(module)
    text = " ".join((FLYFN_DIR.parent / "ARCHITECTURE.md").read_text().split())
    section = text[text.index("## Process state") : text.index("## Common changes")]
    missing = [
        f"{piece.owner}: {piece.name}"
        for piece in process_state.pieces()
        if piece.owner not in section or piece.name not in section
    ]
    assert not missing
