"""The versions area of ``install -osavetargets``: what a peer's change took away here.

A peer's new content, a path turned into another kind, and a peer's deletion each end
a local regular file's life on this host. For a set with ``savetargets`` that file is
kept first, under ``<root>/.omirror-versions/`` (one area per FILES root), at its path
relative to the root and named ``NAME~YYYYmmdd-HHMMSS`` (UTC, the time it was kept;
``-N`` added when that name is taken). It is kept by a hard link of the old inode, made
just before the applier swaps the new version in or takes the old one away, so the
path is never missing, nothing is copied, and the version is in the area before the
new one is in place; when the applier finds a local change instead and puts it back,
the link is removed again (:meth:`Versions.discard`). A file on another file system
than its root (a mount point below it), or one the daemon may not link, is copied
through descriptors instead.

The area is one of the daemon's own names (``.omirror*``, omirror/paths.py): never
scanned, watched, sent or accepted from a peer. Local users write the trees, so the
area is used only when it is a directory of this daemon's user with no access for
group or others: one planted as a symlink, a file, or a directory someone else owns or
may enter is never written through nor read; a warning says so once, and replication
goes on without keeping anything there. Everything below it is reached from the root's
descriptor one component at a time (omirror/fsio.py).

Retention is by the time in each kept name: :meth:`Versions.prune` removes what is
older than ``--keep-versions`` days, and the directories that leave empty.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from omirror import fsio
from omirror.errors import OmirrorError
from omirror.paths import NAME_MAX, VERSIONS_AREA, join, local_path, logical, show, split

if TYPE_CHECKING:  # the command line reads the defaults here without loading these
    from omirror.config import MirrorSet
    from omirror.setdirs import SetDirs

log = logging.getLogger(__name__)

#: ``--keep-versions`` when not given: days a kept version stays.
DEFAULT_KEEP_DAYS = 30.0
#: How often the daemon prunes the areas (and once at startup).
PRUNE_EVERY_S = 3600.0
_TIME_FORMAT = "%Y%m%d-%H%M%S"
_KEPT = re.compile(rb"~(\d{8}-\d{6})(?:-([1-9]\d{0,5}))?\Z")
_MAX_SUFFIX = 1000
_COPY_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class AreaRefused(Exception):
    """The name ``.omirror-versions`` under a root holds something the daemon must not
    write through or read: ``why`` says what, and what to do."""

    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__(why)


@dataclass(frozen=True)
class Kept:
    """One kept version: the logical path it was, its version name (the time it was
    kept, ``20240501-093000`` or ``20240501-093000-1``), when, its size, and the local
    path of the kept file (what a restore copies back)."""

    path: bytes
    version: str
    kept_at: float
    size: int
    where: bytes


def kept_name(name: bytes, when: float, n: int = 0) -> bytes:
    """``index.html`` kept at ``when`` (Unix seconds): ``index.html~20240501-093000``,
    and ``-N`` after it for the ``n``-th name taken."""
    suffix = time.strftime(_TIME_FORMAT, time.gmtime(when)).encode()
    return name + b"~" + suffix + (b"-%d" % n if n else b"")


def parse_kept(name: bytes) -> tuple[bytes, str, float] | None:
    """The original name, the version and the time of keeping, from a kept name;
    None for a name the daemon does not make."""
    found = _KEPT.search(name)
    if found is None or found.start() == 0:
        return None
    try:
        when = calendar.timegm(time.strptime(found.group(1).decode(), _TIME_FORMAT))
    except ValueError:
        return None
    return name[:found.start()], found.group(0)[1:].decode(), float(when)


def _own_uid() -> int:
    return os.geteuid()


def open_area(root_fd: int, *, create: bool, owner: int | None = None) -> int | None:
    """Open the area below an open root (the caller closes it); None when there is none
    and ``create`` is false. :class:`AreaRefused` when the name holds anything but a
    directory of ``owner`` (by default this process's user: the daemon's) that group
    and others cannot enter."""
    uid = _own_uid() if owner is None else owner
    try:
        fd = os.open(VERSIONS_AREA, fsio.DIR_FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        if not create:
            return None
        with contextlib.suppress(FileExistsError):
            os.mkdir(VERSIONS_AREA, 0o700, dir_fd=root_fd)
        return open_area(root_fd, create=False, owner=owner)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        st = fsio.lstat_at(root_fd, VERSIONS_AREA)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise AreaRefused("is a symbolic link; remove it") from None
        raise AreaRefused("is not a directory; remove it") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != uid:
            raise AreaRefused(f"is owned by uid {st.st_uid}, not by this daemon's user "
                              f"(uid {uid}); remove it")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise AreaRefused(f"has mode {stat.S_IMODE(st.st_mode):04o}, open to group or "
                              "others; chmod 700 it, or remove it")
    except BaseException:
        os.close(fd)
        raise
    return fd


class Versions:
    """Keeps, prunes and lists the versions of the sets below ``dirs.root``.

    ``clock`` gives the time of keeping (Unix seconds). ``owner`` is the user whose
    areas are used: this process's (the daemon's), unless a command run by another
    user (root listing what the daemon's user kept) says whose. ``warned`` holds the roots (by
    set title and logical root) whose area was refused and said so, so a refused area
    is reported once, not at every file; an area usable again is reported again when
    it is refused again.
    """

    def __init__(self, dirs: SetDirs, clock: Callable[[], float] = time.time,
                 owner: int | None = None) -> None:
        self.dirs = dirs
        self.clock = clock
        self.owner = owner
        self.warned: set[tuple[str, bytes]] = set()

    # -- keeping ---------------------------------------------------------------------------

    def keep(self, mset: MirrorSet, path: bytes, dir_fd: int, name: bytes,
             old: os.stat_result) -> bytes | None:
        """Keep the regular file ``name`` of the open directory ``dir_fd``, which was
        checked to be ``old``, the version of ``path`` a peer's change takes away;
        returns the kept file's logical path, or None when nothing was kept.

        Never raises for the file's sake: a version that cannot be kept is logged, and
        the peer's change goes on (the caller removes or replaces the file after this).
        """
        if not mset.options.savetargets or not stat.S_ISREG(old.st_mode):
            return None
        try:
            top = self.dirs.top(mset, path)
            rel_dir, base = split(path[len(top) + 1:] if top else path)
            root_fd = self.dirs.open_root(top, path)
            try:
                area = self._area(mset, top, root_fd)
            finally:
                os.close(root_fd)
            if area is None:
                return None
            fd = area
            try:
                for part in rel_dir.split(b"/") if rel_dir else ():
                    child = fsio.step(fd, part, path, create=True, mode=0o700)
                    os.close(fd)
                    fd = child
                kept = self._put(fd, dir_fd, name, base, old)
            finally:
                os.close(fd)
        except (OSError, OmirrorError, fsio.NotInTree) as e:
            log.warning("path=%s the version a peer's change replaces is not kept: %s",
                        show(path), e)
            return None
        if kept is None:
            return None
        where = join(top, join(VERSIONS_AREA, join(rel_dir, kept)))
        log.info("path=%s the version a peer's change replaces is kept as %s", show(path),
                 show(where))
        return where

    def _area(self, mset: MirrorSet, top: bytes, root_fd: int) -> int | None:
        key = (mset.title, top)
        try:
            fd = open_area(root_fd, create=True, owner=self.owner)
        except AreaRefused as e:
            if key not in self.warned:
                self.warned.add(key)
                log.warning("set=%s keeps no old versions under %s: %s %s; replication "
                            "goes on, and old versions are kept again once it is a "
                            "directory of this daemon's user with mode 0700 (the daemon "
                            "makes it when it is missing)", mset.title, show(top),
                            show(join(top, VERSIONS_AREA)), e.why)
            return None
        self.warned.discard(key)
        return fd

    def _put(self, area_dir: int, dir_fd: int, name: bytes, base: bytes,
             old: os.stat_result) -> bytes | None:
        """Link (or copy) the file into the open area directory under a free name.

        A file with other names (a hard link) is copied: those names stay, and a write
        through one of them would change a linked version too."""
        now = self.clock()
        for n in range(_MAX_SUFFIX):
            kept = kept_name(base, now, n)
            if len(kept) > NAME_MAX:
                raise OSError(errno.ENAMETOOLONG, f"{len(kept)} bytes are too long a name "
                                                  "for the kept version")
            if old.st_nlink > 1:
                try:
                    return kept if _copy(dir_fd, name, area_dir, kept, old) else None
                except FileExistsError:
                    continue
            try:
                os.link(name, kept, src_dir_fd=dir_fd, dst_dir_fd=area_dir,
                        follow_symlinks=False)
            except FileExistsError:
                continue
            except OSError as e:
                # another file system below the root, or fs.protected_hardlinks refusing
                # a file of another user to a daemon without CAP_FOWNER: copy it
                if e.errno not in (errno.EXDEV, errno.EPERM):
                    raise
                try:
                    return kept if _copy(dir_fd, name, area_dir, kept, old) else None
                except FileExistsError:
                    continue
            st = fsio.lstat_at(area_dir, kept)
            if st is None or not fsio.same_version(st, old):
                # the name held another file by now: not the version taken away
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(kept, dir_fd=area_dir)
                return None
            return kept
        raise OSError(errno.EEXIST, f"{_MAX_SUFFIX} versions kept in the same second")

    def discard(self, where: bytes) -> None:
        """Remove a version :meth:`keep` kept (its logical path ``where``) after all: the
        file was not replaced (a local change came first), so the link would be the
        live file under a version's name."""
        top, _, rest = where.rpartition(b"/" + VERSIONS_AREA + b"/")
        if not rest:
            top, rest = b"", where.removeprefix(VERSIONS_AREA + b"/")
        rel_dir, kept = split(rest)
        try:
            fd = self._open_existing(top)
            if fd is None:
                return
            try:
                for part in rel_dir.split(b"/") if rel_dir else ():
                    child = fsio.step(fd, part, where)
                    os.close(fd)
                    fd = child
                    if fd < 0:
                        return
                os.unlink(kept, dir_fd=fd)
            finally:
                if fd >= 0:
                    os.close(fd)
        except (OSError, OmirrorError, AreaRefused, fsio.NotInTree) as e:
            log.warning("%s is no version (the file changed here first) but could not be "
                        "removed: %s", show(where), e)

    # -- pruning ---------------------------------------------------------------------------

    def prune(self, sets: Iterable[MirrorSet], keep_days: float) -> int:
        """Remove kept versions older than ``keep_days`` (0: none), and the directories
        of the areas that this leaves empty; returns how many versions went."""
        if keep_days <= 0:
            return 0
        cutoff = self.clock() - keep_days * 86400
        removed = 0
        for top in _tops(sets):
            try:
                area = self._open_existing(top)
            except (OSError, OmirrorError, AreaRefused) as e:
                log.debug("path=%s versions not pruned: %s", show(top), e)
                continue
            if area is None:
                continue
            try:
                removed += _prune(area, cutoff)
            except OSError as e:
                log.warning("path=%s old versions not all pruned: %s",
                            show(join(top, VERSIONS_AREA)), e)
            finally:
                os.close(area)
        if removed:
            log.info("removed %d kept version%s older than %g days", removed,
                     "" if removed == 1 else "s", keep_days)
        return removed

    def _open_existing(self, top: bytes) -> int | None:
        root_fd = self.dirs.open_root(top, top)
        try:
            return open_area(root_fd, create=False, owner=self.owner)
        finally:
            os.close(root_fd)

    # -- listing ---------------------------------------------------------------------------

    def listing(self, sets: Iterable[MirrorSet], paths: Sequence[bytes] = (),
                problem: Callable[[str], None] = log.warning) -> Iterator[Kept]:
        """Every kept version, by root, for the logical ``paths`` and what lies below
        them (all when empty). A root whose area cannot be read, or is not used (see
        :func:`open_area`), is told to ``problem`` and skipped."""
        for top in _tops(sets):
            if paths and not any(_overlaps(top, p) for p in paths):
                continue
            try:
                area = self._open_existing(top)
            except (OSError, OmirrorError) as e:
                problem(f"{show(top)}: {e}")
                continue
            except AreaRefused as e:
                problem(f"{show(join(top, VERSIONS_AREA))} {e.why}; not listed")
                continue
            if area is None:
                continue
            try:
                where = local_path(self.dirs.root, join(top, VERSIONS_AREA))
                found = sorted(_listing(area, top, where),
                               key=lambda k: (k.path, k.kept_at, len(k.version), k.version))
            finally:
                os.close(area)
            for kept in found:
                if not paths or any(_under(kept.path, p) for p in paths):
                    yield kept


