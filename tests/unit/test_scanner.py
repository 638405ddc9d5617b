"""The scanner on real trees: what it records, what it skips, and what it refuses."""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from omirror import config
from omirror import scanner as scanner_module
from omirror.entry import Entry, Kind, Stamp
from omirror.errors import RootError
from omirror.scanner import MARKER, Scanner
from omirror.store import StatSig, Store

MTIME_NS = 1_600_000_000_123_456_789
DISTFILE = """HOSTS = ( alpha beta )
FILES = ( /data )
${{FILES}} -> ${{HOSTS}}
    install ;
{extra}"""


def mirror_set(extra: str = "") -> config.MirrorSet:
    return config.parse(DISTFILE.format(extra=extra), "test.conf").sets[0]


class Tree:
    """A host: a root with /data in it, a store, a scanner."""

    def __init__(self, base: Path, extra: str = "") -> None:
        self.base = base
        self.data = base / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.mset = mirror_set(extra)
        self.store = Store.open(base / "state")
        self.clock_ns = 10**18
        self.scanner = Scanner(self.store, "alpha", clock=lambda: self.clock_ns)

    def scan(self, **kw: object) -> scanner_module.ScanStats:
        stats = self.scanner.scan_set(self.mset, os.fsencode(self.base), **kw)  # type: ignore
        self.store.new = False  # as the daemon does after its startup scan
        return stats

    def entry(self, rel: str | bytes):  # type: ignore[no-untyped-def]
        path = b"data/" + (rel if isinstance(rel, bytes) else rel.encode())
        record = self.store.get(path.rstrip(b"/"))
        return None if record is None else record.entry

    def log(self) -> list[tuple[bytes, Kind]]:
        return [(r.entry.path, r.entry.kind) for r in self.store.since(0)]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    t = Tree(tmp_path)
    yield t
    t.store.close()


def test_first_scan_records_every_kind_with_digest_and_a_stamp_before_its_mtime(
        tree: Tree) -> None:
    """The first scan of a store with no history stamps what it finds just before its
    content was last modified: when it was copied or restored here (its ctime) says
    nothing of when it was made. Once the store has history, a new path gets its ctime."""
    (tree.data / "sub").mkdir()
    (tree.data / "sub" / "a.txt").write_bytes(b"hello")
    os.chmod(tree.data / "sub" / "a.txt", 0o640)
    (tree.data / "link").symlink_to("sub/a.txt")
    stats = tree.scan()
    assert (stats.files, stats.symlinks, stats.dirs, stats.new) == (1, 1, 2, 4)
    a = tree.entry("sub/a.txt")
    st = os.lstat(tree.data / "sub" / "a.txt")
    assert a.kind is Kind.FILE and a.size == 5 and a.mode == 0o640
    assert a.digest == xxhash.xxh3_128(b"hello").digest()
    assert a.stamp.time_ns == min(st.st_mtime_ns, st.st_ctime_ns) - 1
    assert a.stamp.origin == "alpha"
    assert a.mtime_ns == st.st_mtime_ns and a.owner == "root"
    assert tree.entry("link").target == b"sub/a.txt"
    assert tree.entry("sub").kind is Kind.DIR
    assert tree.store.get(b"data").entry.kind is Kind.DIR
    assert (tree.data / os.fsdecode(MARKER)).exists()
    assert tree.entry(MARKER) is None
    tree.store.new = False  # the daemon says so once its startup scan is done
    (tree.data / "b.txt").write_bytes(b"later")
    os.utime(tree.data / "b.txt", ns=(0, 10**18))  # an old mtime, as cp -p leaves
    tree.scan()
    assert tree.entry("b.txt").stamp.time_ns == os.lstat(tree.data / "b.txt").st_ctime_ns


def test_no_change_rescan_records_and_hashes_nothing(tree: Tree) -> None:
    for i in range(50):
        (tree.data / f"f{i}").write_bytes(b"x" * i)
    tree.scan()
    seq = tree.store.last_seq
    stats = tree.scan()
    assert stats.recorded == 0 and stats.hashed == 0 and stats.unchanged == 51
    assert tree.store.last_seq == seq


def test_modified_file_gets_a_successor_version(tree: Tree) -> None:
    f = tree.data / "f"
    f.write_bytes(b"one")
    tree.scan()
    before = tree.entry("f")
    f.write_bytes(b"two!")
    stats = tree.scan()
    after = tree.entry("f")
    assert stats.changed == 1 and stats.hashed == 1
    assert after.stamp > before.stamp and after.digest != before.digest
    assert dict(after.vector)["alpha"] == after.stamp.time_ns


def test_touch_without_change_updates_the_signature_only(tree: Tree) -> None:
    f = tree.data / "f"
    f.write_bytes(b"same")
    tree.scan()
    seq = tree.store.last_seq
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # ctime moves, content does not
    stats = tree.scan()
    assert stats.recorded == 0 and stats.hashed == 1 and tree.store.last_seq == seq
    assert tree.scan().hashed == 0  # the new signature is remembered


