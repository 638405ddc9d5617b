"""Small files written ahead by the stager while the tree worker applies the batch
before (omirror/staging.py, Ahead): taken when they are still what is applied, and never
in the way of a directory a peer deleted."""

from __future__ import annotations

import asyncio
import os
import types
from pathlib import Path

import pytest
import xxhash

from omirror import config, staging
from omirror.apply import Applier
from omirror.entry import Entry, Kind, Stamp
from omirror.receive import Receiver, _Entries
from omirror.resolve import Resolver
from omirror.scanner import MARKER, Scanner
from omirror.staging import TEMP_FLAGS, CreateCost, TempFile
from omirror.store import Store
from omirror.wire import EntryMsg, Passed

DISTFILE = "( /data ) -> ( alpha beta ) install ;\n"
T0 = 2 * 10**18


class Host:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        (self.root / "data").mkdir(parents=True)
        (self.root / "data" / os.fsdecode(MARKER)).write_bytes(b"marker\n")
        self.mset = config.parse(DISTFILE, "test.conf").sets[0]
        self.store = Store.open(tmp_path / "state")
        self.scanner = Scanner(self.store, "alpha")
        self.applier = Applier(os.fsencode(self.root), self.store, "alpha")
        self.scanner.scan_set(self.mset, os.fsencode(self.root))
        self.resolver = Resolver(self.store, self.applier, self.scanner)

    def temps(self, directory: str) -> list[str]:
        return sorted(n for n in os.listdir(self.root / "data" / directory)
                      if n.startswith(".omirror"))


@pytest.fixture
def host(tmp_path: Path) -> Host:
    h = Host(tmp_path)
    yield h
    h.store.close()


def _dir(path: bytes, t: int) -> tuple[Entry, None]:
    return Entry(path, Kind.DIR, Stamp(t, "beta"), vector=(("beta", t),), mode=0o755,
                 owner="root", group="root", mtime_ns=10**18), None


def _file(path: bytes, t: int) -> tuple[Entry, bytes]:
    content = b"content of %s at %d\n" % (path, t)
    return Entry(path, Kind.FILE, Stamp(t, "beta"), vector=(("beta", t),), mode=0o644,
                 owner="root", group="root", mtime_ns=10**18, size=len(content),
                 digest=xxhash.xxh3_128(content).digest()), content


def _gone(path: bytes, t: int) -> tuple[Entry, None]:
    return Entry(path, Kind.TOMBSTONE, Stamp(t, "beta"), vector=(("beta", t),)), None


