"""The record of issued replays (flyfn/replay_record.py): one replay explains one fallback, per
Machine across its worker processes, bounded and expiring; and the middleware's use of it."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from pytest_django.fixtures import Settings as SettingsWrapper

from flyfn import machine_dir
from flyfn.fly.replay import FlyReplay, ReplayFailed
from flyfn.machine_dir import default_base
from flyfn.machine_role import MAIN, MachineEnv, override_role
from flyfn.replay_record import (
    ENTRY_SIZE,
    REPLAY_RECORD_LIMIT,
    SWEEP_INTERVAL,
    DirectoryRecord,
    MemoryRecord,
    ReplayRecord,
    machine_record,
    open_record,
    replay_key,
)
from tests import support_replay_record as procs
from tests.support_middleware import PDF_MACHINE, routing_manager
from tests.support_pools import StaticPools, installed

SECRET = "flyfn-tests-not-secret"
NOW = 1_764_302_000.25
TTL = 16.0  # a 10 s replay timeout and the way back


def key(path: str = "/purchases/receipts.pdf", query: str = "", body: str = "") -> str:
    return replay_key(SECRET, "GET", path, query, body)


def a_machine_id() -> str:
    return "m" + uuid.uuid4().hex[:13]


@pytest.fixture(params=["memory", "directory"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., ReplayRecord]:
    """A fresh record of each kind: in-process, or a Machine's directory under `tmp_path`."""

    def new(limit: int = REPLAY_RECORD_LIMIT, machine_id: str | None = None) -> ReplayRecord:
        if request.param == "memory":
            return MemoryRecord(limit)
        record = open_record(machine_id or a_machine_id(), str(tmp_path), limit)
        assert isinstance(record, DirectoryRecord)
        return record

    return new


# ------------------------------------------------------------------------------------ one for one


def test_one_issued_replay_explains_one_fallback(make: Callable[..., ReplayRecord]) -> None:
    record = make()
    assert record.add(key(), TTL, now=NOW)
    assert record.take(key(), now=NOW + 1)
    assert not record.take(key(), now=NOW + 1)  # a second (forged) fallback of the same request


def test_two_replays_of_one_request_explain_two_fallbacks(
    make: Callable[..., ReplayRecord],
) -> None:
    record = make()
    assert record.add(key(), TTL, now=NOW)
    assert record.add(key(), TTL, now=NOW)  # the same request replayed again (a busy URL)
    assert [record.take(key(), now=NOW) for _ in range(3)] == [True, True, False]


@pytest.mark.parametrize(
    "other",
    [
        key(query="page=2"),  # another query string
        key(body="sha256:" + "0" * 64),  # another body
        key("/purchases/other.pdf"),  # another path
        replay_key(SECRET, "POST", "/purchases/receipts.pdf", "", ""),  # another method
        replay_key("another-secret", "GET", "/purchases/receipts.pdf", "", ""),  # another key
    ],
)
def test_a_fallback_of_another_request_is_not_explained(
    make: Callable[..., ReplayRecord], other: str
) -> None:
    record = make()
    assert record.add(key(), TTL, now=NOW)
    assert not record.take(other, now=NOW)
    assert record.take(key(), now=NOW)  # the replay's own fallback still is


def test_fields_cannot_run_into_each_other() -> None:
    assert key("/a", query="b") != key("/a?b")
    assert replay_key(SECRET, "GET", "/x", "1", "") != replay_key(SECRET, "GET", "/x", "", "1")


def test_an_expired_entry_explains_nothing(make: Callable[..., ReplayRecord]) -> None:
    record = make()
    assert record.add(key(), TTL, now=NOW)
    assert not record.take(key(), now=NOW + TTL + 1)
    assert record.add(key(), TTL, now=NOW)
    assert record.take(key(), now=int(NOW) + TTL)  # the last whole second of its window


def test_an_entry_issued_late_in_a_second_lives_its_whole_ttl(
    make: Callable[..., ReplayRecord],
) -> None:
    """The margin the fallback has (`FALLBACK_RETURN_MARGIN`) is all of it, never up to a second
    less: an entry expires at the end of its TTL rounded up to a whole second."""
    record = make()
    issued = int(NOW) + 0.9
    assert record.add(key(), TTL, now=issued)
    assert record.take(key(), now=issued + TTL - 0.01)
    assert record.add(key(), TTL, now=issued)
    assert not record.take(key(), now=issued + TTL + 1)  # and less than a second more