def test_chmod_is_a_change_without_rehash_of_content_semantics(tree: Tree) -> None:
    f = tree.data / "f"
    f.write_bytes(b"x")
    tree.scan()
    os.chmod(f, 0o600)
    assert tree.scan().changed == 1
    assert tree.entry("f").mode == 0o600


def test_a_change_of_extended_attributes_alone_is_a_new_version(tree: Tree) -> None:
    f = tree.data / "f"
    f.write_bytes(b"x")
    (tree.data / "d").mkdir()
    os.setxattr(f, b"user.b", b"2")
    os.setxattr(f, b"trusted.t", b"never mirrored")
    tree.scan()
    first = tree.entry("f")
    assert first.xattrs == ((b"user.b", b"2"),)
    os.setxattr(f, b"user.a", b"1")
    os.setxattr(tree.data / "d", b"user.dir", b"3")
    stats = tree.scan()
    assert stats.changed == 2 and stats.hashed == 1
    second = tree.entry("f")
    assert second.stamp > first.stamp and second.digest == first.digest
    assert second.xattrs == ((b"user.a", b"1"), (b"user.b", b"2"))
    assert tree.entry("d").xattrs == ((b"user.dir", b"3"),)
    os.removexattr(f, b"user.a")
    os.removexattr(f, b"user.b")
    assert tree.scan().changed == 1 and tree.entry("f").xattrs == ()
    tree.scan()
    f.unlink()
    tree.scan()
    assert tree.entry("f").is_tombstone and tree.entry("f").xattrs == ()


def test_a_set_without_attributes_keeps_what_it_recorded(tmp_path: Path) -> None:
    """A host whose set says noxattrs neither reads attributes nor drops the ones a
    peer's version carries: a local edit keeps them in its version."""
    tree = Tree(tmp_path, extra="")
    tree.mset = mirror_set().__class__(**{
        **{f: getattr(tree.mset, f) for f in ("label", "files", "hosts", "excepts",
                                              "except_pats", "specials", "line")},
        "options": config.InstallOptions(noxattrs=True)})
    f = tree.data / "f"
    f.write_bytes(b"x")
    os.setxattr(f, b"user.local", b"1")
    tree.scan()
    assert tree.entry("f").xattrs == ()
    record = tree.store.get(b"data/f")
    assert record is not None
    carried = ((b"user.peer", b"2"),)
    from dataclasses import replace as _replace
    tree.store.put(_replace(record.entry, xattrs=carried), record.sig)
    f.write_bytes(b"edited")
    assert tree.scan().changed == 1
    assert tree.entry("f").xattrs == carried
    tree.store.close()


def test_deleted_directory_becomes_tombstones_children_first(tree: Tree) -> None:
    (tree.data / "d" / "e").mkdir(parents=True)
    (tree.data / "d" / "e" / "f").write_bytes(b"1")
    (tree.data / "d" / "g").write_bytes(b"2")
    tree.scan()
    for p in ("d/e/f", "d/g"):
        (tree.data / p).unlink()
    (tree.data / "d" / "e").rmdir()
    (tree.data / "d").rmdir()
    tree.clock_ns = 2 * 10**18
    stats = tree.scan()
    assert stats.deleted == 4
    tombs = [p for p, k in tree.log() if k is Kind.TOMBSTONE]
    assert tombs.index(b"data/d/e/f") < tombs.index(b"data/d/e") < tombs.index(b"data/d")
    assert tree.entry("d/g").stamp.time_ns == 2 * 10**18


def test_file_renamed_in_the_tree_is_found_by_inode_and_not_rehashed(tree: Tree) -> None:
    (tree.data / "a").write_bytes(b"content" * 1000)
    tree.scan()
    digest = tree.entry("a").digest
    (tree.data / "a").rename(tree.data / "b")
    stats = tree.scan()
    assert stats.moved == 1 and stats.hashed == 0 and stats.deleted == 1
    b = tree.entry("b")
    assert b.moved_from == b"data/a" and b.digest == digest
    order = [p for p, _ in tree.log()]
    assert order.index(b"data/b") < order.index(b"data/a")  # new name before old tombstone


def test_renamed_directory_moves_its_files_without_reading_them(tree: Tree) -> None:
    (tree.data / "old" / "deep").mkdir(parents=True)
    for i in range(20):
        (tree.data / "old" / "deep" / f"f{i}").write_bytes(os.urandom(4096))
    tree.scan()
    (tree.data / "old").rename(tree.data / "new")
    stats = tree.scan()
    assert stats.hashed == 0 and stats.moved == 22 and stats.deleted == 22
    assert tree.entry("new/deep/f3").moved_from == b"data/old/deep/f3"
    # a file that came with the directory is stamped no earlier than the rename (the
    # directory's ctime), not by its own older ctime: that would let an older version
    # made elsewhere at the new path beat a rename made after it
    renamed_at = os.lstat(tree.data / "new").st_ctime_ns
    assert tree.entry("new/deep/f3").stamp.time_ns >= renamed_at
    assert tree.entry("new").stamp.time_ns >= renamed_at
    # the same when the directory is renamed over an empty one (no longer a rename to
    # the scanner, which sees the path's directory replaced)
    (tree.data / "empty").mkdir()
    tree.scan()
    os.rename(tree.data / "new", tree.data / "empty")
    tree.scan()
    replaced_at = os.lstat(tree.data / "empty").st_ctime_ns
    assert tree.entry("empty/deep/f3").stamp.time_ns >= replaced_at


