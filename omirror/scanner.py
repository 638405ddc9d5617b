"""Walk a mirror set, find what changed since the store last saw it, and record it.

The scanner is the safety net under the watcher: it runs at startup (so edits made while
the daemon was down go out, stamped with their real ctime), after an inotify overflow,
and periodically. It must be cheap when nothing changed, so it trusts a file whose
(inode, size, mtime, ctime) match the store and hashes only the rest.

It runs in a worker thread: listing, stat and hashing all block. It never follows a
symlink (unless the set says ``follow``), never descends into an excluded path, and never
turns a missing or unmounted root into deletions.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import grp
import logging
import os
import pwd
import stat
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import xxhash

from omirror.clock import now_ns, offset_ns
from omirror.config import MirrorSet
from omirror.entry import TEMP_PREFIX, Entry, Kind, first_version, is_own_name, next_stamp
from omirror.errors import RootError
from omirror.store import FAST, Record, StatSig, Store, fast_sig

log = logging.getLogger(__name__)

#: The marker file under each root: its absence on a root that held files means the tree
#: is unmounted or was wiped, never that every file in it was deleted.
MARKER = b".omirror-root"
_MARKER_TEXT = b"omirror root marker: its absence stops this set instead of deleting files\n"
_READ_SIZE = 1 << 20
_FLUSH_EVERY = 500
_HASH_TRIES = 3
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def logical(top: str) -> bytes:
    """The logical path of a FILES entry: ``"/srv/www"`` -> ``b"srv/www"``."""
    return os.fsencode(top.strip("/"))


def local_path(root: bytes, path: bytes) -> bytes:
    """Where a logical path lives on this host, under ``--root``."""
    return os.path.join(root, path) if path else root


class Unstable(Exception):
    """The file changed while it was being read; its digest would describe no version."""


def hash_file(path: bytes, expect_ino: int | None = None) -> tuple[bytes, os.stat_result]:
    """Digest a regular file, and the stat that the digest describes.

    The stat is taken on the open descriptor before and after reading; if size, mtime or
    ctime moved, a writer was busy and the digest is refused. ``O_NOFOLLOW`` and the
    inode check stop a file swapped for a symlink between ``lstat`` and ``open``;
    ``O_NONBLOCK`` stops one swapped for a FIFO from hanging the scan.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode) or (expect_ino is not None
                                                 and before.st_ino != expect_ino):
            raise Unstable(path)
        digest = xxhash.xxh3_128()
        while chunk := os.read(fd, _READ_SIZE):
            digest.update(chunk)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
            before.st_size, before.st_mtime_ns, before.st_ctime_ns):
        raise Unstable(path)
    return digest.digest(), after


@dataclass
class ScanStats:
    """What one scan of one set found; logged, shown in status, asserted on in tests."""

    set_title: str
    dirs: int = 0
    files: int = 0
    symlinks: int = 0
    unchanged: int = 0
    hashed: int = 0
    hashed_bytes: int = 0
    new: int = 0
    changed: int = 0
    deleted: int = 0
    moved: int = 0
    special: int = 0
    unreadable: list[tuple[bytes, str]] = field(default_factory=list)
    unstable: list[bytes] = field(default_factory=list)
    #: With ``dry_run``: the versions a real scan would record, in the order it would.
    changes: list[Entry] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def recorded(self) -> int:
        return self.new + self.changed + self.deleted


