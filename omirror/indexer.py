"""From the file system to the log: watches, events, scans and the poller.

The watcher's events are coalesced (omirror/events.py) and the paths they name are
scanned in the tree worker, which records each change in the store; the store's log is
what the pushers send. Watches go up before the scan that follows them, so a change
landing in between is caught by its event. Subtrees the watcher could not watch (the
inotify limit) are polled; an overflow of the inotify queue, a reload and the hourly
rescan scan every set whole. A set whose root is missing or unmounted stops here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from omirror.config import MirrorSet, set_label
from omirror.errors import OmirrorError, RootError
from omirror.events import Coalescer, ScanRequest
from omirror.hostsets import HostSets
from omirror.paths import is_own_name, local_path, logical, show, show_name
from omirror.scanner import Scanner
from omirror.watcher import EventKind, PathEvent, Watcher

log = logging.getLogger(__name__)

#: Deletions are indexed once none has come for this long (omirror/events.py says why).
DELETE_HOLD_S = 0.5
POLL_EVERY_S = 2.0
RESCAN_EVERY_S = 3600.0
#: The event loop's timers wait whole milliseconds, rounded up (epoll_wait): a wait
#: shorter than this is slept in a thread instead, which wakes on time. With the default
#: 1 ms window, the rounding alone made a change wait about twice its window.
_PRECISE_BELOW_S = 0.002
#: The counters of one scan, summed over sets, that ``omirrord sync`` answers with.
SYNC_COUNTS = ("new", "changed", "deleted", "moved", "dirs", "files", "symlinks", "hashed")


class Indexer:
    """Keeps the store's log in step with this host's trees.

    Without a loop (``--once``, which reconciles and exits) it only scans: nothing is
    watched, and a set stopped at a scan needs no unwatching.
    """

    def __init__(self, sets: HostSets, scanner: Scanner, root: bytes,
                 tree: Callable[..., Awaitable[Any]], *, delay_s: float,
                 loop: asyncio.AbstractEventLoop | None,
                 show_scan: Callable[[str], None] = lambda text: None) -> None:
        self.sets = sets
        self.scanner = scanner
        self.root = root
        self.tree = tree
        self.show_scan = show_scan  # "scanning set web (startup)", for systemd
        self.coalescer = Coalescer(delay_s, hold_s=DELETE_HOLD_S)
        self.watcher = None if loop is None else Watcher(loop, self._on_events)
        self.last_scan: dict[str, Any] = {}
        self._wake = asyncio.Event()

    def start(self) -> None:
        """Put the watches up; their events queue until :meth:`run` takes them."""
        if self.watcher is not None:
            self.watcher.start()
            self.watch_all()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()

    async def run(self) -> None:
        """Index events as they come due, and poll what is not watched, until cancelled."""
        await asyncio.gather(self._index_loop(), self._poll_loop())

    # -- scans ---------------------------------------------------------------------------

    async def scan_all(self, why: str) -> None:
        """Scan every running set whole; a set whose root is not usable stops."""
        for mset in self.sets.running():
            self.show_scan(f"scanning {set_label(mset.title)} ({why})")
            try:
                stats = await self.tree(self.scanner.scan_set, mset, self.root,
                                        sweep=why == "startup")
            except RootError as e:
                self.stop_set(mset, e)
                continue
            self.last_scan = {"why": why, "at": time.time(), "seconds": stats.duration_s,
                              "set": mset.title, "recorded": stats.recorded}

    def stop_set(self, mset: MirrorSet, error: RootError) -> None:
        """Stop a set whose root is missing, unmounted or unmarked: nothing of it is
        recorded, sent or applied until a reload finds it usable again."""
        log.error("%s", error)
        self.sets.stopped.add(mset.title)
        if self.watcher is not None:
            for top in mset.files:
                self.watcher.unwatch_tree(local_path(self.root, logical(top)))

    async def sync(self, paths: list[str]) -> dict[str, Any]:
        """``omirrord sync``: rescan the named paths and their subtrees now; what changed
        goes out at once. Every path is checked before anything is scanned, and all bad
        ones are named."""
        by_set: dict[str, tuple[MirrorSet, list[tuple[bytes, bool]]]] = {}
        problems = []
        for text in paths:
            try:
                mset, path = self.sets.target(text)
            except OmirrorError as e:
                problems.append(str(e))
                continue
            by_set.setdefault(mset.title, (mset, []))[1].append((path, True))
        if problems:
            raise OmirrorError("; ".join(problems))
        counts = dict.fromkeys(SYNC_COUNTS, 0)
        unreadable: list[str] = []
        for mset, requests in by_set.values():
            try:
                stats = await self.tree(self.scanner.scan_paths, mset, self.root, requests)
            except RootError as e:
                self.stop_set(mset, e)
                raise OmirrorError(str(e)) from None
            self.last_scan = {"why": "sync", "at": time.time(),
                              "seconds": stats.duration_s, "set": mset.title,
                              "recorded": stats.recorded}
            for key in counts:
                counts[key] += getattr(stats, key)
            unreadable += [f"{show(p)}: {why}" for p, why in stats.unreadable]
        recorded = counts["new"] + counts["changed"] + counts["deleted"]
        log.info("sync of %s: recorded=%d new=%d changed=%d deleted=%d moved=%d",
                 ", ".join(show(os.fsencode(p).lstrip(b"/")) for p in paths), recorded,
                 counts["new"], counts["changed"], counts["deleted"], counts["moved"])
        return {"recorded": recorded, **counts, "unreadable": unreadable}

    def status(self) -> dict[str, Any]:
        """This room's part of ``omirrord status``."""
        watcher = self.watcher
        return {
            "queue": self.coalescer.pending,
            "watched_dirs": 0 if watcher is None else watcher.watched_count,
            "polled": [] if watcher is None else sorted(show_name(p) for p in watcher.polled),
            "stopped_sets": sorted(self.sets.stopped),
            "last_scan": self.last_scan,
        }

    # -- watches and events --------------------------------------------------------------

    def watch_all(self) -> None:
        """Watch every running set (again: directories made during an overflow, sets a
        reload added)."""
        if self.watcher is None:
            return
        for mset in self.sets.running():
            for top in mset.files:
                self.watcher.watch_tree(local_path(self.root, logical(top)), self._skip)

    def _logical(self, local: bytes) -> bytes | None:
        root = self.root.rstrip(b"/")
        if not local.startswith(root + b"/"):
            return None
        return local[len(root) + 1:]

    def _skip(self, local: bytes) -> bool:
        """Whether the watcher leaves a directory alone: in no running set of this host
        (by the one rule, so a set nested in an excluded path is watched)."""
        if is_own_name(os.path.basename(local)):
            return True
        path = self._logical(local)
        return path is None or self.sets.set_of(path) is None

    def _on_events(self, events: list[PathEvent]) -> None:
        if self.watcher is None:
            return
        for event in events:
            if event.is_dir and event.kind in (EventKind.CREATED, EventKind.MOVED) \
                    and not self._skip(event.path):
                # watch before the scan that follows, so nothing made in between is missed
                self.watcher.watch_tree(event.path, self._skip)
        self.coalescer.add(events, self.watcher.read_s)
        self._wake.set()

    async def _index_loop(self) -> None:
        next_rescan = time.monotonic() + RESCAN_EVERY_S * random.uniform(0.9, 1.1)
        while True:
            deadline = self.coalescer.next_deadline()
            timeout = min(next_rescan, deadline if deadline is not None else next_rescan) \
                - time.monotonic()
            self._wake.clear()
            if 0 < timeout < _PRECISE_BELOW_S:
                await asyncio.to_thread(time.sleep, timeout)
            elif timeout > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            if time.monotonic() >= next_rescan:
                next_rescan = time.monotonic() + RESCAN_EVERY_S * random.uniform(0.9, 1.1)
                await self.scan_all("periodic")
            requests, rescan = self.coalescer.take_due()
            if rescan:
                log.warning("the inotify queue overflowed: rescanning every set")
                # directories made during the overflow may have no watch yet
                self.watch_all()
                await self.scan_all("overflow")
                continue
            if requests:
                await self._index(requests)

    async def _index(self, requests: list[ScanRequest]) -> None:
        by_set: dict[str, tuple[MirrorSet, list[tuple[bytes, bool]]]] = {}
        for request in requests:
            path = self._logical(request.path)
            if path is None:
                continue
            mset = self.sets.set_of(path)
            if mset is None:
                continue
            by_set.setdefault(mset.title, (mset, []))[1].append((path, request.recursive))
        for mset, paths in by_set.values():
            try:
                await self.tree(self.scanner.scan_paths, mset, self.root, paths, keep=True)
            except RootError as e:
                self.stop_set(mset, e)

    async def _poll_loop(self) -> None:
        while self.watcher is not None:
            await asyncio.sleep(POLL_EVERY_S)  # polling interval of unwatched subtrees
            if self.watcher.polled:
                self.coalescer.add(PathEvent(EventKind.CREATED, p, is_dir=True)
                                   for p in sorted(self.watcher.polled))
                self._wake.set()
