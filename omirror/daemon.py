"""The daemon: builds every room, starts them in order, stops them, reloads.

Startup binds the control socket first (a daemon that answers there owns the state
directory), opens the store and records what an interrupted receive batch left
(omirror/intents.py), puts the watches up, then scans every set, so edits made while
the daemon was down are in the log before any peer asks for it and an edit landing
during the scan is caught by its event; then the listener and one link out per peer.
SIGTERM lets the job in the tree worker finish (a file being installed is installed or
not at all), closes the links, writes the status and exits 0; SIGHUP re-reads the
Distfile and the peers file.

Where each job lives: the sets (hostsets.py), the tree worker (treeworker.py), the
watches and scans (indexer.py), the links (peering.py), the control socket
(control.py), the status (status.py; in metrics.py for Prometheus) and systemd
(systemd.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncssh

from omirror import config as config_module
from omirror import control, intents, peerkeys, peers, systemd
from omirror.apply import Applier, recover
from omirror.config import Config, Host
from omirror.diskspace import DEFAULT_MIN_FREE, Reserve
from omirror.errors import OmirrorError
from omirror.hostsets import HostSets
from omirror.indexer import Indexer
from omirror.link import Context
from omirror.peering import Peering
from omirror.progress import Progress
from omirror.scanner import Scanner
from omirror.specials import DEFAULT_TIMEOUT_S, Specials
from omirror.status import STATUS_EVERY_S, SeqTimes, failing_status, plural, write_status_file
from omirror.store import TOMBSTONE_RETENTION_NS, Store
from omirror.treeworker import TreeWorker
from omirror.versions import DEFAULT_KEEP_DAYS, PRUNE_EVERY_S

if TYPE_CHECKING:
    from omirror.metrics import MetricsFile

log = logging.getLogger(__name__)

STAGER_NAME = "omirror-stage"


class Parts:
    """The rooms of a daemon that runs (or of ``--once``), built inside the event loop,
    in the order data flows: tree worker, store, scanner and applier, the links'
    context, the indexer, the links."""

    def __init__(self, daemon: Daemon, loop: asyncio.AbstractEventLoop, *,
                 watch: bool) -> None:
        self.worker = TreeWorker()
        self.store = Store.open(daemon.state_dir)
        name = daemon.sets.me.name
        self.scanner = Scanner(self.store, name)
        self.applier = Applier(daemon.root, self.store, name)
        self.applier.reserve = daemon.min_free
        self.scanner.expected_absent = self.applier.expected_absent
        self.intents = intents.IntentLog(daemon.state_dir)
        self._recover(daemon)
        self.ctx = Context(name, self.store, self.applier, self.scanner, daemon.root,
                           daemon.sets.shared_with, self.worker)
        self.ctx.stopped = daemon.sets.stopped_holding
        #: Writes a receiver's next small files ahead while the tree worker applies.
        self.stager = TreeWorker(STAGER_NAME)
        self.ctx.stage = self.stager if watch else None
        self.ctx.bwlimit_kib = daemon.bwlimit_kib
        # the specials of what peers' versions applied run in the loop, never in the
        # tree worker, which only reports what it committed
        self.specials = Specials(daemon.root, timeout_s=daemon.special_timeout_s)
        self.ctx.resolver.on_applied = lambda applied: _soon(loop, self.specials.applied,
                                                            applied)
        self.store.add_listener(lambda seq: _soon(loop, self.ctx.notify))
        self.seq_times = SeqTimes(self.store.last_seq, time.time())
        self.store.add_listener(
            lambda seq: _soon(loop, self.seq_times.note, seq, time.time()))
        self.indexer = Indexer(daemon.sets, self.scanner, daemon.root, self.worker,
                               delay_s=daemon.delay_s, loop=loop if watch else None,
                               show_scan=daemon.reporter.show)
        self.peering = Peering(daemon.sets, self.ctx, daemon.host_key, lambda: daemon.keys,
                               compress=daemon.compress)

    def _recover(self, daemon: Daemon) -> None:
        """Before anything scans: record what a daemon killed inside a receive batch had
        applied without recording it, then log every change ahead again, emptied by
        each commit."""
        left = intents.read(daemon.state_dir)
        self.applier.intents = self.intents
        self.store.add_commit_hook(self.intents.clear)
        if left:
            try:
                with self.applier.dirs.holding_roots(), self.store.batch():
                    recorded = recover(left, daemon.sets.running(), self.applier.dirs,
                                       self.store)
            except OmirrorError as e:  # a root gone, say: its set stops at the scan
                log.warning("changes of an interrupted batch not examined: %s", e)
                recorded = 0
            log.info("an interrupted receive batch had %d changes announced; %d of them "
                     "were on disk and are recorded as the peers' versions", len(left),
                     recorded)
        self.intents.clear()

    async def first_scan(self) -> None:
        """Scan every set; what it found is recorded, so later scans stamp by arrival."""
        await self.indexer.scan_all("startup")
        self.store.new = False

    def close(self) -> None:
        """After the links: the job in progress finishes, then the store closes."""
        self.indexer.close()
        self.stager.shutdown()
        with self.applier.ahead.paused():
            pass  # what was written ahead for a batch that will not run is removed
        self.worker.shutdown()
        self.intents.close()
        self.store.close()


class Daemon:
    """One omirrord: its configuration and identity, its rooms, their start and stop."""

    def __init__(self, config_path: str, name: str | None, root: str, state_dir: str,
                 peers_path: str, *, delay_s: float, compress: bool,
                 min_free: Reserve = DEFAULT_MIN_FREE,
                 keep_versions: float = DEFAULT_KEEP_DAYS,
                 special_timeout_s: float = DEFAULT_TIMEOUT_S,
                 bwlimit_kib: int = 0, metrics_file: str | None = None) -> None:
        self.config_path = config_path
        self.wanted_name = name
        self.root = os.fsencode(os.path.abspath(root))
        self.state_dir = state_dir
        self.peers_path = peers_path
        self.delay_s = delay_s
        self.compress = compress
        self.min_free = min_free
        #: Days the versions kept by ``savetargets`` stay (omirror/versions.py); 0: ever.
        self.keep_versions = keep_versions
        self.special_timeout_s = special_timeout_s
        #: ``--bwlimit``: KiB/s each link may write; 0, no limit (omirror/bwlimit.py)
        self.bwlimit_kib = bwlimit_kib
        #: ``--metrics-file``: rewritten with status.json (omirror/metrics.py); None: off.
        self.metrics: MetricsFile | None = None
        if metrics_file is not None:
            # only here: prometheus_client costs some 40 ms at every start otherwise
            from omirror.metrics import MetricsFile
            self.metrics = MetricsFile(metrics_file)
            self.metrics.check()
        config, me = self._read_config()
        self.sets = HostSets(config, me)
        self.keys = peerkeys.load_peers(peers_path)
        self.host_key, created = peerkeys.ensure_host_key(state_dir)
        if created:
            log.warning("made a new host key %s; add this line to every peer's peers file: "
                        "%s", peerkeys.host_key_path(state_dir),
                        peerkeys.peer_line(me.name, self.host_key))
        self.started = time.time()
        self.reporter = systemd.Reporter(self._summary, self._current_scan, self._progress,
                                         self._probe)
        #: Built in the loop by :meth:`run` or :meth:`run_once`; None before and after.
        self.parts: Parts | None = None
        self._stop = asyncio.Event()

    @property
    def me(self) -> Host:
        return self.sets.me

    def _read_config(self) -> tuple[Config, Host]:
        cfg = config_module.load(self.config_path)
        return cfg, cfg.find_self(self.wanted_name)

    # -- running -------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT; 0 after a clean stop."""
        loop = asyncio.get_running_loop()
        _warn_unprotected_hardlinks()
        # first, before the store is touched: a daemon that answers here owns this state
        # directory, and this one stops; no handler runs before the next await
        commands = control.Commands(self.status, self._sync, self._replay)
        server = await control.serve_control(control.socket_path(self.state_dir),
                                             commands.handlers())
        parts = self.parts = Parts(self, loop, watch=True)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        listener = None
        supervision = self.reporter.start()
        background: list[asyncio.Task[None]] = []
        try:
            # watches first: a change landing while the scan walks the tree (after the
            # scan read that file, before any watch existed) would otherwise wait for
            # the periodic rescan; its events now queue until the indexer runs
            parts.indexer.start()
            await parts.first_scan()
            parts.store.collect_tombstones(time.time_ns() - TOMBSTONE_RETENTION_NS)
            await self._prune(parts)
            listener = await self._listen(parts)
            self.reporter.tell_ready()  # watches and listener are up
            parts.peering.start()
            background = [asyncio.create_task(parts.indexer.run(), name="indexer"),
                          asyncio.create_task(self._status_loop(), name="status"),
                          asyncio.create_task(self._prune_loop(parts), name="prune")]
            await self._stop.wait()
            log.info("stopping: finishing the job in progress")
        finally:
            systemd.stopping()
            await control.close_control(server, control.socket_path(self.state_dir))
            for task in [*supervision, *background]:
                task.cancel()
            await parts.peering.close()
            await parts.specials.close()
            if listener is not None:
                listener.close()
                try:
                    await asyncio.wait_for(listener.wait_closed(), 2)
                except (TimeoutError, OSError, asyncssh.Error):
                    pass
            final = self.status()
            write_status_file(self.state_dir, final)
            if self.metrics is not None:
                self.metrics.close(final)
            parts.close()
            self.parts = None
            log.info("stopped")
        return 0

    async def _prune(self, parts: Parts) -> None:
        """Remove the kept versions older than ``--keep-versions``, in the tree worker
        (which owns the trees); a failure is logged and the daemon goes on."""
        try:
            await parts.worker(parts.applier.versions.prune, self.sets.all(),
                               self.keep_versions)
        except OmirrorError as e:
            log.warning("kept versions not pruned: %s", e)

    async def _prune_loop(self, parts: Parts) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY_S)
            await self._prune(parts)

    async def _listen(self, parts: Parts) -> asyncssh.SSHAcceptor:
        address = listen_address(self.me)
        try:
            listener = await peers.listen(address, self.me.port, self.host_key,
                                          lambda: self.keys, parts.peering.inbound,
                                          compress=self.compress)
        except OSError as e:
            raise OmirrorError(f"cannot listen on {address or '*'}:{self.me.port}: "
                               f"{e.strerror or e}") from None
        log.info("omirrord %s listening on %s:%d; sets: %s", self.me.name, address or "*",
                 self.me.port, ", ".join(m.title for m in self.sets.running()) or "none")
        return listener

    async def run_once(self, report: Callable[[str], None]) -> int:
        """``--once``: scan, then with every peer at once push our log and pull theirs
        until both are caught up; exit 0, or 1 naming the peers that were not reached."""
        parts = self.parts = Parts(self, asyncio.get_running_loop(), watch=False)
        progress = Progress("reconciling")
        shower = asyncio.create_task(self._show_progress(progress, parts))
        try:
            await parts.first_scan()
            hosts = list(self.sets.peers().values())
            results = await asyncio.gather(*(parts.peering.once_with(h) for h in hosts),
                                           return_exceptions=True)
            await parts.specials.drain()  # what arrived has its specials run
        finally:
            await parts.specials.close()
            shower.cancel()
            progress.close()
            parts.close()
            self.parts = None
        failed = len(self.sets.stopped)
        for title in sorted(self.sets.stopped):
            report(f"{title}: not reconciled: its root is not usable here (see the log)")
        for host, result in zip(hosts, results):
            stats = parts.peering.stats_of(host.name)
            if isinstance(result, BaseException):
                if isinstance(result, (asyncio.CancelledError, KeyboardInterrupt)):
                    raise result
                failed += 1
                report(f"{host.name}: not reconciled: {result or type(result).__name__}")
            else:
                report(f"{host.name}: reconciled: sent {stats.entries_sent} entries "
                       f"({stats.content_bytes_sent} bytes of content), received "
                       f"{stats.entries_received} ({stats.content_bytes_received} bytes)"
                       + (f"; waited {stats.bwlimit_wait_s:.1f} s on --bwlimit"
                          if stats.bwlimit_wait_s else ""))
        failing = parts.ctx.failing
        if failing:
            listed = failing_status(failing)
            more = listed["failing_count"] - len(listed["failing"])
            report(f"{listed['failing_count']} paths could not be applied: "
                   + ", ".join(listed["failing"]) + (f", and {more} more" if more else ""))
        return 1 if failed or failing else 0

    async def _show_progress(self, progress: Progress, parts: Parts) -> None:
        while True:
            links = list(parts.peering.stats.values())
            progress.update(sum(s.entries_sent + s.entries_received for s in links),
                            sum(s.content_bytes_sent + s.content_bytes_received
                                for s in links),
                            sum(s.expected_out + s.expected_in for s in links))
            await asyncio.sleep(0.2)  # the refresh period of the progress line

    # -- what the control socket asks (omirror/control.py checks the requests) ----------

    async def _sync(self, paths: list[str]) -> dict[str, Any]:
        parts = self._running()
        answer = await parts.indexer.sync(paths)
        return {**answer, "last_seq": parts.store.last_seq,
                "links_out": parts.peering.links_out()}

    async def _replay(self, peer: str, from_seq: int) -> dict[str, Any]:
        parts = self._running()
        name = await parts.peering.replay(peer, from_seq)
        return {"peer": name, "from_seq": from_seq, "last_seq": parts.store.last_seq}

    def _running(self) -> Parts:
        if self.parts is None or self._stop.is_set():
            raise OmirrorError("omirrord is starting or stopping; try again in a moment")
        return self.parts

    # -- reload and status ---------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: read the Distfile and the peers file again; keep the old ones on error.

        systemd hears RELOADING=1 first and READY=1 once done, so ``systemctl reload``
        returns when the new configuration is in force (or was refused).
        """
        if not self.reporter.ready:  # still starting (READY=1 comes after listen), or
            await self._reload()     # reloading already
            return
        self.reporter.tell_reloading()
        try:
            await self._reload()
        finally:
            self.reporter.tell_ready()

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
        self.sets.replace(cfg)
        self.keys = keys
        parts = self.parts
        if parts is None:
            return
        parts.indexer.watch_all()
        await parts.indexer.scan_all("reload")
        parts.peering.start()

    def status(self) -> dict[str, Any]:
        """What ``omirrord status`` shows and ``status.json`` holds."""
        out: dict[str, Any] = {"name": self.me.name, "pid": os.getpid(),
                               "started": self.started, "min_free": str(self.min_free)}
        parts = self.parts
        if parts is None:
            return {**out, "phase": "stopped" if self._stop.is_set() else "starting"}
        return {
            **out,
            "phase": "stopping" if self._stop.is_set() else "scanning"
            if parts.scanner.current is not None else "running",
            "last_seq": parts.store.last_seq,
            **parts.indexer.status(),
            "peers": parts.peering.status(parts.store.last_seq, parts.seq_times),
            "conflicts": parts.ctx.conflicts,
            **failing_status(parts.ctx.failing),
            "low_disk": {title: short.text() for title, short in parts.applier.short.items()},
            "specials": parts.specials.status(),
        }

    async def _status_loop(self) -> None:
        while True:
            status = self.status()
            write_status_file(self.state_dir, status)
            if self.metrics is not None:
                self.metrics.submit(status)  # in its own thread: a sync may be slow
            await asyncio.sleep(STATUS_EVERY_S)  # the status file's refresh period

    # -- what systemd hears ----------------------------------------------------------------

    def _summary(self) -> str:
        """The one line ``systemctl status`` shows while nothing is being scanned."""
        parts = self.parts
        hosts = self.sets.peers()
        stats = {} if parts is None else parts.peering.stats
        links = [stats.get(name) for name in hosts]
        out = sum(1 for s in links if s is not None and s.out == "up")
        inbound = sum(1 for s in links if s is not None and s.inbound == "up")
        queue = 0 if parts is None else parts.indexer.coalescer.pending
        text = (f"mirroring {plural(len(self.sets.running()), 'set')} with "
                f"{plural(len(hosts), 'peer')}; links up: {out} out, {inbound} in; "
                f"queue {queue}")
        if parts is not None and parts.ctx.failing:
            text += f"; {len(parts.ctx.failing)} failing"
        if self.sets.stopped:
            text += "; stopped: " + ", ".join(sorted(self.sets.stopped))
        return text

    def _current_scan(self) -> Any:
        return None if self.parts is None else self.parts.scanner.current

    async def _probe(self) -> None:
        """The watchdog's proof: a store read done by the tree worker, so the event loop,
        the worker and the store have each done a job."""
        parts = self.parts
        if parts is not None:
            await parts.worker(parts.store.get, b"")

    def _progress(self) -> tuple[Any, ...]:
        """What moves while the tree worker is busy with one long job (a scan of a large
        tree, a large file): the scan's counters, the bytes the worker thread has read
        and written, the store's sequence."""
        parts = self.parts
        if parts is None:
            return ()
        scan = parts.scanner.current
        counters = None if scan is None else (scan.dirs, scan.files, scan.hashed_bytes)
        io = (0, 0)
        for thread in threading.enumerate():
            if thread.name.startswith(TreeWorker.THREAD_NAME):
                io = systemd.thread_io(thread.native_id)
        return counters, io, parts.store.last_seq


