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
from omirror.staging import Prepared
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


# -- hard links ----------------------------------------------------------------------------

class Receiver:
    """A host receiving beta's entries: a marked root, a store, scanner, applier, resolver."""

    def __init__(self, base: Path, distfile: str = DISTFILE) -> None:
        self.root = base / "root"
        self.data = self.root / "data"
        self.data.mkdir(parents=True)
        (self.data / os.fsdecode(MARKER)).write_bytes(b"marker\n")
        self.mset = config.parse(distfile, "test.conf").sets[0]
        self.store = Store.open(base / "state")
        self.scanner = Scanner(self.store, "alpha")
        self.applier = Applier(os.fsencode(self.root), self.store, "alpha")
        self.scanner.expected_absent = self.applier.expected_absent
        self.resolver = Resolver(self.store, self.applier, self.scanner)
        self.rescan()  # the root itself is recorded

    def take(self, entry: Entry, data: bytes | None) -> object:
        return self.resolver.batch("beta", [self.mset], [(entry, data)], lambda _: None)[0]

    def ino(self, name: str) -> int:
        return os.lstat(self.data / name).st_ino

    def rescan(self) -> int:
        """New versions a scan would record here: none after what was applied."""
        return self.scanner.scan_set(self.mset, os.fsencode(self.root)).recorded

    def temps(self) -> list[str]:
        return [n for n in os.listdir(self.data) if n.startswith(".omirror-tmp-")]


def version(name: str, data: bytes, t: int, *, link: str = "", mode: int = 0o644) -> Entry:
    return Entry(b"data/" + name.encode(), Kind.FILE, Stamp(t, "beta"),
                 vector=(("beta", t),), mode=mode, owner="root", group="root",
                 mtime_ns=10**18, size=len(data), digest=xxhash.xxh3_128(data).digest(),
                 link=b"data/" + link.encode() if link else b"")


T = 2 * 10**18


def test_a_name_whose_hint_holds_the_same_content_is_linked_not_written(
        tmp_path: Path) -> None:
    here = Receiver(tmp_path)
    assert here.take(version("a", b"shared", T), b"shared") is None
    # no content comes with it (the pusher keeps it back): linked, nothing fetched
    assert here.take(version("b", b"shared", T + 1, link="a"), None) is None
    assert here.ino("a") == here.ino("b") and os.lstat(here.data / "a").st_nlink == 2
    got = here.store.get(b"data/b")
    assert got is not None and got.entry.link == b"data/a" and got.entry.stamp.time_ns == T + 1
    assert here.rescan() == 0 and here.temps() == []
    # the link moved a's ctime: its record was given the new stat, nothing is hashed again
    assert here.scanner.scan_set(here.mset, os.fsencode(here.root)).hashed == 0
    here.store.close()


def test_a_hint_that_does_not_hold_falls_back_to_the_content(tmp_path: Path) -> None:
    here = Receiver(tmp_path, "( /data ) -> ( alpha beta ) install ;\n"
                              "    except /data/private ;\n")
    here.take(version("a", b"other", T), b"other")
    (here.data / "private").mkdir()
    (here.data / "private" / "p").write_bytes(b"shared")
    assert here.take(version("b", b"shared", T + 1, link="a"), b"shared") is None
    assert here.ino("a") != here.ino("b") and (here.data / "b").read_bytes() == b"shared"
    # without content, a hint that does not hold asks for it
    need = here.take(version("c", b"shared", T + 2, link="a"), None)
    assert isinstance(need, Need) and need.purpose is Purpose.INSTALL
    # a hint to an excluded path is ignored, not refused, and never followed
    assert here.take(version("d", b"shared", T + 3, link="private/p"), b"shared") is None
    assert here.ino("d") != os.lstat(here.data / "private" / "p").st_ino
    assert os.lstat(here.data / "private" / "p").st_nlink == 1
    # a hint whose name changed here since it was recorded is not linked to
    here.take(version("e", b"shared", T + 4), b"shared")
    with open(here.data / "e", "r+b") as f:
        f.write(b"S")
    assert here.take(version("g", b"shared", T + 5, link="e"), b"shared") is None
    assert here.ino("g") != here.ino("e") and (here.data / "g").read_bytes() == b"shared"
    here.store.close()


def test_the_second_name_arriving_first_gets_the_content_and_the_first_links(
        tmp_path: Path) -> None:
    here = Receiver(tmp_path)
    here.take(version("b", b"shared", T + 1, link="a"), b"shared")
    here.take(version("a", b"shared", T, link="b"), b"shared")
    assert here.ino("a") == here.ino("b")
    assert here.rescan() == 0
    here.store.close()


def test_a_name_replaced_by_a_link_was_the_version_recorded(tmp_path: Path) -> None:
    """Content written through one name on the peer: the first name's version installs
    new content (breaking the link here), the second's links it again."""
    here = Receiver(tmp_path)
    here.take(version("a", b"old", T), b"old")
    here.take(version("b", b"old", T + 1, link="a"), None)
    here.take(version("a", b"new!", T + 2, link="b"), b"new!")
    assert here.ino("a") != here.ino("b") and (here.data / "b").read_bytes() == b"old"
    assert here.take(version("b", b"new!", T + 3, link="a"), None) is None
    assert here.ino("a") == here.ino("b") and (here.data / "b").read_bytes() == b"new!"
    assert here.rescan() == 0 and here.temps() == []
    here.store.close()


