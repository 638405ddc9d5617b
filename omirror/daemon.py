"""The daemon: startup scan, watcher, indexer, listener and links, wired in one loop.

Startup puts the watches up, then scans every set, so edits made while the daemon was
down are in the log before any peer asks for it and an edit landing during the scan is
caught by its event (each new directory is scanned after its watch exists); then the
listener and one outbound link per peer, all concurrent.
SIGTERM lets the job in the tree worker finish (a file being installed is installed or
not at all), closes the links, writes the status and exits 0; SIGHUP re-reads the
Distfile and the peers file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import ipaddress
import json
import logging
import os
import posixpath
import random
import signal
import threading
import time
from typing import Any, Callable, TypeVar

import asyncssh

from omirror import config as config_module
from omirror import control
from omirror import intents, peerkeys, peers, systemd
from omirror.apply import Applier
from omirror.config import Config, Host, MirrorSet, set_for
from omirror.diskspace import DEFAULT_MIN_FREE, Reserve
from omirror.paths import has_own_name, is_own_name, logical, show, show_name, show_text
from omirror.errors import OmirrorError, RootError
from omirror.events import Coalescer, ScanRequest
from omirror.progress import Progress, human_bytes
from omirror.link import Context, LinkStats
from omirror.push import Pusher
from omirror.receive import Receiver
from omirror.scanner import Scanner
from omirror.status import SeqTimes, failing_status, link_status
from omirror.store import TOMBSTONE_RETENTION_NS, Store
from omirror.watcher import EventKind, PathEvent, Watcher
from omirror.wire import INDEX_SUBSYSTEM, PULL_SUBSYSTEM, SUBSYSTEM

log = logging.getLogger(__name__)

T = TypeVar("T")

STATUS_FILE = "status.json"
STATUS_EVERY_S = 0.5
#: Deletions are indexed once none has come for this long (omirror/events.py says why).
DELETE_HOLD_S = 0.5
POLL_EVERY_S = 2.0
RESCAN_EVERY_S = 3600.0
STOP_GRACE_S = 10.0
REPORT_EVERY_S = 1.0  # STATUS= lines for systemd
SCAN_LOG_EVERY_S = 60.0  # a progress line in the log during a long scan


class Daemon:
    """One omirrord: this host's sets, its store, its watcher and its links."""

    def __init__(self, config_path: str, name: str | None, root: str, state_dir: str,
                 peers_path: str, *, delay_s: float, compress: bool,
                 min_free: Reserve = DEFAULT_MIN_FREE) -> None:
        self.config_path = config_path
        self.min_free = min_free
        self.wanted_name = name
        self.root = os.fsencode(os.path.abspath(root))
        self.state_dir = state_dir
        self.peers_path = peers_path
        self.delay_s = delay_s
        self.compress = compress
        self.config, self.me = self._read_config()
        self.keys = peerkeys.load_peers(peers_path)
        self.host_key, created = peerkeys.ensure_host_key(state_dir)
        if created:
            log.warning("made a new host key %s; add this line to every peer's peers file: "
                        "%s", peerkeys.host_key_path(state_dir),
                        peerkeys.peer_line(self.me.name, self.host_key))
        self.stopped_sets: set[str] = set()
        self.stats: dict[str, LinkStats] = {}
        self.started = time.time()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._inbound: dict[str, asyncio.Task[None]] = {}
        #: Per peer: set when it connects in, so our link out to it stops backing off.
        self._peer_back: dict[str, asyncio.Event] = {}
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._last_scan: dict[str, Any] = {}
        self._ready = False  # whether systemd has been told READY=1 (and no reload since)
        self._shown = ""  # the STATUS= line systemd shows

    # -- configuration -------------------------------------------------------------------

    def _read_config(self) -> tuple[Config, Host]:
        cfg = config_module.load(self.config_path)
        return cfg, cfg.find_self(self.wanted_name)

    def my_sets(self) -> tuple[MirrorSet, ...]:
        return tuple(m for m in self.config.sets_of(self.me.name)
                     if m.title not in self.stopped_sets)

    def sets_with(self, peer: str) -> tuple[MirrorSet, ...]:
        """The sets this host shares with ``peer``: the only ones a link may carry."""
        return tuple(m for m in self.my_sets() if m.has_host(peer))

    def _stopped_set_of(self, peer: str, path: bytes) -> str | None:
        """The stopped set shared with ``peer`` that holds ``path``, if any: what a peer
        sends for it waits (is retried), it is not refused and acknowledged for good."""
        for mset in self.config.sets_of(self.me.name):
            if mset.title in self.stopped_sets and mset.has_host(peer) \
                    and mset.root_of(path) is not None:
                return mset.title
        return None

    def peer_hosts(self) -> dict[str, Host]:
        out: dict[str, Host] = {}
        for mset in self.my_sets():
            for host in mset.peers_of(self.me.name):
                out.setdefault(host.name, host)
        return out

    # -- the tree worker -----------------------------------------------------------------

    async def tree(self, func: Callable[..., T], *args: Any) -> T:
        """Run ``func`` in the tree worker: the one thread that touches mirrored trees."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, functools.partial(func, *args))

    # -- running -------------------------------------------------------------------------

    def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        """The store, the scanner, the applier and the tree worker: what both the daemon
        and ``--once`` need."""
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "omirror-tree")
        self.store = Store.open(self.state_dir)
        self.scanner = Scanner(self.store, self.me.name)
        self.applier = Applier(self.root, self.store, self.me.name)
        self.applier.reserve = self.min_free
        self.scanner.expected_absent = self.applier.expected_absent
        self._recover_intents()
        self.ctx = Context(self.me.name, self.store, self.applier, self.scanner, self.root,
                           self.sets_with, self.tree)
        self.ctx.stopped = self._stopped_set_of
        self.store.add_listener(lambda seq: loop.call_soon_threadsafe(self.ctx.notify))

    def _close_store(self) -> None:
        if self.applier.intents is not None:
            self.applier.intents.close()
        self.store.close()

    def _recover_intents(self) -> None:
        """Before anything scans: record what a daemon killed inside a receive batch had
        applied without recording it (omirror/intents.py), then log every change ahead
        again, emptied by each commit."""
        left = intents.read(self.state_dir)
        log_ = intents.IntentLog(self.state_dir)
        self.applier.intents = log_
        self.store.add_commit_hook(log_.clear)
        if left:
            try:
                with self.applier.dirs.holding_roots(), self.store.batch():
                    recorded = self.applier.recover(left, self.my_sets())
            except OmirrorError as e:  # a root gone, say: its set stops at the scan
                log.warning("changes of an interrupted batch not examined: %s", e)
                recorded = 0
            log.info("an interrupted receive batch had %d changes announced; %d of them "
                     "were on disk and are recorded as the peers' versions", len(left),
                     recorded)
        log_.clear()

    async def run_once(self, report: Callable[[str], None]) -> int:
        """``--once``: scan, then with every peer at once push our log and pull theirs
        until both are caught up; exit 0, or 1 naming the peers that were not reached."""
        loop = asyncio.get_running_loop()
        self._open(loop)
        progress = Progress("reconciling")
        shower = asyncio.create_task(self._show_progress(progress))
        try:
            await self._scan_all("startup")
            self.store.new = False  # what the first scan found is recorded now
            hosts = list(self.peer_hosts().values())
            results = await asyncio.gather(*(self._once_with(h) for h in hosts),
                                           return_exceptions=True)
        finally:
            shower.cancel()
            progress.close()
            self._worker.shutdown(wait=True)
            self._close_store()
        failed = 0
        for host, result in zip(hosts, results):
            stats = self._stats(host.name)
            if isinstance(result, BaseException):
                if isinstance(result, (asyncio.CancelledError, KeyboardInterrupt)):
                    raise result
                failed += 1
                report(f"{host.name}: not reconciled: {result or type(result).__name__}")
            else:
                report(f"{host.name}: reconciled: sent {stats.entries_sent} entries "
                       f"({stats.content_bytes_sent} bytes of content), received "
                       f"{stats.entries_received} ({stats.content_bytes_received} bytes)")
        if self.ctx.failing:
            listed = failing_status(self.ctx.failing)
            more = listed["failing_count"] - len(listed["failing"])
            report(f"{listed['failing_count']} paths could not be applied: "
                   + ", ".join(listed["failing"]) + (f", and {more} more" if more else ""))
        return 1 if failed or self.ctx.failing else 0

    async def _show_progress(self, progress: Progress) -> None:
        while True:
            links = list(self.stats.values())
            progress.update(sum(s.entries_sent + s.entries_received for s in links),
                            sum(s.content_bytes_sent + s.content_bytes_received
                                for s in links),
                            sum(s.expected_out + s.expected_in for s in links))
            await asyncio.sleep(0.2)  # the refresh period of the progress line

    async def _once_with(self, host: Host) -> None:
        key = self.keys.get(host.name)
        if key is None:
            raise OmirrorError("no line in the peers file")
        stats = self._stats(host.name)

        async def push() -> None:
            conn, reader, writer = await peers.open_link(host, self.host_key, key,
                                                         compress=self.compress)
            try:
                await Pusher(self.ctx, host.name, reader, writer, stats, once=True).run()
            finally:
                conn.close()

        async def pull() -> None:
            conn, reader, writer = await peers.open_link(host, self.host_key, key,
                                                         compress=self.compress,
                                                         subsystem=PULL_SUBSYSTEM)
            try:
                await Receiver(self.ctx, host.name, reader, writer, stats).run()
            finally:
                conn.close()

        await asyncio.gather(push(), pull())

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        _warn_unprotected_hardlinks()
        # first, before the store is touched: a daemon that answers here owns this state
        # directory, and this one stops; no handler runs before the next await
        self._control = await control.serve_control(control.socket_path(self.state_dir),
                                                    self._control_handlers())
        self._open(loop)
        self._seq_times = SeqTimes(self.store.last_seq, time.time())
        self.store.add_listener(
            lambda seq: loop.call_soon_threadsafe(self._seq_times.note, seq, time.time()))
        self.coalescer = Coalescer(self.delay_s, hold_s=DELETE_HOLD_S)
        self.watcher = Watcher(loop, self._on_events)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        listener = None
        self._supervision = self._supervise()
        try:
            # watches first: a change landing while the scan walks the tree (after the
            # scan read that file, before any watch existed) would otherwise wait for
            # the periodic rescan; its events now queue until the indexer runs
            self.watcher.start()
            self._watch_all()
            await self._scan_all("startup")
            self.store.new = False  # what the first scan found is recorded now
            self.store.collect_tombstones(time.time_ns() - TOMBSTONE_RETENTION_NS)
            address = listen_address(self.me)
            try:
                listener = await peers.listen(address, self.me.port, self.host_key,
                                              lambda: self.keys, self._inbound_session,
                                              compress=self.compress)
            except OSError as e:
                raise OmirrorError(f"cannot listen on {address or '*'}:{self.me.port}: "
                                   f"{e.strerror or e}") from None
            log.info("omirrord %s listening on %s:%d; sets: %s", self.me.name,
                     address or "*", self.me.port,
                     ", ".join(m.title for m in self.my_sets()) or "none")
            self._tell_ready()  # watches and listener are up
            self._start_links()
            background = [asyncio.create_task(self._index_loop(), name="indexer"),
                          asyncio.create_task(self._status_loop(), name="status"),
                          asyncio.create_task(self._poll_loop(), name="poller")]
            await self._stop.wait()
            log.info("stopping: finishing the job in progress")
            for task in background:
                task.cancel()
        finally:
            await self._shutdown(listener)
        return 0

    async def _shutdown(self, listener: asyncssh.SSHAcceptor | None) -> None:
        systemd.stopping()
        await control.close_control(self._control, control.socket_path(self.state_dir))
        for task in self._supervision:
            task.cancel()
        for task in [*self._tasks.values(), *self._inbound.values()]:
            task.cancel()
        tasks = [*self._tasks.values(), *self._inbound.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_GRACE_S)
        if listener is not None:
            listener.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.wait_closed(), 2)
        self.watcher.close()
        self._worker.shutdown(wait=True)
        self._write_status()
        self._close_store()
        log.info("stopped")

    # -- scanning and watching -----------------------------------------------------------

    async def _scan_all(self, why: str) -> None:
        for mset in self.my_sets():
            self._show(f"scanning {_set_label(mset.title)} ({why})")
            try:
                stats = await self.tree(functools.partial(
                    self.scanner.scan_set, mset, self.root, sweep=why == "startup"))
            except RootError as e:
                self._stop_set(mset, e)
                continue
            self._last_scan = {"why": why, "at": time.time(), "seconds": stats.duration_s,
                               "set": mset.title, "recorded": stats.recorded}

    def _stop_set(self, mset: MirrorSet, error: RootError) -> None:
        log.error("%s", error)
        self.stopped_sets.add(mset.title)
        for top in mset.files:
            self.watcher.unwatch_tree(self._local(logical(top)))

    def _local(self, path: bytes) -> bytes:
        return os.path.join(self.root, path) if path else self.root

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
        return path is None or self._set_of(path) is None

    def _set_of(self, path: bytes) -> MirrorSet | None:
        """The running set of this host that holds ``path`` (:func:`config.set_for`)."""
        return set_for(path, self.my_sets())

    def _watch_all(self) -> None:
        for mset in self.my_sets():
            for top in mset.files:
                self.watcher.watch_tree(self._local(logical(top)), self._skip)

    def _on_events(self, events: list[PathEvent]) -> None:
        for event in events:
            if event.is_dir and event.kind in (EventKind.CREATED, EventKind.MOVED) \
                    and not self._skip(event.path):
                # watch before the scan that follows, so nothing made in between is missed
                self.watcher.watch_tree(event.path, self._skip)
        self.coalescer.add(events)
        self._wake.set()

    async def _index_loop(self) -> None:
        next_rescan = time.monotonic() + RESCAN_EVERY_S * random.uniform(0.9, 1.1)
        while True:
            deadline = self.coalescer.next_deadline()
            timeout = min(next_rescan, deadline if deadline is not None else next_rescan) \
                - time.monotonic()
            self._wake.clear()
            if timeout > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            if time.monotonic() >= next_rescan:
                next_rescan = time.monotonic() + RESCAN_EVERY_S * random.uniform(0.9, 1.1)
                await self._scan_all("periodic")
            requests, rescan = self.coalescer.take_due()
            if rescan:
                log.warning("the inotify queue overflowed: rescanning every set")
                # directories made during the overflow may have no watch yet
                self._watch_all()
                await self._scan_all("overflow")
                continue
            if requests:
                await self._index(requests)

    async def _index(self, requests: list[ScanRequest]) -> None:
        by_set: dict[str, tuple[MirrorSet, list[tuple[bytes, bool]]]] = {}
        for request in requests:
            path = self._logical(request.path)
            if path is None:
                continue
            mset = self._set_of(path)
            if mset is None:
                continue
            by_set.setdefault(mset.title, (mset, []))[1].append((path, request.recursive))
        for mset, paths in by_set.values():
            try:
                await self.tree(self.scanner.scan_paths, mset, self.root, paths)
            except RootError as e:
                self._stop_set(mset, e)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_EVERY_S)  # polling interval of unwatched subtrees
            if self.watcher.polled:
                self.coalescer.add(PathEvent(EventKind.CREATED, p, is_dir=True)
                                   for p in sorted(self.watcher.polled))
                self._wake.set()

    # -- links ---------------------------------------------------------------------------

    def _stats(self, peer: str) -> LinkStats:
        return self.stats.setdefault(peer, LinkStats())

    def _start_links(self) -> None:
        wanted = self.peer_hosts()
        for name in list(self._tasks):
            if name not in wanted:
                self._tasks.pop(name).cancel()
        for name, host in wanted.items():
            if name not in self._tasks:
                self._tasks[name] = asyncio.create_task(self._link_out(host), name=f"out:{name}")

    async def _link_out(self, host: Host, replay_from: int | None = None) -> None:
        stats = self._stats(host.name)

        def on_state(state: str) -> None:
            stats.out = state
            stats.out_since = time.time()

        async def run(peer: str, reader: Any, writer: Any) -> None:
            nonlocal replay_from
            conn = writer.get_extra_info("connection")
            stats.compression = conn.get_extra_info("send_compression") or "none"
            pusher = Pusher(self.ctx, peer, reader, writer, stats, replay_from=replay_from)
            try:
                await pusher.run()
            finally:
                if pusher.examined is not None:
                    replay_from = None  # started: the peer's cursor carries it on

        await peers.keep_linked(host, self.host_key, self.keys.get, run, on_state,
                                compress=self.compress,
                                wake=self._peer_back.setdefault(host.name, asyncio.Event()))

    async def _inbound_session(self, peer: str, subsystem: str, reader: Any,
                               writer: Any) -> None:
        if not self.sets_with(peer):
            log.warning("peer=%s connected but shares no set with this host", peer)
            return
        if subsystem != SUBSYSTEM:
            await self._serve_once(peer, subsystem, reader, writer)
            return
        previous = self._inbound.get(peer)
        if previous is not None and not previous.done():
            previous.cancel()  # the peer reconnected: its old session is dead
        task = asyncio.current_task()
        assert task is not None
        self._inbound[peer] = task
        stats = self._stats(peer)
        stats.inbound, stats.in_since = "up", time.time()
        log.info("peer=%s link in up", peer)
        if stats.out != "up":
            self._peer_back.setdefault(peer, asyncio.Event()).set()
        try:
            await Receiver(self.ctx, peer, reader, writer, stats).run()
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.IncompleteReadError, ConnectionError, asyncssh.Error) as e:
            log.info("peer=%s link in down: %s", peer, e or type(e).__name__)
        except Exception as e:  # a protocol error or a bug in one link: not the daemon's end
            log.warning("peer=%s link in closed: %s", peer, e, exc_info=not isinstance(
                e, OmirrorError))
        finally:
            if self._inbound.get(peer) is task:
                del self._inbound[peer]
                stats.inbound, stats.in_since = "down", time.time()

    async def _serve_once(self, peer: str, subsystem: str, reader: Any, writer: Any) -> None:
        """A peer's ``--once`` pulls our log, or its ``--check`` reads our index."""
        index = subsystem == INDEX_SUBSYSTEM
        log.info("peer=%s asks for our %s", peer, "index (--check)" if index else
                 "log once (--once)")
        try:
            await Pusher(self.ctx, peer, reader, writer, self._stats(peer),
                         once=True, index=index).run()
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.IncompleteReadError, ConnectionError, asyncssh.Error,
                OmirrorError) as e:
            log.info("peer=%s %s session ended: %s", peer, subsystem, e or type(e).__name__)

    # -- the control socket (omirrord status, sync, log replay) ---------------------------

    def _control_handlers(self) -> dict[str, control.Handler]:
        return {"status": self._control_status, "sync": self._control_sync,
                "replay": self._control_replay}

    async def _control_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.status()}

    async def _control_sync(self, request: dict[str, Any]) -> dict[str, Any]:
        """Rescan the named paths and their subtrees now; what changed goes out at once.

        Every path is checked before anything is scanned, and all bad ones are named.
        """
        paths = request.get("paths")
        if not isinstance(paths, list) or not paths \
                or not all(isinstance(p, str) for p in paths):
            raise OmirrorError('sync needs "paths": a list of absolute paths')
        by_set: dict[str, tuple[MirrorSet, list[tuple[bytes, bool]]]] = {}
        problems = []
        for text in paths:
            try:
                mset, path = self._sync_target(text)
            except OmirrorError as e:
                problems.append(str(e))
                continue
            by_set.setdefault(mset.title, (mset, []))[1].append((path, True))
        if problems:
            raise OmirrorError("; ".join(problems))
        counts = dict.fromkeys(("new", "changed", "deleted", "moved", "dirs", "files",
                                "symlinks", "hashed"), 0)
        unreadable: list[str] = []
        for mset, requests in by_set.values():
            try:
                stats = await self.tree(self.scanner.scan_paths, mset, self.root, requests)
            except RootError as e:
                self._stop_set(mset, e)
                raise OmirrorError(str(e)) from None
            self._last_scan = {"why": "sync", "at": time.time(),
                               "seconds": stats.duration_s, "set": mset.title,
                               "recorded": stats.recorded}
            for key in counts:
                counts[key] += getattr(stats, key)
            unreadable += [f"{show(p)}: {why}" for p, why in stats.unreadable]
        recorded = counts["new"] + counts["changed"] + counts["deleted"]
        log.info("sync of %s: recorded=%d new=%d changed=%d deleted=%d moved=%d",
                 ", ".join(show(os.fsencode(p).lstrip(b"/")) for p in paths), recorded,
                 counts["new"], counts["changed"],
                 counts["deleted"], counts["moved"])
        links = {name: self._stats(name).out for name in self.peer_hosts()}
        return {"recorded": recorded, **counts, "unreadable": unreadable,
                "last_seq": self.store.last_seq, "links_out": links}

    def _sync_target(self, text: str) -> tuple[MirrorSet, bytes]:
        """The running set and logical path of a path as the Distfile names it."""
        if not text.startswith("/") or "\0" in text:
            raise OmirrorError(f"'{show_text(text)}' is not an absolute path "
                               "(name it as the Distfile does, e.g. /srv/www/index.html)")
        path = os.fsencode(posixpath.normpath(text).strip("/"))
        shown = show(path)
        sets = self.config.sets_of(self.me.name)
        mset = None if has_own_name(path) else set_for(path, sets)
        if mset is not None:
            if mset.title in self.stopped_sets:
                raise OmirrorError(f"{shown} is in set {mset.title}, which is stopped on "
                                   "this host (see the log)")
            return mset, path
        holder = next((m for m in sets if m.root_of(path) is not None), None)
        if holder is not None:
            raise OmirrorError(f"{shown} is excluded from set {holder.title}")
        tops = sorted({top for m in sets for top in m.files})
        raise OmirrorError(f"{shown} is in no set of {self.me.name} (its sets hold "
                           f"{', '.join(tops) or 'nothing'})")

    async def _control_replay(self, request: dict[str, Any]) -> dict[str, Any]:
        """Restart the link to a peer with its stream starting at ``from_seq``."""
        peer, from_seq = request.get("peer"), request.get("from_seq")
        if not isinstance(peer, str) or not peer:
            raise OmirrorError('replay needs "peer", the name of a peer')
        if not isinstance(from_seq, int) or isinstance(from_seq, bool) or from_seq < 0:
            raise OmirrorError('replay needs "from_seq", a whole number >= 0')
        hosts = self.peer_hosts()
        name = peer
        with contextlib.suppress(OmirrorError):
            name = config_module.parse_host(peer, "--peer").name
        if name not in hosts:
            raise OmirrorError(f"{peer} is not a peer of {self.me.name}; its peers are "
                               f"{', '.join(sorted(hosts)) or 'none'}")
        if not self._tasks or self._stop.is_set():
            raise OmirrorError("omirrord is starting or stopping; its links are not up")
        old = self._tasks.pop(name, None)
        if old is not None:
            old.cancel()

        async def relink() -> None:
            if old is not None:
                await asyncio.wait([old])  # its last state change comes before ours
            await self._link_out(hosts[name], replay_from=from_seq)

        self._tasks[name] = asyncio.create_task(relink(), name=f"out:{name}")
        log.info("peer=%s replay of our log from seq %d requested", name, from_seq)
        return {"peer": name, "from_seq": from_seq, "last_seq": self.store.last_seq}

    # -- reload and status ---------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: read the Distfile and the peers file again; keep the old ones on error.

        systemd hears RELOADING=1 first and READY=1 once done, so ``systemctl reload``
        returns when the new configuration is in force (or was refused).
        """
        if not self._ready:  # still starting (READY=1 comes after listen), or reloading
            await self._reload()
            return
        systemd.reloading()
        self._ready = False
        try:
            await self._reload()
        finally:
            self._tell_ready()

    async def _reload(self) -> None:
        log.info("reloading %s and %s", self.config_path, self.peers_path)
        try:
            cfg, me = self._read_config()
            keys = peerkeys.load_peers(self.peers_path)
        except OmirrorError as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            return
        if me.name != self.me.name:
            log.error("reload: this host is now %s, was %s; restart omirrord to change "
                      "identity", me.name, self.me.name)
            return
        self.config, self.keys = cfg, keys
        self.stopped_sets.clear()
        self._watch_all()
        await self._scan_all("reload")
        self._start_links()

    def status(self) -> dict[str, Any]:
        return {
            "name": self.me.name, "pid": os.getpid(), "started": self.started,
            "phase": "stopping" if self._stop.is_set() else "scanning"
            if self.scanner.current is not None else "running",
            "last_seq": self.store.last_seq, "queue": self.coalescer.pending,
            "watched_dirs": self.watcher.watched_count,
            "polled": sorted(show_name(p) for p in self.watcher.polled),
            "stopped_sets": sorted(self.stopped_sets), "last_scan": self._last_scan,
            "peers": {name: link_status(s, self.store.last_seq, self._seq_times)
                      for name, s in self.stats.items()},
            "conflicts": self.ctx.conflicts,
            **failing_status(self.ctx.failing),
            "min_free": str(self.min_free),
            "low_disk": {title: short.text() for title, short in self.applier.short.items()},
        }

    def _write_status(self) -> None:
        path = os.path.join(self.state_dir, STATUS_FILE)
        temp = path + ".tmp"
        try:
            with open(temp, "w") as f:
                json.dump(self.status(), f)
            os.replace(temp, path)
        except OSError as e:
            log.debug("cannot write %s: %s", path, e)

    async def _status_loop(self) -> None:
        while True:
            self._write_status()
            await asyncio.sleep(STATUS_EVERY_S)  # the status file's refresh period

    # -- systemd -------------------------------------------------------------------------

    def _supervise(self) -> list[asyncio.Task[None]]:
        """The tasks that keep systemd informed, from before the startup scan: STATUS=
        lines, and the watchdog when the unit sets WatchdogSec=. Outside systemd both
        cost a check a second and send nothing."""
        tasks = [asyncio.create_task(self._report_loop(), name="systemd-status")]
        interval = systemd.watchdog_interval()
        if interval is not None:
            dog = systemd.Watchdog(interval, self._probe, self._progress)
            tasks.append(asyncio.create_task(dog.run(), name="watchdog"))
        return tasks

    async def _probe(self) -> None:
        """The watchdog's proof: a store read done by the tree worker, so the event loop,
        the worker and the store have each done a job."""
        await self.tree(self.store.get, b"")

    def _progress(self) -> tuple[Any, ...]:
        """What moves while the tree worker is busy with one long job (a scan of a large
        tree, a large file): the scan's counters, the bytes the worker thread has read
        and written, the store's sequence."""
        scan = self.scanner.current
        counters = None if scan is None else (scan.dirs, scan.files, scan.hashed_bytes)
        io = (0, 0)
        for thread in threading.enumerate():
            if thread.name.startswith("omirror-tree"):
                io = systemd.thread_io(thread.native_id)
        return counters, io, self.store.last_seq

    def _tell_ready(self) -> None:
        self._shown = self._summary()
        systemd.ready(self._shown)
        self._ready = True

    def _show(self, text: str) -> None:
        """STATUS= for systemd, sent when it changes."""
        if text != self._shown:
            self._shown = text
            systemd.status(text)

    def _summary(self) -> str:
        """The one line ``systemctl status`` shows while nothing is being scanned."""
        hosts = self.peer_hosts()
        links = [self.stats.get(name) for name in hosts]
        out = sum(1 for s in links if s is not None and s.out == "up")
        inbound = sum(1 for s in links if s is not None and s.inbound == "up")
        text = (f"mirroring {_plural(len(self.my_sets()), 'set')} with "
                f"{_plural(len(hosts), 'peer')}; links up: {out} out, {inbound} in; "
                f"queue {self.coalescer.pending}")
        if self.ctx.failing:
            text += f"; {len(self.ctx.failing)} failing"
        if self.stopped_sets:
            text += "; stopped: " + ", ".join(sorted(self.stopped_sets))
        return text

    async def _report_loop(self) -> None:
        """Every second a STATUS= line: a scan's progress while one runs, else the
        summary. A scan that moves also holds off systemd's start or reload timeout
        (a first scan of a large tree may take longer than any fixed timeout; one that
        hangs does not move, and times out), and logs its progress once a minute."""
        progress = self._progress()
        scan = None
        scan_started = logged = time.monotonic()
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            previous, progress = progress, self._progress()
            now = time.monotonic()
            if self.scanner.current is not scan:
                scan, scan_started, logged = self.scanner.current, now, now
            if scan is None:
                if not self._ready:
                    continue  # starting or reloading: the scans say what happens
                text = self._summary()
            else:
                text = (f"scanning {_set_label(scan.set_title)}: {scan.files} files in "
                        f"{scan.dirs} directories, {scan.hashed} hashed "
                        f"({human_bytes(scan.hashed_bytes)})")
                if not self._ready and progress != previous:
                    systemd.extend_timeout(systemd.EXTEND_TIMEOUT_S)
                if now - logged >= SCAN_LOG_EVERY_S:
                    logged = now
                    log.info("scanning set=%s files=%d dirs=%d hashed=%d hashed_bytes=%d "
                             "for %.0fs", scan.set_title, scan.files, scan.dirs, scan.hashed,
                             scan.hashed_bytes, now - scan_started)
            self._show(text)


