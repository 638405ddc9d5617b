"""Temp files: where content from a peer is built before it takes a name in the tree.

A temp file is made in the target directory itself, so that its rename into place is
atomic (ypxfr's temp file, then rename) and the content is never copied twice. It is
written from start to end (a hole skipped, never allocated) and hashed as it grows, so it
is checked against the entry's digest without being read again; it is synced before the
rename, so an acknowledged version is on disk. A transfer that is cut keeps what arrived
under a partial name, to resume from.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator

from omirror import diskspace, fsio, tempnames
from omirror.config import MirrorSet
from omirror.diskspace import Reserve
from omirror.entry import Entry, Kind
from omirror.errors import ApplyError
from omirror.paths import PARTIAL_PREFIX, show, split
from omirror.setdirs import SetDirs
from omirror.store import Record, StatSig

log = logging.getLogger(__name__)

TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
#: A big file being received is handed to writeback every this many bytes, so that the
#: fsync before its rename finds most of it on disk already (a 1 GiB file otherwise
#: waited for all of it there, after the last byte came).
WRITEBACK_EVERY = 8 << 20


#: Batches of at least this many small files are made durable with one syncfs: two
#: fsyncs already cost two journal commits (ext4 allocates delayed blocks at
#: writeback, so fsyncs of files written together do not share one).
SYNCFS_MIN = 2


#: Less than this of a transfer is not worth keeping.
PARTIAL_MIN = 1 << 20


def partial_name(name: bytes, digest: bytes) -> bytes:
    """What is kept of a cut transfer: a daemon name (never mirrored), one per file name
    and version, so a resume finds it and a newer version never uses an older's start."""
    return PARTIAL_PREFIX + fsio.short_hash(name).encode() + b"-" \
        + digest.hex().encode()


@contextlib.contextmanager
def temp_at(parent: int) -> Iterator[bytes]:
    """A fresh temp name in a directory; whatever the block made under it is removed if
    the block fails, so no ``.omirror-tmp-*`` outlives an error."""
    temp = tempnames.issue()
    try:
        yield temp
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=parent)
        raise


#: Told, before a range of data is written, its length, how much data the file will
#: then hold, and whether a hole came before: it raises (``diskspace.LowDisk``) to stop
#: a file whose data would cut into the reserve of free space (``Applier.begin_file``).
RoomCheck = Callable[[int, int, bool], None]


class CreateCost:
    """What creating a file costs this thread's CPU lately, mostly in the kernel (an
    average over the last few dozen files made; the time spent waiting for the
    interpreter is not in it): whether writing ahead pays (:class:`Ahead`). On some
    disks it is a few microseconds, on others most of a millisecond."""

    WEIGHT = 0.05

    def __init__(self) -> None:
        self.mean_s = 0.0

    def note(self, seconds: float) -> None:
        self.mean_s += (seconds - self.mean_s) * self.WEIGHT

    def slow(self) -> bool:
        """Creating costs more than the stager's own work per file, which competes with
        the tree worker for the interpreter: only then does writing ahead gain time."""
        return self.mean_s > AHEAD_ABOVE_S


#: See :meth:`CreateCost.slow`; measured here: the stager's Python work is about 100 us
#: per small file, a create 10-40 us on a quick disk and 400-900 us on a slow one.
AHEAD_ABOVE_S = 100e-6
CREATE_COST = CreateCost()