def _tops(sets: Iterable[MirrorSet]) -> list[bytes]:
    """The distinct FILES roots of the sets, as logical paths."""
    seen: dict[bytes, None] = {}
    for mset in sets:
        for top in mset.files:
            seen.setdefault(logical(top), None)
    return list(seen)


def _under(path: bytes, top: bytes) -> bool:
    return path == top or not top or path.startswith(top + b"/")


def _overlaps(a: bytes, b: bytes) -> bool:
    return _under(a, b) or _under(b, a)


def _copy(dir_fd: int, name: bytes, area_dir: int, kept: bytes, old: os.stat_result) -> bool:
    """Copy the file through descriptors when it cannot be linked; False when what the
    name holds is not ``old`` or changed while it was copied."""
    src, st = fsio.open_file(dir_fd, name, old)
    try:
        if not fsio.same_version(st, old):
            return False
        dst = os.open(kept, _COPY_FLAGS, 0o600, dir_fd=area_dir)
        try:
            fsio.copy_data(src, dst)
            with contextlib.suppress(PermissionError):
                os.fchown(dst, st.st_uid, st.st_gid)
            os.fchmod(dst, stat.S_IMODE(st.st_mode))
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            same = fsio.unchanged(os.fstat(src), st)
        finally:
            os.close(dst)
        if not same:
            os.unlink(kept, dir_fd=area_dir)
        return same
    finally:
        os.close(src)