def test_the_bound_holds_and_frees_as_entries_expire(make: Callable[..., ReplayRecord]) -> None:
    record = make(limit=3)
    added = [record.add(key(f"/p{n}/"), TTL, now=NOW) for n in range(5)]
    assert added == [True, True, True, False, False]  # a flood: beyond the limit, unrecorded
    assert not record.take(key("/p3/"), now=NOW)
    later = NOW + TTL + SWEEP_INTERVAL + 1  # the flood expired; the next sweep forgets it
    assert record.add(key("/p5/"), TTL, now=later)
    assert record.take(key("/p5/"), now=later)


def test_the_default_bound_is_16384(make: Callable[..., ReplayRecord]) -> None:
    record = make()
    added = [record.add(key(f"/p{n}/"), TTL, now=NOW) for n in range(16_385)]
    assert added.count(True) == 16_384
    assert not added[-1]


def test_a_full_record_says_so_once_a_minute(
    make: Callable[..., ReplayRecord], caplog: pytest.LogCaptureFixture
) -> None:
    record = make(limit=1)
    with caplog.at_level(logging.WARNING, "flyfn.replay_record"):
        for n in range(4):
            record.add(key(f"/p{n}/"), TTL, now=NOW)
    (line,) = caplog.records
    assert "go unrecorded" in line.getMessage()


def test_entries_of_another_machine_are_not_seen(tmp_path: Path) -> None:
    mine = open_record("m0a1b2c3d4e5f6", str(tmp_path))
    other = open_record("m9f8e7d6c5b4a3", str(tmp_path))
    assert mine.add(key(), TTL, now=NOW)
    assert not other.take(key(), now=NOW)
    again = open_record("m0a1b2c3d4e5f6", str(tmp_path))  # another process of the same Machine
    assert again.take(key(), now=NOW)
    assert not mine.take(key(), now=NOW)


def test_a_machine_keeps_its_record_in_its_own_private_directory() -> None:
    machine_id = a_machine_id()
    record = machine_record(machine_id)
    assert record is machine_record(machine_id)
    assert isinstance(record, DirectoryRecord)
    assert record.root == os.path.join(default_base(), f"flyfn-{machine_id}", "replays")
    assert stat.S_IMODE(os.stat(record.root).st_mode) == 0o700
    assert record.add(key(), TTL)
    (log,) = os.listdir(record.root)
    entry = Path(record.root, log).read_text()
    assert entry == key() + "\n"  # an HMAC: no URL in the record
    assert "receipts" not in log + entry
    assert isinstance(machine_record(None), MemoryRecord)  # no Machine id: in-process


def test_machine_dirs_live_in_ram_when_there_is_a_dev_shm_else_in_the_temp_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(machine_dir, "base_dir", None)
    monkeypatch.delenv(machine_dir.MACHINE_DIRS_ENV, raising=False)
    monkeypatch.setattr(machine_dir, "_SHM", str(tmp_path))
    assert default_base() == str(tmp_path)
    monkeypatch.setattr(machine_dir, "_SHM", str(tmp_path / "none"))
    assert default_base() == tempfile.gettempdir()
    # `flyfn dev` (and the tests) name where Machines keep their directories.
    monkeypatch.setenv(machine_dir.MACHINE_DIRS_ENV, str(tmp_path / "run"))
    assert default_base() == str(tmp_path / "run")


@pytest.mark.parametrize("machine_id", ["../escape", "a/b", "x" * 65])
def test_a_machine_id_that_cannot_name_a_directory_keeps_it_in_process(machine_id: str) -> None:
    assert isinstance(open_record(machine_id), MemoryRecord)


def test_a_directory_others_can_write_to_is_not_trusted(tmp_path: Path) -> None:
    machine_dir = tmp_path / "flyfn-m0a1b2c3d4e5f6"
    machine_dir.mkdir()
    machine_dir.chmod(0o777)  # e.g. made by another user of a shared /tmp
    assert isinstance(open_record("m0a1b2c3d4e5f6", str(tmp_path)), MemoryRecord)
    (tmp_path / "flyfn-m1").symlink_to(tmp_path)
    assert isinstance(open_record("m1", str(tmp_path)), MemoryRecord)


def test_a_sweep_removes_expired_entries_and_counts_the_rest(tmp_path: Path) -> None:
    record = open_record(a_machine_id(), str(tmp_path))
    assert isinstance(record, DirectoryRecord)
    record.add(key("/old/"), 1.0, now=NOW)
    record.add(key("/new/"), TTL, now=NOW)
    assert record.sweep(now=NOW + 5) == 1
    files = [name for _, _, names in os.walk(record.root) for name in names]
    assert len(files) == 1
    assert record.take(key("/new/"), now=NOW + 5)