def test_files_written_ahead_are_installed_without_being_written_again(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    first = [_dir(b"data/d", T0)]
    second = [_file(b"data/d/f%d" % i, T0 + 1 + i) for i in range(5)]
    assert host.resolver.batch("beta", [host.mset], first, lambda p: None) == [None]
    staged = host.resolver.stage([host.mset], second)
    assert len(staged) == 5 and len(host.temps("d")) == 5
    assert all(t.is_synced for t in staged.temps.values())
    made: list[bytes] = []
    init = TempFile.__init__

    def counted(self: TempFile, *args: object, **kw: object) -> None:
        made.append(args[1].path)  # type: ignore[attr-defined]
        init(self, *args, **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(TempFile, "__init__", counted)
    outcomes = host.resolver.batch("beta", [host.mset], second, lambda p: None, staged)
    assert outcomes == [None] * 5 and made == []
    for entry, data in second:
        assert (host.root / os.fsdecode(entry.path)).read_bytes() == data
    assert host.temps("d") == []


def test_what_was_written_ahead_for_another_version_is_removed(host: Host) -> None:
    host.resolver.batch("beta", [host.mset], [_dir(b"data/d", T0)], lambda p: None)
    staged = host.resolver.stage([host.mset], [_file(b"data/d/f", T0 + 1)])
    assert len(host.temps("d")) == 1
    newer = _file(b"data/d/f", T0 + 2)
    assert host.resolver.batch("beta", [host.mset], [newer], lambda p: None, staged) \
        == [None]
    assert (host.root / "data" / "d" / "f").read_bytes() == newer[1]
    assert host.temps("d") == []


def test_a_directory_a_peer_deleted_goes_though_files_for_it_were_written_ahead(
        host: Host) -> None:
    """Another link's tombstone, a retry, or a batch the stager did not see can delete
    a directory while temp files written ahead sit in it. Kept as "not empty here",
    the directory would be recorded again, newer than the deletion, and come back on
    every peer: the temp files are dropped, and the directory goes."""
    host.resolver.batch("beta", [host.mset], [_dir(b"data/d", T0)], lambda p: None)
    staged = host.resolver.stage([host.mset], [_file(b"data/d/f", T0 + 5)])
    assert len(host.temps("d")) == 1
    assert host.resolver.batch("beta", [host.mset], [_gone(b"data/d", T0 + 1)],
                               lambda p: None) == [None]
    assert not (host.root / "data" / "d").exists()
    record = host.store.get(b"data/d")
    assert record is not None and record.entry.kind is Kind.TOMBSTONE
    assert len(staged) == 0  # dropped: the batch it was for writes its files itself


def test_a_directory_replaced_by_a_file_goes_though_files_for_it_were_written_ahead(
        host: Host) -> None:
    host.resolver.batch("beta", [host.mset], [_dir(b"data/d", T0)], lambda p: None)
    host.resolver.stage([host.mset], [_file(b"data/d/f", T0 + 5)])
    replacing = _file(b"data/d", T0 + 1)
    assert host.resolver.batch("beta", [host.mset], [replacing], lambda p: None) == [None]
    assert (host.root / "data" / "d").read_bytes() == replacing[1]


def test_a_directory_with_a_file_of_its_own_is_still_kept(host: Host) -> None:
    host.resolver.batch("beta", [host.mset], [_dir(b"data/d", T0)], lambda p: None)
    host.resolver.stage([host.mset], [_file(b"data/d/f", T0 + 5)])
    fd = os.open(host.root / "data" / "d" / "local", TEMP_FLAGS)  # made here meanwhile
    os.close(fd)
    host.resolver.batch("beta", [host.mset], [_gone(b"data/d", T0 + 1)], lambda p: None)
    assert os.listdir(host.root / "data" / "d") == ["local"]


def test_nothing_is_written_ahead_below_a_directory_those_entries_delete(host: Host) -> None:
    host.resolver.batch("beta", [host.mset], [_dir(b"data/d", T0)], lambda p: None)
    staged = host.resolver.stage([host.mset], [_gone(b"data/d", T0 + 1),
                                               _file(b"data/d/f", T0 + 2)])
    assert len(staged) == 0 and host.temps("d") == []


def test_what_was_written_ahead_for_a_batch_that_never_runs_is_removed(host: Host) -> None:
    host.resolver.batch("beta", [host.mset], [_dir(b"data/d", T0)], lambda p: None)
    staged = host.resolver.stage([host.mset], [_file(b"data/d/f%d" % i, T0 + 1 + i)
                                               for i in range(3)])
    assert len(host.temps("d")) == 3
    host.applier.ahead.drop(staged)
    assert host.temps("d") == []


def test_the_receivers_queue_shows_what_is_behind_a_batch_without_taking_it() -> None:
    async def run() -> None:
        queue = _Entries(maxsize=10)
        msgs = [EntryMsg(i + 1, _file(b"data/f%d" % i, T0 + i)[0], None) for i in range(3)]
        for msg in msgs:
            await queue.put(msg)
        await queue.put(Passed(9))
        assert queue.peek(2) == msgs[:2] and queue.qsize() == 4
        assert await queue.get() is msgs[0]
        assert queue.peek(10) == [*msgs[1:], Passed(9)]
        assert not queue.empty()
    asyncio.run(run())


def test_files_are_written_ahead_only_where_creating_one_is_slow() -> None:
    """The stager's own work competes with the tree worker for the interpreter: where
    creating a file is quick it costs more than the overlap gains, so it waits for
    creates to be slow, as measured on the last files made (CPU time, not time spent
    waiting for the interpreter)."""
    cost = CreateCost()
    assert not cost.slow()
    for _ in range(100):
        cost.note(20e-6)
    assert not cost.slow()
    for _ in range(100):
        cost.note(600e-6)
    assert cost.slow()
    for _ in range(100):
        cost.note(20e-6)
    assert not cost.slow()


def test_a_receiver_writes_nothing_ahead_while_creating_files_is_quick(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    async def stage(*args: object) -> None:
        calls.append(args)

    async def run() -> tuple[object, object]:
        receiver = Receiver.__new__(Receiver)
        receiver.ctx = types.SimpleNamespace(  # type: ignore[assignment]
            stage=stage, resolver=types.SimpleNamespace(stage=None),
            sets_with=lambda peer: [])
        receiver.peer = "beta"
        receiver.entries = _Entries(maxsize=10)
        await receiver.entries.put(EntryMsg(1, *_file(b"data/f", T0)))
        monkeypatch.setattr(staging.CREATE_COST, "mean_s", 10e-6)
        quick = receiver._stage_next()
        monkeypatch.setattr(staging.CREATE_COST, "mean_s", 1e-3)
        slow = receiver._stage_next()
        if slow is not None:
            await slow
        return quick, slow
    quick, slow = asyncio.run(run())
    assert quick is None and slow is not None and len(calls) == 1
