"""Temp files: where content from a peer is built before it takes a name in the tree.

A temp file is made in the target directory itself, so that its rename into place is
atomic (ypxfr's temp file, then rename) and the content is never copied twice. It is
append-only and hashed as it grows, so it is checked against the entry's digest without
being read again; it is synced before the rename, so an acknowledged version is on disk.
A transfer that is cut keeps what arrived under a partial name, to resume from.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from collections.abc import Iterator

from omirror import fsio
from omirror.entry import Entry
from omirror.errors import ApplyError
from omirror.paths import PARTIAL_PREFIX, TEMP_PREFIX, show, split

log = logging.getLogger(__name__)

TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
#: A big file being received is handed to writeback every this many bytes, so that the
#: fsync before its rename finds most of it on disk already (a 1 GiB file otherwise
#: waited for all of it there, after the last byte came).
WRITEBACK_EVERY = 8 << 20


#: Batches of at least this many small files are made durable with one syncfs.
SYNCFS_MIN = 8


@contextlib.contextmanager
def os_errors(path: bytes, action: str) -> Iterator[None]:
    """Turn a failed system call into an :class:`ApplyError` that says what failed."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or errno.errorcode.get(e.errno or 0, str(e))
        raise ApplyError(path, e.errno, f"cannot {action} {show(path)}: {reason}") from e


def temp_name() -> bytes:
    return TEMP_PREFIX + secrets.token_hex(8).encode()


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
    temp = temp_name()
    try:
        yield temp
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=parent)
        raise


class TempFile:
    """A file being received: ``.omirror-tmp-<hex>`` in the target directory.

    It is created in the target directory, not in a spool, so that the final rename is
    atomic and the content is never copied twice. It is append-only and hashed as it
    grows, so :meth:`finish` can check the digest without reading the file again. Use it
    as a context manager (or call :meth:`abort`) so a failed transfer leaves nothing.
    """

    def __init__(self, dir_fd: int, entry: Entry) -> None:
        """Create the temp file in the directory open at ``dir_fd``, which it owns from
        now on, even when this fails."""
        self.entry = entry
        self.path = entry.path
        self.name = temp_name()
        self.size = 0
        self._written_back = 0
        self.dir_fd = dir_fd
        self.fd = -1
        self._hash = fsio.new_digest()
        self._finished = False
        self._synced = False
        self._created = False
        try:
            self.fd = os.open(self.name, TEMP_FLAGS, 0o600, dir_fd=dir_fd)
            self._created = True
            if entry.size > _CHUNK:
                self._reserve(entry.size)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> TempFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def _reserve(self, size: int) -> None:
        """Allocate the whole size up front: a disk too small fails now, not after
        gigabytes were received."""
        try:
            os.posix_fallocate(self.fd, 0, size)
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

    def write(self, data: bytes) -> None:
        """Append ``data``; more than the entry announced is refused at once, so a peer
        cannot fill the disk through one entry."""
        if self.size + len(data) > self.entry.size:
            self.abort()
            raise ApplyError(self.path, None,
                             f"cannot write {show(self.path)}: more content than the "
                             f"{self.entry.size} bytes its entry announced")
        with self._guard("write"):
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        self._hash.update(data)
        self.size += len(data)
        if self.size - self._written_back >= WRITEBACK_EVERY:
            fsio.start_writeback(self.fd, self._written_back, self.size - self._written_back)
            self._written_back = self.size

    def copy_from(self, fd: int, offset: int, length: int) -> None:
        """Append ``length`` bytes of another open file from ``offset``: the blocks of a
        delta that the older local version already holds."""
        while length > 0:
            with self._guard("write"):
                chunk = os.pread(fd, min(_CHUNK, length), offset)
            if not chunk:
                self.abort()
                raise ApplyError(self.path, None,
                                 f"cannot write {show(self.path)}: the local file it is "
                                 f"built from ended {length} bytes early")
            self.write(chunk)
            offset += len(chunk)
            length -= len(chunk)

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