@functools.lru_cache(maxsize=4096)
def user_name(uid: int) -> str:
    """Owners travel by name, as rdist sends them; a uid with no name travels as digits."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@functools.lru_cache(maxsize=4096)
def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class Scanner:
    """Scans the sets of one host into its store.

    ``clock`` gives the time of deletions (a scan cannot know when a file went away, so
    it says "now"); tests and skew injection replace it.
    """

    def __init__(self, store: Store, host: str, *,
                 clock: Callable[[], int] = now_ns) -> None:
        self.store = store
        self.host = host
        self.clock = clock
        self._specials_logged: set[bytes] = set()
        #: Paths that applying a peer's rename moved away here: their deletion is the
        #: peer's, and arrives as its tombstone. Recording one of our own first would
        #: send every peer a second deletion for each renamed path.
        self.expected_absent: set[bytes] = set()
        #: The counters of the full scan in progress, None between scans: the daemon
        #: reads them from its loop for progress reports and as the watchdog's proof.
        self.current: ScanStats | None = None

    async def scan(self, mset: MirrorSet, root: bytes, *, subtree: bytes | None = None,
                   dry_run: bool = False) -> ScanStats:
        """Scan in a worker thread, leaving the event loop free."""
        return await asyncio.to_thread(self.scan_set, mset, root, subtree=subtree,
                                       dry_run=dry_run)

    def scan_set(self, mset: MirrorSet, root: bytes, *, subtree: bytes | None = None,
                 dry_run: bool = False, sweep: bool = False,
                 force: bool = False) -> ScanStats:
        """Scan a whole set, or one subtree of it, and record (or with dry_run, list) changes.

        Every root of the set is checked before anything is recorded: one bad root stops
        the set with :class:`RootError`, and no deletion is recorded for any of its roots.
        With ``sweep`` (at startup, when no transfer can be in flight), temp files left by
        a crash during a transfer are removed. With ``force`` every file is hashed, even
        one whose stat is unchanged (``--check -f``: content that changed behind an
        unchanged stat, as bit rot or a tool that restores mtimes leaves it).
        """
        started = time.monotonic()
        run = _Run(self, mset, root, dry_run)
        run.sweep = sweep and not dry_run
        run.force = force
        tops = [logical(top) for top in mset.files]
        for top in tops:
            self.check_root(mset, root, top, dry_run=dry_run)
        if subtree is None:
            starts = tops
        elif any(subtree == t or subtree.startswith(t + b"/") for t in tops):
            starts = [subtree]
        else:
            raise ValueError(f"{subtree!r} is not inside set {mset.title}")
        self.current = run.stats
        try:
            for start in starts:
                run.visit_top(start)
            run.finish()
        finally:
            self.current = None
        run.stats.duration_s = time.monotonic() - started
        log.info("scanned set=%s dirs=%d files=%d unchanged=%d hashed=%d new=%d changed=%d "
                 "deleted=%d moved=%d in %.3fs%s", mset.title, run.stats.dirs,
                 run.stats.files, run.stats.unchanged, run.stats.hashed, run.stats.new,
                 run.stats.changed, run.stats.deleted, run.stats.moved, run.stats.duration_s,
                 " (dry run)" if dry_run else "")
        return run.stats

    def scan_paths(self, mset: MirrorSet, root: bytes,
                   requests: list[tuple[bytes, bool]], *, force: bool = False) -> ScanStats:
        """Examine the given logical paths, each alone or with its whole subtree.

        This is how live events are indexed: a path an event named is examined exactly as
        a full scan would examine it, so events and rescans never disagree. The roots
        holding the paths are checked first, as for a full scan. Renames are found when
        both the new and the old path are in one call: deletions are recorded last. With
        ``force`` every file is hashed, even one whose stat is unchanged.
        """
        started = time.monotonic()
        run = _Run(self, mset, root, dry_run=False)
        run.force = force
        tops = [logical(top) for top in mset.files]
        checked: set[bytes] = set()
        for path, recursive in requests:
            top = next((t for t in tops if path == t or path.startswith(t + b"/")), None)
            if top is None:
                log.debug("set=%s path=%s is outside the set; not scanned", mset.title,
                          os.fsdecode(path))
                continue
            if top not in checked:
                self.check_root(mset, root, top)
                checked.add(top)
            if path != top and (mset.is_excluded(path) or any(
                    is_own_name(part) for part in path[len(top) + 1:].split(b"/"))):
                continue
            run.visit_top(path, recursive=recursive)
        run.finish()
        run.stats.duration_s = time.monotonic() - started
        if run.stats.recorded:
            log.debug("indexed set=%s paths=%d new=%d changed=%d deleted=%d moved=%d",
                      mset.title, len(requests), run.stats.new, run.stats.changed,
                      run.stats.deleted, run.stats.moved)
        return run.stats

    def check_root(self, mset: MirrorSet, root: bytes, top: bytes, *,
                   dry_run: bool = False) -> None:
        """Refuse a root that is missing, not a directory, or lost its marker.

        A root seen for the first time gets its marker; one that held files before and
        has no marker now is unmounted or wiped, and scanning it would delete everything
        on every peer.
        """
        where = local_path(root, top)
        shown = os.fsdecode(where)
        name = "/" + os.fsdecode(top)
        try:
            st = os.lstat(where)
        except FileNotFoundError:
            raise RootError(f"set {mset.title}: root {name} is missing here ({shown}); the "
                            "set is stopped on this host and nothing is deleted on its "
                            "peers. Mount or restore it, then restart omirrord") from None
        except OSError as e:
            raise RootError(f"set {mset.title}: cannot examine root {shown}: "
                            f"{e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise RootError(f"set {mset.title}: root {name} ({shown}) is not a directory; "
                            "FILES entries must be directories")
        if not dry_run and _read_only(where):
            # systemd's ProtectSystem=strict mounts every path read-only for the service
            # but those in ReadWritePaths=; mirroring out but never in would be worse
            raise RootError(
                f"set {mset.title}: root {shown} is on a read-only mount here, so nothing "
                "from the peers could be applied; the set is stopped on this host. Under "
                "systemd, list it in ReadWritePaths= ('systemctl edit omirrord', see "
                "docs/operations.rst), then restart omirrord")
        marker = os.path.join(where, MARKER)
        if os.path.lexists(marker):
            return
        held = self.store.get(top)
        if held is not None and not held.entry.is_tombstone:
            raise RootError(
                f"set {mset.title}: root {shown} has lost its marker "
                f"{os.fsdecode(MARKER)}: it looks unmounted or wiped, so the set is stopped "
                "here and nothing is deleted on its peers. If the tree really is meant to "
                f"be like this, run 'touch {os.fsdecode(marker)}' and restart: its "
                "present state, deletions included, will then be mirrored")
        if not dry_run:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, _MARKER_TEXT)
            finally:
                os.close(fd)
            log.info("set=%s root %s marked as a mirrored root", mset.title, shown)


class _Run:
    """The state of one scan: counters, pending writes, paths that went away."""

    def __init__(self, scanner: Scanner, mset: MirrorSet, root: bytes, dry_run: bool) -> None:
        self.sc = scanner
        self.store = scanner.store
        self.mset = mset
        self.root = root
        self.dry_run = dry_run
        self.follow = mset.options.follow
        self.stats = ScanStats(mset.title)
        self.pending: list[tuple[Entry, StatSig]] = []
        self.sig_updates: list[tuple[bytes, Kind, StatSig]] = []
        self.vanished: list[bytes] = []
        self.visited_dirs: set[tuple[int, int]] = set()
        self.sweep = False
        #: Directories found renamed in this run -> the time they got there. A rename
        #: moves the ctime of the directory renamed, not of what it holds: a file that
        #: came with it is stamped no earlier than its directory's arrival, or an older
        #: version elsewhere could beat a rename made after it.
        self.fresh: dict[bytes, int] = {}
        self.force = False
        self.store_empty = scanner.store.count() == 0

    # -- walking -------------------------------------------------------------------------

    def visit_top(self, path: bytes, *, recursive: bool = True) -> None:
        """Examine one path itself (a root, a subtree, a path named by an event), then,
        when it is a directory and ``recursive``, walk below it."""
        try:
            if not self.follow and self._below_a_link(path):
                raise FileNotFoundError(path)
            st = self._stat(local_path(self.root, path))
        except FileNotFoundError:
            held = self.store.get(path)
            if held is not None and not held.entry.is_tombstone:
                self.vanished.append(path)
            return
        except OSError as e:
            self._unreadable(path, e)
            return
        kind = _kind(st.st_mode)
        if kind is None:
            self._special(path)
            return
        held = self.store.get(path)
        self._consider(path, kind, st,
                       None if held is None else fast_sig(held.entry.kind, held.sig))
        if kind is Kind.DIR and recursive:
            self.walk(path, st)
        self.flush()

    def _below_a_link(self, path: bytes) -> bool:
        """True when a directory between the path's set root and the path is a symlink
        (or a file) here: the path is then not in the tree, as a walk, which never
        follows a symlink, sees it. Examining it would record, and send to the peers,
        whatever lies beyond the link, outside the tree (a path named by a peer's entry,
        behind a symlink the peer planted earlier, is examined before it is applied)."""
        top = self.mset.root_of(path)
        if top is None:
            return False
        top_path = logical(top)
        where = local_path(self.root, top_path)
        for part in path[len(top_path) + 1:].split(b"/")[:-1] if path != top_path else ():
            where = os.path.join(where, part)
            try:
                if not stat.S_ISDIR(os.lstat(where).st_mode):
                    return True
            except OSError:
                return False  # the path's own stat says what is wrong
        return False

    def walk(self, top: bytes, top_st: os.stat_result) -> None:
        stack = [(top, top_st)]
        while stack:
            directory, st = stack.pop()
            if self.follow:
                key = (st.st_dev, st.st_ino)
                if key in self.visited_dirs:
                    continue
                self.visited_dirs.add(key)
            self.stats.dirs += 1
            self._walk_dir(directory, stack)
            if len(self.pending) + len(self.sig_updates) >= _FLUSH_EVERY:
                self.flush()

    def _walk_dir(self, directory: bytes, stack: list[tuple[bytes, os.stat_result]]) -> None:
        """List one directory and compare each entry with the store.

        This loop runs once per file of the tree on every rescan, so it does as little
        as Python allows: names found on disk are popped from the store's listing (what
        is left over went away), counters are locals, and the kind comes from one dict
        lookup on the file type bits.
        """
        known = self.store.signatures(directory)
        try:
            listing = os.scandir(local_path(self.root, directory))
        except FileNotFoundError:
            listing = None  # went away after its parent was listed: its children did too
        except OSError as e:
            # Unreadable is not empty: keep every record below it as it is.
            self._unreadable(directory, e)
            return
        excluded = self.mset.is_excluded if self.mset.excepts or self.mset.except_pats \
            else None
        follow = self.follow
        prefix = directory + b"/"
        pop = known.pop
        pack = FAST.pack if not self.force else _never
        kind_of = _KINDS.get
        is_dir = Kind.DIR
        unchanged = 0
        counts = [0, 0, 0, 0]
        with listing if listing is not None else _nothing() as entries:
            for de in entries:
                name = de.name
                sig = pop(name, None)
                if name.startswith(b".omirror"):
                    if self.sweep and name.startswith(TEMP_PREFIX):
                        self._sweep(prefix + name)
                    continue
                if excluded is not None and excluded(prefix + name):
                    continue
                try:
                    st = de.stat(follow_symlinks=follow)
                except FileNotFoundError:
                    if sig is not None:
                        known[name] = sig  # gone between listing and stat: a deletion
                    continue
                except OSError as e:
                    self._unreadable(prefix + name, e)
                    continue
                kind = kind_of(st.st_mode & 0o170000)
                if kind is None:
                    self._special(prefix + name)
                    continue
                if kind is is_dir:
                    stack.append((prefix + name, st))
                if sig == pack(kind, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                    unchanged += 1
                    counts[kind] += 1
                    continue
                self._consider(prefix + name, kind, st, sig)
        stats = self.stats
        stats.unchanged += unchanged
        stats.files += counts[Kind.FILE]
        stats.symlinks += counts[Kind.SYMLINK]
        for name, sig in known.items():
            if sig[0] != Kind.TOMBSTONE:  # the first byte of a signature is the kind
                self.vanished.append(prefix + name)

    # -- one changed path ----------------------------------------------------------------

    def _consider(self, path: bytes, kind: Kind, st: os.stat_result,
                  known: bytes | None) -> None:
        """Build the version of a path whose stat differs from the store's, and record it
        if its content or attributes really changed."""
        _count(self.stats, kind)
        if not self.force and known == FAST.pack(kind, st.st_ino, st.st_size, st.st_mtime_ns,
                                                 st.st_ctime_ns):
            self.stats.unchanged += 1
            return
        held = None if known is None else self.store.get(path)
        where = local_path(self.root, path)
        moved_from: bytes | None = None
        attrs: dict[str, object] = {}
        try:
            if kind is Kind.FILE:
                source = self._moved_source(path, kind, st, held)
                if source is not None:
                    moved_from, digest = source.entry.path, source.entry.digest
                else:
                    digest, st = self._hash(where, st)
                attrs.update(digest=digest, size=st.st_size, mtime_ns=st.st_mtime_ns)
            elif kind is Kind.SYMLINK:
                attrs.update(target=os.readlink(where), mode=0)
            else:
                source = self._moved_source(path, kind, st, held)
                moved_from = None if source is None else source.entry.path
        except FileNotFoundError:
            return  # gone since it was listed; a later event or scan will say so
        except Unstable:
            self.stats.unstable.append(path)
            log.debug("set=%s path=%s changed while read; left for the next event or scan",
                      self.mset.title, os.fsdecode(path))
            return
        except OSError as e:
            self._unreadable(path, e)
            return
        # mode and owner from the stat that is recorded, for a file the one its digest
        # goes with: a chmod since the listing is in both, or in neither
        attrs = {"mode": stat.S_IMODE(st.st_mode), "owner": user_name(st.st_uid),
                 "group": group_name(st.st_gid), **attrs}
        replaced = (kind is Kind.DIR and held is not None and held.sig is not None
                    and not held.entry.is_tombstone and held.sig.ino != st.st_ino)
        if kind is Kind.DIR and (moved_from is not None or replaced or (
                held is not None and held.entry.is_tombstone)
                or (held is None and not self.store_empty)):
            # renamed here (maybe over an empty directory), back where it had been
            # deleted, or new here (a rename not recognised as one: its mtime moved since,
            # or it came from outside the tree): what it holds arrived now, whatever its
            # own ctimes say
            self.fresh[path] = max(st.st_ctime_ns, self._arrival(path))
        sig = StatSig.of(st)
        previous = None if held is None else held.entry
        # a directory made anew where one was is a new version even with the same mode:
        # it must beat a deletion of the old one made elsewhere before it was made. Not
        # so a file or symlink of the same content: a tree restored from a backup has
        # new inodes everywhere, and re-stamping it would undo what the peers did since.
        # But one renamed here from another tracked path is a user's act, newer than
        # what it replaced, even when it holds the same thing
        if previous is not None and not previous.is_tombstone and not replaced:
            candidate = replace(previous, kind=kind, mode=0, owner="", group="", mtime_ns=0,
                                size=0, digest=b"", target=b"")
            candidate = replace(candidate, **attrs)  # type: ignore[arg-type]
            if previous.same_content(candidate) and not self._renamed_over(
                    path, kind, st, held):
                self.sig_updates.append((path, kind, sig))
                self.stats.unchanged += 1
                return
        changed_ns = st.st_ctime_ns
        if self.fresh:
            changed_ns = max(changed_ns, self._arrival(path))
        stamp = next_stamp(changed_ns + offset_ns(),
                           None if previous is None else previous.stamp, self.sc.host)
        if previous is None:
            entry = first_version(path, kind, stamp, **attrs)
        else:
            entry = previous.successor(stamp, kind=kind, mode=0, owner="", group="",
                                       mtime_ns=0, size=0, digest=b"", target=b"")
            entry = replace(entry, **attrs)  # type: ignore[arg-type]
        if moved_from is not None:
            entry = replace(entry, moved_from=moved_from)
            self.stats.moved += 1
            if not os.path.lexists(local_path(self.root, moved_from)):
                # the rename's old path is gone now: its deletion is recorded in this
                # scan too. Left to its own event, it could come after the path came
                # back (renamed there again), and then never: the peers, which moved
                # their copy away on this entry, would wait for ever for a tombstone
                self.vanished.append(moved_from)
        if previous is None or previous.is_tombstone:
            self.stats.new += 1
        else:
            self.stats.changed += 1
        self.pending.append((entry, sig))

    def _arrival(self, path: bytes) -> int:
        """When the nearest directory above ``path`` found renamed in this run got there."""
        parent = path.rpartition(b"/")[0]
        while parent:
            if parent in self.fresh:
                return self.fresh[parent]
            parent = parent.rpartition(b"/")[0]
        return 0

    def _renamed_over(self, path: bytes, kind: Kind, st: os.stat_result,
                      held: Record | None) -> bool:
        """True when the file or symlink at ``path``, recorded there under another inode,
        is one renamed here from another tracked path."""
        if held is None or held.sig is None or held.sig.ino == st.st_ino \
                or kind not in (Kind.FILE, Kind.SYMLINK):
            return False
        return next(self._renamed_from(path, kind, st), None) is not None

    def _renamed_from(self, path: bytes, kind: Kind, st: os.stat_result) -> Iterator[Record]:
        """Records of other paths of this set last seen with this inode, whose path no
        longer holds it: where it may have been renamed from. A path that still holds
        the inode is a hard link, never taken for a rename."""
        for record in self.store.by_inode(st.st_ino):
            if record.entry.kind != kind or record.entry.path == path or record.sig is None:
                continue
            if self.mset.root_of(record.entry.path) is None:
                continue  # moved in from another set: a new path here, not a rename
            try:
                if os.lstat(local_path(self.root, record.entry.path)).st_ino == st.st_ino:
                    continue
            except FileNotFoundError:
                pass
            except OSError:
                continue
            yield record

    def _moved_source(self, path: bytes, kind: Kind, st: os.stat_result,
                      held: Record | None) -> Record | None:
        """The record this new path was renamed from, found by inode, or None.

        The source's digest is then reused: a renamed 10 GB tree is not read again, so
        a file qualifies only with the size and mtime recorded. So does a directory's
        mtime, which a rename leaves alone: a directory made since, which got the inode
        number of one deleted meanwhile, has its own (a false rename would name a path
        this host never renamed).
        """
        if self.store_empty or (held is not None and not held.entry.is_tombstone):
            return None
        for record in self._renamed_from(path, kind, st):
            assert record.sig is not None  # _renamed_from yields only records with one
            if kind is Kind.FILE and (record.sig.size, record.sig.mtime_ns) != (
                    st.st_size, st.st_mtime_ns):
                continue
            if kind is Kind.DIR and record.sig.mtime_ns != st.st_mtime_ns:
                continue
            return record
        return None

    def _hash(self, where: bytes, st: os.stat_result) -> tuple[bytes, os.stat_result]:
        for attempt in range(_HASH_TRIES):
            try:
                digest, st = hash_file(where, st.st_ino)
            except Unstable:
                if attempt == _HASH_TRIES - 1:
                    raise
                st = os.lstat(where)
                if not stat.S_ISREG(st.st_mode):
                    raise
                continue
            self.stats.hashed += 1
            self.stats.hashed_bytes += st.st_size
            return digest, st
        raise Unstable(where)  # not reached: the loop returns or raises

    # -- recording -----------------------------------------------------------------------

    def flush(self) -> None:
        if self.dry_run:
            self.stats.changes.extend(entry for entry, _ in self.pending)
        elif self.pending or self.sig_updates:
            expected = self.sc.expected_absent
            with self.store.batch():
                for entry, sig in self.pending:
                    self.store.put(entry, sig)
                    if expected and not entry.is_tombstone:
                        # something is there again (renamed there here, say): its later
                        # deletion is this host's own, not one a peer will send
                        expected.discard(entry.path)
                for path, kind, sig in self.sig_updates:
                    self.store.set_sig(path, kind, sig)
        self.pending.clear()
        self.sig_updates.clear()

    def finish(self) -> None:
        """Record the deletions, after every new path, so that a rename's new name is in
        the log before its old name's tombstone and a receiver can still rename."""
        self.flush()
        now = self.sc.clock()
        gone: dict[bytes, Record] = {}
        for path in self.vanished:
            if self._expected(path):
                continue
            for record in self.store.under(path):
                if not record.entry.is_tombstone:
                    gone[record.entry.path] = record
        for path in sorted(gone, reverse=True):  # children before their directory
            record = gone[path]
            stamp = next_stamp(now, record.entry.stamp, self.sc.host)
            tomb = record.entry.successor(stamp, kind=Kind.TOMBSTONE, mode=0, owner="",
                                          group="", mtime_ns=0, size=0, digest=b"",
                                          target=b"")
            self.pending.append((tomb, None))  # type: ignore[arg-type]
            self.stats.deleted += 1
            if len(self.pending) >= _FLUSH_EVERY:
                self.flush()
        self.flush()

    def _sweep(self, path: bytes) -> None:
        try:
            os.unlink(local_path(self.root, path))
            log.info("set=%s removed %s, left by an interrupted transfer", self.mset.title,
                     os.fsdecode(path))
        except OSError as e:
            log.warning("set=%s cannot remove %s: %s", self.mset.title, os.fsdecode(path),
                        e.strerror)

    def _expected(self, path: bytes) -> bool:
        expected = self.sc.expected_absent
        if not expected:
            return False
        while path:
            if path in expected:
                return True
            path = path.rpartition(b"/")[0]
        return False

    # -- reporting -----------------------------------------------------------------------

    def _stat(self, where: bytes) -> os.stat_result:
        return os.stat(where) if self.follow else os.lstat(where)

    def _special(self, path: bytes) -> None:
        self.stats.special += 1
        if path not in self.sc._specials_logged:
            self.sc._specials_logged.add(path)
            log.info("set=%s path=%s is a special file (device, FIFO or socket): not mirrored",
                     self.mset.title, os.fsdecode(path))

    def _unreadable(self, path: bytes, error: OSError) -> None:
        reason = error.strerror or errno.errorcode.get(error.errno or 0, str(error))
        self.stats.unreadable.append((path, reason))
        log.warning("set=%s path=%s cannot be read: %s; its last known version is kept",
                    self.mset.title, os.fsdecode(path), reason)


_KINDS = {stat.S_IFREG: Kind.FILE, stat.S_IFDIR: Kind.DIR, stat.S_IFLNK: Kind.SYMLINK}


def _read_only(where: bytes) -> bool:
    """Whether ``where`` is on a read-only mount (statvfs(3) ST_RDONLY); unknown counts
    as writable, and the writes themselves then report what is wrong."""
    try:
        return bool(os.statvfs(where).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _kind(mode: int) -> Kind | None:
    return _KINDS.get(stat.S_IFMT(mode))


def _count(stats: ScanStats, kind: Kind) -> None:
    if kind is Kind.FILE:
        stats.files += 1
    elif kind is Kind.SYMLINK:
        stats.symlinks += 1


def _never(*_: object) -> None:
    """A fast-path signature that equals no stored one: with ``force``, nothing is trusted."""
    return None


class _nothing:
    """An empty directory listing, usable as a context manager like os.scandir's."""

    def __enter__(self) -> Iterator[os.DirEntry[bytes]]:
        return iter(())

    def __exit__(self, *exc: object) -> None:
        return None
