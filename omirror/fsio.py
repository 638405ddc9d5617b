"""The directory-descriptor layer: how every read and write of a mirrored tree reaches a file.

omirrord runs as root, and the trees it mirrors are written by local users. A path that
the kernel resolves in one go can be redirected between a check and its use: a user who
swaps a directory of the tree with a symlink to ``/etc`` (``rename(2)``, or
``renameat2(RENAME_EXCHANGE)``, which is atomic) would make root read ``/etc/shadow``
where it meant ``d/f``, and send it to every peer; or write where it meant to write. So
no path below a set's root is ever resolved by name in one go:

* a set's root is opened by :func:`open_root`, which follows a symlink on the way only
  when root (or this daemon's user) owns it, so a link a user planted is refused;
* every directory below it is opened relative to its parent with
  ``O_NOFOLLOW|O_DIRECTORY`` (:func:`step`): a symlink, or a file, where a directory is
  expected raises :class:`NotInTree`, a stop and never a detour;
* the final name is examined, opened, renamed or removed relative to that descriptor,
  and what was opened is compared by device and inode with what was listed
  (:func:`same_file`), so a file swapped in between is noticed.

Descriptors of directories are held only for one job (a scan, a page of a link), never
for the daemon's life: a held descriptor would keep an unmounted disk busy.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import functools
import os
import stat
from collections.abc import Callable, Iterator, Sequence

import xxhash

from omirror.paths import local_path, show_name

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: O_NONBLOCK: a name swapped for a FIFO must not hang the thread that opens it (a FIFO
#: without a writer blocks open(2) for ever); O_NOCTTY: nor may a terminal become ours.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
CHUNK = 1 << 20
#: Symlinks followed on the way to one root, as the kernel bounds them.
_MAX_HOPS = 40
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_EMPTY_PATH = 0x1000


class NotInTree(Exception):
    """A path leads through a symlink, or through something that is not a directory.

    What lies beyond is outside the tree: it is neither read, nor written, nor recorded.
    """

    def __init__(self, path: bytes, part: bytes, *, link: bool) -> None:
        self.path = path
        self.part = part
        self.link = link
        self.why = "is a symbolic link here" if link else "is not a directory here"
        super().__init__(f"component '{show_name(part)}' of {show_name(path)} {self.why}")


class Swapped(Exception):
    """What a name held when it was opened is not what was looked at before: another
    file, or not a regular file at all (a FIFO, a device)."""


# --------------------------------------------------------------------------- comparing


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """The two stats are of one file: device and inode, never the inode alone."""
    return a.st_ino == b.st_ino and a.st_dev == b.st_dev


def unchanged(now: os.stat_result, then: os.stat_result) -> bool:
    """No write, truncation, chmod or chown landed between the two stats of one file."""
    return (now.st_size, now.st_mtime_ns, now.st_ctime_ns) == (
        then.st_size, then.st_mtime_ns, then.st_ctime_ns)


def same_version(now: os.stat_result, then: os.stat_result) -> bool:
    """One file, neither written nor chmod'ed nor chown'ed between the two stats (a
    rename moves its ctime, and nothing else)."""
    return (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns, now.st_mode, now.st_uid,
            now.st_gid) == (then.st_ino, then.st_dev, then.st_size, then.st_mtime_ns,
                            then.st_mode, then.st_uid, then.st_gid)


# --------------------------------------------------------------------------- opening


def through(held: int) -> str:
    """The name by which the calls that take no ``O_PATH`` descriptor (the ``*xattr``
    family) reach the very file ``held`` is open on, whatever its name holds now."""
    return f"/proc/self/fd/{held}"


def open_root(where: bytes) -> int:
    """Open a set's root directory by its absolute local path.

    The components are opened one at a time from ``/``. A symlink on the way is
    followed only when root or this daemon's user owns it (its target is read through
    a descriptor of the link itself, so it cannot be swapped after the owner was
    checked): ``/srv -> /data/srv`` made by an administrator works, a link that a local
    user planted is refused with ``ELOOP``. The root itself must be a directory, not a
    symlink to one (``ENOTDIR``, or ``ELOOP`` for a symlink).
    """
    parent, _, last = where.rstrip(b"/").rpartition(b"/")
    fd = _walk_trusted(os.open(b"/", DIR_FLAGS), parent.split(b"/"), where)
    try:
        if not last:
            return fd
        try:
            return os.open(last, DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            st = lstat_at(fd, last) if e.errno in (errno.ELOOP, errno.ENOTDIR) else None
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise OSError(errno.ELOOP, f"{show_name(where)} is a symlink") from None
            raise
    finally:
        if last:
            os.close(fd)


def follow_link(dir_fd: int, name: bytes, where: bytes) -> tuple[int, bytes] | None:
    """Where the symlink ``name`` of an open directory leads, for a set that follows
    symlinks (``install -ofollow``): the open directory that holds the link's target
    (the caller's to close) and the target's last name, itself no symlink.

    Only links that root or this daemon's user own are followed, here and on the way:
    a link that a local user made could lead anywhere (``/etc/shadow``), and this
    daemon reads as root. None for such a link, and for one that loops.
    """
    parent = os.dup(dir_fd)
    try:
        for _ in range(_MAX_HOPS):
            try:
                target = _trusted_link(parent, name, where)
            except OSError:
                os.close(parent)
                return None
            if target is None:
                return parent, name
            parts = target.rstrip(b"/").split(b"/") if target.rstrip(b"/") else [b""]
            start = os.open(b"/", DIR_FLAGS) if target.startswith(b"/") else os.dup(parent)
            os.close(parent)
            parent = -1
            parent = _walk_trusted(start, parts[:-1], where)
            name = parts[-1] or b"."
        os.close(parent)
        return None
    except OSError:
        if parent >= 0:
            os.close(parent)
        return None


def _walk_trusted(fd: int, parts: list[bytes], where: bytes) -> int:
    """Open the directories ``parts`` from the open directory ``fd`` (which the walk
    takes over), following symlinks owned by root or this daemon's user only."""
    pending = collections.deque(parts)
    hops = 0
    try:
        while pending:
            part = pending.popleft()
            if part in (b"", b"."):
                continue
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                target = _trusted_link(fd, part, where)
                if target is None:
                    raise
                hops += 1
                if hops > _MAX_HOPS:
                    raise OSError(errno.ELOOP, f"too many symlinks on the way to "
                                               f"{show_name(where)}") from None
                if target.startswith(b"/"):
                    os.close(fd)
                    fd = -1
                    fd = os.open(b"/", DIR_FLAGS)
                pending.extendleft(reversed(target.split(b"/")))
                continue
            os.close(fd)
            fd = child
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return fd


def _trusted_link(parent: int, name: bytes, where: bytes) -> bytes | None:
    """The target of the symlink ``name`` if root or this daemon's user owns it; None if
    ``name`` is no symlink; ``OSError(ELOOP)`` for a link someone else owns."""
    try:
        link = os.open(name, PATH_FLAGS, dir_fd=parent)
    except OSError:
        return None
    try:
        st = os.fstat(link)
        if not stat.S_ISLNK(st.st_mode):
            return None
        if st.st_uid not in (0, os.geteuid()):
            raise OSError(errno.ELOOP, f"{show_name(name)} on the way to "
                                       f"{show_name(where)} is a symlink owned by uid "
                                       f"{st.st_uid}: only symlinks owned by root are "
                                       "followed to a root")
        return os.readlink(b"", dir_fd=link)
    finally:
        os.close(link)


def step(parent: int, part: bytes, path: bytes, *, create: bool = False,
         mode: int = 0o755, on_create: Callable[[bytes], None] | None = None) -> int:
    """Open the directory ``part`` of ``parent``; -1 when it is missing and not made.

    :class:`NotInTree` when ``part`` is a symlink or not a directory. With ``create`` a
    missing directory is made with ``mode`` (and ``on_create`` told its name).
    """
    try:
        return os.open(part, DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            return -1
    except OSError as e:
        # open(2): O_NOFOLLOW|O_DIRECTORY on a symlink fails with ENOTDIR or ELOOP,
        # depending on the kernel; look again to say which it was
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        st = lstat_at(parent, part)
        raise NotInTree(path, part,
                        link=st is not None and stat.S_ISLNK(st.st_mode)) from None
    try:
        os.mkdir(part, mode, dir_fd=parent)
        if on_create is not None:
            on_create(part)
    except FileExistsError:
        pass
    return step(parent, part, path)


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    """``lstat`` of a name in an open directory; None when nothing is there."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def open_file(dir_fd: int, name: bytes,
              expect: os.stat_result | None = None) -> tuple[int, os.stat_result]:
    """Open a regular file of an open directory for reading, and its ``fstat``.

    :class:`Swapped` when it is not a regular file, or (with ``expect``) not the file
    that was listed; ``FileNotFoundError`` when it is gone.
    """
    fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Swapped(f"{show_name(name)} is not a regular file")
        if expect is not None and not same_file(st, expect):
            raise Swapped(f"{show_name(name)} was replaced after it was listed")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class Opener:
    """Directory descriptors for one job (a page of a link, a batch of events), reused
    between the paths of that job and all closed at its end.

    ``root`` is the ``--root`` prefix; each path is opened below its set's root
    (``top``, a logical path), and the directories on the way are cached by logical
    path: the files of one page usually share a few directories.
    """

    def __init__(self, root: bytes) -> None:
        self.root = root
        self._dirs: dict[bytes, int] = {}
        #: The roots among them: kept by :meth:`trim`, since opening one walks from /.
        self._tops: set[bytes] = set()

    def __enter__(self) -> Opener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        self._tops.clear()

    def trim(self, keep: int = 64) -> None:
        """Close the directories held beyond ``keep``, oldest first. Called between the
        paths of a job, never while a descriptor it returned may still be in use (a
        burst of events in a thousand directories would otherwise hold a thousand)."""
        excess = len(self._dirs) - keep
        if excess <= 0:
            return
        for path in [p for p in self._dirs if p not in self._tops][:excess]:
            os.close(self._dirs.pop(path))

    def directory(self, top: bytes, path: bytes) -> int:
        """The open directory ``path`` (logical, at or below ``top``); -1 when missing.

        Raises :class:`NotInTree` for a path beyond a symlink, and ``OSError`` for a root
        that cannot be opened. The descriptor stays the opener's.
        """
        held = self._dirs.get(path)
        if held is not None:
            return held
        if path == top:
            fd = open_root(local_path(self.root, top))
            self._tops.add(top)
        else:
            parent, _, name = path.rpartition(b"/")
            above = self.directory(top, parent if len(parent) >= len(top) else top)
            if above < 0:
                return -1
            fd = step(above, name, path)
            if fd < 0:
                return -1
        self._dirs[path] = fd
        return fd

    def parent(self, top: bytes, path: bytes) -> tuple[int, bytes]:
        """The open directory holding ``path`` (below ``top``) and its last name; -1 when
        a directory on the way is missing."""
        parent, _, name = path.rpartition(b"/")
        return self.directory(top, parent if len(parent) >= len(top) else top), name

    def lstat(self, top: bytes, path: bytes) -> os.stat_result | None:
        """``lstat`` of a path below ``top``, reached through descriptors; None when it,
        or a directory on the way, is missing; :class:`NotInTree` beyond a symlink."""
        if path == top:
            fd = self.directory(top, top)
            return os.fstat(fd)
        fd, name = self.parent(top, path)
        return None if fd < 0 else lstat_at(fd, name)

    def open_file(self, top: bytes, path: bytes,
                  expect: os.stat_result | None = None) -> tuple[int, os.stat_result]:
        """:func:`open_file` of a path below ``top``; ``FileNotFoundError`` when missing."""
        fd, name = self.parent(top, path)
        if fd < 0:
            raise FileNotFoundError(errno.ENOENT, "a directory on the way is missing")
        return open_file(fd, name, expect)



# --------------------------------------------------------------------------- content


# Every digest of content is xxh3-128, and every short name derived from bytes xxh3-64:
# these are the only calls of xxhash in the project, so the choice is made once.


#: A running digest, for the type of what :func:`new_digest` returns.
Digest = xxhash.xxh3_128


def new_digest() -> Digest:
    """A running xxh3-128 digest, for content that arrives or is read in parts."""
    return xxhash.xxh3_128()


def short_hash(data: bytes) -> str:
    """16 hex digits naming ``data`` (xxh3-64): short, stable names for long ones."""
    return xxhash.xxh3_64_hexdigest(data)


#: Zeros stand in for a hole wherever content is hashed: a hole is never read, it is
#: known to hold zeros. Shared and read-only.
ZEROS = bytes(CHUNK)


def hash_zeros(digest: Digest, length: int) -> None:
    """Feed ``length`` zero bytes (a hole) to a running digest, without a buffer of that
    size: a hole of gigabytes costs its hashing, neither memory nor reads."""
    view = memoryview(ZEROS)
    while length > 0:
        step_len = min(length, len(ZEROS))
        digest.update(view[:step_len])
        length -= step_len


def extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """The ranges of ``[start, end)`` of an open file as ``(offset, length, is_data)``,
    as the file system reports them (``lseek`` ``SEEK_DATA``/``SEEK_HOLE``): a hole is
    what it allocated nothing for, so one smaller than its block does not exist.

    Where the file system cannot say, everything is data. A file that shrinks meanwhile
    ends the ranges at its new end (the caller's digest then tells).
    """
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # EINVAL, EOPNOTSUPP: no hole is known here
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                yield pos, end - pos, True
                return
            # no data from pos on: a hole up to the end of the file, or past it
            data = min(end, os.fstat(fd).st_size)
            if data <= pos:
                return
        data = min(data, end)
        if data > pos:
            yield pos, data - pos, False
            pos = data
            if pos >= end:
                return
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError as e:
            if e.errno not in (errno.ENXIO, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            hole = end
        hole = end if hole <= pos else min(hole, end)
        yield pos, hole - pos, True
        pos = hole


def is_dense(st: os.stat_result) -> bool:
    """As many blocks as its size: no hole worth asking the file system about (most
    files; asking costs two ``lseek`` per file, on every hash)."""
    return st.st_blocks * 512 >= st.st_size


def has_hole(fd: int, st: os.stat_result) -> bool:
    """The open file has a hole before its end: fewer blocks than its size first (cheap,
    and enough for most files), then the file system asked where the first hole is."""
    if is_dense(st):
        return False
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < st.st_size
    except OSError:
        return False


def read_range(fd: int, offset: int, length: int) -> Iterator[bytes]:
    """The data of ``[offset, offset + length)`` of an open file in chunks of at most
    :data:`CHUNK`; ends early (short) when the file does."""
    while length > 0:
        data = os.pread(fd, min(CHUNK, length), offset)
        if not data:
            return
        yield data
        offset += len(data)
        length -= len(data)


def copy_data(src: int, dst: int) -> None:
    """Copy an open file's content into an empty open file, from the start: its holes
    stay holes (skipped, then the size set), its data in chunks. What the source grew
    by meanwhile is copied as well."""
    st = os.fstat(src)
    offset = 0
    for start, length, is_data in () if is_dense(st) else extents(src, 0, st.st_size):
        if is_data:
            for data in read_range(src, start, length):
                _write_all(dst, data, offset)
                offset += len(data)
            if offset < start + length:  # the source shrank under us
                break
        else:
            offset += length
    while chunk := os.pread(src, CHUNK, offset):
        _write_all(dst, chunk, offset)
        offset += len(chunk)
    if os.fstat(dst).st_size < offset:  # it ends in a hole
        os.ftruncate(dst, offset)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def digest_fd(fd: int) -> tuple[bytes, int]:
    """xxh3-128 digest and size of an open file, read from its start.

    The digest is of the logical content: holes count as the zeros they read as, but
    are hashed from :data:`ZEROS`, not read. What the file grew by meanwhile is read on
    to its end, so the size is what was hashed.
    """
    digest = new_digest()
    offset = 0
    st = os.fstat(fd)
    for start, length, is_data in () if is_dense(st) else extents(fd, 0, st.st_size):
        if not is_data:
            hash_zeros(digest, length)
            offset += length
            continue
        for data in read_range(fd, start, length):
            digest.update(data)
            offset += len(data)
        if offset < start + length:  # the file shrank under us
            return digest.digest(), offset
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.digest(), offset


def digest_bytes(data: bytes) -> bytes:
    """xxh3-128 of content held in memory (an inline file)."""
    return xxhash.xxh3_128_digest(data)


def _blocks(fd: int, size: int) -> Iterator[bytes | int]:
    """An open file, from its start, in blocks of ``size`` (the last may be short). A
    block that is all hole is its length (an int), not read; a block partly a hole is
    read only where it holds data."""
    st = os.fstat(fd)
    end = 0 if is_dense(st) else st.st_size  # dense: every block read as it comes, below
    offset = 0
    while offset < end:
        length = min(size, end - offset)
        ranges = list(extents(fd, offset, offset + length))
        if not ranges:  # the file shrank under us
            return
        if not any(is_data for _, _, is_data in ranges):
            yield length
        elif len(ranges) == 1:
            data = os.pread(fd, length, offset)
            yield data
            if len(data) < length:
                return
        else:
            block = bytearray(length)
            for start, part, is_data in ranges:
                if is_data:
                    data = os.pread(fd, part, start)
                    block[start - offset:start - offset + len(data)] = data
            yield bytes(block)
        offset += length
    # what the file grew by since its size was taken is read as it is
    while data := os.pread(fd, size, offset):
        yield data
        offset += len(data)
        if len(data) < size:
            return


class _BlockHasher:
    """Digests of blocks and of the whole, holes hashed as zeros: an all-hole block's
    digest is that of zeros of its length, computed once per length."""

    def __init__(self) -> None:
        self.whole = new_digest()
        self._zero_blocks: dict[int, bytes] = {}

    def add(self, block: bytes | int) -> bytes:
        if isinstance(block, bytes):
            self.whole.update(block)
            return digest_bytes(block)
        hash_zeros(self.whole, block)
        known = self._zero_blocks.get(block)
        if known is None:
            zeros = new_digest()
            hash_zeros(zeros, block)
            known = self._zero_blocks[block] = zeros.digest()
        return known


def compare_blocks(fd: int, size: int,
                   theirs: Sequence[bytes]) -> tuple[bytearray, bytes]:
    """Which blocks of an open file have the digests ``theirs`` (1 where they do), and
    the digest of the whole file."""
    hasher = _BlockHasher()
    same = bytearray()
    for index, block in enumerate(_blocks(fd, size)):
        digest = hasher.add(block)  # the whole digest needs every block
        same.append(index < len(theirs) and digest == theirs[index])
    return same, hasher.whole.digest()


def block_digests(fd: int, size: int) -> tuple[list[bytes], bytes]:
    """Digests of each block of an open file, and of the whole file."""
    hasher = _BlockHasher()
    blocks = [hasher.add(block) for block in _blocks(fd, size)]
    return blocks, hasher.whole.digest()


# --------------------------------------------------------------------------- libc


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def chown_link(link_fd: int, uid: int, gid: int) -> None:
    """``fchownat(fd, "", AT_EMPTY_PATH)``: set the owner of the symlink open at the
    ``O_PATH`` descriptor ``link_fd`` itself. Python's ``os.chown`` can only name a
    symlink by path, and a name in a directory users write can be swapped between a
    check and the chown (which would give their file away to the entry's owner)."""
    libc = _libc()
    fn = None if libc is None else getattr(libc, "fchownat", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "fchownat is not available")
    if fn(link_fd, b"", uid, gid, _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def rename_noreplace(src_dir: int, src: bytes, dst: bytes,
                     dst_dir: int | None = None) -> None:
    """``renameat2(RENAME_NOREPLACE)``: ``FileExistsError`` if ``dst`` exists, never a
    silent replacement of what someone put there an instant before. Where the call or
    the file system lacks it, a check then a plain rename."""
    target_dir = src_dir if dst_dir is None else dst_dir
    fn = getattr(_libc(), "renameat2", None)
    if fn is not None:
        if fn(src_dir, src, target_dir, dst, _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), os.fsdecode(dst))
    if lstat_at(target_dir, dst) is not None:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst))
    os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=target_dir)


def rename_exchange(src_dir: int, src: bytes, dst: bytes,
                    dst_dir: int | None = None) -> bool:
    """``renameat2(RENAME_EXCHANGE)``: swap two names at once, both of which exist.
    False where the call or the file system lacks it (the caller renames instead)."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    if fn(src_dir, src, src_dir if dst_dir is None else dst_dir, dst, _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), os.fsdecode(dst))


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    return getattr(_libc(), "syncfs", None)


@functools.cache
def _libc_sync_file_range() -> Callable[..., int] | None:
    fn = getattr(_libc(), "sync_file_range", None)
    if fn is not None:
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of ``fd`` to disk, without waiting: only a head start for
    the fsync that makes the file durable, so a failure here changes nothing."""
    fn = _libc_sync_file_range()
    if fn is not None:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def syncfs(fd: int) -> bool:
    """syncfs(2) on the file system holding ``fd``; False where there is none, or it
    failed (the caller then fsyncs each file)."""
    fn = _libc_syncfs()
    return fn is not None and fn(fd) == 0
