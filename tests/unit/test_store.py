"""The store: versions, the sequence, cursors, tombstones, and what survives a crash."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from omirror.entry import Entry, Kind, Stamp, first_version
from omirror.errors import StoreError
from omirror.store import FAST, Cursor, Resume, StatSig, Store


def version(path: bytes, t: int, kind: Kind = Kind.FILE, origin: str = "alpha",
            **attrs: object) -> Entry:
    return first_version(path, kind, Stamp(t, origin), **attrs)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "state")
    yield s
    s.close()


def test_entry_round_trips_every_field(store: Store) -> None:
    entry = Entry(path=b"srv/www/caf\xe9.html", kind=Kind.FILE, stamp=Stamp(5, "beta"),
                  vector=(("alpha", 3), ("beta", 5)), mode=0o640, owner="www", group="adm",
                  mtime_ns=123, size=9, digest=b"\x01" * 16, target=b"", moved_from=b"old\xff",
                  link=b"srv/www/other\xfe")
    sig = StatSig(ino=42, size=9, mtime_ns=123, ctime_ns=456)
    seq = store.put(entry, sig)
    got = store.get(entry.path)
    assert got is not None
    assert got.entry == entry and got.entry.moved_from == b"old\xff"
    assert got.entry.link == b"srv/www/other\xfe"  # a hint: kept, though not compared
    assert [r.entry.link for r in store.since(0)] == [b"srv/www/other\xfe"]
    assert got.sig == sig and got.seq == seq


def test_every_change_gets_the_next_seq_and_since_lists_latest_versions(store: Store) -> None:
    a1 = store.put(version(b"a", 1), None)
    b1 = store.put(version(b"b", 2), None)
    a2 = store.put(version(b"a", 3), None)
    assert a1 < b1 < a2 == store.last_seq
    assert [(r.entry.path, r.seq) for r in store.since(0)] == [(b"b", b1), (b"a", a2)]
    assert [r.entry.path for r in store.since(b1)] == [b"a"]
    assert list(store.since(a2)) == []


def test_since_pages_through_large_logs_in_order(store: Store) -> None:
    with store.batch():
        for i in range(2500):
            store.put(version(b"f%05d" % i, i), None)
    seqs = [r.seq for r in store.since(10)]
    assert len(seqs) == 2490 and seqs == sorted(seqs) and seqs[0] == 11


def test_epoch_is_random_per_store_and_kept_across_reopen(tmp_path: Path) -> None:
    one, two = Store.open(tmp_path / "one"), Store.open(tmp_path / "two")
    try:
        assert one.epoch and two.epoch and one.epoch != two.epoch
        epoch = one.epoch
    finally:
        one.close()
        two.close()
    with Store.open(tmp_path / "one") as again:
        assert again.epoch == epoch


def test_failed_batch_commits_nothing_and_reuses_no_seq(store: Store) -> None:
    store.put(version(b"kept", 1), None)
    before = store.last_seq
    with pytest.raises(RuntimeError), store.batch():
        store.put(version(b"lost1", 2), None)
        store.put(version(b"lost2", 3), None)
        raise RuntimeError("boom")
    assert store.get(b"lost1") is None and store.get(b"lost2") is None
    assert store.last_seq == before
    assert store.put(version(b"next", 4), None) == before + 1


def test_listeners_hear_of_commits_only(store: Store) -> None:
    heard: list[int] = []
    store.add_listener(heard.append)
    with store.batch():
        store.put(version(b"a", 1), None)
        with store.batch():
            store.put(version(b"b", 2), None)
        assert heard == []  # the inner batch does not commit
    assert heard == [store.last_seq]
    with pytest.raises(ValueError), store.batch():
        store.put(version(b"c", 3), None)
        raise ValueError
    store.set_sig(b"a", Kind.FILE, StatSig(1, 2, 3, 4))  # not a change: no seq, nothing to hear
    assert heard == [2]


def test_signatures_are_fast_path_tuples_of_one_directory(store: Store) -> None:
    store.put(version(b"d/x", 1), StatSig(7, 10, 20, 30))
    store.put(version(b"d/y", 2, Kind.SYMLINK), None)
    store.put(version(b"d/sub/z", 3), StatSig(8, 1, 2, 3))
    sigs = store.signatures(b"d")
    assert sigs == {b"x": FAST.pack(Kind.FILE, 7, 10, 20, 30),
                    b"y": FAST.pack(Kind.SYMLINK, -1, 0, 0, 0)}


def test_set_sig_and_set_vector_do_not_log_a_change(store: Store) -> None:
    seq = store.put(version(b"a", 1), None)
    store.set_sig(b"a", Kind.FILE, StatSig(1, 2, 3, 4))
    store.set_vector(b"a", (("alpha", 1), ("beta", 9)))
    got = store.get(b"a")
    assert got is not None and got.seq == seq == store.last_seq
    assert got.sig == StatSig(1, 2, 3, 4) and got.entry.vector == (("alpha", 1), ("beta", 9))


def test_under_lists_a_subtree_and_nothing_beside_it(store: Store) -> None:
    for p in (b"a/b", b"a/b/c", b"a/b/c/d", b"a/bc", b"a/b0", b"a/b.x", b"a"):
        store.put(version(p, 1), None)
    assert sorted(r.entry.path for r in store.under(b"a/b")) == [b"a/b", b"a/b/c", b"a/b/c/d"]


def test_by_inode_finds_live_records_only(store: Store) -> None:
    store.put(version(b"live", 1), StatSig(99, 1, 1, 1))
    store.put(version(b"dead", 2, Kind.TOMBSTONE), StatSig(99, 1, 1, 1))
    assert [r.entry.path for r in store.by_inode(99)] == [b"live"]


def test_collecting_tombstones_records_the_floor(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        old = store.put(version(b"old", 100, Kind.TOMBSTONE), None)
        store.put(version(b"live", 50), None)
        young = store.put(version(b"young", 10**12, Kind.TOMBSTONE), None)
        assert store.collect_tombstones(older_than_ns=1000) == 1
        assert store.get(b"old") is None and store.get(b"live") is not None
        assert store.get(b"young") is not None
        assert store.floor == old
        assert store.collect_tombstones(older_than_ns=1000) == 0
    with Store.open(tmp_path) as store:
        assert store.floor == old and store.last_seq == young


def test_last_seq_survives_collection_of_the_newest_change(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        store.put(version(b"a", 1), None)
        top = store.put(version(b"gone", 5, Kind.TOMBSTONE), None)
        store.collect_tombstones(older_than_ns=10)
    with Store.open(tmp_path) as store:
        assert store.put(version(b"b", 7), None) == top + 1


def test_cursors_persist(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        assert store.cursor("beta") is None
        store.set_cursor("beta", Cursor("e1", 10))
        store.set_cursor("beta", Cursor("e1", 12))
        store.set_cursor("gamma", Cursor("e2", 3))
    with Store.open(tmp_path) as store:
        assert store.cursor("beta") == Cursor("e1", 12)
        assert store.cursors() == {"beta": Cursor("e1", 12), "gamma": Cursor("e2", 3)}


def test_a_link_begins_where_its_pusher_may_have_left_something_out(tmp_path: Path) -> None:
    """A pusher left out the versions of the hosts it was told were linked here, each
    since the seq where it was told (the lowest, if told twice). A new link from it
    trusts on the hosts linked here still; for the others it starts again at the oldest
    of their seqs, and up to the cursor sends only their versions. Their records stay
    until that is applied, so that a crash in between asks again."""
    with Store.open(tmp_path) as store:
        store.set_cursor("beta", Cursor("e1", 500))
        store.trust("beta", "e1", ["gamma"], 120)
        store.trust("beta", "e1", ["delta", "gamma"], 300)  # gamma keeps its earlier seq
        store.trust("beta", "e1", ["omega"], 600)  # beyond the cursor: nothing left out
        store.trust("zeta", "e1", ["gamma"], 7)  # another pusher's
        assert store.trusts("beta") == {"gamma": 120, "delta": 300, "omega": 600}
        assert store.begin_receiving("beta", "e1", ["delta"]) == Resume(
            Cursor("e1", 500), 120, 500, ("gamma",))
    with Store.open(tmp_path) as store:
        assert store.cursor("beta") == Cursor("e1", 500)
        assert store.trusts("beta") == {"gamma": 120, "delta": 120}
        assert store.trusts("zeta") == {"gamma": 7}
        store.untrust("beta", ["gamma"])  # sent again, and applied
        assert store.begin_receiving("beta", "e1", []) == Resume(
            Cursor("e1", 500), 120, 500, ("delta",))
        # the peer's store is new: nothing of the old epoch is asked for
        assert store.begin_receiving("beta", "e2", ["gamma"]) == Resume(
            Cursor("e1", 500), 0, 0, ())
        assert store.trusts("beta") == {"gamma": 0}
        assert store.begin_receiving("omega", "e9", ["gamma"]) == Resume(None, 0, 0, ())


def test_a_trust_advances_never_back_and_only_for_its_origin_and_epoch(
        tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        store.trust("beta", "e1", ["gamma", "delta"], 10)
        store.trust("zeta", "e1", ["gamma"], 10)
        store.trust("psi", "e1", ["gamma"], 10)
        store.advance_trust("gamma", {"beta": ("e1", 50), "zeta": ("e1", 4),
                                      "psi": ("e0", 90), "omega": ("e1", 99)})
        assert store.trusts("beta") == {"gamma": 50, "delta": 10}
        assert store.trusts("zeta") == {"gamma": 10}
        assert store.trusts("psi") == {"gamma": 10}  # another epoch's seqs
        assert store.trusts("omega") == {}


def test_a_file_that_is_not_a_database_is_refused_with_the_remedy(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=r"cannot open state database .*move it aside"):
        Store.open(tmp_path)


def test_a_store_of_another_schema_is_refused(tmp_path: Path) -> None:
    Store.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute("UPDATE meta SET value=99 WHERE key='schema'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="has schema 99"):
        Store.open(tmp_path)


_WRITER = textwrap.dedent("""
    import sys
    from omirror.entry import first_version, Kind, Stamp
    from omirror.store import Store
    store = Store.open(sys.argv[1])
    for b in range(10**6):
        with store.batch():
            for i in range(50):
                entry = first_version(b"f%d/%d" % (b, i), Kind.FILE, Stamp(b * 100 + i, "a"))
                store.put(entry, None)
        print(store.last_seq, flush=True)
