"""Walk a mirror set, find what changed since the store last saw it, and record it.

The scanner is the safety net under the watcher: it runs at startup (so edits made while
the daemon was down go out, stamped with their real ctime), after an inotify overflow,
and periodically. It must be cheap when nothing changed, so it trusts a file whose
(inode, size, mtime, ctime) match the store and hashes only the rest.

It runs in a worker thread: listing, stat and hashing all block. It reads the tree only
through directory descriptors (omirror/fsio.py): local users write in the trees, and a
path re-resolved by name could be swapped for a symlink between the listing and the
read, making root hash and send a file from outside the tree. It never follows a
symlink (unless the set says ``follow``, and then only links root owns), never descends
into an excluded path, and never turns a missing or unmounted root into deletions.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from omirror import fsio, recent, xattrs
from omirror.clock import now_ns, offset_ns
from omirror.config import MirrorSet
from omirror.entry import Entry, Kind, first_version, next_stamp
from omirror.errors import RootError
from omirror.owners import OwnerMap, group_name, user_name
from omirror.paths import (
    PARTIAL_PREFIX,
    TEMP_PREFIX,
    has_own_name,
    is_under,
    local_path,
    logical,
    show,
    show_name,
)
from omirror.store import FAST, Record, StatSig, Store, fast_sig

log = logging.getLogger(__name__)

#: The marker file under each root: its absence on a root that held files means the tree
#: is unmounted or was wiped, never that every file in it was deleted.
MARKER = b".omirror-root"
_MARKER_TEXT = b"omirror root marker: its absence stops this set instead of deleting files\n"
_FLUSH_EVERY = 500
_LINKS_TOLD_MAX = 10_000
_HASH_TRIES = 3


#: The attributes of a path not read yet (None is "this file system shows none").
_UNREAD = object()


class Unstable(Exception):
    """The file changed while it was being read, or was replaced after it was listed;
    its digest would describe no version."""


def hash_at(dir_fd: int, name: bytes, listed: os.stat_result,
            policy: xattrs.Policy | None = None, keep: int = 0
            ) -> tuple[bytes, os.stat_result, xattrs.Xattrs | None, bytes | None]:
    """Digest a regular file of an open directory, and the stat the digest describes.

    The file is opened relative to its directory with ``O_NOFOLLOW`` and must be the
    file that was listed (device and inode): a name swapped for a symlink, a FIFO or
    another file in between is refused, never read. The stat is taken on the descriptor
    before and after reading; if size, mtime or ctime moved, a writer was busy and the
    digest is refused too.

    A dense file of at most ``keep`` bytes is read whole, in one read, and its content
    returned with its digest (for the pushers: omirror/recent.py); else None.
    """
    try:
        fd, before = fsio.open_file(dir_fd, name, listed)
    except fsio.Swapped:
        raise Unstable(name) from None
    data = None
    try:
        if keep and before.st_size <= keep and fsio.is_dense(before):
            data = os.read(fd, before.st_size + 1)
            if len(data) != before.st_size:
                raise Unstable(name)  # it grew or shrank while read
            digest = fsio.digest_bytes(data)
        else:
            digest, _ = fsio.digest_fd(fd)
        # through the descriptor already open, and before the stat that vouches for
        # both: an attribute set meanwhile moves the ctime, and the file is read again
        found = None if policy is None else xattrs.read(fd, policy)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if not fsio.unchanged(after, before):
        raise Unstable(name)
    return digest, after, found, data


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
        """Versions written to the log; ``moved`` is not added, each move being already a
        new (or changed) path."""
        return self.new + self.changed + self.deleted


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
        self._no_xattrs: set[str] = set()
        #: Files with names outside their set, as last warned of: (device, inode) ->
        #: (link count, names in the set).
        self.links_told: dict[tuple[int, int], tuple[int, int]] = {}
        #: Paths that applying a peer's rename moved away here: their deletion is the
        #: peer's, and arrives as its tombstone. Recording one of our own first would
        #: send every peer a second deletion for each renamed path.
        self.expected_absent: set[bytes] = set()
        #: The counters of the full scan in progress, None between scans: the daemon
        #: reads them from its loop for progress reports and as the watchdog's proof.
        self.current: ScanStats | None = None
        #: How owners of versions from peers map here: a file that holds what applying
        #: a version gave it is no local change (omirror/owners.py).
        self.owners = OwnerMap()
        #: Small files the scans of live events read, for the pushers to send as read.
        self.recent = recent.RecentContent()
        #: Directories recorded as arriving (renamed here, or back where they had been
        #: deleted), by path: when they arrived, and when that was recorded (monotonic).
        #: What they hold may be examined by a later run (a directory's own event can be
        #: taken before the walk below it): it arrived with them, whatever its ctimes say.
        self.arrivals: dict[bytes, tuple[int, float]] = {}

    async def scan(self, mset: MirrorSet, root: bytes, *, subtree: bytes | None = None,
                   dry_run: bool = False) -> ScanStats:
        """Scan in a worker thread, leaving the event loop free."""
        return await asyncio.to_thread(self.scan_set, mset, root, subtree=subtree,
                                       dry_run=dry_run)

    def arrived(self, directory: bytes, at_ns: int) -> None:
        """Kept ARRIVAL_KEEP_S for later runs; past _ARRIVALS_MAX only expired ones are
        dropped, so a minute with more arrivals than that keeps them all."""
        now = time.monotonic()
        if len(self.arrivals) >= _ARRIVALS_MAX:
            self.arrivals = {p: a for p, a in self.arrivals.items()
                             if now - a[1] < ARRIVAL_KEEP_S}
        self.arrivals[directory] = (at_ns, now)

    def arrival_of(self, directory: bytes) -> int:
        """When ``directory`` arrived, if that was recorded a moment ago; else 0."""
        held = self.arrivals.get(directory)
        if held is None:
            return 0
        if time.monotonic() - held[1] >= ARRIVAL_KEEP_S:
            del self.arrivals[directory]
            return 0
        return held[0]

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
        with _Run(self, mset, root, dry_run) as run:
            run.sweep = sweep and not dry_run
            run.force = force
            tops = [logical(top) for top in mset.files]
            for top in tops:
                self.check_root(mset, root, top, dry_run=dry_run, opener=run.opener)
            if subtree is None:
                starts = tops
            elif any(is_under(subtree, t) for t in tops):
                starts = [subtree]
            else:
                raise ValueError(f"{show(subtree)} is not inside set {mset.title}")
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
                   requests: list[tuple[bytes, bool]], *, force: bool = False,
                   keep: bool = False) -> ScanStats:
        """Examine the given logical paths, each alone or with its whole subtree.

        This is how live events are indexed: a path an event named is examined exactly as
        a full scan would examine it, so events and rescans never disagree. The roots
        holding the paths are checked first, as for a full scan. Renames are found when
        both the new and the old path are in one call: deletions are recorded last. With
        ``force`` every file is hashed, even one whose stat is unchanged; with ``keep``
        the small files hashed are kept in :attr:`recent` for the pushers.
        """
        started = time.monotonic()
        with _Run(self, mset, root, dry_run=False) as run:
            run.force = force
            run.keep = keep
            checked: set[bytes] = set()
            for path, recursive in requests:
                top = run.top_of(path)
                if top is None:
                    log.debug("set=%s path=%s is outside the set; not scanned", mset.title,
                              show(path))
                    continue
                if top not in checked:
                    self.check_root(mset, root, top, opener=run.opener)
                    checked.add(top)
                if path != top and (mset.is_excluded(path)
                                    or has_own_name(path[len(top) + 1 if top else 0:])):
                    continue
                run.visit_top(path, recursive=recursive)
                run.opener.trim()
            run.finish()
        run.stats.duration_s = time.monotonic() - started
        if run.stats.recorded:
            log.debug("indexed set=%s paths=%d new=%d changed=%d deleted=%d moved=%d",
                      mset.title, len(requests), run.stats.new, run.stats.changed,
                      run.stats.deleted, run.stats.moved)
        return run.stats

    def check_root(self, mset: MirrorSet, root: bytes, top: bytes, *,
                   dry_run: bool = False, opener: fsio.Opener | None = None) -> None:
        """Refuse a root that is missing, not a directory, or lost its marker.

        A root seen for the first time gets its marker; one that held files before and
        has no marker now is unmounted or wiped, and scanning it would delete everything
        on every peer. The root is opened as every reader opens it (omirror/fsio.py):
        a symlink on the way that root does not own is refused. With ``opener`` the open
        root stays in it, for the walk that follows.
        """
        if opener is None:
            with fsio.Opener(root) as own:
                self.check_root(mset, root, top, dry_run=dry_run, opener=own)
            return
        where = local_path(root, top)
        shown = show_name(where)
        name = show(top)
        try:
            fd = opener.directory(top, top)
        except FileNotFoundError:
            raise RootError(f"set {mset.title}: root {name} is missing here ({shown}); the "
                            "set is stopped on this host and nothing is deleted on its "
                            "peers. Mount or restore it, then restart omirrord") from None
        except NotADirectoryError:
            raise RootError(f"set {mset.title}: root {name} ({shown}) is not a directory; "
                            "FILES entries must be directories") from None
        except OSError as e:
            if e.errno == errno.ELOOP and e.strerror and "owned by uid" in e.strerror:
                reason = e.strerror
            elif e.errno == errno.ELOOP:
                reason = ("it is a symlink; FILES entries must name the directory "
                          "itself")
            else:
                reason = e.strerror or str(e)
            raise RootError(f"set {mset.title}: cannot open root {shown}: {reason}") \
                from None
        if fd < 0:  # not reached: a root is opened whole or raises
            raise RootError(f"set {mset.title}: root {name} is missing here ({shown})")
        if not dry_run and _read_only(fd):
            # systemd's ProtectSystem=strict mounts every path read-only for the service
            # but those in ReadWritePaths=; mirroring out but never in would be worse
            raise RootError(
                f"set {mset.title}: root {shown} is on a read-only mount here, so nothing "
                "from the peers could be applied; the set is stopped on this host. Under "
                "systemd, list it in ReadWritePaths= ('systemctl edit omirrord', see "
                "docs/operations.rst), then restart omirrord")
        if fsio.lstat_at(fd, MARKER) is not None:
            return
        marker = show_name(os.path.join(where, MARKER))
        held = self.store.get(top)
        if held is not None and not held.entry.is_tombstone:
            raise RootError(
                f"set {mset.title}: root {shown} has lost its marker "
                f"{os.fsdecode(MARKER)}: it looks unmounted or wiped, so the set is stopped "
                "here and nothing is deleted on its peers. If the tree really is meant to "
                f"be like this, run 'touch {marker}' and restart: its "
                "present state, deletions included, will then be mirrored")
        if not dry_run:
            made = os.open(MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                           | os.O_CLOEXEC, 0o644, dir_fd=fd)
            try:
                os.write(made, _MARKER_TEXT)
            finally:
                os.close(made)
            log.info("set=%s root %s marked as a mirrored root", mset.title, shown)


class _Run:
    """The state of one scan: counters, pending writes, paths that went away, and the
    directory descriptors it reads through."""

    def __init__(self, scanner: Scanner, mset: MirrorSet, root: bytes, dry_run: bool) -> None:
        self.sc = scanner
        self.store = scanner.store
        self.mset = mset
        self.root = root
        self.dry_run = dry_run
        self.follow = mset.options.follow
        self.policy = xattrs.Policy.of(mset.options)
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
        #: Whether small files read to be hashed are kept for the pushers
        #: (:attr:`Scanner.recent`): in the scans of live events only.
        self.keep = False
        self.store_empty = scanner.store.count() == 0
        self.tops = sorted((logical(top) for top in mset.files), key=len, reverse=True)
        #: Files with other names (st_nlink > 1) recorded in this run, by (device,
        #: inode): each name recorded, with its version and the stat it was made from.
        #: Their link hints are chosen as they are written (:meth:`_hint_links`), and
        #: the other names are examined at the end of the run (:meth:`_other_names`).
        self.links: dict[tuple[int, int], dict[bytes, tuple[Entry, os.stat_result]]] = {}
        self.link_keys: dict[bytes, tuple[int, int]] = {}
        #: Inodes whose names were examined by :meth:`_other_names` in this run.
        self.links_done: set[tuple[int, int]] = set()
        #: The set's roots and the directories on the way to the paths examined alone.
        self.opener = fsio.Opener(root)

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.opener.close()

    def top_of(self, path: bytes) -> bytes | None:
        """The logical root of this set that holds ``path``."""
        return next((t for t in self.tops if is_under(path, t)), None)

    # -- walking -------------------------------------------------------------------------

    def visit_top(self, path: bytes, *, recursive: bool = True) -> None:
        """Examine one path itself (a root, a subtree, a path named by an event), then,
        when it is a directory and ``recursive``, walk below it.

        A path beyond a symlink (or a file) here is not in the tree, as a walk, which
        never follows a symlink, sees it: it is absent. Examining it would record, and
        send to the peers, whatever lies beyond the link.
        """
        top = self.top_of(path)
        if top is None:
            return
        dir_fd, name = -1, b""
        try:
            if path == top:
                st = os.fstat(self.opener.directory(top, top))
            else:
                dir_fd, name = self.opener.parent(top, path)
                found = None if dir_fd < 0 else self._stat_at(dir_fd, name, path)
                if found is None:
                    raise FileNotFoundError(errno.ENOENT, "not there")
                st = found
        except (FileNotFoundError, fsio.NotInTree):
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
                       None if held is None else fast_sig(held.entry.kind, held.sig),
                       dir_fd, name)
        if kind is Kind.DIR and recursive:
            try:
                fd = os.dup(self.opener.directory(top, top)) if path == top \
                    else self._open_dir(dir_fd, name, st)
            except (OSError, fsio.NotInTree, fsio.Swapped):
                pass  # gone or replaced since it was examined: its events say what now
            else:
                self.walk(path, fd)
        self.flush()

    def walk(self, top: bytes, top_fd: int) -> None:
        """Walk below the open directory ``top`` (its descriptor becomes the walk's).

        Depth first, holding the descriptors of the directories on the current path
        only: each directory is opened from its parent's descriptor and must be the
        directory that was listed.
        """
        frames: list[tuple[bytes, int, list[tuple[bytes, os.stat_result]]]] = []
        try:
            self._enter(frames, top, top_fd)
            while frames:
                path, fd, below = frames[-1]
                if not below:
                    frames.pop()
                    os.close(fd)
                    continue
                name, st = below.pop()
                try:
                    child = self._open_dir(fd, name, st)
                except (OSError, fsio.NotInTree, fsio.Swapped):
                    continue  # gone or replaced since it was listed: its events say so
                self._enter(frames, path + b"/" + name, child)
        finally:
            for _, fd, _ in frames:
                os.close(fd)

    def _enter(self, frames: list[tuple[bytes, int, list[tuple[bytes, os.stat_result]]]],
               path: bytes, fd: int) -> None:
        if self.follow:
            here = os.fstat(fd)
            key = (here.st_dev, here.st_ino)
            if key in self.visited_dirs:
                os.close(fd)
                return
            self.visited_dirs.add(key)
        try:
            self.stats.dirs += 1
            below = self._walk_dir(path, fd)
        except BaseException:
            os.close(fd)
            raise
        below.reverse()  # popped from the end: in listing order
        frames.append((path, fd, below))
        if len(self.pending) + len(self.sig_updates) >= _FLUSH_EVERY:
            self.flush()

    def _open_dir(self, parent: int, name: bytes, listed: os.stat_result) -> int:
        """Open a directory that was listed in ``parent``, checking it is that one."""
        with self._target(parent, name) as target:
            fd = -1 if target is None else fsio.step(*target, b"")
        if fd < 0:
            raise FileNotFoundError(errno.ENOENT, "gone")
        if not fsio.same_file(os.fstat(fd), listed):
            os.close(fd)
            raise fsio.Swapped("replaced since it was listed")
        return fd

    def _walk_dir(self, directory: bytes, dir_fd: int) -> list[tuple[bytes, os.stat_result]]:
        """List one open directory and compare each entry with the store; return the
        directories below it to walk.

        This loop runs once per file of the tree on every rescan, so it does as little
        as Python allows: names found on disk are popped from the store's listing (what
        is left over went away), counters are locals, and the kind comes from one dict
        lookup on the file type bits.
        """
        known = self.store.signatures(directory)
        below: list[tuple[bytes, os.stat_result]] = []
        try:
            listing = os.scandir(dir_fd)
        except FileNotFoundError:
            listing = None  # went away after its parent was listed: its children did too
        except OSError as e:
            # Unreadable is not empty: keep every record below it as it is.
            self._unreadable(directory, e)
            return below
        excluded = self.mset.is_excluded if self.mset.excepts or self.mset.except_pats \
            else None
        follow = self.follow
        prefix = directory + b"/" if directory else b""
        pop = known.pop
        pack = FAST.pack if not self.force else _never
        kind_of = _KINDS.get
        is_dir = Kind.DIR
        encode = os.fsencode
        unchanged = 0
        counts = [0, 0, 0, 0]
        with listing if listing is not None else _nothing() as entries:
            for de in entries:
                name = encode(de.name)  # names of a descriptor's listing come as str
                sig = pop(name, None)
                if name.startswith(b".omirror"):
                    if self.sweep and (name.startswith(TEMP_PREFIX) or (
                            name.startswith(PARTIAL_PREFIX) and _stale(de))):
                        self._sweep(dir_fd, prefix + name)
                    continue
                if excluded is not None and excluded(prefix + name):
                    continue
                try:
                    st = de.stat(follow_symlinks=False)
                    if follow and stat.S_ISLNK(st.st_mode):
                        st = self._follow_stat(dir_fd, name, prefix + name, st)
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
                    below.append((name, st))
                if sig == pack(kind, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                    unchanged += 1
                    counts[kind] += 1
                    continue
                self._consider(prefix + name, kind, st, sig, dir_fd, name)
        stats = self.stats
        stats.unchanged += unchanged
        stats.files += counts[Kind.FILE]
        stats.symlinks += counts[Kind.SYMLINK]
        for name, sig in known.items():
            if sig[0] != Kind.TOMBSTONE:  # the first byte of a signature is the kind
                self.vanished.append(prefix + name)
        return below

    # -- following symlinks (install -ofollow) --------------------------------------------

    @contextlib.contextmanager
    def _target(self, dir_fd: int, name: bytes) -> Iterator[tuple[int, bytes] | None]:
        """Where ``name`` of an open directory is read: itself, or, in a set that follows
        symlinks, what it leads to through links root owns (omirror/fsio.py); None for a
        link that is not followed (someone else's, or a loop)."""
        if not self.follow:
            yield dir_fd, name
            return
        followed = fsio.follow_link(dir_fd, name, local_path(self.root, b""))
        try:
            yield followed
        finally:
            if followed is not None:
                os.close(followed[0])

    def _follow_stat(self, dir_fd: int, name: bytes, path: bytes,
                     link: os.stat_result) -> os.stat_result:
        """The stat of what a symlink leads to in a set that follows symlinks; the link's
        own stat when it is not followed (owned by someone else, dangling, a loop)."""
        with self._target(dir_fd, name) as target:
            st = None if target is None else fsio.lstat_at(*target)
        if target is None and path not in self.sc._specials_logged \
                and link.st_uid not in (0, os.geteuid()):
            self.sc._specials_logged.add(path)
            log.info("set=%s symlink %s is owned by uid %d: mirrored as a symlink, not "
                     "followed (only symlinks owned by root are followed)", self.mset.title,
                     show(path), link.st_uid)
        return link if st is None else st

    def _stat_at(self, dir_fd: int, name: bytes, path: bytes) -> os.stat_result | None:
        st = fsio.lstat_at(dir_fd, name)
        if st is not None and self.follow and stat.S_ISLNK(st.st_mode):
            st = self._follow_stat(dir_fd, name, path, st)
        return st

    # -- one changed path ----------------------------------------------------------------

    def _consider(self, path: bytes, kind: Kind, st: os.stat_result,
                  known: bytes | None, dir_fd: int, name: bytes) -> None:
        """Build the version of a path whose stat differs from the store's, and record it
        if its content or attributes really changed. ``dir_fd`` and ``name`` are where it
        was listed (-1 for a set's root)."""
        _count(self.stats, kind)
        if not self.force and known == FAST.pack(kind, st.st_ino, st.st_size, st.st_mtime_ns,
                                                 st.st_ctime_ns):
            self.stats.unchanged += 1
            return
        held = None if known is None else self.store.get(path)
        moved_from: bytes | None = None
        attrs: dict[str, object] = {}
        try:
            if kind is Kind.FILE:
                source = self._moved_source(path, kind, st, held)
                found: xattrs.Xattrs | object | None = _UNREAD
                if source is not None:
                    moved_from, digest = source.entry.path, source.entry.digest
                else:
                    digest, st, found, data = self._hash(dir_fd, name, st)
                    if data is not None:
                        self.sc.recent.put(path, digest, data)
                attrs.update(digest=digest, size=st.st_size, mtime_ns=st.st_mtime_ns)
            elif kind is Kind.SYMLINK:
                attrs.update(target=os.readlink(name, dir_fd=dir_fd), mode=0)
            else:
                source = self._moved_source(path, kind, st, held)
                moved_from = None if source is None else source.entry.path
            if kind is not Kind.SYMLINK:
                attrs["xattrs"] = self._xattrs(path, kind, st, dir_fd, name, held,
                                               found if kind is Kind.FILE else _UNREAD)
        except FileNotFoundError:
            return  # gone since it was listed; a later event or scan will say so
        except Unstable:
            self.stats.unstable.append(path)
            log.debug("set=%s path=%s changed while read; left for the next event or scan",
                      self.mset.title, show(path))
            return
        except OSError as e:
            self._unreadable(path, e)
            return
        # mode and owner from the stat that is recorded, for a file the one its digest
        # goes with: a chmod since the listing is in both, or in neither
        attrs = {**self._ownership(st, held), **attrs}
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
            self.sc.arrived(path, self.fresh[path])
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
                                size=0, digest=b"", target=b"", xattrs=())
            candidate = replace(candidate, **attrs)  # type: ignore[arg-type]
            if previous.same_content(candidate) and not self._renamed_over(
                    path, kind, st, held):
                self.sig_updates.append((path, kind, sig))
                self.stats.unchanged += 1
                return
        changed_ns = st.st_ctime_ns
        if previous is None and self.store.new:
            # found by the first scan of a store that has no history (a first start, a
            # store deleted and made again): when it was copied, restored or installed
            # here (its ctime) says nothing of when it was made. Stamped just before its
            # content was last modified, it loses to any version a peer made of it
            # since (identical content is then simply adopted, not re-stamped), and a
            # file edited here while the store was gone still wins over older versions
            changed_ns = min(changed_ns, st.st_mtime_ns) - 1
        elif previous is not None and previous.is_tombstone \
                and changed_ns + offset_ns() <= previous.stamp.time_ns:
            # back where its deletion was recorded, with a ctime from before that: a
            # directory above it was renamed away and back (a rename leaves the ctimes
            # of what the directory holds as they were). It came back when that rename
            # was made, not when it was last changed
            changed_ns = max(changed_ns, self._carried_back(path))
        if self.fresh or self.sc.arrivals:
            changed_ns = max(changed_ns, self._arrival(path))
        stamp = next_stamp(changed_ns + offset_ns(),
                           None if previous is None else previous.stamp, self.sc.host)
        if previous is None:
            entry = first_version(path, kind, stamp, **attrs)
        else:
            entry = previous.successor(stamp, kind=kind, mode=0, owner="", group="",
                                       uid=-1, gid=-1, mtime_ns=0, size=0, digest=b"",
                                       target=b"", xattrs=())
            entry = replace(entry, **attrs)  # type: ignore[arg-type]
        if moved_from is not None:
            entry = replace(entry, moved_from=moved_from)
            self.stats.moved += 1
            if not self._lexists(moved_from):
                # the rename's old path is gone now: its deletion is recorded in this
                # scan too. Left to its own event, it could come after the path came
                # back (renamed there again), and then never: the peers, which moved
                # their copy away on this entry, would wait for ever for a tombstone
                self.vanished.append(moved_from)
        if previous is None or previous.is_tombstone:
            self.stats.new += 1
        else:
            self.stats.changed += 1
            if previous.kind is Kind.DIR and kind is not Kind.DIR:
                self._bury_below(path)
        if kind is Kind.FILE and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            self.links.setdefault(key, {})[path] = (entry, st)
            self.link_keys[path] = key
        self.pending.append((entry, sig))

    def _xattrs(self, path: bytes, kind: Kind, st: os.stat_result, dir_fd: int, name: bytes,
                held: Record | None, found: xattrs.Xattrs | object | None) -> xattrs.Xattrs:
        """The extended attributes of the file or directory examined (the one listed:
        opened without following, checked by device and inode), or ``found`` as hashing
        read them. What this set does not mirror, or this file system cannot show, is
        kept as recorded."""
        recorded = () if held is None or held.entry.kind is not kind else held.entry.xattrs
        policy = self.policy
        if not policy.enabled:
            return recorded
        if found is not _UNREAD:
            return self._merged(path, found, recorded)  # type: ignore[arg-type]
        if dir_fd < 0:  # a set's root
            fd = os.dup(self.opener.directory(path, path))
        else:
            with self._target(dir_fd, name) as target:
                if target is None:
                    raise Unstable(name)
                flags = fsio.READ_FLAGS if kind is Kind.FILE else fsio.DIR_FLAGS
                fd = os.open(target[1], flags, dir_fd=target[0])
        try:
            if not fsio.same_file(os.fstat(fd), st):
                raise Unstable(name)
            read = xattrs.read(fd, policy)
        finally:
            os.close(fd)
        return self._merged(path, read, recorded)

    def _merged(self, path: bytes, found: xattrs.Xattrs | None,
                recorded: xattrs.Xattrs) -> xattrs.Xattrs:
        if found is None and self.mset.title not in self.sc._no_xattrs:
            self.sc._no_xattrs.add(self.mset.title)
            log.info("set=%s the file system at %s keeps no extended attributes: none are "
                     "read from it", self.mset.title, show(path))
        return xattrs.merged(found, recorded, self.policy)

    def _bury_below(self, path: bytes) -> None:
        """A directory replaced by a file or a symlink took everything below it away:
        record those deletions now, deepest first and before the new version, so that a
        receiver has emptied its directory when it is asked to replace it. (Nothing else
        would: no walk goes below a path that is no directory.)"""
        now = self.sc.clock()
        below = [r for r in self.store.under(path)
                 if r.entry.path != path and not r.entry.is_tombstone
                 and not self._expected(r.entry.path)]
        for record in sorted(below, key=lambda r: r.entry.path, reverse=True):
            self._bury(record, now)

    def _bury(self, record: Record, now: int) -> None:
        """Record the deletion of a path found gone, stamped ``now`` (a scan cannot know
        when it went)."""
        stamp = next_stamp(now, record.entry.stamp, self.sc.host)
        tomb = record.entry.successor(stamp, kind=Kind.TOMBSTONE, mode=0, owner="",
                                      group="", uid=-1, gid=-1, mtime_ns=0, size=0,
                                      digest=b"", target=b"", xattrs=())
        self.pending.append((tomb, None))  # type: ignore[arg-type]
        self.stats.deleted += 1

    def _ownership(self, st: os.stat_result, held: Record | None) -> dict[str, object]:
        """Mode, owner and group to record for ``st``: those of the recorded version when
        the file holds what applying that version here gave it (an owner unknown here
        mapped to the sender's number, set-id bits dropped: omirror/owners.py), else
        what the file has."""
        if held is not None and not held.entry.is_tombstone \
                and held.entry.kind is not Kind.SYMLINK:
            e = held.entry
            kept = self.sc.owners.recorded(e.owner, e.uid, e.group, e.gid, e.mode, st)
            if kept is not None:
                owner, uid, group, gid, mode = kept
                return {"mode": mode, "owner": owner, "uid": uid, "group": group, "gid": gid}
        mode = 0 if stat.S_ISLNK(st.st_mode) else stat.S_IMODE(st.st_mode)
        return {"mode": mode, "owner": user_name(st.st_uid), "uid": st.st_uid,
                "group": group_name(st.st_gid), "gid": st.st_gid}

    def _carried_back(self, path: bytes) -> int:
        """The latest ctime of the directories above ``path`` in its set: no earlier
        than the rename of whichever of them brought it back."""
        top = self.top_of(path)
        latest = 0
        parent = path.rpartition(b"/")[0]
        while top is not None and parent and (parent == top or is_under(parent, top)):
            st = self._lstat(parent)
            if st is not None:
                latest = max(latest, st.st_ctime_ns)
            if parent == top:
                break
            parent = parent.rpartition(b"/")[0]
        return latest

    def _arrival(self, path: bytes) -> int:
        """When the nearest directory above ``path`` found renamed (in this run, or in
        one a moment ago) got there."""
        parent = path.rpartition(b"/")[0]
        while parent:
            if parent in self.fresh:
                return self.fresh[parent]
            earlier = self.sc.arrival_of(parent)
            if earlier:
                return earlier
            parent = parent.rpartition(b"/")[0]
        return 0

    def _lstat(self, path: bytes) -> os.stat_result | None:
        """``lstat`` of a path of this set through descriptors; None when absent or
        beyond a symlink (not in the tree)."""
        top = self.top_of(path)
        if top is None:
            return None
        try:
            return self.opener.lstat(top, path)
        except (FileNotFoundError, fsio.NotInTree):
            return None

    def _lexists(self, path: bytes) -> bool:
        return self._lstat(path) is not None

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
            if not self.mset.contains(record.entry.path):
                continue  # moved in from another set, or from an excluded path: new here
            try:
                now = self.opener.lstat(self.top_of(record.entry.path) or b"",
                                        record.entry.path)
            except (FileNotFoundError, fsio.NotInTree):
                now = None
            except OSError:
                continue
            if now is not None and fsio.same_file(now, st):
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

    def _hash(self, dir_fd: int, name: bytes, st: os.stat_result
              ) -> tuple[bytes, os.stat_result, xattrs.Xattrs | None, bytes | None]:
        with self._target(dir_fd, name) as target:
            if target is None:
                raise Unstable(name)  # a link no longer followed: its events say what now
            return self._hash_at(*target, st)

    def _hash_at(self, dir_fd: int, name: bytes, st: os.stat_result
                 ) -> tuple[bytes, os.stat_result, xattrs.Xattrs | None, bytes | None]:
        policy = self.policy if self.policy.enabled else None
        keep = recent.MAX_FILE if self.keep else 0
        for attempt in range(_HASH_TRIES):
            try:
                digest, st, found, data = hash_at(dir_fd, name, st, policy, keep)
            except Unstable:
                if attempt == _HASH_TRIES - 1:
                    raise
                again = fsio.lstat_at(dir_fd, name)
                if again is None:
                    raise FileNotFoundError(errno.ENOENT, "gone") from None
                if not stat.S_ISREG(again.st_mode):
                    raise
                st = again
                continue
            self.stats.hashed += 1
            self.stats.hashed_bytes += st.st_size
            return digest, st, found, data
        raise Unstable(name)  # not reached: the loop returns or raises

    # -- recording -----------------------------------------------------------------------

    def flush(self) -> None:
        """One store batch per _FLUSH_EVERY paths, not one per path; with ``dry_run``,
        the versions go to ``stats.changes`` and the store is not written."""
        if self.links:
            self._hint_links()
        if self.dry_run:
            self.stats.changes.extend(entry for entry, _ in self.pending)
        elif self.pending or self.sig_updates:
            expected = self.sc.expected_absent
            debug = log.isEnabledFor(logging.DEBUG)
            with self.store.batch():
                for entry, sig in self.pending:
                    self.store.put(entry, sig)
                    if debug:
                        log.debug("path=%s recorded %s stamp=%s", show(entry.path),
                                  entry.kind.name.lower(), entry.stamp)
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
        while len(self.links_done) < len(self.links):
            self._other_names()
        now = self.sc.clock()
        gone: dict[bytes, Record] = {}
        for path in self.vanished:
            if self._expected(path):
                continue
            for record in self.store.under(path):
                if not record.entry.is_tombstone:
                    gone[record.entry.path] = record
        for path in sorted(gone, reverse=True):  # children before their directory
            self._bury(gone[path], now)
            if len(self.pending) >= _FLUSH_EVERY:
                self.flush()
        self.flush()

    # -- hard links -----------------------------------------------------------------------

    def _hint_links(self) -> None:
        """Give each pending version of a file with other names its link hint: another
        name of the inode in this set, one holding the same content first (a receiver
        links only to a name whose content it holds). Chosen when the versions are
        written, so that names found in one directory (a catch-up scan) name each
        other, and a receiver links whichever of them arrives second."""
        for i, (entry, sig) in enumerate(self.pending):
            if entry.kind is not Kind.FILE or sig is None or entry.link:
                continue
            key = self.link_keys.get(entry.path)
            if key is None:
                continue
            names = self.links[key]
            st = names[entry.path][1]
            hint = next(self._names_of(entry, st, same_content_first=True), None)
            if hint is not None:
                self.pending[i] = (replace(entry, link=hint), sig)
                names[entry.path] = (self.pending[i][0], st)

    def _names_of(self, entry: Entry, st: os.stat_result, *,
                  same_content_first: bool = False) -> Iterator[bytes]:
        """The other names of the file ``entry`` was made from that this set holds, as
        recorded (in the store, or earlier in this run) and checked on disk now (device
        and inode, through descriptors): a name outside the set, or excluded, is none."""
        held = {r.entry.path: r.entry for r in self.store.by_inode(st.st_ino)
                if r.entry.kind is Kind.FILE}
        for e, _ in self.links.get((st.st_dev, st.st_ino), {}).values():
            held[e.path] = e
        held.pop(entry.path, None)
        order = sorted(held, key=lambda p: (not (same_content_first
                                                 and held[p].same_content(entry)), p))
        for path in order:
            if not self.mset.contains(path):
                continue
            now = self._lstat(path)
            if now is not None and stat.S_ISREG(now.st_mode) and fsio.same_file(now, st):
                yield path

    def _other_names(self) -> None:
        """Examine the other names of the files with several names recorded in this run:
        content written through one name changes the others without an event for them.
        Then warn of names the set does not hold (rdist's "missing links"), unless the
        set says ``ignlnks``."""
        for key, names in list(self.links.items()):
            if key in self.links_done:
                continue
            self.links_done.add(key)
            path, (entry, st) = next(iter(names.items()))
            others = list(self._names_of(entry, st))
            for other in others:
                if other not in names:
                    self.visit_top(other, recursive=False)
            found = 1 + len(others)
            if st.st_nlink > found and not self.mset.options.ignlnks and not self.dry_run \
                    and self.sc.links_told.get(key) != (st.st_nlink, found):
                # once per inode and count: every write to such a file is a scan run
                if len(self.sc.links_told) >= _LINKS_TOLD_MAX:
                    self.sc.links_told.clear()
                self.sc.links_told[key] = (st.st_nlink, found)
                missing = st.st_nlink - found
                log.warning("set=%s path=%s: %d missing link%s: the file has %d names, %d "
                            "of them in the set; only those are mirrored, as links of one "
                            "another (install -oignlnks silences this)", self.mset.title,
                            show(path), missing, "" if missing == 1 else "s", st.st_nlink,
                            found)
        self.flush()

    def _sweep(self, dir_fd: int, path: bytes) -> None:
        name = path.rpartition(b"/")[2]
        try:
            try:
                os.unlink(name, dir_fd=dir_fd)
            except IsADirectoryError:  # a directory being made (omirror/apply.py)
                os.rmdir(name, dir_fd=dir_fd)
            log.info("set=%s removed %s, left by an interrupted transfer or kept too long",
                     self.mset.title, show(path))
        except OSError as e:
            log.warning("set=%s cannot remove %s: %s", self.mset.title, show(path),
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

    def _special(self, path: bytes) -> None:
        self.stats.special += 1
        if path not in self.sc._specials_logged:
            self.sc._specials_logged.add(path)
            log.info("set=%s path=%s is a special file (device, FIFO or socket): not mirrored",
                     self.mset.title, show(path))

    def _unreadable(self, path: bytes, error: OSError) -> None:
        reason = error.strerror or errno.errorcode.get(error.errno or 0, str(error))
        self.stats.unreadable.append((path, reason))
        log.warning("set=%s path=%s cannot be read: %s; its last known version is kept",
                    self.mset.title, show(path), reason)


_KINDS = {stat.S_IFREG: Kind.FILE, stat.S_IFDIR: Kind.DIR, stat.S_IFLNK: Kind.SYMLINK}


def _read_only(fd: int) -> bool:
    """Whether the open directory is on a read-only mount (fstatvfs(3) ST_RDONLY); unknown
    counts as writable, and the writes themselves then report what is wrong."""
    try:
        return bool(os.statvfs(fd).f_flag & os.ST_RDONLY)
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


#: How long what a directory that arrived holds is stamped no earlier than its arrival:
#: the walk below it follows its own event within the coalescing delay, or the next scan.
ARRIVAL_KEEP_S = 60.0
_ARRIVALS_MAX = 10_000

#: A cut transfer's start is kept this long for a resume, then removed at a start.
PARTIAL_KEEP_S = 7 * 86400


def _stale(de: os.DirEntry[str] | os.DirEntry[bytes]) -> bool:
    try:
        return de.stat(follow_symlinks=False).st_mtime < time.time() - PARTIAL_KEEP_S
    except OSError:
        return False


class _nothing:
    """An empty directory listing, usable as a context manager like os.scandir's."""

    def __enter__(self) -> Iterator[os.DirEntry[bytes]]:
        return iter(())

    def __exit__(self, *exc: object) -> None:
        return None
