"""Coalescing path events into scan requests: what to re-examine, and when.

The watcher reports every write; the scanner should look at a path once per burst, after
the writer is done, and look at a changed subtree once rather than at each path in it.
A request is due ``delay_s`` after the last event of its path; a path that is still
being written (every event so far unclosed) waits for its close or for ``quiet_s`` of
silence; and no path waits longer than ``max(1.0, 10 * delay_s)`` after its first event,
so a file that never stops changing is still mirrored now and then.

Deletions wait longer, with ``hold_s``: a deleted path is examined only once no
deletion has come for ``hold_s`` (but no later than ``max_hold_s`` after its first
event). ``rm -rf`` of a whole mirrored root deletes the files in directory order and
reaches the root's marker at a random point: held until the burst ends, its deletions
are examined only after the marker has gone, and the scanner then stops the set instead
of recording them (nothing is deleted on the peers). A root whose removal takes longer
than ``max_hold_s`` to reach its marker is beyond this guard.

Pure bookkeeping on an injected clock: the only I/O is one ``lstat`` of a newly created
non-directory, to tell a finished symlink or hard link from a file still being written.
"""

from __future__ import annotations

import heapq
import math
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from omirror.paths import is_under
from omirror.watcher import EventKind, PathEvent

__all__ = ["Coalescer", "ScanRequest"]


@dataclass(frozen=True, slots=True, order=True)
class ScanRequest:
    """Examine ``path``: alone, or (``recursive``) with its whole subtree."""

    path: bytes        # absolute local path
    recursive: bool    # new / moved / deleted directory: walk it all


@dataclass(slots=True)
class _Pending:
    """The merged events of one path (or of one subtree) not yet handed out."""

    recursive: bool
    first_s: float              # clock time of the first event: bounds the wait
    last_s: float               # clock time of the latest event
    closed: bool                # some event said the writer is done
    heap_at: float = math.inf   # when its (only valid) heap entry fires
    removal: bool = False       # a deletion: held until deletions are quiet


def _parent(path: bytes) -> bytes:
    return path[:path.rfind(b"/")] or b"/"


def _ancestors(path: bytes) -> Iterable[bytes]:
    """``b"/a/b/c"`` -> ``b"/a/b"``, ``b"/a"``, ``b"/"``."""
    end = path.rfind(b"/")
    while end > 0:
        yield path[:end]
        end = path.rfind(b"/", 0, end)
    if path != b"/":
        yield b"/"