""")


def test_kill_9_between_transactions_loses_nothing_committed(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        committed = 0
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while committed < 2000 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "the writer died before it was killed"
            committed = int(line)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
    assert committed >= 2000
    with Store.open(tmp_path) as store:
        assert store.last_seq >= committed
        assert store.count() >= committed
        seqs = [r.seq for r in store.since(0)]
        assert seqs[:committed] == list(range(1, committed + 1))


def test_the_database_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    Store.open(tmp_path / "state").close()
    assert (tmp_path / "state" / "state.db").stat().st_mode & 0o777 == 0o600


def _old_store(db: Path, schema: int) -> None:
    """A store as an omirrord of that schema wrote it, holding one version."""
    from omirror import store as store_module

    gone = ",\n    xattrs BLOB,\n    link BLOB NOT NULL DEFAULT x''"
    if schema < 2:
        gone = ",\n    uid INTEGER NOT NULL DEFAULT -1,\n    gid INTEGER NOT NULL DEFAULT -1" \
            + gone
    assert gone in store_module._SCHEMA
    conn = sqlite3.connect(db)
    conn.executescript(store_module._SCHEMA.replace(gone, ""))
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [("schema", schema),
                                                         ("epoch", "e" * 32),
                                                         ("floor", 0), ("last_seq", 1)])
    conn.execute("INSERT INTO entries (path, dir, seq, kind, stamp_ns, origin, vector, mode, "
                 "owner, grp, mtime_ns, size, digest, target, moved_from, sig_ino, fast) "
                 "VALUES (?,?,1,1,5,'beta',?,420,'root','root',0,1,?,?,NULL,NULL,?)",
                 (b"data/f", b"data", msgpack.packb([["beta", 5]]), b"\0" * 16, b"",
                  store_module.fast_sig(1, None)))
    conn.commit()
    conn.close()


@pytest.mark.parametrize("schema", [1, 2])
def test_a_store_of_an_older_schema_is_read_and_upgraded(tmp_path: Path, schema: int) -> None:
    """Schema 2 added the numeric owner ids, schema 3 the extended attributes and the link
    hint. A store written by an omirrord before them is read as it is by --check (which
    writes nothing), and upgraded in place by a daemon: its versions keep everything,
    with ids not known (-1), no attributes and no link hint."""
    from omirror import store as store_module

    db = tmp_path / store_module.DB_NAME
    _old_store(db, schema)
    with Store.open_readonly(tmp_path) as old:
        record = old.get(b"data/f")
        assert record is not None and (record.entry.owner, record.entry.uid) == ("root", -1)
        assert record.entry.link == b"" and record.entry.xattrs == ()
    attrs = ((b"system.posix_acl_access", b"user::rw-"), (b"user.a", b"\0\xff"))
    with Store.open(tmp_path) as upgraded:
        record = upgraded.get(b"data/f")
        assert record is not None and record.entry.stamp == Stamp(5, "beta")
        assert (record.entry.uid, record.entry.gid, record.entry.link) == (-1, -1, b"")
        upgraded.put(replace(record.entry, uid=0, gid=0, link=b"data/g", xattrs=attrs), None)
        got = upgraded.get(b"data/f")
        assert got is not None and (got.entry.uid, got.entry.link) == (0, b"data/g")
        assert got.entry.xattrs == attrs
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == 3
    conn.close()
    with Store.open(tmp_path) as again:  # reopened: the link hint stayed
        got = again.get(b"data/f")
        assert got is not None and got.entry.link == b"data/g"


def test_a_transaction_reads_its_own_writes_through_its_record_cache(tmp_path: Path) -> None:
    """A batch remembers the records it read (a receiver reads each path several times);
    every write of a path, and the end of the transaction, drops what it holds."""
    store = Store.open(tmp_path / "state")
    first = Entry(b"data/f", Kind.FILE, Stamp(1, "alpha"), size=1, digest=b"\x01" * 16)
    store.put(first, None)
    with store.batch():
        assert store.get(b"data/f").entry == first
        second = replace(first, stamp=Stamp(2, "beta"))
        store.put(second, None)
        assert store.get(b"data/f").entry == second
        store.set_vector(b"data/f", (("alpha", 1), ("beta", 2)))
        assert store.get(b"data/f").entry.vector == (("alpha", 1), ("beta", 2))
        assert store.get(b"data/g") is None
        store.put(replace(first, path=b"data/g"), None)
        assert store.get(b"data/g") is not None
    try:
        with store.batch():
            store.put(replace(first, stamp=Stamp(3, "gamma")), None)
            assert store.get(b"data/f").entry.stamp == Stamp(3, "gamma")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    assert store.get(b"data/f").entry.stamp == Stamp(2, "beta")
    store.close()


def test_committed_reads_never_see_a_transaction_in_progress(tmp_path: Path) -> None:
    """The pushers read what is committed, beside the tree worker's open transaction,
    without waiting for it (and never a version that could still roll back)."""
    store = Store.open(tmp_path / "state")
    entry = Entry(b"data/f", Kind.FILE, Stamp(1, "alpha"), size=1, digest=b"\x01" * 16)
    store.put(entry, None)
    done = threading.Event()
    seen: list[object] = []

    def reader() -> None:
        seen.append(store.committed(b"data/f"))
        seen.append([r.entry.stamp for r in store.since(0)])
        done.set()
    with store.batch():
        store.put(replace(entry, stamp=Stamp(2, "beta")), None)
        thread = threading.Thread(target=reader)
        thread.start()
        assert done.wait(10), "a committed read waited for the transaction"
    thread.join(10)
    assert seen[0] is not None and seen[0].entry.stamp == Stamp(1, "alpha")  # type: ignore[attr-defined]
    assert seen[1] == [Stamp(1, "alpha")]
    assert store.committed(b"data/f").entry.stamp == Stamp(2, "beta")
    store.close()


def test_a_page_leaves_one_origins_versions_out_but_ends_where_the_log_ended(
        store: Store) -> None:
    """A pusher's peer made the versions of one origin: they are left out in SQLite.
    The log's last record is always in, so that the pusher's position passes what was
    left out, and a full page ends at its last record, so nothing is passed unsent."""
    with store.batch():
        seqs = {name: store.put(version(name, i, origin=origin), None)
                for i, (name, origin) in enumerate(
                    [(b"b1", "beta"), (b"a1", "alpha"), (b"b2", "beta"), (b"a2", "alpha"),
                     (b"b3", "beta"), (b"b4", "beta")])}

    def page(seq: int, limit: int) -> list[bytes]:
        return [r.entry.path for r in store.page(seq, limit, skip_origins=("beta",))]
    assert page(0, 10) == [b"a1", b"a2", b"b4"]  # b4: where the log ends
    assert page(0, 2) == [b"a1", b"a2"]  # full: b3 and b4 not passed
    assert page(seqs[b"a2"], 10) == [b"b4"]
    assert page(seqs[b"b4"], 10) == []
    assert [r.entry.path for r in store.page(0, 3)] == [b"b1", b"a1", b"b2"]
    store.put(version(b"a3", 9), None)
    assert page(seqs[b"a2"], 10) == [b"a3"]


def test_holds_exactly_is_the_recorded_stamp_and_history_only(store: Store) -> None:
    v = version(b"data/a", 10)
    assert not store.holds_exactly(b"data/a", v.stamp, v.vector)
    store.put(v, None)
    assert store.holds_exactly(b"data/a", v.stamp, v.vector)
    assert not store.holds_exactly(b"data/a", Stamp(10, "beta"), v.vector)
    assert not store.holds_exactly(b"data/a", v.stamp, (*v.vector, ("beta", 3)))
    with store.batch():  # a version written in the open transaction, read from its cache
        newer = v.successor(Stamp(11, "alpha"))
        store.put(newer, None)
        assert store.get(b"data/a") is not None
        assert store.holds_exactly(b"data/a", newer.stamp, newer.vector)
        assert not store.holds_exactly(b"data/a", v.stamp, v.vector)
