"""The Applier: puts a version from a peer in place here, and records it.

It is the only writer of mirrored trees. It decides nothing: resolve.py decides, then
calls one method here per path (a file installed from its temp file, a directory, a
symlink, a deletion, a conflict copy). Every step reaches the tree through descriptors
(omirror/setdirs.py) and replaces only what the store says is there: a name that holds
anything else is a local change (:class:`LocalChanged`), recorded first and decided on,
never overwritten. Replacements are swaps (``RENAME_EXCHANGE``) whose loser is examined,
and deletions go through a temp name, so a write landing in that instant is put back.

After each change the final path's ``lstat`` is recorded with the entry, which is how
the watcher and the scanner recognise the echo of this write and do not send it back;
before each, one line in the intent log (omirror/intents.py) says what it will be.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

from omirror import diskspace, fsio, tempnames, xattrs
from omirror.clock import now_ns
from omirror.config import MirrorSet, set_for
from omirror.entry import Entry, Kind, Stamp, conflict_name, first_version, kind_of, next_stamp
from omirror.errors import ApplyError, LocalChanged, PathRefused, os_errors
from omirror.intents import Intent, IntentLog
from omirror.owners import OwnerMap, Ownership, group_name, user_name
from omirror.owners import can_chown as can_chown_now
from omirror.paths import PATH_MAX, join, show, split
from omirror.setdirs import SetDirs
from omirror.staging import (
    TEMP_FLAGS,
    Ahead,
    Prepared,
    RoomCheck,
    TempFile,
    check_temp,
    temp_at,
)
from omirror.store import Record, StatSig, Store, matches
from omirror.units import human_bytes
from omirror.versions import Versions

log = logging.getLogger(__name__)

#: Versions whose data need is remembered (a bound on what failing peers can make us
#: hold; the oldest is forgotten first, and at worst crosses once more).
_DATA_NEEDED_MAX = 10_000

#: Keeps the regular file at a name of an open directory (checked to be the stat given)
#: as the version a peer's change takes away (omirror/versions.py); returns how to undo
#: that when the change is not made after all, or None when nothing was kept.
Keep = Callable[[int, bytes, os.stat_result], Callable[[], None] | None]


@dataclass(frozen=True, slots=True)
class Given:
    """What this host just gave a file or directory: mode, owner (-1 where left as it
    was), mtime (None where not set), managed attributes.

    Compared with the stat that is recorded (and the attributes read back after it):
    a chmod, chown, write or setxattr a user makes between the last of this host's
    calls and that stat is in the stat, and would be recorded as this host's own, never
    seen by a scan or the watcher (:func:`_check_ours`)."""

    mode: int
    uid: int = -1
    gid: int = -1
    mtime_ns: int | None = None
    xattrs: xattrs.Given | None = None

    def held_by(self, st: os.stat_result, target: int | str | None = None) -> bool:
        """Whether ``st``, and the attributes read at ``target`` after it was taken,
        are what was given."""
        if stat.S_IMODE(st.st_mode) != self.mode \
                or (self.mtime_ns is not None and st.st_mtime_ns != self.mtime_ns) \
                or self.uid not in (-1, st.st_uid) or self.gid not in (-1, st.st_gid):
            return False
        return target is None or self.xattrs is None or xattrs.still_given(target,
                                                                            self.xattrs)


class Applier:
    """Writes versions received from peers into this host's trees, and records them.

    ``clock`` stamps the new local versions this makes (conflict copies); ``can_chown``
    says whether owners can be set (by default: whether this process holds
    ``CAP_CHOWN``, omirror/owners.py).

    ``expected_absent`` holds the paths that applying a peer's rename moved away here
    (:meth:`copy_local` with ``move``, :meth:`move`): their deletion is the peer's and
    arrives as its tombstone, so the scanner (which shares this set) must not record one
    of its own for them; :meth:`delete` takes a path out again.
    """

    def __init__(self, root: bytes, store: Store, host: str, *,
                 clock: Callable[[], int] = now_ns,
                 can_chown: bool | None = None) -> None:
        self.root = root
        self.store = store
        self.host = host
        self.clock = clock
        self.can_chown = can_chown_now() if can_chown is None else can_chown
        self.owners = OwnerMap()
        self.xattrs = xattrs.Writer()
        self.expected_absent: set[bytes] = set()
        #: The directories of the sets, opened through descriptors.
        self.dirs = SetDirs(root)
        #: Small files of a batch written and synced ahead (omirror/staging.py).
        self.prepared = Prepared(self.dirs)
        #: Small files of a receiver's next batch, written ahead by the stager.
        self.ahead = Ahead()
        #: Where each change is announced before it is made (omirror/intents.py); None
        #: in tools that apply nothing a crash could leave unrecorded.
        self.intents: IntentLog | None = None
        #: Free space no file from a peer is written into (omirror/diskspace.py), and
        #: the sets whose file system is short of it now, by title, for status.
        self.reserve = diskspace.Reserve()
        self.short: dict[str, diskspace.Shortage] = {}
        #: Data a version (path, digest) was found to need when it was begun without
        #: room for its whole size (a sparse file needs room for its data only).
        self.data_needed: dict[tuple[bytes, bytes], int] = {}
        #: Where ``install -osavetargets`` keeps what a peer's change takes away.
        self.versions = Versions(self.dirs)

    def _intend(self, entry: Entry, ino: int, old_ctime_ns: int = 0) -> None:
        if self.intents is not None:
            self.intents.note(Intent(entry, ino, old_ctime_ns))

    # -- checks --------------------------------------------------------------------------

    def disk_matches(self, mset: MirrorSet, path: bytes, record: Record | None) -> bool:
        """True when the disk at ``path`` holds what the store last recorded there.

        Checked before anything is replaced: a local change the scanner has not recorded
        yet must win, so the caller scans the path instead of applying. A directory is
        compared by kind, inode and mode only: every file written into it moves its
        mtime and ctime, and its entry holds neither. A path beyond a symlink is refused
        (:class:`PathRefused`): what the disk shows there is outside the tree.
        """
        return matches(self.dirs.lstat(mset, path), record)

    # -- files ---------------------------------------------------------------------------

    def write_file(self, mset: MirrorSet, entry: Entry, data: bytes) -> Record:
        """Install a file whose whole content came with its entry; a temp file
        :meth:`prepare` made for it is used."""
        temp = self.prepared.take(mset, entry)
        if temp is None:
            temp = self.begin_file(mset, entry)
            temp.write(data)  # removes the temp file itself if it fails
        with temp:
            return self.install_file(mset, entry, temp)

    def begin_file(self, mset: MirrorSet, entry: Entry) -> TempFile:
        """Open the temp file that streamed content (chunks, delta blocks) is written to."""
        _expect(entry, Kind.FILE)
        dir_fd, _ = self.dirs.parent_for_write(mset, entry.path, "write")
        try:
            with os_errors(entry.path, "write"):
                room = self._check_room(mset, dir_fd, entry)
        except BaseException:
            os.close(dir_fd)
            raise
        with os_errors(entry.path, "write"):
            return TempFile(dir_fd, entry, room)  # it owns dir_fd from here, even if it fails

    def _check_room(self, mset: MirrorSet, dir_fd: int, entry: Entry) -> RoomCheck | None:
        """Refuse (:class:`diskspace.LowDisk`) a file that would cut into the reserve.

        A file whose whole size fits is written as it comes (None). One that does not
        may still be sparse, and only its data takes space: it is begun with a check of
        each range of data as it arrives (the returned :data:`RoomCheck`), unless an
        earlier attempt at this version already found it needs more than is free. A
        file that turns out to have no hole is then known to need its whole size, so a
        dense file crosses in vain at most once, and waits as before.
        """
        if not self.reserve:
            return None
        free, keep = diskspace.room(dir_fd, self.reserve)
        held = self.short.get(mset.title)
        if held is not None and free - held.needed >= keep:
            del self.short[mset.title]
            log.info("set=%s has room again above its reserve of %s: %s free",
                     mset.title, self.reserve, human_bytes(free))
        if free - entry.size >= keep:
            return None
        needed = self.data_needed.get((entry.path, entry.digest), 0)
        if free - needed >= keep and needed < entry.size:
            def room(length: int, data: int, holes: bool) -> None:
                self._check_range(mset, dir_fd, entry, length, data, holes)
            return room
        raise self._short(mset, entry, diskspace.Shortage(free, keep, needed or entry.size))

    def _check_range(self, mset: MirrorSet, dir_fd: int, entry: Entry, length: int,
                     data: int, holes: bool) -> None:
        """Before a range of data of a file begun without room for its whole size: the
        free space (which what was written already took) must hold it above the reserve."""
        try:
            free, keep = diskspace.room(dir_fd, self.reserve)
        except OSError as e:
            raise ApplyError(entry.path, e.errno, f"cannot write {show(entry.path)}: "
                                                  f"{e.strerror}") from e
        if free - length >= keep:
            return
        # all the data, as far as is known: what came, or the whole size when no hole did
        needed = data if holes else entry.size
        key = (entry.path, entry.digest)
        if key not in self.data_needed and len(self.data_needed) >= _DATA_NEEDED_MAX:
            del self.data_needed[next(iter(self.data_needed))]
        self.data_needed[key] = max(needed, self.data_needed.get(key, 0))
        raise self._short(mset, entry, diskspace.Shortage(free + data - length, keep,
                                                          needed))

    def _short(self, mset: MirrorSet, entry: Entry,
               shortage: diskspace.Shortage) -> diskspace.LowDisk:
        """Note a file refused for lack of space (status shows the set as low); the
        refusal is returned for the caller to raise."""
        held = self.short.get(mset.title)
        if held is None:
            log.warning("set=%s low disk space: %s; files from peers wait, deletions go "
                        "on", mset.title, shortage.text())
        if held is None or shortage.needed >= held.needed:
            self.short[mset.title] = shortage
        return diskspace.refuse(entry.path, show(entry.path), shortage)

    def install_file(self, mset: MirrorSet, entry: Entry, temp: TempFile) -> Record:
        """Verify the temp file (if :meth:`TempFile.finish` was not called yet) and rename
        it over the target; the temp file is removed whatever fails."""
        _expect(entry, Kind.FILE)
        check_temp(temp, entry)
        with temp:
            temp.finish()
            st = self._install_temp(mset, temp, split(entry.path)[1], entry.path, entry)
        self.data_needed.pop((entry.path, entry.digest), None)
        return self._record(entry, st)

    def copy_local(self, mset: MirrorSet, entry: Entry, source: bytes, *,
                   move: bool) -> Record:
        """Make ``entry`` from the local file at ``source``, which holds the same content.

        Used for renames (``move=True``: the file is renamed, nothing is read when the
        store vouches for it) and for identical content found locally (a copy, checked
        against the digest as it is made). A source whose content is not the entry's is
        refused with :class:`ApplyError`: the caller then fetches the content. ``source``
        must be in the same set. Its record is left as it is: its tombstone comes from
        the same peer right after this entry.
        """
        _expect(entry, Kind.FILE)
        self.dirs.top(mset, source)
        if source == entry.path:
            raise ValueError(f"copy_local of {show(source)} onto itself")
        action = "move" if move else "copy"
        src_dir, src_name, fd = self._open_source(mset, entry, source, action)
        with contextlib.ExitStack() as close:
            close.callback(os.close, src_dir)
            close.callback(os.close, fd)
            if move:
                st = self._move(mset, entry, source, src_dir, src_name, fd)
            else:
                st = self._copy(mset, entry, source, fd)
        log.debug("path=%s %s from %s", show(entry.path), "moved" if move else "copied",
                  show(source))
        return self._record(entry, st)

    def _open_source(self, mset: MirrorSet, entry: Entry, source: bytes,
                     action: str) -> tuple[int, bytes, int]:
        """Open the local source file and its directory, or say that it is gone."""
        gone = ApplyError(source, errno.ENOENT, f"cannot {action} {show(source)} to "
                                                f"{show(entry.path)}: it is gone")
        opened = self.dirs.open_parent(mset, source, create=False, action=action)
        if opened is None:
            raise gone
        src_dir, src_name = opened
        try:
            with os_errors(source, action):
                try:
                    return src_dir, src_name, os.open(src_name, fsio.READ_FLAGS, dir_fd=src_dir)
                except FileNotFoundError:
                    raise gone from None
        except BaseException:
            os.close(src_dir)
            raise

    def _move(self, mset: MirrorSet, entry: Entry, source: bytes, src_dir: int,
              src_name: bytes, fd: int) -> os.stat_result:
        verified = self._verify_source(entry, source, fd)
        dst_dir, name = self.dirs.parent_for_write(mset, entry.path, "write")
        try:
            with os_errors(entry.path, "write"):
                old = fsio.lstat_at(dst_dir, name)
                self._guard_target(entry.path, old)
                named = fsio.lstat_at(src_dir, src_name)
                if not fsio.unchanged(os.fstat(fd), verified) or named is None \
                        or not fsio.same_file(named, verified):
                    # written to since it was verified, or another file put at its name
                    # (the rename goes by name): what would move is not the entry's
                    # content (recorded with its digest, it would be sent as that version)
                    raise LocalChanged(source, None, f"{show(source)} changed here while "
                                       f"it was being moved to {show(entry.path)}")
                given = self._set_attrs(mset, fd, entry, old)
                if old is not None and stat.S_ISDIR(old.st_mode):
                    self._remove_empty_dir(dst_dir, name, entry)
                self._intend(entry, verified.st_ino)
                _rename_over(src_dir, src_name, name, old, entry.path, dst_dir,
                             keep=self._keeper(mset, entry))
                self.expected_absent.add(source)
                st = os.fstat(fd)  # not by name: what is there now may be someone else's
                moved = fsio.lstat_at(dst_dir, name)
                if moved is None or not fsio.same_file(moved, st) \
                        or not given.held_by(st, fd):
                    # what went is not the version checked: a file put at the source's
                    # name in the instant before the rename, or the file written since
                    # its check (a user appending to it): it is the user's, under the
                    # user's name, so it goes back there and is recorded first
                    self._put_back(dst_dir, name, src_dir, src_name, source)
                    raise LocalChanged(source, None, f"{show(source)} changed here as a "
                                       f"peer's rename moved it to {show(entry.path)}; it "
                                       "is put back and recorded first")
        finally:
            os.close(dst_dir)
        return st

    def _put_back(self, dst_dir: int, name: bytes, src_dir: int, src_name: bytes,
                  source: bytes) -> None:
        """Rename what a move took back to its source name, unless something is there
        again (then both are the user's, and the rescans record them where they are)."""
        try:
            fsio.rename_noreplace(dst_dir, name, src_name, src_dir)
        except OSError:
            return
        self.expected_absent.discard(source)

    def _copy(self, mset: MirrorSet, entry: Entry, source: bytes,
              fd: int) -> os.stat_result:
        """Copy through a temp file, which checks the digest as the bytes go by."""
        with os_errors(source, "copy"):
            size = os.fstat(fd).st_size
        if size != entry.size:
            raise _not_the_content("copy", source, entry)
        with self.begin_file(mset, entry) as temp:
            temp.copy_from(fd, 0, size)
            temp.finish()
            return self._install_temp(mset, temp, split(entry.path)[1], entry.path, entry)

    def _verify_source(self, entry: Entry, source: bytes, fd: int) -> os.stat_result:
        """Check that the file about to be renamed holds the entry's content; return
        the stat it was verified with.

        The store's digest is trusted when the file's stat signature is the one recorded
        with it, exactly as a scan trusts it: a renamed 10 GB file is not read again.
        Otherwise the file is hashed.
        """
        with os_errors(source, "read"):
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ApplyError(source, None, f"cannot move {show(source)}: it is not a "
                                               "regular file here")
            held = self.store.get(source)
            if (held is not None and held.entry.kind is Kind.FILE
                    and held.sig == StatSig.of(st) and held.entry.digest == entry.digest
                    and held.entry.size == entry.size):
                return st
            digest, size = fsio.digest_fd(fd)
            if not fsio.unchanged(os.fstat(fd), st):
                raise LocalChanged(source, None, f"{show(source)} changed here while it "
                                   "was read")
        if (digest, size) != (entry.digest, entry.size):
            raise _not_the_content("move", source, entry)
        return st

    def link_file(self, mset: MirrorSet, entry: Entry, source: bytes,
                  held: Record) -> Record | None:
        """Make ``entry`` a hard link to ``source``, another path of the same set whose
        record ``held`` holds the same content (the caller checked), instead of writing
        the content again; None when the file system will not link them (another file
        system under the set, a link count at its limit, ``protected_hardlinks``): the
        caller then writes the content.

        The source must still be what ``held`` recorded (its stat, through descriptors),
        or :class:`LocalChanged` says to record it first. The link is made at a temp
        name beside the target (``linkat`` never follows a symlink), checked to be a
        regular file with the source's inode, and renamed over the target as every
        replacement here is (:func:`_rename_over`). Nothing is set on the file: its
        owner, mode and mtime are the source's, which are the entry's.
        """
        _expect(entry, Kind.FILE)
        self.dirs.top(mset, source)
        if source == entry.path:
            raise ValueError(f"link_file of {show(source)} onto itself")
        opened = self.dirs.open_parent(mset, source, create=False, action="link")
        if opened is None:
            raise ApplyError(source, errno.ENOENT, f"cannot link {show(entry.path)} to "
                                                   f"{show(source)}: it is gone")
        src_dir, src_name = opened
        try:
            with os_errors(source, "link"):
                before = fsio.lstat_at(src_dir, src_name)
                if not matches(before, held) or before is None:
                    raise LocalChanged(source, None, f"{show(source)} changed here before "
                                       f"{show(entry.path)} could be linked to it")
            dst_dir, name = self.dirs.parent_for_write(mset, entry.path, "write")
            try:
                with os_errors(entry.path, "write"):
                    return self._link_at(mset, entry, source, src_dir, src_name, before,
                                         dst_dir, name)
            finally:
                os.close(dst_dir)
        finally:
            os.close(src_dir)

    def _link_at(self, mset: MirrorSet, entry: Entry, source: bytes, src_dir: int,
                 src_name: bytes, before: os.stat_result, dst_dir: int,
                 name: bytes) -> Record | None:
        old = fsio.lstat_at(dst_dir, name)
        if old is not None and fsio.same_version(old, before) and stat.S_ISREG(old.st_mode):
            # linked already: it holds the source's content, which is the entry's, so
            # nothing is replaced (whatever its record says: a version applied to the
            # source changed it too)
            return self._record(entry, old)
        self._guard_target(entry.path, old)
        with temp_at(dst_dir) as temp:
            try:
                os.link(src_name, temp, src_dir_fd=src_dir, dst_dir_fd=dst_dir,
                        follow_symlinks=False)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EACCES):
                    raise
                log.debug("path=%s not linked to %s: %s; its content is written",
                          show(entry.path), show(source), e.strerror)
                return None
            held = os.open(temp, fsio.PATH_FLAGS, dir_fd=dst_dir)
            try:
                made = os.fstat(held)
                # what the name held when it was linked: a file swapped in at the
                # source's name after its check is not the content vouched for
                if not stat.S_ISREG(made.st_mode) or not fsio.same_version(made, before):
                    raise LocalChanged(source, None, f"{show(source)} changed here as "
                                       f"{show(entry.path)} was being linked to it")
                if old is not None and stat.S_ISDIR(old.st_mode):
                    self._remove_empty_dir(dst_dir, name, entry)
                self._intend(entry, made.st_ino)
                _rename_over(dst_dir, temp, name, old, entry.path)
                st = os.fstat(held)
                self.dirs.placed(dst_dir, name, entry.path)
            finally:
                os.close(held)
        if not Given(stat.S_IMODE(before.st_mode), mtime_ns=before.st_mtime_ns).held_by(st) \
                or st.st_size != before.st_size:
            raise LocalChanged(entry.path, None, f"{show(entry.path)} changed here as it was "
                               "linked to another name of the same content; the local "
                               "change is recorded first")
        record = self._record(entry, st)
        self.relinked(mset, before, st, entry.path)
        log.debug("path=%s linked to %s", show(entry.path), show(source))
        return record

    def relinked(self, mset: MirrorSet, before: os.stat_result, after: os.stat_result,
                 skip: bytes) -> None:
        """Give the other recorded names of a file whose link count this host just
        changed (a link made, a name deleted) its new stat: the count moved their ctime,
        nothing else, and a record left with the old one would have them hashed again
        and a peer's next version of them held up as a local change.

        Only a name recorded with the stat it had before (``before``) and holding the
        same inode, mode, owner, size and mtime now is updated: a write, chmod or chown
        landing meanwhile is a change the scanner must still see.
        """
        if before.st_nlink < 2 and after.st_nlink < 2:
            return
        was = StatSig.of(before)
        for record in self.store.by_inode(before.st_ino):
            path = record.entry.path
            if path == skip or record.entry.kind is not Kind.FILE or record.sig != was \
                    or not mset.contains(path):
                continue
            try:
                now = self.dirs.lstat(mset, path)
            except (PathRefused, OSError):
                continue
            if now is not None and fsio.same_version(now, before) \
                    and now.st_ctime_ns == after.st_ctime_ns:
                self.store.set_sig(path, Kind.FILE, StatSig.of(now))

    def adopt(self, mset: MirrorSet, entry: Entry, expect: StatSig) -> Record:
        """Record a version whose content is already in place here, with its attributes.

        For a file that holds the entry's content already: its local version has the same
        digest and an unchanged stat, or it arrived with its directory by :meth:`move`.
        Only owner, mode and mtime are set; nothing is read. The caller vouches for the
        content of the file it looked at, ``expect``: the file opened here must be that
        one, unchanged (inode, size, mtime, ctime), or :class:`LocalChanged` says so.
        A file swapped in by a user in between would otherwise get the entry's owner
        and mode (root, 4755) for its own content.
        """
        _expect(entry, Kind.FILE)
        opened = self.dirs.open_parent(mset, entry.path, create=False, action="adopt")
        if opened is None:
            raise ApplyError(entry.path, errno.ENOENT, f"cannot adopt {show(entry.path)}: "
                                                       "it is not here")
        parent, name = opened
        try:
            with os_errors(entry.path, "adopt"):
                fd = os.open(name, fsio.READ_FLAGS, dir_fd=parent)
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
                        raise ApplyError(entry.path, None,
                                         f"cannot adopt {show(entry.path)}: it is not a "
                                         f"regular file of {entry.size} bytes here")
                    if StatSig.of(st) != expect:
                        raise LocalChanged(entry.path, None, f"{show(entry.path)} changed "
                                           "here while a peer's version was being applied; "
                                           "the local change is recorded first")
                    given = self._set_attrs(mset, fd, entry, st)
                    st = os.fstat(fd)
                    _check_ours(entry.path, st, given, fd)
                finally:
                    os.close(fd)
        finally:
            os.close(parent)
        return self._record(entry, st)

    # -- directories and symlinks --------------------------------------------------------

    def make_dir(self, mset: MirrorSet, entry: Entry) -> Record:
        """Make the directory, or give an existing one its mode and owner.

        A file or symlink in its place is removed first. Directory mtimes are not
        mirrored: every change inside a directory moves its mtime anyway.
        """
        _expect(entry, Kind.DIR)
        top = self.dirs.top(mset, entry.path)
        if entry.path == top:
            return self._set_root(mset, entry)
        parent, name = self.dirs.parent_for_write(mset, entry.path, "make directory")
        try:
            with os_errors(entry.path, "make directory"):
                old = fsio.lstat_at(parent, name)
                self._guard_target(entry.path, old)
                if old is not None and stat.S_ISDIR(old.st_mode):
                    st = self._set_dir(mset, entry, parent, name, old)
                else:
                    st = self._new_dir(mset, entry, parent, name, old)
        finally:
            os.close(parent)
        return self._record(entry, st)

    def _set_dir(self, mset: MirrorSet, entry: Entry, parent: int, name: bytes,
                 old: os.stat_result) -> os.stat_result:
        """Give the directory that is there the entry's owner and mode."""
        fd = os.open(name, fsio.DIR_FLAGS, dir_fd=parent)
        try:
            # the directory opened must be the one examined: another put there by a user
            # in between would get the entry's owner and mode
            if not fsio.same_file(os.fstat(fd), old):
                raise LocalChanged(entry.path, None, f"{show(entry.path)} was replaced here "
                                   "while a peer's version was applied; the local change is "
                                   "recorded first")
            self._intend(entry, old.st_ino, old.st_ctime_ns)
            given = self._set_attrs(mset, fd, entry, old, mtime=False)
            st = os.fstat(fd)
            _check_ours(entry.path, st, given, fd)
            return st
        finally:
            os.close(fd)

    def _new_dir(self, mset: MirrorSet, entry: Entry, parent: int, name: bytes,
                 old: os.stat_result | None) -> os.stat_result:
        """Make the directory complete under a temp name (0700 until its owner and mode
        are set, so a directory meant to be private is never open to others), then
        rename it into place: under its name it never has any other mode or owner, and
        a crash in between leaves only a temp directory that the next start removes."""
        temp = tempnames.issue()
        os.mkdir(temp, 0o700, dir_fd=parent)
        try:
            fd = os.open(temp, fsio.DIR_FLAGS, dir_fd=parent)
            try:
                # ours, still 0700: one a user put at the temp name would get the
                # entry's owner and mode
                here = os.fstat(fd)
                if here.st_uid != os.geteuid() or stat.S_IMODE(here.st_mode) != 0o700:
                    raise ApplyError(entry.path, None, f"cannot make directory "
                                     f"{show(entry.path)}: its temp directory was replaced "
                                     "by someone else")
                given = self._set_attrs(mset, fd, entry, old, mtime=False)
                st = os.fstat(fd)
                _check_ours(entry.path, st, given, fd)
            finally:
                os.close(fd)
            self._intend(entry, st.st_ino)
            if old is not None:  # a file or symlink the store knows of: replaced
                with _keeping(self._keeper(mset, entry), parent, name, old):
                    os.unlink(name, dir_fd=parent)
            try:
                fsio.rename_noreplace(parent, temp, name)
            except FileExistsError:
                raise LocalChanged(entry.path, None, f"{show(entry.path)} was made here "
                                   "while a peer's version was applied; the local change "
                                   "is recorded first") from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(temp, dir_fd=parent)
            raise
        self.dirs.placed(parent, name, entry.path)
        return st

    def _set_root(self, mset: MirrorSet, entry: Entry) -> Record:
        """A root's own entry: its mode and owner; it exists, or nothing is applied."""
        fd = self.dirs.open_root(entry.path, entry.path)
        try:
            with os_errors(entry.path, "set the attributes of"):
                given = self._set_attrs(mset, fd, entry, os.fstat(fd), mtime=False)
                st = os.fstat(fd)
                _check_ours(entry.path, st, given, fd)
        finally:
            os.close(fd)
        return self._record(entry, st)

    def make_symlink(self, mset: MirrorSet, entry: Entry) -> Record:
        """Make the symlink at a temp name, then rename it over what the store says is
        there."""
        _expect(entry, Kind.SYMLINK)
        if not entry.target or b"\0" in entry.target or len(entry.target) > PATH_MAX:
            raise PathRefused(entry.path, "symlink target is empty, too long or holds a NUL")
        parent, name = self.dirs.parent_for_write(mset, entry.path, "make symlink")
        try:
            with os_errors(entry.path, "make symlink"):
                with temp_at(parent) as temp:
                    os.symlink(entry.target, temp, dir_fd=parent)
                    old = fsio.lstat_at(parent, name)
                    self._guard_target(entry.path, old)
                    ours = self._own_symlink(mset, entry, old, parent, temp)
                    if old is not None and stat.S_ISDIR(old.st_mode):
                        self._remove_empty_dir(parent, name, entry)
                    self._intend(entry, ours.st_ino)
                    _rename_over(parent, temp, name, old, entry.path,
                                 keep=self._keeper(mset, entry))
                    self.dirs.placed(parent, name, entry.path)
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if not fsio.same_file(st, ours):
                    # replaced here right after the rename: record what we made, which
                    # the disk no longer matches, so the scan the change caused records it
                    st = ours
        finally:
            os.close(parent)
        return self._record(entry, st)

    def _own_symlink(self, mset: MirrorSet, entry: Entry, old: os.stat_result | None,
                     parent: int, temp: bytes) -> os.stat_result:
        """Give the temp symlink just made its owner, through a descriptor of the link
        itself; return its stat. The temp name is in a directory users may write: the
        link opened must be ours (owned by this daemon's user, which no one else can
        make), or someone swapped it, and their file would get the entry's owner."""
        link = os.open(temp, fsio.PATH_FLAGS, dir_fd=parent)
        try:
            st = os.fstat(link)
            if not stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
                raise ApplyError(entry.path, None, f"cannot make symlink {show(entry.path)}:"
                                                   " its temp link was replaced by someone "
                                                   "else")
            ids = self._ownership(mset, entry, old).chown_args()
            if self.can_chown and ids is not None:
                fsio.chown_link(link, *ids)
                st = os.fstat(link)
            return st
        finally:
            os.close(link)

    # -- deletions -----------------------------------------------------------------------

    def delete(self, mset: MirrorSet, entry: Entry) -> Record:
        """Remove what is at the path, and record the tombstone.

        A directory that still has children here is left: they are local files newer
        than the deletion (their own tombstones would have come first), and a later scan
        mirrors them. The tombstone is recorded anyway; an absent path is already deleted.
        """
        _expect(entry, Kind.TOMBSTONE)
        if entry.path == self.dirs.top(mset, entry.path):
            raise PathRefused(entry.path, f"is a root of set {mset.title}; a root is never "
                                          "deleted by a peer")
        opened = self.dirs.open_parent(mset, entry.path, create=False, action="delete")
        if opened is not None:
            parent, name = opened
            try:
                with os_errors(entry.path, "delete"):
                    self._intend(entry, 0)
                    self._remove(mset, parent, name, entry.path, self._keeper(mset, entry))
            finally:
                os.close(parent)
        seq = self.store.put(entry, None)
        self.expected_absent.discard(entry.path)
        log.debug("path=%s applied tombstone stamp=%s", show(entry.path), entry.stamp)
        return Record(entry, seq, None)

    def _remove(self, mset: MirrorSet, parent: int, name: bytes, path: bytes,
                keep: Keep | None) -> None:
        old = fsio.lstat_at(parent, name)
        if old is None:
            return
        self._guard_target(path, old)
        if not stat.S_ISDIR(old.st_mode):
            after = _take_away(parent, name, path, old, keep)
            if after is not None:  # the file has other names: they stay
                self.relinked(mset, old, after, path)
            return
        if not self._rmdir(parent, name):
            log.info("path=%s deleted by a peer but not empty here: kept, the local files "
                     "below it are newer", show(path))

    # -- conflicts -----------------------------------------------------------------------

    def keep_conflict_copy(self, mset: MirrorSet, path: bytes, loser: Stamp,
                           digest: bytes | None = None) -> Record | None:
        """Keep the local file at ``path``, which lost a conflict, as its conflict copy.

        The copy is a copy, not a rename, so the path keeps its content until the winner
        is installed over it: if that install fails, no scan can mistake the empty name
        for a deletion that would beat the winner. Nor a hard link: a program writing
        the path in place (O_TRUNC) would rewrite the copy too, unseen by the watcher,
        which reports the name written (found by tests/fault: copies of one name held
        different contents on different peers, for ever). With ``digest`` (the losing
        version's), a copy whose content differs is not kept: the path changed since it
        was recorded, and :class:`LocalChanged` says to record that first. The copy is
        recorded as a new local version, mirrored like any user file. Returns None when
        there is no regular file at ``path`` to keep.
        """
        self.dirs.top(mset, path)
        opened = self.dirs.open_parent(mset, path, create=False, action="keep a conflict copy of")
        if opened is None:
            return None
        parent, name = opened
        copy = conflict_name(name, loser)
        copy_path = join(split(path)[0], copy)
        try:
            with os_errors(copy_path, "keep a conflict copy at"):
                old = fsio.lstat_at(parent, name)
                if old is None or not stat.S_ISREG(old.st_mode):
                    log.debug("path=%s no local file to keep as a conflict copy", show(path))
                    return None
                with temp_at(parent) as temp:
                    self._copy_at(parent, name, temp)
                    fd = os.open(temp, fsio.READ_FLAGS, dir_fd=parent)
                    try:
                        kept, _ = fsio.digest_fd(fd)
                        if digest is not None and kept != digest:
                            raise LocalChanged(path, None, f"{show(path)} changed here "
                                               "since it was recorded; not kept as its "
                                               "conflict copy")
                        # a file a user put at the copy's name is theirs, not replaced
                        self._guard_target(copy_path, fsio.lstat_at(parent, copy))
                        os.rename(temp, copy, src_dir_fd=parent, dst_dir_fd=parent)
                        self.dirs.placed(parent, copy, copy_path)
                        st = os.fstat(fd)
                    finally:
                        os.close(fd)
        finally:
            os.close(parent)
        log.warning("path=%s lost a conflict to a peer's version: local content kept as %s",
                    show(path), show(copy_path))
        return self._record_local(copy_path, st, kept)

    def _copy_at(self, parent: int, name: bytes, temp: bytes) -> None:
        """Copy a file's content, owner, mode and mtime to ``temp`` in the same directory.

        The caller's ``_temp_at`` removes ``temp`` if this fails."""
        src = os.open(name, fsio.READ_FLAGS, dir_fd=parent)
        try:
            st = os.fstat(src)
            dst = os.open(temp, TEMP_FLAGS, 0o600, dir_fd=parent)
            try:
                fsio.copy_data(src, dst)
                if self.can_chown:
                    os.fchown(dst, st.st_uid, st.st_gid)
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def write_conflict_copy(self, mset: MirrorSet, entry: Entry,
                            data_or_temp: bytes | TempFile) -> Record:
        """Keep an incoming version that lost a conflict as its conflict copy.

        The content is written at ``conflict_name(name, entry.stamp)`` beside the path,
        with the entry's mode, owner and mtime, and recorded as a new local version.
        """
        _expect(entry, Kind.FILE)
        if isinstance(data_or_temp, TempFile):
            temp = data_or_temp
            check_temp(temp, entry)
        else:
            temp = self.begin_file(mset, entry)
        parent_path, name = split(entry.path)
        copy = conflict_name(name, entry.stamp)
        copy_path = join(parent_path, copy)
        with temp:
            if not isinstance(data_or_temp, TempFile):
                temp.write(data_or_temp)
            temp.finish()
            st = self._install_temp(mset, temp, copy, copy_path, entry, keep=False)
        log.warning("path=%s a peer's version lost a conflict: kept as %s", show(entry.path),
                    show(copy_path))
        return self._record_local(copy_path, st, entry.digest, entry.xattrs)

    # -- shared steps --------------------------------------------------------------------

    def _install_temp(self, mset: MirrorSet, temp: TempFile, name: bytes, path: bytes,
                      entry: Entry, *, keep: bool = True) -> os.stat_result:
        """Give the finished temp file its attributes and rename it to ``name``.

        The target is checked against the store once more right before the rename, as
        every replacement here is (:meth:`_guard_target`): writing and syncing the temp
        file takes a while, and a local change made meanwhile must be recorded and
        decided on, not overwritten. Without ``keep`` (a conflict copy, which replaces
        no version of the path) nothing is kept for ``savetargets``.
        """
        dir_fd = temp.dir_fd
        with os_errors(path, "write"):
            old = fsio.lstat_at(dir_fd, name)
            self._guard_target(path, old)
            given = self._set_attrs(mset, temp.fd, entry, old)
            if old is not None and stat.S_ISDIR(old.st_mode):
                self._remove_empty_dir(dir_fd, name, entry)
            # closed before the rename, so that its close is reported under the temp name
            # (ignored), not as a write to ``name`` (which would be examined again, once
            # per received file); what was installed is still read through a descriptor
            # (O_PATH: no events): a file put there by someone else right after the
            # rename must not be recorded as ours (it would never be seen)
            held = temp.hold()
            try:
                self._intend(entry, os.fstat(held).st_ino)
                _rename_over(dir_fd, temp.name, name, old, path,
                             keep=self._keeper(mset, entry) if keep else None)
                st = os.fstat(held)
                intact = given.held_by(st, fsio.through(held))
                self.dirs.placed(dir_fd, name, path)
                temp._installed()  # closes dir_fd
            finally:
                os.close(held)
        if not intact:
            raise _changed_meanwhile(path)
        return st

    def _keeper(self, mset: MirrorSet, entry: Entry) -> Keep | None:
        """How to keep the version ``entry`` takes away from its path, for a set with
        ``savetargets``; None when nothing is kept: the set keeps nothing, what the
        store says is there is no regular file, or the entry only changes attributes
        (the same content stays, under the same name)."""
        if not mset.options.savetargets:
            return None
        record = self.store.get(entry.path)
        if record is None or record.entry.kind is not Kind.FILE:
            return None
        if entry.kind is Kind.FILE and entry.digest == record.entry.digest:
            return None
        versions = self.versions

        def keep(dir_fd: int, name: bytes, old: os.stat_result) -> Callable[[], None] | None:
            where = versions.keep(mset, entry.path, dir_fd, name, old)
            return None if where is None else partial(versions.discard, where)

        return keep

    def moved_away(self, mset: MirrorSet, path: bytes) -> bool:
        """True when applying a peer's rename took the file at ``path`` away and nothing
        is there now: its record is still live, until the peer's tombstone comes."""
        if path not in self.expected_absent:
            return False
        return self.dirs.lstat(mset, path) is None

    def _guard_target(self, path: bytes, st: os.stat_result | None) -> None:
        """Raise :class:`LocalChanged` if ``st`` (the target's lstat) is not what the
        store recorded at ``path``: the same test as :meth:`disk_matches`. The applier
        replaces only what the store knows of; anything else is a local change that the
        scanner records first."""
        if st is None and path in self.expected_absent:
            return  # moved away by a peer's rename applied here: as expected
        if not matches(st, self.store.get(path)):
            raise LocalChanged(path, None, f"{show(path)} changed here while a peer's "
                                           "version was being applied; the local change is "
                                           "recorded first")

    def _set_attrs(self, mset: MirrorSet, fd: int, entry: Entry, old: os.stat_result | None,
                   *, mtime: bool = True) -> Given:
        """Owner, then mode (a chown may clear set-id bits), then mtime, on an open fd;
        returns what was given, for :func:`_check_ours`.

        The owner follows the owner rule (omirror/owners.py): a name known here maps to
        its id, an unknown one to the sender's number; set-user-ID and set-group-ID bits
        are kept only when both owner and group were mapped exactly and really set.
        ``old`` is what the path held before: with ``nochkowner``/``nochkgroup``/
        ``nochkmode`` its attributes are kept (the new file replaces it), and a new path
        gets the entry's mode, as rdist gives new files the source's mode.
        """
        owner = self._ownership(mset, entry, old)
        ids = owner.chown_args()
        if self.can_chown and ids is not None:
            os.fchown(fd, *ids)
        else:
            ids = (-1, -1)
        # attributes before the mode: an ACL moves the group bits, the mode then puts
        # them (and the ACL's mask) where the sender has them
        attributes = self.xattrs.apply(fd, entry.xattrs, xattrs.Policy.of(mset.options),
                                       mset.title)
        if mset.options.nochkmode and old is not None and kind_of(old) is entry.kind:
            mode = stat.S_IMODE(old.st_mode)
        else:
            mode = entry.mode & 0o7777
        mode = owner.mode(mode, os.fstat(fd))
        os.fchmod(fd, mode)
        if mtime:
            os.utime(fd, ns=(time.time_ns(), entry.mtime_ns))
        return Given(mode, *ids, entry.mtime_ns if mtime else None, attributes)

    def _ownership(self, mset: MirrorSet, entry: Entry,
                   old: os.stat_result | None) -> Ownership:
        """What owner and group ``entry`` gets here, by the owner rule."""
        options = mset.options
        return self.owners.resolve(
            entry.owner, entry.uid, entry.group, entry.gid, entry.path, entry.stamp.origin,
            keep_owner=old if options.nochkowner else False,
            keep_group=old if options.nochkgroup else False)

    def _remove_empty_dir(self, parent: int, name: bytes, entry: Entry) -> None:
        """Make room for a file or symlink where a directory is; only an empty one."""
        if not self._rmdir(parent, name):
            raise ApplyError(entry.path, errno.ENOTEMPTY,
                             f"cannot replace directory {show(entry.path)} by a "
                             f"{entry.kind.name.lower()}: it is not empty here")

    def _rmdir(self, parent: int, name: bytes) -> bool:
        """Remove an empty directory; False when something is in it. Temp files written
        ahead (staging.Ahead, and this batch's own) are not something: a directory
        holding them is removed once they are dropped, with the stager held off, or a
        temp file would keep a directory a peer deleted, and the scan of what was kept
        would bring it back on every peer."""
        for attempt in range(2):
            try:
                if attempt == 0:
                    os.rmdir(name, dir_fd=parent)
                else:
                    with self.ahead.paused():
                        self.prepared.discard()
                        os.rmdir(name, dir_fd=parent)
                return True
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        return False

    def _record(self, entry: Entry, st: os.stat_result) -> Record:
        """Record what was applied with the stat it left, so its echo is recognised."""
        sig = StatSig.of(st)
        seq = self.store.put(entry, sig)
        self.expected_absent.discard(entry.path)  # something is there again, by design
        if log.isEnabledFor(logging.DEBUG):  # once per file: not shown for nothing
            log.debug("path=%s applied %s stamp=%s", show(entry.path),
                      entry.kind.name.lower(), entry.stamp)
        return Record(entry, seq, sig)

    def _record_local(self, path: bytes, st: os.stat_result, digest: bytes,
                      attributes: xattrs.Xattrs = ()) -> Record:
        """Record a file made here (a conflict copy) as a new local version."""
        held = self.store.get(path)
        previous = None if held is None else held.entry
        stamp = next_stamp(self.clock(), None if previous is None else previous.stamp,
                           self.host)
        attrs: dict[str, object] = {
            "mode": stat.S_IMODE(st.st_mode), "owner": user_name(st.st_uid),
            "uid": st.st_uid, "group": group_name(st.st_gid), "gid": st.st_gid,
            "mtime_ns": st.st_mtime_ns, "size": st.st_size, "digest": digest,
            "xattrs": attributes,
        }
        if previous is None:
            entry = first_version(path, Kind.FILE, stamp, **attrs)
        else:
            entry = previous.successor(stamp, kind=Kind.FILE, target=b"", **attrs)
        sig = StatSig.of(st)
        seq = self.store.put(entry, sig)
        return Record(entry, seq, sig)