def test_claims_are_counted_against_the_bound_and_swept_with_their_second(tmp_path: Path) -> None:
    record = open_record(a_machine_id(), str(tmp_path), limit=3)
    assert isinstance(record, DirectoryRecord)
    keys = [key(f"/{n}/") for n in range(3)]
    assert all(record.add(k, TTL, now=NOW) for k in keys)
    assert record.take(keys[0], now=NOW)
    assert record.sweep(now=NOW) == 2  # three lines, one consumed
    assert record.add(key("/3/"), TTL, now=NOW)  # so there is room for one more
    assert record.sweep(now=NOW + TTL + 2) == 0
    assert list(Path(record.root).iterdir()) == []  # the log and its claims are gone


def test_a_torn_line_hides_no_entry_after_it(tmp_path: Path) -> None:
    """A write cut short (no space left) leaves part of a line; the next entry still counts."""
    record = open_record(a_machine_id(), str(tmp_path))
    assert isinstance(record, DirectoryRecord)
    assert record.add(key("/first/"), TTL, now=NOW)
    (log,) = Path(record.root).iterdir()
    with log.open("ab") as torn:
        torn.write(key("/torn/")[:20].encode())
    assert record.add(key(), TTL, now=NOW)
    assert not record.take(key("/torn/"), now=NOW)
    assert record.take(key(), now=NOW)
    assert record.take(key("/first/"), now=NOW)


def test_a_claim_made_after_the_entry_expired_explains_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep removes an expired second's claims: a fallback that read the log just before, and
    claims after, must not count as the entry's one explanation."""
    record = open_record(a_machine_id(), str(tmp_path))
    assert record.add(key(), TTL, now=NOW)
    expiry = math.ceil(NOW + TTL)
    readings = [expiry - 0.5, expiry + 0.5]  # read while live, claimed once expired
    monkeypatch.setattr(time, "time", lambda: readings.pop(0) if len(readings) > 1 else readings[0])
    assert not record.take(key())


def test_the_bound_counts_other_processes_entries_from_their_last_sweep(tmp_path: Path) -> None:
    machine_id = a_machine_id()
    first = open_record(machine_id, str(tmp_path), limit=4)
    second = open_record(machine_id, str(tmp_path), limit=4)  # another worker of the Machine
    assert isinstance(second, DirectoryRecord)
    assert all(first.add(key(f"/p{n}/"), TTL, now=NOW) for n in range(3))
    assert second.sweep(now=NOW) == 3
    assert second.add(key("/p3/"), TTL, now=NOW)
    assert not second.add(key("/p4/"), TTL, now=NOW)
    assert second.take(key("/p0/"), now=NOW)  # consumed by it, counted again at the next sweep
    assert second.sweep(now=NOW) == 3


def open_descriptors() -> set[int]:
    """This process's open file descriptors (the listing's own is closed once it is read)."""
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if _is_open(fd)}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="no /proc/self/fd")


@needs_proc
def test_a_sweep_closes_the_logs_of_past_seconds(tmp_path: Path) -> None:
    record = open_record(a_machine_id(), str(tmp_path))
    assert isinstance(record, DirectoryRecord)
    before = open_descriptors()
    for ttl in (1.0, 2.0, 3.0):  # three seconds' logs, each kept open
        assert record.add(key(), ttl, now=NOW)
    assert len(open_descriptors() - before) == 3
    record.sweep(now=NOW + 10)
    assert open_descriptors() == before
    assert os.listdir(record.root) == []


@needs_proc
def test_an_idle_process_logs_are_emptied_by_another_process_sweep(tmp_path: Path) -> None:
    """A process that stops replaying keeps its logs open until it next replays (it sweeps only
    then): another's sweep removes them and empties them, so they hold no data meanwhile."""
    machine_id = a_machine_id()
    idle = open_record(machine_id, str(tmp_path))
    busy = open_record(machine_id, str(tmp_path))  # another worker of the Machine
    assert isinstance(idle, DirectoryRecord)
    assert isinstance(busy, DirectoryRecord)
    before = open_descriptors()
    assert all(idle.add(key(f"/p{n}/"), TTL, now=NOW) for n in range(100))
    (held,) = open_descriptors() - before
    assert busy.add(key("/later/"), TTL, now=NOW + TTL + 2)  # its sweep, once idle's expired
    assert os.listdir(idle.root) == [f"{math.ceil(NOW + TTL + 2 + TTL)}.log"]
    assert (os.fstat(held).st_nlink, os.fstat(held).st_size) == (0, 0)
    busy.drop_files()
    assert idle.add(key("/back/"), TTL, now=NOW + TTL + 3)  # idle again: it closes its old log
    (log,) = open_descriptors() - before
    assert os.fstat(log).st_nlink == 1  # its new one
    idle.drop_files()
    assert open_descriptors() == before