def _warn_unprotected_hardlinks(where: str = "/proc/sys/fs/protected_hardlinks") -> bool:
    """Say so when any user may hard-link any file: a link to /etc/shadow put into a
    tree would be read by this daemon as root, and mirrored. True when warned."""
    try:
        with open(where, "rb") as f:
            if f.read().strip() != b"0":
                return False
    except OSError:
        return False
    log.warning("fs.protected_hardlinks is 0: a local user can hard-link any file, "
                "/etc/shadow included, into a mirrored tree, and omirrord reads it as "
                "root and mirrors it; set it to 1 (conf/sysctl.d/60-omirror.conf)")
    return True


def _set_label(title: str) -> str:
    """"set web" for a labelled set; an unlabelled one is titled "set at line 3" already."""
    return title if title.startswith("set ") else f"set {title}"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def listen_address(me: Host) -> str:
    """Where to listen: the address itself when the identity is an IP address (several
    peers on one machine, tests), else every address, as sshd does: a host name in HOSTS
    is how the others reach this host, not necessarily an address of this host."""
    try:
        ipaddress.ip_address(me.address)
    except ValueError:
        return ""
    return me.address


def run_once(config_path: str, name: str | None, root: str, state_dir: str,
             peers_path: str, *, compress: bool, report: Callable[[str], None],
             min_free: Reserve = DEFAULT_MIN_FREE) -> int:
    """``omirrord --once``: reconcile with every reachable peer, then exit."""
    daemon = Daemon(config_path, name, root, state_dir, peers_path, delay_s=0.0,
                    compress=compress, min_free=min_free)
    return asyncio.run(daemon.run_once(report))


def run_daemon(config_path: str, name: str | None, root: str, state_dir: str,
               peers_path: str, *, delay_s: float, compress: bool,
               min_free: Reserve = DEFAULT_MIN_FREE) -> int:
    """Run until SIGTERM; errors in the configuration raise before anything starts."""
    daemon = Daemon(config_path, name, root, state_dir, peers_path, delay_s=delay_s,
                    compress=compress, min_free=min_free)
    return asyncio.run(daemon.run())