def recover(intents: list[Intent], sets: Sequence[MirrorSet], dirs: SetDirs, store: Store) -> int:
    """Record the versions a daemon stopped in the middle of a batch had put on disk
    without recording them (omirror/intents.py); returns how many. Recorded without
    a stat, so the scan that follows compares them with the disk: a local change
    made since is still a new version."""
    recorded = 0
    for intent in intents:
        entry = intent.entry
        mset = set_for(entry.path, sets)
        if mset is None:
            continue
        try:
            st = dirs.lstat(mset, entry.path)
        except (PathRefused, OSError):
            continue
        if entry.kind is Kind.TOMBSTONE:
            done = st is None
        else:
            done = st is not None and st.st_ino == intent.ino \
                and kind_of(st) is entry.kind and st.st_ctime_ns != intent.old_ctime_ns
        record = store.get(entry.path)
        if done and (record is None or record.entry.stamp != entry.stamp):
            store.put(entry, None)
            recorded += 1
            log.info("path=%s recorded as the peer's version applied before a crash "
                     "(stamp=%s)", show(entry.path), entry.stamp)
    return recorded


def _check_ours(path: bytes, st: os.stat_result, given: Given, target: int | str) -> None:
    """Raise :class:`LocalChanged` when what was just applied no longer has the
    attributes it was given (its stat ``st``, its extended attributes read at ``target``
    now): someone changed it in the instant since. Recording it with that stat would
    make the change look like ours, and no scan would ever see it."""
    if not given.held_by(st, target):
        raise _changed_meanwhile(path)


