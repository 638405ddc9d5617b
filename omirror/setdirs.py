"""A set's paths reached through descriptors, for writing: the ground the applier stands on.

Paths come from the network, so nothing here trusts them: every write opens the parent
directory one component at a time from the set's root, with ``O_NOFOLLOW`` and
``O_DIRECTORY`` (omirror/fsio.py), and every later system call is relative to that
descriptor with the final name only. A symlink planted anywhere in the path (by a user,
or by a peer in an earlier entry) cannot lead a write out of the tree: opening it fails.
A root is never created, and must carry its marker: an empty mount point is not a tree.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator

from omirror import fsio
from omirror.config import MirrorSet
from omirror.errors import ApplyError, PathRefused, os_errors
from omirror.paths import check_form, local_path, logical, show, show_name, split
from omirror.scanner import MARKER

log = logging.getLogger(__name__)

#: Bound on the paths :meth:`SetDirs.placed` keeps for a caller that never takes them.
_MAX_STRAYS = 1024


class SetDirs:
    """Opens the directories of this host's sets below ``root``, and notices a directory
    renamed while something went into it (:meth:`placed`)."""

    def __init__(self, root: bytes) -> None:
        self.root = root
        #: Logical paths where something renamed into place really is, when its
        #: directory was renamed while it went in (:meth:`placed`); the caller has them
        #: scanned (:meth:`take_strays`).
        self.strays: list[bytes] = []
        #: The root as /proc names it (symlinks above it resolved), for :meth:`placed`.
        self._real_root = os.path.realpath(root)
        #: Set roots opened during one job (:meth:`holding_roots`), by logical path.
        self._roots: dict[bytes, int] | None = None
        #: Directories below them opened during that job, by logical path: checked
        #: (:meth:`_still_there`) each time before they are used again.
        self._parents: dict[bytes, int] = {}

    @contextlib.contextmanager
    def holding_roots(self) -> Iterator[None]:
        """Keep the set roots opened for the length of one job (a batch of entries):
        opening a root walks every directory from ``/`` (omirror/fsio.py), and each entry
        opens it several times. Never longer: a descriptor held for the daemon's life
        would keep an unmounted disk busy."""
        if self._roots is not None:
            yield
            return
        self._roots = {}
        try:
            yield
        finally:
            roots, self._roots = self._roots, None
            parents, self._parents = self._parents, {}
            for fd in (*roots.values(), *parents.values()):
                os.close(fd)

    def _held_parent(self, directory: bytes) -> int:
        """A directory this job opened before, if it is still where its path says
        (a duplicate the caller closes); -1 otherwise.

        Opening a file's directory component by component from its root is most of
        what a small file costs; a batch puts many files into few directories. What a
        walk checks, the directory's place, is checked again here on every use: it
        must not have been renamed (by a user, possibly out of the tree) or removed
        since. Where /proc cannot say, nothing is held.
        """
        fd = self._parents.get(directory, -1)
        if fd < 0:
            return -1
        if self._still_there(fd, directory):
            return os.dup(fd)
        del self._parents[directory]
        os.close(fd)
        return -1

    def _still_there(self, fd: int, directory: bytes) -> bool:
        try:
            where = os.readlink(b"/proc/self/fd/%d" % fd)
        except OSError:
            return False
        return where == local_path(self._real_root, directory)

    def still_at(self, fd: int, path: bytes) -> bool:
        """Whether the directory open at ``fd`` is, right now, the one that holds
        ``path``, told by one ``readlink`` where /proc can say: the kernel's name of the
        directory is a path of real directories (no symlink in it), so one equal to the
        expected one means a walk from the root would open this same directory. False
        means only "not told so": the caller then walks to find out."""
        return self._still_there(fd, path.rpartition(b"/")[0])

    def _hold_parent(self, directory: bytes, fd: int) -> None:
        if directory not in self._parents and self._still_there(fd, directory):
            self._parents[directory] = os.dup(fd)

    def take_strays(self) -> list[bytes]:
        """The strays found since the last call, for the caller to scan."""
        strays, self.strays = self.strays, []
        return strays

    def placed(self, parent: int, name: bytes, path: bytes) -> None:
        """Check that the directory open at ``parent`` is still where ``path`` says.

        A user may rename a directory while a file goes into it through a descriptor
        opened before: the file is then below the new name, and the event of our own
        rename into place is one the watcher drops (its source is a temp name), so the
        scanner would only find it if its walk of the renamed directory came later. Where
        it really is is kept in :attr:`strays` for the caller to scan.
        """
        try:
            where = os.readlink(b"/proc/self/fd/%d" % parent)
        except OSError:
            return  # no /proc: the next periodic rescan finds such a file
        root = self._real_root
        expected = local_path(root, split(path)[0])
        if where == expected or where.endswith(b" (deleted)"):
            return
        if where.startswith(root + b"/") and len(self.strays) < _MAX_STRAYS:
            self.strays.append(where[len(root) + 1:] + b"/" + name)
            log.info("path=%s its directory was renamed while it was written: it is at %s",
                     show(path), show(self.strays[-1]))

    def lstat(self, mset: MirrorSet, path: bytes) -> os.stat_result | None:
        """``lstat`` of a path of ``mset``, reached through descriptors from its root;
        None when it (or a directory on the way) is missing. :class:`PathRefused` when
        the path lies beyond a symlink or a file here: what is there is outside the tree,
        neither examined nor replaced."""
        top = self.top(mset, path)
        if path == top:
            fd = self.open_root(top, path)
            try:
                return os.fstat(fd)
            finally:
                os.close(fd)
        opened = self.open_parent(mset, path, create=False, action="examine")
        if opened is None:
            return None
        parent, name = opened
        try:
            with os_errors(path, "examine"):
                return fsio.lstat_at(parent, name)
        finally:
            os.close(parent)

    def check_parents(self, mset: MirrorSet, path: bytes) -> None:
        """Refuse a path that lies beyond a symlink (or a file) here, with
        :class:`PathRefused`: what the disk shows at such a path is outside the tree, so
        it is neither examined nor replaced. The parents are walked as a write walks
        them; a missing one is fine (the path is simply absent)."""
        if path == self.top(mset, path):
            return
        opened = self.open_parent(mset, path, create=False, action="examine")
        if opened is not None:
            os.close(opened[0])

    def top(self, mset: MirrorSet, path: bytes) -> bytes:
        """The logical root of the set entry holding ``path``; refuses a path outside it.

        The receiver checked the path with :func:`check_path` already; this repeats the
        cheap part, so that no caller can make the applier write outside a set.
        """
        check_form(path)
        top = mset.root_of(path)
        if top is None:
            raise PathRefused(path, f"is not inside set {mset.title}")
        return logical(top)

    def open_root(self, top: bytes, path: bytes) -> int:
        """Open a set root, which must exist and carry its marker.

        A root is never created here: a missing root, or an empty mount point without the
        marker, means the disk is not mounted, and writing into the mount point would
        hide files and later look like a mass change. The error is retried until the
        root is back (or the scan stops the set).
        """
        where = local_path(self.root, top)
        shown = show_name(where)
        action = f"apply {show(path)}: root {show(top)}"
        try:
            held = None if self._roots is None else self._roots.get(top)
            if held is not None:
                fd = os.dup(held)
            else:
                # a symlink on the way that root does not own is refused (omirror/fsio.py)
                fd = fsio.open_root(where)
                if self._roots is not None:
                    self._roots[top] = os.dup(fd)
        except OSError as e:
            raise ApplyError(path, e.errno, f"cannot {action} ({shown}) is not "
                                            f"usable: {e.strerror}") from e
        try:
            os.stat(MARKER, dir_fd=fd, follow_symlinks=False)
        except OSError as e:
            os.close(fd)
            raise ApplyError(path, e.errno, f"cannot {action} ({shown}) has no "
                                            f"{os.fsdecode(MARKER)} marker: it looks "
                                            "unmounted or wiped, so nothing is written into "
                                            "it") from e
        return fd

    def open_parent(self, mset: MirrorSet, path: bytes, *, create: bool,
                     action: str) -> tuple[int, bytes] | None:
        """Open the directory holding ``path``, walking down from its set root.

        Each component is opened relative to the one above with ``O_NOFOLLOW`` and
        ``O_DIRECTORY``, so a symlink anywhere below the root is refused rather than
        followed. Missing directories are made when ``create`` (a child can arrive for
        a parent deleted here); otherwise None says the path cannot exist. Returns the
        open directory (the caller closes it) and the final name.
        """
        top = self.top(mset, path)
        if path == top:
            raise PathRefused(path, f"is a root of set {mset.title}; a root is always a "
                                    "directory")
        parts = (path[len(top) + 1:] if top else path).split(b"/")
        directory = path.rpartition(b"/")[0]
        if directory != top and self._roots is not None:
            held = self._held_parent(directory)
            if held >= 0:
                return held, parts[-1]
        fd = self.open_root(top, path)
        try:
            at = top
            for part in parts[:-1]:
                at = at + b"/" + part if at else part
                child = self._step(fd, part, at, path, create, action)
                os.close(fd)
                fd = child
                if fd < 0:
                    return None
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        if directory != top and self._roots is not None:
            self._hold_parent(directory, fd)
        return fd, parts[-1]

    def parent_if_there(self, mset: MirrorSet, path: bytes,
                         action: str) -> tuple[int, bytes] | None:
        """:meth:`open_parent` for what is only worth doing if the path can be there:
        None also where it would be refused."""
        try:
            return self.open_parent(mset, path, create=False, action=action)
        except (ApplyError, PathRefused):
            return None

    def parent_for_write(self, mset: MirrorSet, path: bytes,
                          action: str) -> tuple[int, bytes]:
        """:meth:`open_parent`, making missing directories, so it always opens one."""
        opened = self.open_parent(mset, path, create=True, action=action)
        if opened is None:  # not reached: with create, every missing directory is made
            raise ApplyError(path, errno.ENOENT, f"cannot {action} {show(path)}: its "
                                                 "directory vanished while it was made")
        return opened

    @staticmethod
    def _step(parent: int, part: bytes, at: bytes, path: bytes, create: bool,
              action: str) -> int:
        """Open one directory below ``parent`` (``at``, on the way to ``path``); -1 when
        it is missing and not made."""
        with os_errors(path, action):
            try:
                return fsio.step(parent, part, path, create=create, on_create=lambda made:
                                 log.debug("path=%s made missing directory %s", show(path),
                                           show_name(made)))
            except fsio.NotInTree as e:
                raise PathRefused(path, f"component '{show_name(part)}' {e.why}"
                                        + (": writes never go through one" if e.link else ""),
                                  beyond=at) from e