def test_hard_link_is_not_taken_for_a_rename(tree: Tree) -> None:
    (tree.data / "a").write_bytes(b"x")
    tree.scan()
    os.link(tree.data / "a", tree.data / "b")
    stats = tree.scan()
    assert stats.moved == 0 and stats.deleted == 0 and tree.entry("b").moved_from is None


def test_excluded_paths_are_neither_recorded_nor_walked(tmp_path: Path) -> None:
    t = Tree(tmp_path, "    except /data/cache ;\n    except_pat ( \\.swp$ ) ;\n")
    (t.data / "cache" / "x").mkdir(parents=True)
    (t.data / "a.swp").write_bytes(b"s")
    (t.data / "keep").write_bytes(b"k")
    stats = t.scan()
    assert {p for p, _ in t.log()} == {b"data", b"data/keep"}
    assert stats.dirs == 1
    t.store.close()


def test_excluding_a_recorded_path_later_deletes_nothing(tmp_path: Path) -> None:
    t = Tree(tmp_path)
    (t.data / "a.swp").write_bytes(b"s")
    t.scan()
    t.store.close()
    t2 = Tree(tmp_path, "    except_pat ( \\.swp$ ) ;\n")
    assert t2.scan().deleted == 0
    t2.store.close()


def test_own_files_are_never_recorded(tree: Tree) -> None:
    (tree.data / ".omirror-tmp-123").write_bytes(b"partial")
    (tree.data / "x.omirror-conflict-beta-1").write_bytes(b"user data")
    tree.scan()
    paths = {p for p, _ in tree.log()}
    assert b"data/.omirror-tmp-123" not in paths
    assert b"data/x.omirror-conflict-beta-1" in paths


def test_the_versions_area_is_never_scanned_nor_swept(tree: Tree) -> None:
    """What ``savetargets`` kept (omirror/versions.py) is no data of the tree."""
    area = tree.data / ".omirror-versions" / "d"
    area.mkdir(parents=True)
    (area / "a~20240501-093000").write_bytes(b"an old version")
    (tree.data / "a").write_bytes(b"now")
    tree.scan()
    paths = {p for p, _ in tree.log()}
    assert b"data/a" in paths
    assert not any(b".omirror-versions" in p for p in paths), paths
    assert (area / "a~20240501-093000").read_bytes() == b"an old version"


def test_non_utf8_names_are_recorded_as_bytes(tree: Tree) -> None:
    name = b"caf\xe9-\xff.txt"
    with open(os.path.join(os.fsencode(tree.data), name), "wb") as f:
        f.write(b"latin-1")
    tree.scan()
    assert tree.entry(name).size == 7


def test_special_files_are_skipped_and_logged_once(tree: Tree,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    os.mkfifo(tree.data / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tree.data / "sock"))
    try:
        with caplog.at_level(logging.INFO, logger="omirror.scanner"):
            assert tree.scan().special == 2
            assert tree.scan().special == 2
    finally:
        sock.close()
    assert tree.entry("fifo") is None and tree.entry("sock") is None
    notes = [r for r in caplog.records if "special file" in r.getMessage()]
    assert len(notes) == 2