class TempFile:
    """A file being received: ``.omirror-tmp-<hex>`` in the target directory.

    It is created in the target directory, not in a spool, so that the final rename is
    atomic and the content is never copied twice. It is written from its start to its
    end, data and holes in order, and hashed as it grows (a hole as its zeros), so
    :meth:`finish` can check the digest without reading the file again. A hole is
    skipped, never written nor allocated: a sparse file arrives as sparse as it was
    sent. Use it as a context manager (or call :meth:`abort`) so a failed transfer
    leaves nothing.
    """

    def __init__(self, dir_fd: int, entry: Entry, room: RoomCheck | None = None) -> None:
        """Create the temp file in the directory open at ``dir_fd``, which it owns from
        now on, even when this fails. ``room``, when given, is asked before each range
        of data (see :data:`RoomCheck`)."""
        self.entry = entry
        self.path = entry.path
        self.name = tempnames.issue()
        #: Where the content built so far ends (data and holes), the next write's offset.
        self.size = 0
        #: Bytes of data (not holes) written, and whether any hole came.
        self.data_bytes = 0
        self.holes = False
        self._room = room
        self._written_back = 0
        self._end = 0  # where the file itself ends: past it, only a hole came
        self.dir_fd = dir_fd
        self.fd = -1
        self._hash = fsio.new_digest()
        self._finished = False
        self._synced = False
        self._created = False
        try:
            began = time.thread_time()
            self.fd = os.open(self.name, TEMP_FLAGS, 0o600, dir_fd=dir_fd)
            CREATE_COST.note(time.thread_time() - began)
            self._created = True
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> TempFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def _reserve(self, offset: int, length: int) -> None:
        """Allocate a range of data before it is written, so a large file takes its
        space in few extents. Only data is reserved: a hole is never allocated (the
        whole size was, once, which made every sparse file dense)."""
        if self.entry.size <= _CHUNK:
            return
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                self._fail(e, "write")

    @contextlib.contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        if self.fd < 0:
            raise ValueError(f"temp file for {show(self.path)} is closed")
        try:
            yield
        except OSError as e:
            self._fail(e, action)

    def _fail(self, error: OSError, action: str) -> None:
        self.abort()
        reason = error.strerror or str(error)
        raise ApplyError(self.path, error.errno,
                         f"cannot {action} {show(self.path)}: {reason}") from error

    def _check_bound(self, length: int) -> None:
        """More than the entry announced is refused at once, so a peer cannot fill the
        disk (or make a file larger than it said) through one entry."""
        if self.size + length > self.entry.size:
            self.abort()
            raise ApplyError(self.path, None,
                             f"cannot write {show(self.path)}: more content than the "
                             f"{self.entry.size} bytes its entry announced")

    def write(self, data: bytes) -> None:
        """Write ``data`` where the content built so far ends."""
        self._check_bound(len(data))
        if not data:
            return
        if self._room is not None:
            try:
                self._room(len(data), self.data_bytes + len(data), self.holes)
            except BaseException:
                self.abort()
                raise
        with self._guard("write"):
            self._reserve(self.size, len(data))
            view = memoryview(data)
            while view:  # at the descriptor's offset, which is always self.size
                view = view[os.write(self.fd, view):]
        self._hash.update(data)
        self.size += len(data)
        self.data_bytes += len(data)
        self._end = self.size
        if self.size - self._written_back >= WRITEBACK_EVERY:
            fsio.start_writeback(self.fd, self._written_back, self.size - self._written_back)
            self._written_back = self.size

    def hole(self, length: int) -> None:
        """Skip ``length`` bytes that are a hole: nothing is written or allocated (a
        trailing hole is given its length by :meth:`finish`), the digest takes zeros."""
        self._check_bound(length)
        if self.fd < 0:
            raise ValueError(f"temp file for {show(self.path)} is closed")
        with self._guard("write"):
            # the descriptor's offset stays where the content ends (a crash test reads
            # it as the bytes received); the next write lands past the hole
            os.lseek(self.fd, self.size + length, os.SEEK_SET)
        fsio.hash_zeros(self._hash, length)
        self.size += length
        self.holes = True

    def copy_from(self, fd: int, offset: int, length: int) -> None:
        """Add ``length`` bytes of another open file from ``offset``: the blocks of a
        delta that the older local version (or the part kept of a cut transfer) already
        holds. What is a hole there stays a hole here, and is not read."""
        with self._guard("read"):
            ranges = list(fsio.extents(fd, offset, offset + length))
        done = 0
        for start, part, is_data in ranges:
            if not is_data:
                self.hole(part)
                done += part
                continue
            pos, end = start, start + part
            while pos < end:
                with self._guard("read"):
                    chunk = os.pread(fd, min(_CHUNK, end - pos), pos)
                if not chunk:
                    break
                self.write(chunk)
                pos += len(chunk)
            done += pos - start
            if pos < end:
                break
        if done < length:
            self.abort()
            raise ApplyError(self.path, None,
                             f"cannot write {show(self.path)}: the local file it is "
                             f"built from ended {length - done} bytes early")

    def finish(self, *, sync: bool = True) -> None:
        """Check size and digest against the entry, then fsync; idempotent.

        On a mismatch the temp file is removed: what was received is no version at all.
        Without ``sync`` the caller fsyncs later (:meth:`sync`), before the rename.
        """
        if self._finished:
            if sync and not self._synced:
                self.sync()
            return
        if self.fd < 0:
            raise ValueError(f"temp file for {show(self.path)} is closed")
        if self.size != self.entry.size or self._hash.digest() != self.entry.digest:
            self.abort()
            raise ApplyError(self.path, None,
                             f"cannot write {show(self.path)}: content does not match its "
                             f"digest ({self.size} bytes received, {self.entry.size} "
                             "expected)")
        if self._end < self.size:
            # the content ends in a hole: the file is given its size, still unallocated
            with self._guard("write"):
                os.ftruncate(self.fd, self.size)
            self._end = self.size
        if sync:
            self.sync()
        self._finished = True

    def sync(self) -> None:
        """Make the content durable. Of many temp files written first and synced
        afterwards, the first fsync commits them all (one journal commit on ext4 and
        xfs), so the others return at once."""
        with self._guard("write"):
            os.fsync(self.fd)
        self._synced = True

    @property
    def is_synced(self) -> bool:
        return self._synced

    def synced(self) -> None:
        """The content was made durable by a sync of the whole file system."""
        self._synced = True

    def abort(self) -> None:
        """Remove the temp file and close it; idempotent, and a no-op once installed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._created and self.dir_fd >= 0:
            try:
                os.unlink(self.name, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("path=%s cannot remove temp file %s: %s", show(self.path),
                            os.fsdecode(self.name), e.strerror)
            tempnames.forget(self.name)
        self._created = False
        self._close_dir()

    def keep_partial(self) -> bool:
        """Keep what arrived, as the start of this version, for the transfer to resume
        from when the same version is sent again (a link cut, a restart); removes the
        temp file instead when too little came. True if kept."""
        if self.fd < 0 or not self._created or self.size < PARTIAL_MIN:
            self.abort()
            return False
        try:
            os.ftruncate(self.fd, self.size)  # the space reserved beyond it is given back
            os.rename(self.name, partial_name(split(self.path)[1], self.entry.digest),
                      src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except OSError:
            self.abort()
            return False
        self._created = False
        self.abort()  # closes what is left open; the file is kept under its new name
        return True

    def hold(self) -> int:
        """Close the temp file, keeping an ``O_PATH`` descriptor of it (returned, the
        caller's to close); it is then renamed into place or aborted."""
        with self._guard("write"):
            held = os.open(self.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                           dir_fd=self.dir_fd)
        try:
            st, ours = os.fstat(held), os.fstat(self.fd)
            if not fsio.same_file(st, ours):
                raise ApplyError(self.path, None,
                                 f"cannot write {show(self.path)}: its temp file "
                                 f"{os.fsdecode(self.name)} was replaced by someone else")
            os.close(self.fd)
            self.fd = -1
        except BaseException:
            os.close(held)
            raise
        return held

    def _installed(self) -> None:
        """The temp name was renamed away: nothing is left to remove."""
        self._created = False
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._close_dir()

    def _close_dir(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def sync_batch(temps: list[TempFile]) -> list[TempFile]:
    """Make every temp file of a batch durable before any is renamed into place; return
    those that could not be synced. One ``syncfs`` for a batch of many: a fsync per
    small file costs a journal commit each (ext4 allocates delayed blocks at writeback,
    so fsyncs do not share commits), and that was most of the time a receiver spent on
    a tree of small files. A batch of a few is fsynced file by file."""
    if len(temps) >= SYNCFS_MIN and fsio.syncfs(temps[0].fd):
        for temp in temps:
            temp.synced()
        return []
    failed = []
    for temp in temps:
        try:
            temp.sync()
        except ApplyError:
            failed.append(temp)
    return failed


def check_temp(temp: TempFile, entry: Entry) -> None:
    """A temp file is installed only as the content it was verified against.

    The entry may differ otherwise (the receiver records the merged version vector).
    """
    if (temp.path, temp.entry.size, temp.entry.digest) != (entry.path, entry.size,
                                                           entry.digest):
        raise ValueError(f"temp file of {show(temp.path)} given for another version or "
                         f"path: {show(entry.path)}")


class Prepared:
    """The small files of one receive batch, written into their temp files ahead and
    made durable together (:func:`sync_batch`) before any is renamed into place; each is
    still decided on when its entry is applied, and what is not installed is removed."""

    def __init__(self, dirs: SetDirs) -> None:
        self.dirs = dirs
        self.temps: dict[bytes, TempFile] = {}

    def __len__(self) -> int:
        return len(self.temps)

    def __contains__(self, path: bytes) -> bool:
        return path in self.temps

    def prepare(self, mset: MirrorSet, entry: Entry, data: bytes, reserve: Reserve) -> bool:
        """Write the content of a small file that is about to be installed into its temp
        file, unsynced, so that :meth:`sync` makes a whole batch durable with
        one journal commit instead of one per file. Nothing is created but the temp file
        (its directory must exist: False when it does not, True otherwise); whatever fails
        here is left to the applier's ``write_file``."""
        if entry.kind is not Kind.FILE or entry.path in self.temps:
            return True
        opened = self.dirs.parent_if_there(mset, entry.path, "write")
        if opened is None:
            return False
        if reserve:
            try:
                free, keep = diskspace.room(opened[0], reserve)
            except OSError:
                free, keep = 0, 1
            if free - entry.size < keep:
                os.close(opened[0])
                return True  # write_file refuses it, and says why
        try:
            temp = TempFile(opened[0], entry)
        except OSError:
            return True
        try:
            temp.write(data)
            temp.finish(sync=False)
        except ApplyError:
            return True  # removed by the failure; write_file says what is wrong
        self.temps[entry.path] = temp
        return True

    def sync(self) -> None:
        """Make every prepared file not yet synced durable before any is renamed into
        place (:func:`sync_batch`)."""
        for temp in sync_batch([t for t in self.temps.values() if not t.is_synced]):
            self.temps.pop(temp.path, None)

    def discard(self) -> None:
        """Remove the temp files of a batch that were not installed."""
        for temp in self.temps.values():
            temp.abort()
        self.temps.clear()

    def take(self, mset: MirrorSet, entry: Entry) -> TempFile | None:
        """The prepared temp file of exactly this version, if it is still in the
        directory the path is in now (not one renamed away meanwhile)."""
        temp = self.temps.pop(entry.path, None)
        if temp is None:
            return None
        if (temp.entry.stamp, temp.entry.size, temp.entry.digest) != (
                entry.stamp, entry.size, entry.digest):
            temp.abort()
            return None
        if self.dirs.still_at(temp.dir_fd, entry.path):
            return temp
        opened = self.dirs.parent_if_there(mset, entry.path, "write")
        if opened is not None:
            here = os.fstat(opened[0])
            os.close(opened[0])
            there = os.fstat(temp.dir_fd)
            if fsio.same_file(here, there):
                return temp
        temp.abort()
        return None


    def adopt(self, other: Prepared) -> None:
        """Take the temp files ``other`` wrote ahead (:class:`Ahead`), for a path this
        one has none for; the others are removed."""
        for path, temp in other.temps.items():
            if path in self.temps:
                temp.abort()
            else:
                self.temps[path] = temp
        other.temps.clear()


class Ahead:
    """The small files of a receiver's next batch, written ahead by a thread of their
    own (the stager) while the tree worker applies the batch before: creating a file
    costs the kernel most of a small file's time on some disks, and here it overlaps
    with the rest of the work instead of adding to it.

    Only temp files are made, in directories that exist (no directory is made, nothing
    is recorded): the tree worker still decides each entry when it applies it, takes a
    temp file only for exactly that version in the directory its path names then
    (:meth:`Prepared.take`), and removes the rest. A temp file is a daemon name that
    scans never list, but it does keep its directory from being empty: whatever must
    remove a directory does it inside :meth:`paused`, which waits for the stager, drops
    every temp file written ahead, and keeps the stager out until the removal is done.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._staged: list[Prepared] = []  # written ahead, not yet adopted nor dropped

    @contextlib.contextmanager
    def staging(self, root: bytes) -> Iterator[Prepared]:
        """In the stager: the temp files written in the block, registered (so that
        :meth:`paused` can drop them) from their first to their adoption."""
        with self._lock:
            prepared = Prepared(SetDirs(root))
            self._staged.append(prepared)
            try:
                with prepared.dirs.holding_roots():
                    yield prepared
            except BaseException:
                self._staged.remove(prepared)
                prepared.discard()
                raise

    def adopt(self, staged: Prepared, into: Prepared) -> None:
        """In the tree worker, at the start of the batch ``staged`` was written for."""
        with self._lock:
            if staged in self._staged:
                self._staged.remove(staged)
                into.adopt(staged)

    def drop(self, staged: Prepared) -> None:
        """Remove what was written ahead for a batch that will not run (the link ended)."""
        with self._lock:
            if staged in self._staged:
                self._staged.remove(staged)
                staged.discard()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Remove a directory inside: nothing written ahead is left in it, and nothing is
        written ahead until the block ends."""
        with self._lock:
            for staged in self._staged:
                staged.discard()
            self._staged.clear()
            yield


# -- what a fetch builds from: the old version, or what arrived before a cut ---------------


def open_old(dirs: SetDirs, mset: MirrorSet, record: Record) -> int:
    """Open the local version a block delta is built against, read-only; -1 when the
    file is no longer the one ``record`` describes (another file, or changed since:
    its blocks would not be what the record's content is)."""
    if record.sig is None:
        return -1
    opened = dirs.parent_if_there(mset, record.entry.path, "read")
    if opened is None:
        return -1
    parent, name = opened
    try:
        fd, st = fsio.open_file(parent, name)
    except (OSError, fsio.Swapped):
        return -1
    finally:
        os.close(parent)
    if StatSig.of(st) != record.sig:
        os.close(fd)
        return -1
    return fd

def open_partial(dirs: SetDirs, mset: MirrorSet, entry: Entry) -> tuple[int, int]:
    """The part of this very version kept from a transfer that was cut
    (:meth:`TempFile.keep_partial`), open read-only, and its size; (-1, 0) when
    there is none fit to resume from. It must be ours (a user who can write the
    directory could put a file at that name; what is built is checked against the
    digest anyway)."""
    opened = dirs.parent_if_there(mset, entry.path, "read")
    if opened is None:
        return -1, 0
    parent, name = opened
    try:
        fd = os.open(partial_name(name, entry.digest), fsio.READ_FLAGS, dir_fd=parent)
    except OSError:
        return -1, 0
    finally:
        os.close(parent)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1 \
            or not 0 < st.st_size <= entry.size:
        os.close(fd)
        return -1, 0
    return fd, st.st_size

def drop_partial(dirs: SetDirs, mset: MirrorSet, entry: Entry) -> None:
    """Remove what was kept of a cut transfer of ``entry``: it arrived whole, or that
    version is no longer to be had."""
    opened = dirs.parent_if_there(mset, entry.path, "write")
    if opened is None:
        return
    parent, name = opened
    try:
        os.unlink(partial_name(name, entry.digest), dir_fd=parent)
    except OSError:
        pass
    finally:
        os.close(parent)