def _walk(area: int) -> Iterator[tuple[bytes, int, bytes, os.stat_result | None]]:
    """Walk an area depth first through descriptors: ``(directory, dir_fd, name, st)``
    for each file (``directory`` relative to the area), and ``(directory, dir_fd,
    name, None)`` for each subdirectory once everything below it was seen. Holds the
    descriptors of the current path only; symlinks are never followed."""
    stack: list[tuple[bytes, int, Iterator[str]]] = [(b"", area, iter(os.listdir(area)))]
    try:
        while stack:
            directory, fd, names = stack[-1]
            name_s = next(names, None)
            if name_s is None:
                stack.pop()
                if stack:
                    os.close(fd)
                    parent_dir, parent_fd, _ = stack[-1]
                    yield parent_dir, parent_fd, split(directory)[1], None
                continue
            name = os.fsencode(name_s)
            st = fsio.lstat_at(fd, name)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                try:
                    child = os.open(name, fsio.DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue
                try:
                    listing = iter(os.listdir(child))
                except OSError:
                    os.close(child)
                    continue
                stack.append((join(directory, name), child, listing))
                continue
            yield directory, fd, name, st
    finally:
        for _, fd, _ in stack[1:]:
            os.close(fd)


def _prune(area: int, cutoff: float) -> int:
    removed = 0
    for _, fd, name, st in _walk(area):
        if st is None:
            with contextlib.suppress(OSError):  # not empty: something is kept below
                os.rmdir(name, dir_fd=fd)
            continue
        parsed = parse_kept(name)
        if parsed is not None and parsed[2] < cutoff:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
                removed += 1
    return removed


def _listing(area: int, top: bytes, where: bytes) -> Iterator[Kept]:
    for directory, _, name, st in _walk(area):
        parsed = parse_kept(name) if st is not None and stat.S_ISREG(st.st_mode) else None
        if parsed is None or st is None:
            continue
        original, version, when = parsed
        yield Kept(join(top, join(directory, original)), version, when, st.st_size,
                   os.path.join(where, join(directory, name)))