def test_deleting_one_name_keeps_the_other_and_its_record(tmp_path: Path) -> None:
    here = Receiver(tmp_path)
    here.take(version("a", b"shared", T), b"shared")
    here.take(version("b", b"shared", T + 1, link="a"), None)
    tomb = Entry(b"data/a", Kind.TOMBSTONE, Stamp(T + 2, "beta"), vector=(("beta", T + 2),))
    assert here.take(tomb, None) is None
    assert not (here.data / "a").exists() and (here.data / "b").read_bytes() == b"shared"
    b = here.store.get(b"data/b")
    assert b is not None and b.sig is not None
    assert b.sig.ctime_ns == os.lstat(here.data / "b").st_ctime_ns  # given its new stat
    assert here.rescan() == 0
    here.store.close()


def test_a_chmod_of_linked_names_is_no_local_change_of_the_second(tmp_path: Path) -> None:
    """The first name's version changes the shared inode; the second name's version,
    arriving after, finds that done, and is recorded as it is. (Taken for a local
    change, it would be a version stamped now, beating the peer's, made in the past.)"""
    here = Receiver(tmp_path)
    t = 10**18
    here.take(version("a", b"shared", t), b"shared")
    here.take(version("b", b"shared", t + 1, link="a"), None)
    here.take(version("a", b"shared", t + 2, link="b", mode=0o600), None)
    assert here.take(version("b", b"shared", t + 3, link="a", mode=0o600), None) is None
    assert here.ino("a") == here.ino("b")
    assert [r.entry.stamp.origin for r in here.store.since(0)
            if r.entry.kind is Kind.FILE] == ["beta", "beta"]  # no local version made
    assert here.rescan() == 0
    here.store.close()


def test_files_below_a_directory_the_batch_makes_are_written_ahead_once_it_is_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of new directories and their files comes as one batch: each file is
    written ahead once, after its directory is made, never first tried (a walk from the
    root to a directory not made yet) and then again."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / os.fsdecode(MARKER)).write_bytes(b"marker\n")
    mset = config.parse(DISTFILE, "test.conf").sets[0]
    store = Store.open(tmp_path / "state")
    scanner = Scanner(store, "alpha")
    applier = Applier(os.fsencode(root), store, "alpha")
    scanner.scan_set(mset, os.fsencode(root))
    batch: list[tuple[Entry, bytes | None]] = []
    t = 2 * 10**18
    for d in (b"data/d1", b"data/d2", b"data/d2/d3"):
        t += 1
        batch.append((Entry(d, Kind.DIR, Stamp(t, "beta"), vector=(("beta", t),),
                            mode=0o755, owner="root", group="root", mtime_ns=10**18), None))
        for i in range(5):
            t += 1
            content = b"file %d of %s\n" % (i, d)
            batch.append((Entry(d + b"/f%d" % i, Kind.FILE, Stamp(t, "beta"),
                                vector=(("beta", t),), mode=0o644, owner="root",
                                group="root", mtime_ns=10**18, size=len(content),
                                digest=xxhash.xxh3_128(content).digest()), content))
    tried: list[bytes] = []
    prepare = Prepared.prepare

    def counted(self: Prepared, mset: config.MirrorSet, entry: Entry, data: bytes,
                reserve: int) -> bool:
        tried.append(entry.path)
        return prepare(self, mset, entry, data, reserve)
    monkeypatch.setattr(Prepared, "prepare", counted)
    outcomes = Resolver(store, applier, scanner).batch("beta", [mset], batch, lambda p: None)
    assert outcomes == [None] * len(batch)
    files = [e.path for e, data in batch if data is not None]
    assert tried == files
    for entry, data in batch:
        if data is not None:
            assert (root / os.fsdecode(entry.path)).read_bytes() == data
    store.close()


def test_a_version_held_here_with_its_history_is_settled_without_decoding_its_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a mesh every peer relays every version to every other: most entries a peer
    receives are the version it holds. Those are settled from three columns; one with
    more history is still decided, and the history recorded."""
    here = Receiver(tmp_path)
    first = version("a", b"one", T)
    assert here.take(first, b"one") is None
    decoded: list[bytes] = []
    get = Store.get

    def counted(self: Store, path: bytes) -> object:
        decoded.append(path)
        return get(self, path)
    monkeypatch.setattr(Store, "get", counted)
    assert here.take(first, None) is None
    assert decoded == []
    wider = Entry(first.path, first.kind, first.stamp, vector=(("beta", T), ("gamma", 5)),
                  mode=first.mode, owner="root", group="root", mtime_ns=first.mtime_ns,
                  size=first.size, digest=first.digest)
    assert here.take(wider, None) is None
    assert decoded == [b"data/a"]
    got = here.store.get(b"data/a")
    assert got is not None and got.entry.vector == (("beta", T), ("gamma", 5))
    assert (here.data / "a").read_bytes() == b"one" and here.rescan() == 0
    here.store.close()