def test_the_bound_is_the_machines_when_its_workers_fill_it_at_once(tmp_path: Path) -> None:
    """Two workers that both swept an empty record fill it before either sees the other's
    entries: the Machine's first `limit` unconsumed entries explain fallbacks, no more (so a
    fallback reads no more than the limit's worth of lines), as entries beyond a full record."""
    machine_id = a_machine_id()
    first = open_record(machine_id, str(tmp_path), limit=4)
    second = open_record(machine_id, str(tmp_path), limit=4)
    assert isinstance(first, DirectoryRecord)
    assert isinstance(second, DirectoryRecord)
    assert first.sweep(now=NOW) == second.sweep(now=NOW) == 0  # both saw it empty
    firsts, seconds = [key(f"/a{n}/") for n in range(4)], [key(f"/b{n}/") for n in range(4)]
    assert all(first.add(k, TTL, now=NOW) for k in firsts)
    assert all(second.add(k, TTL, now=NOW) for k in seconds)  # 8 lines: 4 beyond the limit
    assert not any(second.take(k, now=NOW) for k in seconds)
    assert first.take(firsts[0], now=NOW)
    assert second.take(seconds[0], now=NOW)  # one consumed: the next line is within the limit
    assert not second.take(seconds[2], now=NOW)  # 4 unconsumed before it (a1 to a3, b1)
    assert second.take(seconds[1], now=NOW)


def test_a_cleaned_temp_dir_is_made_again(tmp_path: Path) -> None:
    record = open_record(a_machine_id(), str(tmp_path))
    record.clear()  # /tmp cleaned under the Machine's feet
    assert record.add(key(), TTL, now=NOW)
    assert record.take(key(), now=NOW)


# ------------------------------------------------------------------------ across OS processes


def run(target: Callable[..., None], *args: Any) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    return process


