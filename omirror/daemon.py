"""The daemon: startup scan, watcher, indexer, listener and links, wired in one loop.

Startup scans every set first, so edits made while the daemon was down are in the log
before any peer asks for it; then the watches go up (each new directory is scanned after
its watch exists), then the listener and one outbound link per peer, all concurrent.
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
import random
import signal
import time
from dataclasses import asdict
from typing import Any, Callable, TypeVar

import asyncssh

from omirror import config as config_module
from omirror import peerkeys, peers
from omirror.apply import Applier
from omirror.config import Config, Host, MirrorSet
from omirror.entry import is_own_name
from omirror.errors import OmirrorError, RootError
from omirror.events import Coalescer, ScanRequest
from omirror.replicate import Context, LinkStats, Pusher, Receiver
from omirror.scanner import Scanner, logical
from omirror.store import TOMBSTONE_RETENTION_NS, Store
from omirror.watcher import EventKind, PathEvent, Watcher

log = logging.getLogger(__name__)

T = TypeVar("T")

STATUS_FILE = "status.json"
STATUS_EVERY_S = 0.5
POLL_EVERY_S = 2.0
RESCAN_EVERY_S = 3600.0
STOP_GRACE_S = 10.0


class Daemon:
    """One omirrord: this host's sets, its store, its watcher and its links."""

    def __init__(self, config_path: str, name: str | None, root: str, state_dir: str,
                 peers_path: str, *, delay_s: float, compress: bool) -> None:
        self.config_path = config_path
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
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._last_scan: dict[str, Any] = {}

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

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "omirror-tree")
        self.store = Store.open(self.state_dir)
        self.scanner = Scanner(self.store, self.me.name)
        self.applier = Applier(self.root, self.store, self.me.name)
        self.scanner.expected_absent = self.applier.expected_absent
        self.ctx = Context(self.me.name, self.store, self.applier, self.scanner, self.root,
                           self.sets_with, self.tree)
        self.store.add_listener(lambda seq: loop.call_soon_threadsafe(self.ctx.notify))
        self.coalescer = Coalescer(self.delay_s)
        self.watcher = Watcher(loop, self._on_events)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        listener = None
        try:
            await self._scan_all("startup")
            self.store.collect_tombstones(time.time_ns() - TOMBSTONE_RETENTION_NS)
            self.watcher.start()
            self._watch_all()
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
        self.store.close()
        log.info("stopped")

    # -- scanning and watching -----------------------------------------------------------

    async def _scan_all(self, why: str) -> None:
        for mset in self.my_sets():
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
        if is_own_name(os.path.basename(local)):
            return True
        path = self._logical(local)
        if path is None:
            return True
        mset = self._set_of(path)
        return mset is None or mset.is_excluded(path)

    def _set_of(self, path: bytes) -> MirrorSet | None:
        for mset in self.my_sets():
            if mset.root_of(path) is not None:
                return mset
        return None

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

    async def _link_out(self, host: Host) -> None:
        stats = self._stats(host.name)

        def on_state(state: str) -> None:
            stats.out = state
            stats.out_since = time.time()

        async def run(peer: str, reader: Any, writer: Any) -> None:
            conn = writer.get_extra_info("connection")
            stats.compression = conn.get_extra_info("send_compression") or "none"
            await Pusher(self.ctx, peer, reader, writer, stats).run()

        await peers.keep_linked(host, self.host_key, self.keys.get, run, on_state,
                                compress=self.compress)

    async def _inbound_session(self, peer: str, reader: Any, writer: Any) -> None:
        if not self.sets_with(peer):
            log.warning("peer=%s connected but shares no set with this host", peer)
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

    # -- reload and status ---------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: read the Distfile and the peers file again; keep the old ones on error."""
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
        await self._scan_all("reload")
        self._watch_all()
        self._start_links()

    def status(self) -> dict[str, Any]:
        return {
            "name": self.me.name, "pid": os.getpid(), "started": self.started,
            "last_seq": self.store.last_seq, "queue": self.coalescer.pending,
            "watched_dirs": self.watcher.watched_count,
            "polled": sorted(os.fsdecode(p) for p in self.watcher.polled),
            "stopped_sets": sorted(self.stopped_sets), "last_scan": self._last_scan,
            "peers": {name: _link_status(s) for name, s in self.stats.items()},
            "conflicts": self.ctx.conflicts,
            "failing": {"/" + os.fsdecode(p): e for p, e in self.ctx.failing.items()},
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


def listen_address(me: Host) -> str:
    """Where to listen: the address itself when the identity is an IP address (several
    peers on one machine, tests), else every address, as sshd does: a host name in HOSTS
    is how the others reach this host, not necessarily an address of this host."""
    try:
        ipaddress.ip_address(me.address)
    except ValueError:
        return ""
    return me.address


def _link_status(stats: LinkStats) -> dict[str, Any]:
    fields = asdict(stats)
    fields["in"] = fields.pop("inbound")
    return fields


def run_daemon(config_path: str, name: str | None, root: str, state_dir: str,
               peers_path: str, *, delay_s: float, compress: bool) -> int:
    """Run until SIGTERM; errors in the configuration raise before anything starts."""
    daemon = Daemon(config_path, name, root, state_dir, peers_path, delay_s=delay_s,
                    compress=compress)
    return asyncio.run(daemon.run())
