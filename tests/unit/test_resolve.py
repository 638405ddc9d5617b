"""The resolver on real temporary trees: one peer's entries decided and applied here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash

from omirror import config
from omirror.apply import Applier
from omirror.entry import Entry, Kind, Stamp
from omirror.errors import PathRefused
from omirror.resolve import Need, Purpose, Resolver, check_entry
from omirror.scanner import MARKER, Scanner
from omirror.store import Store

DISTFILE = "( /data ) -> ( alpha beta ) install ;\n"


def test_fetched_content_lands_where_a_peers_rename_took_the_file_away(
        tmp_path: Path) -> None:
    """A peer renamed f0 away (applied here: f0 moved, its tombstone to follow) and at
    once made a new, larger f0 (fetched, not inline), so that tombstone never comes. The
    fetched version must be installed: comparing the disk with the old record for ever
    ("it keeps changing here") left the path missing on this host for good."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / os.fsdecode(MARKER)).write_bytes(b"marker\n")
    (root / "data" / "f0").write_bytes(b"old content\n")
    mset = config.parse(DISTFILE, "test.conf").sets[0]
    store = Store.open(tmp_path / "state")
    scanner = Scanner(store, "alpha")
    applier = Applier(os.fsencode(root), store, "alpha")
    scanner.expected_absent = applier.expected_absent
    scanner.scan_set(mset, os.fsencode(root))
    old = store.get(b"data/f0")
    assert old is not None
    moved = Entry(b"data/f0-moved", Kind.FILE, Stamp(2 * 10**18, "beta"),
                  vector=(("beta", 2 * 10**18),), mode=0o644, owner="root", group="root",
                  mtime_ns=old.entry.mtime_ns, size=old.entry.size, digest=old.entry.digest,
                  moved_from=b"data/f0")
    applier.copy_local(mset, moved, b"data/f0", move=True)
    content = os.urandom(100_000)
    new = Entry(b"data/f0", Kind.FILE, Stamp(3 * 10**18, "beta"),
                vector=(("beta", 3 * 10**18),), mode=0o644, owner="root", group="root",
                mtime_ns=10**18, size=len(content), digest=xxhash.xxh3_128(content).digest())

    resolver = Resolver(store, applier, scanner)
    temp = applier.begin_file(mset, new)
    temp.write(content)
    resolver.install("beta", [mset], Need(mset, new, Purpose.INSTALL), temp)
    assert (root / "data" / "f0").read_bytes() == content
    assert store.get(b"data/f0").entry.stamp == new.stamp
    store.close()


@pytest.mark.parametrize("kind, attrs, why", [
    (Kind.FILE, ((b"trusted.overlay.opaque", b"y"),), "not one omirror mirrors"),
    (Kind.DIR, ((b"system.posix_acl_default", b"user:rwx"),), "ACL entry"),
    (Kind.SYMLINK, ((b"user.a", b"1"),), "a symlink entry with extended attributes"),
    (Kind.TOMBSTONE, ((b"user.a", b"1"),), "a tombstone entry with extended attributes"),
])
def test_a_peers_entry_with_attributes_no_peer_makes_is_refused(
        kind: Kind, attrs: tuple[tuple[bytes, bytes], ...], why: str) -> None:
    entry = Entry(path=b"data/x", kind=kind, stamp=Stamp(5, "beta"), xattrs=attrs,
                  digest=b"\0" * 16 if kind is Kind.FILE else b"",
                  target=b"t" if kind is Kind.SYMLINK else b"")
    with pytest.raises(PathRefused, match=why):
        check_entry(entry)
    check_entry(Entry(path=b"data/x", kind=Kind.FILE, stamp=Stamp(5, "beta"),
                      digest=b"\0" * 16, xattrs=((b"user.a", b"1"),)))


def test_applied_files_symlinks_and_their_deletions_are_reported_after_the_commit(
        tmp_path: Path) -> None:
    """What runs specials (omirror/specials.py): a peer's file, symlink, or the deletion
    of one, told once its batch has committed; a directory, a version that loses to
    ours, and a local change are not."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / os.fsdecode(MARKER)).write_bytes(b"marker\n")
    mset = config.parse("( /data ) -> ( alpha beta ) install ; special \"true\" ;\n",
                        "test.conf").sets[0]
    store = Store.open(tmp_path / "state")
    scanner = Scanner(store, "alpha")
    applier = Applier(os.fsencode(root), store, "alpha")
    scanner.expected_absent = applier.expected_absent
    scanner.scan_set(mset, os.fsencode(root))
    resolver = Resolver(store, applier, scanner)
    told: list[list[tuple[bytes, bool]]] = []
    # each path as committed when it is told: a reader outside the transaction sees it
    resolver.on_applied = lambda applied: told.append(
        [(a.path, store.committed(a.path) is not None) for a in applied])

    def version(path: bytes, kind: Kind, t: int, data: bytes = b"",
                target: bytes = b"") -> tuple[Entry, bytes | None]:
        stamp = Stamp(t * 10**18, "beta")
        entry = Entry(path, kind, stamp, vector=(("beta", stamp.time_ns),),
                      mode=0o755 if kind is Kind.DIR else 0o644, owner="root",
                      group="root", mtime_ns=10**18 if kind is Kind.FILE else 0,
                      size=len(data), digest=xxhash.xxh3_128(data).digest()
                      if kind is Kind.FILE else b"", target=target)
        return entry, data if kind is Kind.FILE else None

    batch = [version(b"data/d", Kind.DIR, 2), version(b"data/d/f", Kind.FILE, 2, b"hi\n"),
             version(b"data/l", Kind.SYMLINK, 2, target=b"d/f")]
    assert resolver.batch("beta", [mset], batch, lambda path: None) == [None, None, None]
    assert told == [[(b"data/d/f", True), (b"data/l", True)]]
    assert (root / "data" / "d" / "f").read_bytes() == b"hi\n"

    told.clear()
    older = version(b"data/d/f", Kind.FILE, 1, b"older\n")  # ours wins: nothing applied
    deletions = [version(b"data/d/f", Kind.TOMBSTONE, 3), version(b"data/d", Kind.TOMBSTONE, 3),
                 version(b"data/l", Kind.TOMBSTONE, 3)]
    assert resolver.batch("beta", [mset], [older, *deletions], lambda path: None) == \
        [None] * 4
    assert told == [[(b"data/d/f", True), (b"data/l", True)]]
    assert not (root / "data" / "d").exists()

    told.clear()
    (root / "data" / "local").write_bytes(b"mine\n")
    scanner.scan_set(mset, os.fsencode(root))
    assert store.get(b"data/local") is not None and told == []
    store.close()