def _complete_at_once(path: bytes) -> bool:
    """A new non-directory that nobody is writing: a symlink, or a hard link.

    Both are complete the moment they exist and get no IN_CLOSE_WRITE, so waiting for
    one would only add ``quiet_s``. A path that is already gone needs no wait either.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return True
    return stat.S_ISLNK(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink > 1)


class Coalescer:
    """Merge :class:`PathEvent` s over time into due :class:`ScanRequest` s.

    Call :meth:`add` with each batch, sleep until :meth:`next_deadline`, then
    :meth:`take_due`. Invariant: no pending path lies below a pending recursive request
    (it was absorbed into it), and while a rescan is pending nothing else is.
    """

    def __init__(self, delay_s: float, *, quiet_s: float = 1.0, hold_s: float = 0.0,
                 max_hold_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        for name, value in (("delay_s", delay_s), ("quiet_s", quiet_s), ("hold_s", hold_s),
                            ("max_hold_s", max_hold_s)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, not {value}")
        self._delay_s = delay_s
        self._quiet_s = quiet_s
        self._hold_s = hold_s
        self._max_hold_s = max_hold_s
        self._last_removal_s = -math.inf
        self._max_wait_s = max(1.0, 10 * delay_s)
        self._clock = clock
        self._pending: dict[bytes, _Pending] = {}
        self._by_parent: dict[bytes, set[bytes]] = {}  # directory -> pending paths in it
        self._recursive = 0                              # pending recursive requests
        self._heap: list[tuple[float, bytes]] = []       # (due, path), stale ones skipped
        self._rescan: _Pending | None = None

    @property
    def pending(self) -> int:
        """Requests waiting: one per path, and one for a pending full rescan."""
        return len(self._pending) + (self._rescan is not None)

    def add(self, events: Iterable[PathEvent], at: float | None = None) -> None:
        """The clock is read once per batch, unless ``at`` says when the events were read
        from the kernel (never later than now); after an overflow, every event only
        extends the one pending rescan (the same batch's included)."""
        now = self._clock()
        if at is not None:
            now = min(now, at)
        for event in events:
            if event.kind is EventKind.OVERFLOW:
                self._note_rescan(now)
            elif self._rescan is not None:
                self._rescan.last_s = now  # covered by the rescan; the burst goes on
            elif event.kind is EventKind.MOVED:
                if event.old_path is not None:
                    self._note(event.old_path, event.is_dir, True, now)
                self._note(event.path, event.is_dir, True, now)
            else:
                recursive = event.is_dir and event.kind in (EventKind.CREATED,
                                                            EventKind.DELETED)
                closed = event.closed or (event.kind is EventKind.CREATED
                                          and not event.is_dir
                                          and _complete_at_once(event.path))
                removal = event.kind is EventKind.DELETED and self._hold_s > 0
                if removal:
                    self._last_removal_s = now
                self._note(event.path, recursive, closed, now, removal)

    def next_deadline(self) -> float | None:
        """Clock time at which the earliest pending request is due; None if none is."""
        if self._rescan is not None:
            return self._due(self._rescan)
        while self._heap:
            at, path = self._heap[0]
            pending = self._pending.get(path)
            if pending is None or pending.heap_at != at:
                heapq.heappop(self._heap)  # stale: taken, absorbed or rescheduled
                continue
            due = self._due(pending)
            if due > at:  # more events came: move it back
                heapq.heapreplace(self._heap, (due, path))
                pending.heap_at = due
                continue
            return at
        return None

    def take_due(self, now: float | None = None) -> tuple[list[ScanRequest], bool]:
        """The requests due at ``now`` (sorted), and whether a full rescan is due.

        A due rescan replaces every single request: it will see all they would.
        """
        if now is None:
            now = self._clock()
        if self._rescan is not None:
            if self._due(self._rescan) > now:
                return [], False
            self._rescan = None
            return [], True
        due: list[ScanRequest] = []
        while self._heap and self._heap[0][0] <= now:
            at, path = heapq.heappop(self._heap)
            pending = self._pending.get(path)
            if pending is None or pending.heap_at != at:
                continue
            later = self._due(pending)
            if later > now:
                pending.heap_at = later
                heapq.heappush(self._heap, (later, path))
                continue
            self._remove(path)
            due.append(ScanRequest(path, pending.recursive))
        due.sort()
        return due, False

    # -- bookkeeping ------------------------------------------------------------------

    def _due(self, pending: _Pending) -> float:
        wait = self._delay_s if pending.closed else self._quiet_s
        due = min(pending.last_s + wait, pending.first_s + self._max_wait_s)
        if pending.removal:
            due = max(due, min(self._last_removal_s + self._hold_s,
                               pending.first_s + self._max_hold_s))
        return due

    def _note(self, path: bytes, recursive: bool, closed: bool, now: float,
              removal: bool = False) -> None:
        owner = self._recursive_above(path) if self._recursive else None
        if owner is not None:
            path, recursive, closed = owner, True, True  # inside a subtree to be walked
        pending = self._pending.get(path)
        if pending is None:
            pending = _Pending(recursive, now, now, closed or recursive, removal=removal)
            self._insert(path, pending)
        else:
            pending.last_s = now
            pending.closed = pending.closed or closed or recursive
            pending.removal = pending.removal or removal
            if recursive and not pending.recursive:
                pending.recursive = True
                self._recursive += 1
        if recursive and owner is None:
            self._absorb_below(path, pending)
        self._schedule(path, pending)

    def _note_rescan(self, now: float) -> None:
        """An overflow: everything gets rescanned, so every pending request is moot."""
        if self._rescan is None:
            first = min((p.first_s for p in self._pending.values()), default=now)
            self._rescan = _Pending(True, first, now, True)
        self._rescan.last_s = now
        self._pending.clear()
        self._by_parent.clear()
        self._heap.clear()
        self._recursive = 0

    def _recursive_above(self, path: bytes) -> bytes | None:
        for ancestor in _ancestors(path):
            pending = self._pending.get(ancestor)
            if pending is not None and pending.recursive:
                return ancestor
        return None

    def _absorb_below(self, top: bytes, into: _Pending) -> None:
        """Fold the pending requests below ``top`` into its recursive request.

        Looks only at the directories that hold pending paths, so a burst of thousands
        of files in one directory costs one comparison per new subtree, not thousands.
        """
        for directory in [d for d in self._by_parent if is_under(d, top)]:
            for path in list(self._by_parent.get(directory, ())):
                absorbed = self._remove(path)
                into.first_s = min(into.first_s, absorbed.first_s)
                into.removal = into.removal or absorbed.removal

    def _insert(self, path: bytes, pending: _Pending) -> None:
        self._pending[path] = pending
        self._by_parent.setdefault(_parent(path), set()).add(path)
        self._recursive += pending.recursive

    def _remove(self, path: bytes) -> _Pending:
        pending = self._pending.pop(path)
        parent = _parent(path)
        siblings = self._by_parent[parent]
        siblings.discard(path)
        if not siblings:
            del self._by_parent[parent]
        self._recursive -= pending.recursive
        return pending

    def _schedule(self, path: bytes, pending: _Pending) -> None:
        # One heap entry per path at a time, fired no later than the request is due:
        # when it fires early (more events came), it is moved back then, not on every
        # event, so a burst of a million writes to one file costs no heap growth.
        due = self._due(pending)
        if due < pending.heap_at:
            pending.heap_at = due
            heapq.heappush(self._heap, (due, path))
