"""The only module that knows inotify: kernel events in, path events out.

pyinotify 0.9.6 supplies the system-call bindings and the ``IN_*`` constants, nothing
more. Its Notifier lost most of a 100,000-file burst on these machines, while a thread
doing nothing but blocking reads of the inotify descriptor received every event
(README.rst). So a reader thread drains the descriptor into a queue of raw chunks, and
the asyncio loop thread does everything else: parsing, the ``wd <-> directory`` maps, move
pairing and the callback. Because only the loop thread touches the maps, they need no
lock.

Why the reader does not even parse: it must hold the GIL for that, and every GIL hand-over
waits for the loop thread's switch interval. Measured here (2 cores, tmpfs, ``xargs touch``
making 100,000 files, ~1M events/s at peak, max_queued_events=16384): a reader that parsed
saw 56k of the files on average over 8 runs before overflowing; one that only reads and
queues saw 94-99k, and all 100,000 in 3 runs of 8. A burst from a Python writer (~500k
events/s) arrived whole every time. Whatever overflows is reported, and the daemon
rescans: a deeper kernel queue (conf/sysctl.d/60-omirror.conf) makes that rarer.

Paths are bytes end to end: a Linux file name need not be UTF-8, and pyinotify's own
path handling (str encoded with the file-system encoding) cannot express every one.
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import errno
import logging
import math
import os
import select
import struct
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # pyinotify imports asyncore
    import pyinotify
    from pyinotify import (
        IN_ATTRIB,
        IN_CLOSE_WRITE,
        IN_CREATE,
        IN_DELETE,
        IN_DELETE_SELF,
        IN_DONT_FOLLOW,
        IN_EXCL_UNLINK,
        IN_IGNORED,
        IN_ISDIR,
        IN_MODIFY,
        IN_MOVE_SELF,
        IN_MOVED_FROM,
        IN_MOVED_TO,
        IN_ONLYDIR,
        IN_Q_OVERFLOW,
        IN_UNMOUNT,
    )

from omirror import tempnames
from omirror.paths import is_own_name, is_under, show_name

log = logging.getLogger(__name__)

#: What every directory watch asks for. IN_DONT_FOLLOW and IN_ONLYDIR: a symlink is never
#: followed, not even one swapped in for a directory between listing and watching.
#: IN_EXCL_UNLINK: writes to an unlinked file that is still open are nobody's business.
WATCH_MASK = (IN_CREATE | IN_DELETE | IN_CLOSE_WRITE | IN_ATTRIB | IN_MODIFY
              | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF
              | IN_DONT_FOLLOW | IN_ONLYDIR | IN_EXCL_UNLINK)

#: One read() takes up to this much: a whole default-size kernel queue of short names.
READ_SIZE = 512 * 1024
#: A read smaller than this is a trickle: the reader waits _GATHER_S before the next one.
#: At the fastest rate that still makes small reads (~2,000 events in 2 ms of 32-byte
#: records), the wait queues far fewer events than the kernel holds (16,384 by default).
_SMALL_READ = 64 * 1024
_GATHER_S = 0.002
#: Only reads closer together than this are a trickle. The first read after a quiet
#: spell is often a writer's open and write, with its close a moment behind: waiting
#: _GATHER_S there would hold that close, and so the change, for as long.
_TRICKLE_S = 0.01
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then name
_LIMIT_FILE = "/proc/sys/fs/inotify/max_user_watches"
#: For tests only (tests/fault): a watch limit this watcher believes in, so the poll
#: fallback can be tried without lowering the machine-wide sysctl.
_TEST_MAX_WATCHES = "OMIRROR_TEST_MAX_WATCHES"

#: One parsed ``struct inotify_event``: (wd, mask, cookie, name without its NUL padding).
RawEvent = tuple[int, int, int, bytes]
_OVERFLOW_RECORD = _HEADER.pack(-1, IN_Q_OVERFLOW, 0, 0)


class EventKind(enum.Enum):
    """What happened to a path; the scanner finds out exactly what changed."""

    CHANGED = "changed"    # content or attributes of an existing path may have changed
    CREATED = "created"    # a new path (a directory moved in from outside too)
    DELETED = "deleted"    # a path went away (or was moved out of the watched trees)
    MOVED = "moved"        # renamed inside the watched trees: old_path -> path
    OVERFLOW = "overflow"  # the kernel queue overflowed or a watched fs was unmounted


@dataclass(frozen=True, slots=True)
class PathEvent:
    """One thing that happened to one path, as the rest of omirror sees it."""

    kind: EventKind
    path: bytes                    # absolute local path (b"" for OVERFLOW)
    is_dir: bool = False
    old_path: bytes | None = None  # MOVED only
    closed: bool = True            # False while the path may still be being written


OVERFLOW_EVENT = PathEvent(EventKind.OVERFLOW, b"")


class BytesINotify(pyinotify._CtypesLibcINotifyWrapper):  # type: ignore[misc]
    """pyinotify's ctypes binding, taking bytes paths and reporting errors as OSError.

    The parent class insists on str paths and encodes them with the file-system
    encoding; a directory named ``b"caf\\xe9"`` must be watchable, so bytes go to the
    kernel unchanged.
    """

    def init(self) -> bool:
        """Overridden to also declare ``inotify_init1``, which pyinotify leaves unbound and
        :meth:`open_fd` needs for IN_CLOEXEC."""
        if not super().init():
            return False
        init1 = getattr(self._libc, "inotify_init1", None)
        if init1 is not None:
            init1.argtypes = [ctypes.c_int]
            init1.restype = ctypes.c_int
        return True

    def open_fd(self) -> int:
        """A new inotify descriptor that no child process inherits.

        An inherited descriptor would keep every watch alive in the child and count
        against the user's inotify limits; ``inotify_init1(IN_CLOEXEC)`` closes the race
        with a fork in another thread that setting the flag afterwards would leave open.
        """
        init1 = getattr(self._libc, "inotify_init1", None)
        fd: int = init1(os.O_CLOEXEC) if init1 is not None else self.inotify_init()
        if fd < 0:
            code = self.get_errno() or errno.EIO
            raise OSError(code, f"inotify_init: {os.strerror(code)}")
        os.set_inheritable(fd, False)
        return fd

    def inotify_add_watch(self, fd: int, pathname: bytes, mask: int) -> int:
        """Overridden to skip the parent's check that ``pathname`` is a str: bytes go as is."""
        return self._inotify_add_watch(fd, pathname, mask)

    def _inotify_add_watch(self, fd: int, pathname: bytes, mask: int) -> int:
        return self._libc.inotify_add_watch(fd, pathname, mask)  # type: ignore[no-any-return]

    def add_watch(self, fd: int, path: bytes, mask: int) -> int:
        """Watch ``path``; the watch descriptor, or OSError with the kernel's errno."""
        if b"\0" in path:  # C would see a shorter path, and watch something else
            raise ValueError(f"embedded null byte in path {path!r}")
        wd = self.inotify_add_watch(fd, path, mask)
        if wd < 0:
            code = self.get_errno() or errno.EIO
            raise OSError(code, os.strerror(code), path)
        return wd

    def rm_watch(self, fd: int, wd: int) -> None:
        """Drop a watch; one the kernel already dropped (EINVAL) is not an error."""
        self.inotify_rm_watch(fd, wd)