def _soon(loop: asyncio.AbstractEventLoop, func: Callable[..., object], *args: Any) -> None:
    """Run ``func`` in the loop: the store tells its listeners from the tree worker."""
    loop.call_soon_threadsafe(func, *args)


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
             min_free: Reserve = DEFAULT_MIN_FREE,
             special_timeout_s: float = DEFAULT_TIMEOUT_S, bwlimit_kib: int = 0) -> int:
    """``omirrord --once``: reconcile with every reachable peer, then exit."""
    daemon = Daemon(config_path, name, root, state_dir, peers_path, delay_s=0.0,
                    compress=compress, min_free=min_free,
                    special_timeout_s=special_timeout_s, bwlimit_kib=bwlimit_kib)
    return asyncio.run(daemon.run_once(report))


def run_daemon(config_path: str, name: str | None, root: str, state_dir: str,
               peers_path: str, *, delay_s: float, compress: bool,
               min_free: Reserve = DEFAULT_MIN_FREE,
               keep_versions: float = DEFAULT_KEEP_DAYS,
               special_timeout_s: float = DEFAULT_TIMEOUT_S, bwlimit_kib: int = 0,
               metrics_file: str | None = None) -> int:
    """Run until SIGTERM; errors in the configuration raise before anything starts."""
    daemon = Daemon(config_path, name, root, state_dir, peers_path, delay_s=delay_s,
                    compress=compress, min_free=min_free, keep_versions=keep_versions,
                    special_timeout_s=special_timeout_s, bwlimit_kib=bwlimit_kib,
                    metrics_file=metrics_file)
    return asyncio.run(daemon.run())