def _changed_meanwhile(path: bytes) -> LocalChanged:
    return LocalChanged(path, None, f"{show(path)} changed here as a peer's version was "
                                    "applied; the local change is recorded first")


def _rename_over(src_dir: int, src: bytes, name: bytes, old: os.stat_result | None,
                 path: bytes, dst_dir: int | None = None, *, keep: Keep | None = None) -> None:
    """Rename ``src`` to ``name``, which was checked to hold ``old``.

    Where nothing was there, nothing may be replaced: a file or symlink a user made
    there since the check is theirs (:class:`LocalChanged`), not ours to rename over.
    Where something was, the two names are swapped at once (``RENAME_EXCHANGE``), and
    what came out from under ``name`` is examined: the version checked, unchanged, is
    removed; anything else (written since the check, or another file a user renamed
    there) is swapped back, and the local change is recorded first. ``keep``
    (``savetargets``) is given the old version just before the swap, and undone when
    the swap is undone.
    """
    target_dir = src_dir if dst_dir is None else dst_dir
    if old is not None and not stat.S_ISDIR(old.st_mode):  # a directory was removed
        with _keeping(keep, target_dir, name, old):
            _swap_in(src_dir, src, name, old, path, target_dir)
        return
    try:
        fsio.rename_noreplace(src_dir, src, name, dst_dir)
    except FileExistsError:
        raise LocalChanged(path, None, f"{show(path)} was made here while a peer's version "
                           "was applied; the local change is recorded first") from None