def parse_events(buf: bytes | bytearray, size: int | None = None) -> list[RawEvent]:
    """Split the first ``size`` bytes of one inotify read() into events.

    The kernel returns whole records only: a 16-byte header and a name padded with NULs
    to an alignment boundary (``len`` counts the padding).
    """
    end = len(buf) if size is None else size
    view = memoryview(buf)
    unpack = _HEADER.unpack_from
    events: list[RawEvent] = []
    offset = 0
    while offset < end:
        wd, mask, cookie, length = unpack(buf, offset)
        offset += 16
        name = bytes(view[offset:offset + length]).rstrip(b"\0") if length else b""
        offset += length
        events.append((wd, mask, cookie, name))
    view.release()
    return events


@dataclass(slots=True)
class _Held:
    """A MOVED_FROM waiting for its MOVED_TO."""

    deadline: float  # loop time after which it counts as a move out of the trees
    path: bytes
    is_dir: bool
    own: bool        # a daemon file (.omirror*): only interesting if renamed into place


def _never(path: bytes) -> bool:
    return False


def _join(directory: bytes, name: bytes) -> bytes:
    return directory + b"/" + name if directory != b"/" else b"/" + name


def _watch_limit() -> str:
    try:
        with open(_LIMIT_FILE) as f:
            return f.read().strip()
    except OSError:
        return "?"