def test_symlinks_are_never_followed(tree: Tree, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    (tree.data / "escape").symlink_to(outside)
    tree.scan()
    assert tree.entry("escape").kind is Kind.SYMLINK
    assert tree.entry("escape/secret") is None


def test_missing_root_stops_the_set_and_records_nothing(tmp_path: Path) -> None:
    t = Tree(tmp_path)
    (t.data / "f").write_bytes(b"x")
    t.scan()
    seq = t.store.last_seq
    (t.data / "f").unlink()
    (t.data / os.fsdecode(MARKER)).unlink()
    t.data.rmdir()
    with pytest.raises(RootError, match=r"root /data is missing here .*nothing is deleted"):
        t.scan()
    assert t.store.last_seq == seq
    t.store.close()


def test_root_that_lost_its_marker_is_not_a_mass_deletion(tree: Tree) -> None:
    for i in range(10):
        (tree.data / f"f{i}").write_bytes(b"x")
    tree.scan()
    seq = tree.store.last_seq
    for p in tree.data.iterdir():
        p.unlink()  # what an unmounted disk looks like: an empty directory
    with pytest.raises(RootError, match=r"lost its marker .*touch "):
        tree.scan()
    assert tree.store.last_seq == seq and tree.entry("f3").kind is Kind.FILE


def test_file_changing_while_hashed_is_left_for_later(tree: Tree,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    f = tree.data / "busy"
    f.write_bytes(b"a" * 10)
    real_pread = os.pread

    def read_while_writing(fd: int, n: int, offset: int) -> bytes:
        if offset == 0:  # every attempt sees a writer at work
            with open(f, "ab") as w:
                w.write(b"more")
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", read_while_writing)
    stats = tree.scan()
    assert stats.unstable == [b"data/busy"] and tree.entry("busy") is None


def test_unreadable_directory_keeps_what_is_below_it(tree: Tree,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tree.data / "locked").mkdir()
    (tree.data / "locked" / "f").write_bytes(b"x")
    tree.scan()
    real_scandir = os.scandir

    def scandir(fd):  # type: ignore[no-untyped-def]
        # the scanner lists open directories: which one this is, /proc says
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(fd)

    monkeypatch.setattr(scanner_module.os, "scandir", scandir)
    stats = tree.scan()
    assert stats.deleted == 0 and stats.unreadable == [(b"data/locked", "Permission denied")]
    assert tree.entry("locked/f").kind is Kind.FILE


def test_dry_run_lists_changes_and_writes_nothing(tree: Tree) -> None:
    (tree.data / "f").write_bytes(b"x")
    stats = tree.scan(dry_run=True)
    assert {e.path for e in stats.changes} == {b"data", b"data/f"}
    assert tree.store.count() == 0 and not (tree.data / os.fsdecode(MARKER)).exists()


def test_subtree_scan_sees_only_its_subtree(tree: Tree) -> None:
    (tree.data / "a").mkdir()
    (tree.data / "b").mkdir()
    (tree.data / "b" / "old").write_bytes(b"x")
    tree.scan()
    (tree.data / "a" / "new").write_bytes(b"n")
    (tree.data / "b" / "old").unlink()
    stats = tree.scan(subtree=b"data/a")
    assert stats.new == 1 and stats.deleted == 0
    assert tree.entry("b/old").kind is Kind.FILE


def test_recreated_file_continues_the_history_of_its_tombstone(tree: Tree) -> None:
    f = tree.data / "f"
    f.write_bytes(b"1")
    tree.scan()
    f.unlink()
    tree.clock_ns = 3 * 10**18
    tree.scan()
    tomb = tree.entry("f")
    f.write_bytes(b"2")
    tree.scan()
    again = tree.entry("f")
    assert again.kind is Kind.FILE and again.stamp > tomb.stamp
    assert dict(again.vector)["alpha"] == again.stamp.time_ns


def test_file_replaced_by_directory_changes_kind(tree: Tree) -> None:
    f = tree.data / "x"
    f.write_bytes(b"1")
    tree.scan()
    f.unlink()
    f.mkdir()
    (f / "inner").write_bytes(b"2")
    tree.scan()
    assert tree.entry("x").kind is Kind.DIR and tree.entry("x/inner").kind is Kind.FILE


def test_root_checks(tmp_path: Path) -> None:
    """A root is opened as every reader opens it (omirror/fsio.py), through descriptors:
    these checks need a real file system (pyfakefs has no O_PATH nor dir_fd walks)."""
    r = tmp_path / "r"
    (r / "data").mkdir(parents=True)
    (r / "file").write_bytes(b"")
    (r / "real").mkdir()
    os.symlink("real", r / "link")
    mset = mirror_set()
    base = os.fsencode(r)
    with Store.open(":memory:") as store:
        scanner = Scanner(store, "alpha")
        with pytest.raises(RootError, match="root /data is missing here"):
            scanner.check_root(mset, base + b"/nowhere", b"data")
        with pytest.raises(RootError, match="is not a directory"):
            scanner.check_root(mset, base, b"file")
        with pytest.raises(RootError, match="is a symlink; FILES entries must name"):
            scanner.check_root(mset, base, b"link")
        scanner.check_root(mset, base, b"data", dry_run=True)
        assert not (r / "data" / ".omirror-root").exists()
        scanner.check_root(mset, base, b"data")
        assert stat.S_ISREG(os.lstat(r / "data" / ".omirror-root").st_mode)


def test_a_root_is_reached_only_through_symlinks_root_owns(tmp_path: Path) -> None:
    """An administrator's /srv -> /data/srv is followed on the way to a root; a symlink
    on the way that a local user made (they could point it anywhere: another tree, /)
    is refused, and the set stops instead of mirroring what it leads to."""
    (tmp_path / "disk" / "data").mkdir(parents=True)
    os.symlink(tmp_path / "disk", tmp_path / "srv")
    mset = mirror_set()
    base = os.fsencode(tmp_path / "srv")
    with Store.open(":memory:") as store:
        scanner = Scanner(store, "alpha")
        scanner.check_root(mset, base, b"data")
        assert (tmp_path / "disk" / "data" / ".omirror-root").exists()
        os.lchown(tmp_path / "srv", 65534, 65534)
        with pytest.raises(RootError, match="owned by uid 65534"):
            scanner.check_root(mset, base, b"data")


def test_scan_paths_examines_named_paths_alone_or_recursively(tree: Tree) -> None:
    (tree.data / "d").mkdir()
    (tree.data / "d" / "x").write_bytes(b"1")
    tree.scan()
    (tree.data / "d" / "x").write_bytes(b"changed")
    (tree.data / "d" / "y").write_bytes(b"new")
    os.chmod(tree.data / "d", 0o700)
    alone = tree.scanner.scan_paths(tree.mset, os.fsencode(tree.base), [(b"data/d", False)])
    assert alone.changed == 1 and tree.entry("d/y") is None  # the directory only
    walked = tree.scanner.scan_paths(tree.mset, os.fsencode(tree.base), [(b"data/d", True)])
    assert (walked.new, walked.changed) == (1, 1)


def test_scan_paths_finds_a_rename_named_by_both_its_paths(tree: Tree) -> None:
    (tree.data / "a").write_bytes(b"content")
    tree.scan()
    (tree.data / "a").rename(tree.data / "b")
    stats = tree.scanner.scan_paths(tree.mset, os.fsencode(tree.base),
                                    [(b"data/a", False), (b"data/b", False)])
    assert stats.moved == 1 and stats.hashed == 0 and stats.deleted == 1
    assert tree.entry("a").kind is Kind.TOMBSTONE


def test_scan_paths_ignores_own_files_and_paths_outside_the_set(tree: Tree) -> None:
    (tree.data / ".omirror-tmp-1").write_bytes(b"x")
    tree.scan()
    seq = tree.store.last_seq
    stats = tree.scanner.scan_paths(tree.mset, os.fsencode(tree.base),
                                    [(b"data/.omirror-tmp-1", False), (b"elsewhere/x", False)])
    assert stats.recorded == 0 and tree.store.last_seq == seq


def test_startup_sweep_removes_temp_files_of_interrupted_transfers(tree: Tree) -> None:
    (tree.data / "d").mkdir()
    (tree.data / "d" / ".omirror-tmp-0123abcd").write_bytes(b"half a file")
    (tree.data / ".omirror-root-not-a-temp").write_bytes(b"kept")
    tree.scan()
    assert (tree.data / "d" / ".omirror-tmp-0123abcd").exists()  # only when asked
    tree.scan(sweep=True)
    assert not (tree.data / "d" / ".omirror-tmp-0123abcd").exists()
    assert (tree.data / ".omirror-root-not-a-temp").exists()


def test_force_rehashes_files_whose_stat_did_not_change(tree: Tree) -> None:
    from omirror.store import StatSig

    f = tree.data / "f"
    f.write_bytes(b"original")
    tree.scan()
    f.write_bytes(b"ORIGINAL")  # same size; the store is then told this stat is known,
    tree.store.set_sig(b"data/f", Kind.FILE, StatSig.of(os.lstat(f)))  # as bit rot hides
    assert tree.scan(dry_run=True).changes == []  # the stat fast path trusts it
    forced = tree.scan(dry_run=True, force=True)
    assert forced.hashed >= 1 and [e.path for e in forced.changes] == [b"data/f"]


def test_a_directory_made_anew_in_place_is_a_new_version(tree: Tree) -> None:
    """A directory replaced by another (same mode) is no change to a comparison of
    attributes, but it is a new directory made after whatever deleted the old one
    elsewhere: it must be a version of its own, stamped when it was made, or an older
    deletion from a peer removes it. (rmdir then mkdir can get the same inode number
    back from the file system; that case cannot be told from no change.)"""
    (tree.data / "d").mkdir()
    tree.scan()
    first = tree.entry("d")
    (tree.data / "new").mkdir()  # made while the old one exists: another inode
    os.rmdir(tree.data / "d")
    os.rename(tree.data / "new", tree.data / "d")
    stats = tree.scan()
    again = tree.entry("d")
    assert stats.changed == 1 and again.stamp > first.stamp
    assert again.stamp.time_ns >= os.lstat(tree.data / "d").st_ctime_ns


def test_a_path_expected_absent_is_no_longer_once_something_is_recorded_there(
        tree: Tree) -> None:
    """A path a peer's rename moved away here is left to that peer's tombstone; once the
    path holds something again and that is recorded, its next deletion is ours."""
    tree.scanner.expected_absent.add(b"data/p")
    (tree.data / "p").write_bytes(b"mine")
    tree.scan()
    assert b"data/p" not in tree.scanner.expected_absent
    os.unlink(tree.data / "p")
    tree.scan()
    assert tree.entry("p").is_tombstone


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_path_renamed_over_with_the_same_content_is_a_new_version(tree: Tree,
                                                                     kind: str) -> None:
    """`mv a b` where b held the same content is the user's act on b, newer than what
    b held: it must beat an older change to b made elsewhere. A copy put there (a tree
    restored from a backup: new inodes, none of them tracked) is no new version."""
    for name in ("a", "b", "c"):
        if kind == "file":  # all alike, their mtimes too
            (tree.data / name).write_bytes(b"same content")
            os.utime(tree.data / name, ns=(MTIME_NS, MTIME_NS))
        else:
            (tree.data / name).symlink_to("same/target")
    tree.scan()
    before = tree.entry("b")
    os.rename(tree.data / "a", tree.data / "b")
    stats = tree.scan()
    after = tree.entry("b")
    assert after.stamp > before.stamp and stats.changed == 1, stats
    assert after.stamp.time_ns == os.lstat(tree.data / "b").st_ctime_ns
    assert tree.entry("a").is_tombstone

    restored = tree.entry("c")
    if kind == "file":  # restored with its mtime, as backups are
        (tree.data / "c.new").write_bytes(b"same content")
        os.utime(tree.data / "c.new", ns=(restored.mtime_ns, restored.mtime_ns))
    else:
        (tree.data / "c.new").symlink_to("same/target")
    os.rename(tree.data / "c.new", tree.data / "c")  # c.new was never recorded
    seq = tree.store.last_seq
    tree.scan()
    assert tree.entry("c") == restored and tree.store.last_seq == seq


def test_a_new_directory_on_a_reused_inode_is_not_taken_for_a_rename(tree: Tree) -> None:
    """ext4 soon gives a deleted directory's inode number to a new one: the new directory
    is a new path, not the old one renamed (which this host never did)."""
    (tree.data / "new").mkdir()
    st = os.lstat(tree.data / "new")
    # the store as it was before the old directory went: recorded with the inode number
    # the new one has now, and its own (older) mtime
    entry = Entry(path=b"data/gone", kind=Kind.DIR, stamp=Stamp(10**18, "alpha"),
                  vector=(("alpha", 10**18),), mode=0o755, owner="root", group="root")
    tree.store.put(entry, StatSig(st.st_ino, st.st_size, st.st_mtime_ns - 10**9,
                                  st.st_ctime_ns - 10**9))
    tree.scan()
    assert tree.entry("new").moved_from is None
    assert tree.entry("gone").is_tombstone


def test_files_of_a_renamed_directory_whose_mtime_moved_are_stamped_at_its_arrival(
        tree: Tree) -> None:
    """`mv old new; touch new/x` before the scan: the directory no longer looks renamed
    (its mtime moved), but what it brought arrived with it, not at its own old ctime."""
    (tree.data / "old").mkdir()
    (tree.data / "old" / "f").write_bytes(b"content")
    tree.scan()
    (tree.data / "old").rename(tree.data / "new")
    (tree.data / "new" / "x").write_bytes(b"made after the rename")
    tree.scan()
    arrived = os.lstat(tree.data / "new").st_ctime_ns
    assert tree.entry("new/f").stamp.time_ns >= arrived
    assert tree.entry("new/f").moved_from == b"data/old/f"


RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): swap two names atomically, as a local user can."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_a_directory_swapped_for_a_symlink_mid_scan_never_reads_outside(
        tree: Tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local user swaps ``data/d`` with a symlink to a directory outside the tree right
    after the scanner listed ``d``. Whatever it does next (stat, open, hash) must reach
    the file it listed, never the one beyond the link: a scan that re-resolved the path
    read the outside file as root and recorded it, to be sent to every peer."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"SENTINEL: never mirrored")
    (tree.data / "d").mkdir()
    (tree.data / "d" / "f").write_bytes(b"inside")
    os.symlink(outside, tree.data / "s")
    tree.scan()
    (tree.data / "d" / "f").write_bytes(b"inside, changed")  # to be hashed again
    real_scandir = os.scandir

    class Swapping:
        def __init__(self, listing: Iterator[os.DirEntry[Any]]) -> None:
            self.listing = listing

        def __enter__(self) -> Swapping:
            return self

        def __exit__(self, *exc: object) -> None:
            self.listing.close()  # type: ignore[attr-defined]

        def __iter__(self) -> Iterator[os.DirEntry[Any]]:
            for entry in self.listing:
                if entry.name in ("f", b"f"):
                    _exchange(tree.data / "d", tree.data / "s")
                yield entry

    def scandir(where: Any) -> Swapping:
        listing = real_scandir(where)
        name = os.readlink(f"/proc/self/fd/{where}") if isinstance(where, int) \
            else os.fsdecode(where)
        return Swapping(listing) if name.endswith("/data/d") else listing  # type: ignore

    monkeypatch.setattr(os, "scandir", scandir)
    tree.scan()
    sentinel = xxhash.xxh3_128(b"SENTINEL: never mirrored").digest()
    recorded = [r.entry for r in tree.store.since(0) if r.entry.kind is Kind.FILE]
    assert recorded and all(e.digest != sentinel for e in recorded), recorded


def test_follow_follows_only_symlinks_root_owns(tmp_path: Path) -> None:
    """``install -ofollow`` mirrors what a symlink leads to. omirrord reads as root, and a
    symlink a local user made could lead anywhere (``/etc/shadow``): only links owned by
    root (or the daemon's user) are followed; a user's link is mirrored as the link."""
    t = Tree(tmp_path)
    t.mset = config.parse(DISTFILE.format(extra="").replace("install ;", "install -ofollow ;"),
                          "test.conf").sets[0]
    assert t.mset.options.follow
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shared.txt").write_bytes(b"an administrator's file")
    (outside / "secret").write_bytes(b"SENTINEL: never mirrored")
    os.symlink(outside / "shared.txt", t.data / "by-root")
    os.symlink(outside / "secret", t.data / "by-user")
    os.lchown(t.data / "by-user", 65534, 65534)
    t.scan()
    by_root, by_user = t.entry("by-root"), t.entry("by-user")
    assert by_root.kind is Kind.FILE
    assert by_root.digest == xxhash.xxh3_128(b"an administrator's file").digest()
    assert by_user.kind is Kind.SYMLINK and by_user.target == os.fsencode(outside / "secret")
    t.store.close()


@pytest.mark.parametrize("replacement", ["symlink", "file"])
def test_a_directory_replaced_by_a_file_or_symlink_deletes_what_it_held(
        tree: Tree, tmp_path: Path, replacement: str) -> None:
    """No walk goes below a path that is no longer a directory: the records below it
    must become tombstones when the path is recorded anew, and before its new version,
    so that a receiver has emptied the directory when it is asked to replace it (seen
    when a user swapped a directory and a symlink: the receiver kept the directory with
    stale files, and retried 'not empty here' for ever)."""
    (tree.data / "d" / "sub").mkdir(parents=True)
    (tree.data / "d" / "sub" / "f").write_bytes(b"x")
    (tree.data / "d" / "g").write_bytes(b"y")
    tree.scan()
    moved = tmp_path / "moved-away"
    os.rename(tree.data / "d", moved)
    if replacement == "symlink":
        os.symlink(moved, tree.data / "d")
    else:
        (tree.data / "d").write_bytes(b"now a file")
    stats = tree.scanner.scan_paths(tree.mset, os.fsencode(tree.base), [(b"data/d", False)])
    assert stats.deleted == 3
    for gone in ("d/sub/f", "d/sub", "d/g"):
        assert tree.entry(gone).is_tombstone, gone
    order = [path for path, _ in tree.log()]
    assert order.index(b"data/d") > max(order.index(b"data/d/sub/f"),
                                        order.index(b"data/d/sub"), order.index(b"data/d/g"))


def _until_ctime_passes(probe: Path, ns: int) -> None:
    """Wait (1 s at most) until the file system's clock, which ticks coarsely, is past
    ``ns``: two changes then get ctimes that tell them apart."""
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        probe.write_bytes(b"")
        if os.lstat(probe).st_ctime_ns > ns:
            return
    raise AssertionError("the file system clock did not move in 1 s")


def test_a_file_carried_back_by_a_directory_renamed_away_and_back_is_stamped_by_the_return(
        tree: Tree) -> None:
    """d is renamed to e and back before the daemon looked at d again: its record is
    still live, while the file's old path has its tombstone. The file is back with the
    ctime it had before (a rename leaves it): stamped by that, it would be older than
    its own deletion, and a version made elsewhere in between would beat the return."""
    (tree.data / "d").mkdir()
    (tree.data / "d" / "f").write_bytes(b"carried")
    tree.scan()
    base = os.fsencode(tree.base)
    made_at = os.lstat(tree.data / "d" / "f").st_ctime_ns
    _until_ctime_passes(tree.base / "probe", made_at + 10_000_000)
    os.rename(tree.data / "d", tree.data / "e")
    tree.clock_ns = made_at + 1  # the deletion is seen right after the file was made
    # the file's event came first: its move is recorded, the directory's is not yet
    tree.scanner.scan_paths(tree.mset, base, [(b"data/e/f", False)])
    assert tree.entry("d/f").is_tombstone and not tree.entry("d").is_tombstone
    os.rename(tree.data / "e", tree.data / "d")
    back_at = os.lstat(tree.data / "d").st_ctime_ns
    tree.scanner.scan_paths(tree.mset, base, [(b"data/d", True)])
    f = tree.entry("d/f")
    assert f.kind is Kind.FILE and f.stamp.time_ns >= back_at


def test_what_a_renamed_directory_holds_is_stamped_by_its_arrival_in_a_later_walk_too(
        tree: Tree) -> None:
    """The directory's own event is taken alone first, and the walk below it comes in a
    later run: the files it carried are still stamped no earlier than its arrival."""
    (tree.data / "d").mkdir()
    (tree.data / "d" / "f").write_bytes(b"carried")
    tree.scan()
    made_at = os.lstat(tree.data / "d" / "f").st_ctime_ns
    _until_ctime_passes(tree.base / "probe", made_at + 10_000_000)
    os.rename(tree.data / "d", tree.data / "e")
    arrived_at = os.lstat(tree.data / "e").st_ctime_ns
    base = os.fsencode(tree.base)
    tree.scanner.scan_paths(tree.mset, base, [(b"data/e", False)])
    assert tree.entry("e").kind is Kind.DIR and tree.entry("e/f") is None
    tree.scanner.scan_paths(tree.mset, base, [(b"data/e", True)])
    assert tree.entry("e/f").stamp.time_ns >= arrived_at > made_at


# -- hard links --------------------------------------------------------------------------

def test_names_of_one_inode_found_together_name_each_other(tree: Tree) -> None:
    """A catch-up scan finds both names in one directory: each version's link hint names
    the other, so a receiver links whichever arrives second."""
    (tree.data / "a").write_bytes(b"shared")
    os.link(tree.data / "a", tree.data / "b")
    (tree.data / "lone").write_bytes(b"one name")
    tree.scan()
    assert (tree.entry("a").link, tree.entry("b").link) == (b"data/b", b"data/a")
    assert tree.entry("lone").link == b""


def test_a_new_link_names_the_recorded_name_which_is_not_a_new_version(tree: Tree) -> None:
    (tree.data / "a").write_bytes(b"shared")
    tree.scan()
    seq_a = tree.store.get(b"data/a").seq  # type: ignore[union-attr]
    os.link(tree.data / "a", tree.data / "b")
    stats = tree.scanner.scan_paths(tree.mset, os.fsencode(tree.base), [(b"data/b", False)])
    assert stats.new == 1 and stats.changed == 0
    assert tree.entry("b").link == b"data/a"
    # its ctime moved with the link count: looked at again, the same version
    held = tree.store.get(b"data/a")
    assert held is not None and held.seq == seq_a
    assert held.sig == StatSig.of(os.lstat(tree.data / "a"))


def test_content_written_through_one_name_gives_every_name_a_new_version(tree: Tree) -> None:
    """The other names change without an event of their own: they are examined too."""
    (tree.data / "a").write_bytes(b"old")
    (tree.data / "sub").mkdir()
    os.link(tree.data / "a", tree.data / "sub" / "b")
    tree.scan()
    with open(tree.data / "a", "r+b") as f:  # in place: the inode stays
        f.write(b"new content")
    stats = tree.scanner.scan_paths(tree.mset, os.fsencode(tree.base), [(b"data/a", False)])
    assert stats.changed == 2
    a, b = tree.entry("a"), tree.entry("sub/b")
    assert a.digest == b.digest == xxhash.xxh3_128_digest(b"new content")
    assert b.link == b"data/a"  # recorded after a: holds the same content


def test_a_hint_never_names_a_path_outside_the_set_or_excluded(tmp_path: Path) -> None:
    t = Tree(tmp_path, "    except /data/private ;\n")
    (t.data / "private").mkdir()
    (t.data / "a").write_bytes(b"x")
    os.link(t.data / "a", t.data / "private" / "b")
    os.link(t.data / "a", tmp_path / "outside")
    t.scan()
    assert t.entry("a").link == b""
    t.store.close()


def test_links_outside_the_set_are_warned_of_unless_ignlnks(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """rdist's "N missing links", once per inode per scan."""
    def missing(extra: str, base: Path) -> list[str]:
        t = Tree(base, extra)
        (t.data / "private").mkdir()
        (t.data / "a").write_bytes(b"x")
        os.link(t.data / "a", t.data / "b")
        os.link(t.data / "a", t.data / "private" / "c")
        os.link(t.data / "a", base / "outside")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="omirror.scanner"):
            t.scan()
        t.store.close()
        return [r.getMessage() for r in caplog.records if "missing links" in r.getMessage()]

    warned = missing("    except /data/private ;\n", tmp_path / "one")
    assert len(warned) == 1 and "2 missing links" in warned[0]
    assert "has 4 names, 2 of them in the set" in warned[0]
    assert missing("    install -oignlnks ;\n    except /data/private ;\n",
                   tmp_path / "two") == []


def test_missing_links_are_told_once_until_their_count_changes(
        tree: Tree, caplog: pytest.LogCaptureFixture) -> None:
    """Every write to such a file is a scan run of its own: one warning, not one per
    write, until the links change."""
    (tree.data / "a").write_bytes(b"x")
    os.link(tree.data / "a", tree.base / "outside")
    with caplog.at_level(logging.WARNING, logger="omirror.scanner"):
        tree.scan()
        for n in range(3):
            (tree.data / "a").write_bytes(b"write %d" % n)
            tree.scanner.scan_paths(tree.mset, os.fsencode(tree.base), [(b"data/a", False)])
        os.link(tree.data / "a", tree.base / "outside2")
        (tree.data / "a").write_bytes(b"after a new link")
        tree.scanner.scan_paths(tree.mset, os.fsencode(tree.base), [(b"data/a", False)])
    told = [r.getMessage() for r in caplog.records if "missing link" in r.getMessage()]
    assert len(told) == 2 and "1 missing link:" in told[0] and "2 missing links" in told[1]


def test_all_names_in_the_set_warn_of_nothing(tree: Tree,
                                              caplog: pytest.LogCaptureFixture) -> None:
    (tree.data / "d").mkdir()
    (tree.data / "a").write_bytes(b"x")
    os.link(tree.data / "a", tree.data / "d" / "b")
    with caplog.at_level(logging.WARNING, logger="omirror.scanner"):
        tree.scan()
    assert not [r for r in caplog.records if "missing links" in r.getMessage()]