def _swap_in(src_dir: int, src: bytes, name: bytes, old: os.stat_result, path: bytes,
             target_dir: int) -> None:
    """:func:`_rename_over` where ``old``, a file or symlink, was: swapped, examined."""
    try:
        swapped = fsio.rename_exchange(src_dir, src, name, target_dir)
    except FileNotFoundError:
        raise LocalChanged(path, None, f"{show(path)} was removed here while a peer's "
                           "version was applied; the local change is recorded "
                           "first") from None
    if not swapped:
        os.rename(src, name, src_dir_fd=src_dir, dst_dir_fd=target_dir)
        return
    out = fsio.lstat_at(src_dir, src)
    if out is None or fsio.same_version(out, old):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(src, dir_fd=src_dir)
        return
    fsio.rename_exchange(target_dir, name, src, src_dir)  # theirs back at its name
    raise LocalChanged(path, None, f"{show(path)} changed here as a peer's version "
                       "replaced it; the local change is recorded first")


def _take_away(parent: int, name: bytes, path: bytes, old: os.stat_result,
               keep: Keep | None = None) -> os.stat_result | None:
    """Delete the file or symlink at ``name``, checked to be ``old``, without losing a
    write that lands after the check: it is renamed to a temp name first (what is
    there then is what goes), examined, and only then unlinked; if it is not the file
    checked, or was written since, it is renamed back (:class:`LocalChanged`). ``keep``
    (``savetargets``) is given the file first, and undone when it is put back. Returns
    the stat the file has after the unlink when it has other names (a hard link)."""
    with _keeping(keep, parent, name, old):
        return _take_away_checked(parent, name, path, old)