@pytest.mark.e2e
def test_each_replay_explains_one_fallback_whichever_worker_receives_it(tmp_path: Path) -> None:
    spawn = multiprocessing.get_context("spawn")
    machine_id, base, count = a_machine_id(), str(tmp_path), 20
    results = spawn.Queue()
    issuer = run(procs.record, base, machine_id, count, results)
    assert results.get(timeout=60) == ("recorded", [True] * count)
    issuer.join(60)
    start = spawn.Barrier(2)
    workers = [run(procs.consume, base, machine_id, count, start, n, results) for n in "ab"]
    got = dict(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(60)
    accepted = got["a"] + got["b"]
    assert sorted(accepted) == list(range(count))  # every replay explained one fallback: none lost
    assert len(accepted) == count  # and only one: of the 40 fallbacks, 20 were refused
    assert [w.exitcode for w in [issuer, *workers]] == [0, 0, 0]


@pytest.mark.e2e
def test_workers_appending_at_once_tear_no_line_and_each_entry_is_taken_once(
    tmp_path: Path,
) -> None:
    spawn = multiprocessing.get_context("spawn")
    machine_id, base, workers, count = a_machine_id(), str(tmp_path), 3, 2000
    start, results = spawn.Barrier(workers), spawn.Queue()
    appenders = [
        run(procs.append, base, machine_id, n * count, count, start, results)
        for n in range(workers)
    ]
    assert [results.get(timeout=60) for _ in appenders] == [True] * workers
    for appender in appenders:
        appender.join(60)
    record = open_record(machine_id, base)
    assert isinstance(record, DirectoryRecord)
    (log,) = Path(record.root).iterdir()  # all of the same second
    lines = log.read_bytes().split(b"\n")
    assert lines.pop() == b""
    keys = [procs.key_of(n) for n in range(workers * count)]
    assert sorted(line.decode() for line in lines) == sorted(keys)  # each line whole, once
    assert all(record.take(k, now=procs.NOW) for k in keys)
    assert not any(record.take(k, now=procs.NOW) for k in keys)


@pytest.mark.e2e
@needs_proc
def test_a_forked_worker_holds_none_of_its_parents_logs() -> None:
    record = machine_record(a_machine_id())
    before = open_descriptors()
    assert record.add(key(), TTL, now=NOW)
    (log,) = open_descriptors() - before
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its descriptors, then leave without pytest's teardown
        try:
            os.write(write, json.dumps(sorted(open_descriptors())).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        held = set(json.loads(answer.read()))
    os.waitpid(pid, 0)
    assert log not in held
    assert held <= before | {read, write}


@pytest.mark.e2e
def test_a_fallback_reaching_another_worker_of_the_machine_runs_there(
    settings: SettingsWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue A: the worker that issued the replay is not the one Fly Proxy brings it back to."""
    settings.MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
    machine_id = a_machine_id()
    results = multiprocessing.get_context("spawn").Queue()
    base = default_base()  # this test session's, shared with the worker as /dev/shm would be
    worker = run(procs.replay_through_the_middleware, base, machine_id, results)
    issued_after, header = results.get(timeout=120)
    worker.join(60)
    assert FlyReplay.parse(header).instance == PDF_MACHINE
    failed = {"fly-replay-failed": ReplayFailed(instance=PDF_MACHINE, reason="timeout").to_header()}
    with (
        installed(routing_manager()),
        override_role(MAIN, MachineEnv(machine_id=machine_id)),
    ):
        # The fallbacks come back while the entry lives, however slowly the worker ran.
        monkeypatch.setattr(machine_record(machine_id), "clock", lambda: issued_after)
        back = Client().get("/routing/pdf/", headers=failed)
        forged = Client().get("/routing/pdf/", headers=failed)
    assert (back.status_code, back.content) == (200, b"pdf")
    assert forged.status_code == 503


# ------------------------------------------------------------------------ through the middleware


@pytest.fixture(params=[None, "machine"])
def on_main(request: pytest.FixtureRequest) -> Iterator[StaticPools]:
    """An app Machine: in-process record (no Machine id), or its Machine's directory."""
    env = MachineEnv(machine_id=a_machine_id()) if request.param else None
    with installed(routing_manager()) as manager, override_role(MAIN, env):
        yield manager


def test_forged_failures_after_one_replay_run_the_view_once_and_evict_once(
    on_main: StaticPools, settings: SettingsWrapper
) -> None:
    """The security review's attack: one ordinary request (a replay is issued for it), then three
    forged `fly-replay-failed` for the same URL. The first is indistinguishable from the replay's
    own fallback; the other two explain nothing."""
    settings.MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
    client = Client()
    assert "fly-replay" in client.get("/routing/pdf/")
    failed = {"fly-replay-failed": ReplayFailed(instance=PDF_MACHINE, reason="timeout").to_header()}
    answers = [client.get("/routing/pdf/", headers=failed) for _ in range(3)]
    assert (answers[0].status_code, answers[0].content) == (200, b"pdf")
    assert [r.status_code for r in answers[1:]] == [503, 503]
    assert all(r["Retry-After"] for r in answers[1:])
    assert on_main.forgotten == [("pdf", PDF_MACHINE)]  # one eviction, not three


def test_a_fallback_with_another_query_or_body_is_refused(
    on_main: StaticPools, settings: SettingsWrapper
) -> None:
    settings.MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
    client = Client()
    failed = {"fly-replay-failed": "reason=timeout"}
    assert "fly-replay" in client.get("/routing/pdf/?page=1")
    assert "fly-replay" in client.post("/routing/upload/", b"a", content_type="text/plain")
    assert client.get("/routing/pdf/?page=2", headers=failed).status_code == 503
    other = client.post("/routing/upload/", b"b", content_type="text/plain", headers=failed)
    assert other.status_code == 503
    assert client.get("/routing/pdf/?page=1", headers=failed).content == b"pdf"
    same = client.post("/routing/upload/", b"a", content_type="text/plain", headers=failed)
    assert same.status_code == 200
    assert on_main.forgotten == []  # "reason=timeout" names no Machine


def test_a_replay_records_itself_with_one_entry(settings: SettingsWrapper) -> None:
    settings.MIDDLEWARE = ["flyfn.middleware.FlyReplayMiddleware"]
    machine_id = a_machine_id()
    with installed(routing_manager()), override_role(MAIN, MachineEnv(machine_id=machine_id)):
        for _ in range(3):
            assert "fly-replay" in Client().get("/routing/pdf/")
    root = Path(default_base(), f"flyfn-{machine_id}", "replays")
    assert sum(p.stat().st_size for p in root.iterdir()) == 3 * ENTRY_SIZE