class Watcher:
    """Watch directory trees and report :class:`PathEvent` batches to ``on_events``.

    ``on_events`` is called in the loop thread. The watcher never adds watches by itself:
    on a CREATED or MOVED directory the caller calls :meth:`watch_tree` and then scans
    it, since files made before the watch existed report nothing (calling it for a
    directory already watched is cheap and harmless).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_events: Callable[[list[PathEvent]], None], *,
                 move_hold_s: float = 0.5) -> None:
        self._loop = loop
        self._on_events = on_events
        self._move_hold_s = move_hold_s
        self._inotify = BytesINotify()
        if not self._inotify.init():
            raise OSError(errno.ENOSYS, "this libc has no inotify functions")
        self._fd = self._inotify.open_fd()
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._wd_path: dict[int, bytes] = {}
        self._path_wd: dict[bytes, int] = {}
        self._skips: dict[bytes, Callable[[bytes], bool]] = {}
        #: Roots of subtrees that could not be watched (the watch limit): poll them.
        self.polled: set[bytes] = set()
        self._held: OrderedDict[int, _Held] = OrderedDict()
        self._hold_timer: asyncio.TimerHandle | None = None
        self._inbox: list[bytes] = []
        self._inbox_read_s = 0.0
        self._inbox_lock = threading.Lock()
        #: When the kernel's events being reported to ``on_events`` were read
        #: (``time.monotonic``): the coalescing window runs from there, not from when the
        #: loop got round to them.
        self.read_s = 0.0
        self._drain_scheduled = False
        self._thread: threading.Thread | None = None
        self._closed = False
        self._limit_warned = False
        limit = os.environ.get(_TEST_MAX_WATCHES)
        self._test_max_watches = int(limit) if limit else None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the reader thread; events that arrived since the first watch are kept."""
        if self._closed:
            raise RuntimeError("Watcher.start() after close()")
        if self._thread is None:
            self._thread = threading.Thread(target=self._read_forever,
                                            name="omirror-inotify", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the reader thread, wait for it, and release every watch. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            os.eventfd_write(self._wake_fd, 1)
            self._thread.join()
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self._held.clear()
        os.close(self._fd)  # the kernel drops every watch with the descriptor
        os.close(self._wake_fd)
        self._wd_path.clear()
        self._path_wd.clear()

    @property
    def watched_count(self) -> int:
        """For status; read it in the loop thread, which alone owns the maps. Subtrees in
        :attr:`polled` are not in it."""
        return len(self._wd_path)

    # -- watches ---------------------------------------------------------------------

    def watch_tree(self, top: bytes,
                   skip: Callable[[bytes], bool] = _never) -> list[bytes]:
        """Watch ``top`` and every directory below it; return those hit by the limit.

        Each directory is watched before it is listed, so nothing created in between is
        missed. Symlinks are never followed; a directory for which ``skip`` is true, or
        whose name is a daemon name (``.omirror*``), is neither watched nor entered.
        ``skip`` is remembered for ``top`` and applies to later calls below it.
        Directories refused with ENOSPC (the watch limit) are returned and added to
        :attr:`polled`; other failures (vanished, permission) are skipped quietly.
        """
        top = os.path.abspath(top)
        skipped = self._skip_for(top, skip)
        if is_own_name(os.path.basename(top)) or skipped(top):
            return []
        unwatched: list[bytes] = []
        stack = [top]
        while stack:
            directory = stack.pop()
            if self._watch_dir(directory, unwatched):
                stack.extend(_subdirs(directory, skipped))
        return unwatched

    def unwatch_tree(self, top: bytes) -> None:
        """Remove the watches at and below ``top`` and forget what was polled there."""
        top = os.path.abspath(top)
        for path, wd in [(p, wd) for p, wd in self._path_wd.items() if is_under(p, top)]:
            self._inotify.rm_watch(self._fd, wd)
            del self._path_wd[path]
            self._wd_path.pop(wd, None)
        self.polled.difference_update([p for p in self.polled if is_under(p, top)])
        for registered in [t for t in self._skips if is_under(t, top)]:
            del self._skips[registered]

    def _skip_for(self, top: bytes, skip: Callable[[bytes], bool]) -> Callable[[bytes], bool]:
        """The skip rule for a walk from ``top``: its own and those of the trees above it.

        A directory is skipped only if every tree covering it skips it (two mirror sets
        may nest and exclude different things). A new predicate is remembered, so that a
        new directory watched later with the default ``skip`` still honours it.
        """
        rules = [rule for t, rule in self._skips.items() if is_under(top, t)]
        if skip is not _never and skip not in rules:
            self._skips[top] = skip
            rules.append(skip)
        if not rules:
            return _never
        if len(rules) == 1:
            return rules[0]
        return lambda path: all(rule(path) for rule in rules)

    def _watch_dir(self, directory: bytes, unwatched: list[bytes]) -> bool:
        try:
            if self._test_max_watches is not None and directory not in self._path_wd \
                    and len(self._path_wd) >= self._test_max_watches:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory)
            wd = self._inotify.add_watch(self._fd, directory, WATCH_MASK)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                unwatched.append(directory)
                self.polled.add(directory)
                self._warn_limit(directory)
            else:
                log.debug("not watched: path=%s error=%s", show_name(directory), error.strerror)
            return False
        self._remember(wd, directory)
        self.polled.discard(directory)
        return True

    def _warn_limit(self, directory: bytes) -> None:
        """Say once which sysctl to raise; the rest go to DEBUG (the list is returned)."""
        if self._limit_warned:
            log.debug("not watched (watch limit): path=%s is polled", show_name(directory))
            return
        self._limit_warned = True
        log.warning("inotify watch limit reached (fs.inotify.max_user_watches=%s): %s is "
                    "polled; raise it, see conf/sysctl.d/60-omirror.conf",
                    _watch_limit(), show_name(directory))

    def _remember(self, wd: int, path: bytes) -> None:
        # The kernel returns the existing wd for an inode already watched: if we knew it
        # under another path, a rename was missed (an overflow), and this path is right.
        old = self._wd_path.get(wd)
        if old is not None and old != path and self._path_wd.get(old) == wd:
            del self._path_wd[old]
        self._wd_path[wd] = path
        self._path_wd[path] = wd

    def _forget(self, wd: int) -> None:
        path = self._wd_path.pop(wd, None)
        if path is not None and self._path_wd.get(path) == wd:
            del self._path_wd[path]

    def _rename_tree(self, old: bytes, new: bytes) -> None:
        """Rewrite the paths of every watch at or below a directory renamed in the trees.

        A linear pass over the watches: directory renames are rare next to file events,
        and a tree of maps keyed by component would slow down every event instead.
        """
        moved = [(p, wd) for p, wd in self._path_wd.items() if is_under(p, old)]
        for path, _ in moved:
            del self._path_wd[path]
        for path, wd in moved:
            renamed = new + path[len(old):]
            self._path_wd[renamed] = wd
            self._wd_path[wd] = renamed
        for path in [p for p in self.polled if is_under(p, old)]:
            self.polled.discard(path)
            self.polled.add(new + path[len(old):])
        for path in [p for p in self._skips if is_under(p, old)]:
            self._skips[new + path[len(old):]] = self._skips.pop(path)
        if self._skip_for(new, _never)(new):
            self.unwatch_tree(new)  # renamed to an excluded name: nothing to watch there

    # -- the reader thread ------------------------------------------------------------

    def _read_forever(self) -> None:
        """Drain the inotify descriptor as fast as the kernel fills it, until close().

        The thread only reads and queues the bytes (see the module docstring): the
        kernel queue is bounded (fs.inotify.max_queued_events), ours is not. It sleeps
        in poll() on the descriptor and an eventfd, so that close() can wake and stop
        it: it is never left blocked in read().
        """
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        read_s = -math.inf
        try:
            while True:
                if any(fd == self._wake_fd for fd, _ in poller.poll()):
                    return
                chunk = os.read(self._fd, READ_SIZE)
                before_s, read_s = read_s, time.monotonic()
                if not self._post(chunk, read_s):
                    return
                if len(chunk) < _SMALL_READ and read_s - before_s < _TRICKLE_S:
                    # a trickle (a receiver installing files, say): let it gather for a
                    # moment instead of waking the loop, and taking the GIL from the tree
                    # worker, for every few events; a burst fills reads and never waits
                    time.sleep(_GATHER_S)
        except Exception:
            log.exception("inotify reader failed: no more live events, rescanning")
            self._post(_OVERFLOW_RECORD, time.monotonic())

    def _post(self, chunk: bytes, read_s: float) -> bool:
        """Queue what one read() returned at ``read_s``; one wake-up of the loop until it
        takes them."""
        with self._inbox_lock:
            self._inbox.append(chunk)
            self._inbox_read_s = read_s
            if self._drain_scheduled:
                return True
            self._drain_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody listens any more
            return False
        return True

    # -- the loop thread --------------------------------------------------------------

    def _drain(self) -> None:
        with self._inbox_lock:
            chunks, self._inbox = self._inbox, []
            self._drain_scheduled = False
            read_s = self._inbox_read_s
        if self._closed or not chunks:
            return
        self.read_s = read_s
        self._handle_records([record for chunk in chunks for record in parse_events(chunk)])

    def _handle_records(self, records: Iterable[RawEvent]) -> None:
        events = self._translate(records)
        if events:
            self._on_events(events)

    def _translate(self, records: Iterable[RawEvent]) -> list[PathEvent]:
        out: list[PathEvent] = []
        for wd, mask, cookie, name in records:
            if mask & (IN_Q_OVERFLOW | IN_UNMOUNT):
                if not out or out[-1] is not OVERFLOW_EVENT:
                    out.append(OVERFLOW_EVENT)
            elif mask & IN_IGNORED:
                self._forget(wd)
            elif (directory := self._wd_path.get(wd)) is None:
                continue  # a watch already dropped: its last words do not matter
            elif name:
                self._child_event(_join(directory, name), name, mask, cookie, out)
            else:
                self._self_event(wd, directory, mask, out)
        return out

    def _child_event(self, path: bytes, name: bytes, mask: int, cookie: int,
                     out: list[PathEvent]) -> None:
        is_dir = bool(mask & IN_ISDIR)
        if mask & IN_MOVED_FROM:
            self._hold(cookie, path, is_dir, is_own_name(name))
        elif mask & IN_MOVED_TO:
            self._pair(cookie, path, is_dir, is_own_name(name), out)
        elif is_own_name(name):
            return  # the daemon's temp files and marker
        elif mask & IN_CREATE:
            # A new regular file is still being written; a directory is complete.
            out.append(PathEvent(EventKind.CREATED, path, is_dir, closed=is_dir))
        elif mask & IN_DELETE:
            out.append(PathEvent(EventKind.DELETED, path, is_dir))
        elif mask & IN_MODIFY:
            out.append(PathEvent(EventKind.CHANGED, path, is_dir, closed=False))
        elif mask & (IN_CLOSE_WRITE | IN_ATTRIB):
            out.append(PathEvent(EventKind.CHANGED, path, is_dir))

    def _self_event(self, wd: int, directory: bytes, mask: int,
                    out: list[PathEvent]) -> None:
        """An event about a watched directory itself (the record has no name)."""
        if mask & IN_ATTRIB:
            out.append(PathEvent(EventKind.CHANGED, directory, True))
        elif mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            if os.path.dirname(directory) in self._path_wd:
                if mask & IN_DELETE_SELF:
                    self._forget(wd)
                return  # the watched parent reports the deletion or the move
            # The top of a watched tree is gone from its place and no parent says so.
            log.warning("watched tree top %s was %s", show_name(directory),
                        "deleted" if mask & IN_DELETE_SELF else "moved away")
            out.append(PathEvent(EventKind.DELETED, directory, True))
            self.unwatch_tree(directory)

    def _hold(self, cookie: int, path: bytes, is_dir: bool, own: bool) -> None:
        # inotify(7): MOVED_FROM and MOVED_TO need not be adjacent, and may arrive in
        # different reads; a MOVED_FROM alone is a move out of the watched trees.
        deadline = self._loop.time() + self._move_hold_s
        self._held[cookie] = _Held(deadline, path, is_dir, own)
        if self._hold_timer is None:
            self._hold_timer = self._loop.call_at(deadline, self._expire_held)

    def _pair(self, cookie: int, path: bytes, is_dir: bool, own: bool,
              out: list[PathEvent]) -> None:
        held = self._held.pop(cookie, None)
        if held is None:
            if not own:  # moved in from outside the watched trees
                out.append(PathEvent(EventKind.CREATED, path, is_dir))
        elif held.own and (is_dir or tempnames.taken(held.path.rpartition(b"/")[2])):
            # A daemon temp file renamed into place: a peer's version (or a conflict
            # copy) this daemon has just recorded, with the stat it left. Examining it
            # again would only find it unchanged, at a cost per received file; a change
            # made to it afterwards comes with events of its own. A directory made under
            # a temp name still needs its watch, and what went into it before the watch.
            if is_dir:
                out.append(PathEvent(EventKind.CREATED, path, True))
        elif held.own:
            # a name of that form the daemon did not give out: a local user's file
            out.append(PathEvent(EventKind.CREATED, path, is_dir))
        elif own:
            out.append(self._moved_out(held))  # renamed to a daemon name: gone for us
        else:
            if is_dir:
                self._rename_tree(held.path, path)
            out.append(PathEvent(EventKind.MOVED, path, is_dir, old_path=held.path))

    def _moved_out(self, held: _Held) -> PathEvent:
        if held.is_dir:
            # The kernel keeps watching a directory moved elsewhere: stop, or its events
            # would be reported under a path where it no longer is.
            self.unwatch_tree(held.path)
        return PathEvent(EventKind.DELETED, held.path, held.is_dir)

    def _expire_held(self) -> None:
        """Turn each MOVED_FROM that found no MOVED_TO in time into a deletion."""
        self._hold_timer = None
        if self._closed:
            return
        self._drain()  # a MOVED_TO read but not yet handled must still find its pair
        now = self.read_s = self._loop.time()  # the loop's clock is time.monotonic
        out: list[PathEvent] = []
        while self._held:
            cookie, held = next(iter(self._held.items()))
            if held.deadline > now:
                break
            del self._held[cookie]
            if not held.own:
                out.append(self._moved_out(held))
        if self._held and self._hold_timer is None:
            first = next(iter(self._held.values()))
            self._hold_timer = self._loop.call_at(first.deadline, self._expire_held)
        if out:
            self._on_events(out)


def _subdirs(directory: bytes, skip: Callable[[bytes], bool]) -> list[bytes]:
    """The directories in ``directory`` to watch next: no symlinks, no daemon names."""
    found: list[bytes] = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                except OSError:
                    continue
                if not is_own_name(entry.name) and not skip(entry.path):
                    found.append(entry.path)
    except OSError as error:
        log.debug("not listed: path=%s error=%s", show_name(directory), error.strerror)
    return found