def _keeping(keep: Keep | None, dir_fd: int, name: bytes,
             old: os.stat_result) -> contextlib.AbstractContextManager[None]:
    """``savetargets``: the version at ``name`` is kept before the block replaces or
    removes it, and the keeping undone when the block fails (the version stays)."""
    return contextlib.nullcontext() if keep is None else _kept(keep, dir_fd, name, old)


@contextlib.contextmanager
def _kept(keep: Keep, dir_fd: int, name: bytes, old: os.stat_result) -> Iterator[None]:
    undo = keep(dir_fd, name, old)
    try:
        yield
    except BaseException:
        if undo is not None:
            undo()
        raise


def _take_away_checked(parent: int, name: bytes, path: bytes,
                       old: os.stat_result) -> os.stat_result | None:
    # renamed back only when a local change came meanwhile, which is rescanned anyway
    temp = tempnames.issue(remember=False)
    os.rename(name, temp, src_dir_fd=parent, dst_dir_fd=parent)
    gone = fsio.lstat_at(parent, temp)
    if gone is None or fsio.same_version(gone, old):
        if gone is None or gone.st_nlink < 2 or not stat.S_ISREG(gone.st_mode):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=parent)
            return None
        held = os.open(temp, fsio.PATH_FLAGS, dir_fd=parent)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=parent)
            return os.fstat(held)
        finally:
            os.close(held)
    try:
        fsio.rename_noreplace(parent, temp, name)
    except FileExistsError:  # made again meanwhile: both are local, the later stays
        log.warning("path=%s was written here as a peer's deletion took it away, and made "
                    "again since: the written one is dropped", show(path))
        os.unlink(temp, dir_fd=parent)
    raise LocalChanged(path, None, f"{show(path)} was written here as a peer's deletion "
                       "took it away; it is put back and recorded first")


def _expect(entry: Entry, kind: Kind) -> None:
    if entry.kind is not kind:
        raise ValueError(f"{show(entry.path)}: a {entry.kind.name.lower()} entry given where "
                         f"a {kind.name.lower()} is applied")


def _not_the_content(action: str, source: bytes, entry: Entry) -> ApplyError:
    return ApplyError(source, None, f"cannot {action} {show(source)} to {show(entry.path)}: "
                                    "its content does not match the digest of the entry")
