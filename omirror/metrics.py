"""The daemon's status dict (omirror/status.py, ``Daemon.status()``) in the Prometheus
text exposition format, and the file the daemon keeps it in for node_exporter.

The metrics are made from the status dict and from nothing else, so ``omirrord
metrics``, the ``--metrics-file`` and ``omirrord status --json`` always agree: what a
field of ``status.json`` means is what its metric means (docs/contract.rst). A field
the dict lacks (a daemon still starting has no peers, no scan and no specials yet; a
daemon of another version may lack a field) gives no sample rather than a made-up 0.

The file is for node_exporter's textfile collector, which reads ``*.prom`` files from a
directory: the daemon opens no port (its systemd unit allows none but its own), and a
stopped daemon's last values stay readable, with node_exporter's
``node_textfile_mtime_seconds`` telling how old they are. It is replaced whole by a
rename, so the collector never reads half of it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from omirror.errors import OmirrorError
from omirror.paths import show_name

log = logging.getLogger(__name__)

#: Every phase of ``Daemon.status()``: each gets a sample, 1 for the current one, so a
#: rule can test a phase without first asking whether its series exists.
PHASES = ("starting", "scanning", "running", "stopping", "stopped")
#: The file's mode: node_exporter runs as a user of its own and must read it.
FILE_MODE = 0o644

_PEER = ["peer"]
_PEER_DIRECTION = ["peer", "direction"]
_SET = ["set"]


def _number(value: Any) -> float | None:
    """A status field as a sample value; None (no sample) for a missing or odd one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class _Family:
    """One metric family being filled: samples with no value are left out, and a family
    left with no sample is not exposed at all (an empty family says nothing)."""

    def __init__(self, family: GaugeMetricFamily | CounterMetricFamily) -> None:
        self.family = family

    def add(self, labels: list[str], value: Any) -> None:
        number = _number(value)
        if number is not None:
            self.family.add_metric(labels, number)


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> _Family:
    return _Family(GaugeMetricFamily(name, doc, labels=labels or []))


def _counter(name: str, doc: str, labels: list[str] | None = None) -> _Family:
    # the family is named without ``_total``; its one sample gets the suffix
    return _Family(CounterMetricFamily(name.removesuffix("_total"), doc, labels=labels or []))


#: The metrics that are one field of the status each: how made, name, help, and where
#: the field is (keys into the status dict; a section missing, as ``last_scan`` before
#: the first scan, gives no sample).
_SCALARS: tuple[tuple[Callable[[str, str], _Family], str, str, tuple[str, ...]], ...] = (
    (_gauge, "omirror_start_time_seconds", "When the daemon started (Unix time).",
     ("started",)),
    (_gauge, "omirror_log_last_seq", "The last sequence number of this host's change log.",
     ("last_seq",)),
    (_gauge, "omirror_queue_paths", "Paths waiting to be examined after file-system events.",
     ("queue",)),
    (_gauge, "omirror_watched_directories", "Directories watched with inotify.",
     ("watched_dirs",)),
    (_counter, "omirror_conflicts_total",
     "Conflicts (concurrent edits) resolved since the start.", ("conflicts",)),
    (_gauge, "omirror_failing_paths",
     "Paths from peers that cannot be applied here now (retried).", ("failing_count",)),
    (_gauge, "omirror_last_scan_duration_seconds", "How long the last full scan of a set took.",
     ("last_scan", "seconds")),
    (_gauge, "omirror_last_scan_timestamp_seconds",
     "When the last full scan of a set ended (Unix time).", ("last_scan", "at")),
    (_gauge, "omirror_last_scan_recorded_changes", "Changes the last full scan recorded.",
     ("last_scan", "recorded")),
    (_counter, "omirror_specials_runs_total",
     "special and cmdspecial commands finished since the start.", ("specials", "runs")),
    (_counter, "omirror_specials_failed_total",
     "Of those, the ones that failed (status, timeout or signal).", ("specials", "failed")),
    (_counter, "omirror_specials_dropped_total",
     "Commands dropped (over the bound, or at a stop).", ("specials", "dropped")),
    (_gauge, "omirror_specials_queued", "Commands waiting or running now.",
     ("specials", "queued")),
    (_gauge, "omirror_specials_gathering", "cmdspecial bursts still gathering their files.",
     ("specials", "gathering")),
)


def _field(status: Mapping[str, Any], where: tuple[str, ...]) -> Any:
    value: Any = status
    for key in where:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


class StatusCollector(Collector):
    """A collector over one status dict: each scrape of the registry exposes it."""

    def __init__(self, status: Mapping[str, Any]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        for family in [*self._daemon(), *self._peers(), *self._sets()]:
            if family.family.samples:
                yield family.family

    def _daemon(self) -> list[_Family]:
        st = self.status
        info = _gauge("omirror_info", "This host's identity in the Distfile (the value is 1).",
                      ["name"])
        if isinstance(st.get("name"), str):
            info.add([st["name"]], 1)
        phase = _gauge("omirror_phase", "1 for the daemon's phase now, 0 for the others.",
                       ["phase"])
        current = st.get("phase")
        if isinstance(current, str):
            for name in [*PHASES, *([current] if current not in PHASES else [])]:
                phase.add([name], 1 if name == current else 0)
        polled = _gauge("omirror_polled_subtrees",
                        "Subtrees polled because the inotify watch limit was reached.")
        if isinstance(st.get("polled"), list):
            polled.add([], len(st["polled"]))
        scalars = []
        for make, name, doc, where in _SCALARS:
            family = make(name, doc)
            family.add([], _field(st, where))
            scalars.append(family)
        return [info, phase, polled, *scalars]

    def _peers(self) -> list[_Family]:
        up = _gauge("omirror_peer_link_up",
                    "1 if the link is up: out is ours to the peer (we push), in is the "
                    "peer's to us (we receive).", _PEER_DIRECTION)
        since = _gauge("omirror_peer_link_changed_timestamp_seconds",
                       "When the link's state last changed (Unix time); 0 if never.",
                       _PEER_DIRECTION)
        entries_behind = _gauge("omirror_peer_behind_entries",
                                "Entries of our log the peer has not settled (an upper "
                                "bound while the link is down or catching up).", _PEER)
        seconds_behind = _gauge("omirror_peer_behind_seconds",
                                "Age of the oldest entry of our log the peer has not "
                                "settled.", _PEER)
        settled = _gauge("omirror_peer_settled_seq",
                         "How far in our log the peer has settled every entry meant for it.",
                         _PEER)
        skew = _gauge("omirror_peer_clock_skew_seconds",
                      "The peer's clock minus ours, measured when the link was greeted.",
                      _PEER)
        wire = _counter("omirror_peer_bytes_total",
                        "Bytes on the wire with the peer since the start: out sent, in "
                        "received.", _PEER_DIRECTION)
        content = _counter("omirror_peer_content_bytes_total",
                           "Bytes of file content with the peer since the start.",
                           _PEER_DIRECTION)
        entries = _counter("omirror_peer_entries_total",
                           "Entries (changes) with the peer since the start.",
                           _PEER_DIRECTION)
        bwlimit = _gauge("omirror_peer_bwlimit_bytes_per_second",
                         "The --bwlimit of each link with the peer; 0 for none.", _PEER)
        bwlimit_wait = _counter("omirror_peer_bwlimit_wait_seconds_total",
                                "Seconds the links with the peer waited on --bwlimit since "
                                "the start, in all.", _PEER)
        peers = self.status.get("peers")
        for name, peer in sorted((peers if isinstance(peers, dict) else {}).items()):
            if not isinstance(peer, dict):
                continue
            for direction in ("out", "in"):
                state = peer.get(direction)
                if isinstance(state, str):
                    up.add([name, direction], 1 if state == "up" else 0)
                since.add([name, direction], peer.get(f"{direction}_since"))
            entries_behind.add([name], peer.get("entries_behind"))
            seconds_behind.add([name], peer.get("seconds_behind"))
            settled.add([name], peer.get("settled_seq"))
            skew.add([name], peer.get("skew_s"))
            for direction, verb in (("out", "sent"), ("in", "received")):
                wire.add([name, direction], peer.get(f"bytes_{verb}"))
                content.add([name, direction], peer.get(f"content_bytes_{verb}"))
                entries.add([name, direction], peer.get(f"entries_{verb}"))
            kib = _number(peer.get("bwlimit_kib"))
            bwlimit.add([name], None if kib is None else kib * 1024)
            bwlimit_wait.add([name], peer.get("bwlimit_wait_s"))
        return [up, since, entries_behind, seconds_behind, settled, skew, wire, content,
                entries, bwlimit, bwlimit_wait]

    def _sets(self) -> list[_Family]:
        """Sets in trouble: a count that is always there, and a sample per set named.

        The status dict names only the sets that are stopped or short of disk, so a
        set's series exists only while it is; the counts are for rules.
        """
        st = self.status
        out: list[_Family] = []
        for key, name, what in (
                ("stopped_sets", "stopped", "stopped here (root missing, unmarked or "
                                            "read-only): the log says why"),
                ("low_disk", "low_disk", "whose file system is short of --min-free: "
                                         "files from peers wait")):
            titles = st.get(key)
            if not isinstance(titles, (list, dict)):
                continue
            count = _gauge(f"omirror_{name}_sets", f"Sets {what}.")
            count.add([], len(titles))
            each = _gauge(f"omirror_set_{name}", f"1 for each set {what}.", _SET)
            for title in sorted(str(t) for t in titles):
                each.add([title], 1)
            out += [count, each]
        return out


def exposition(status: Mapping[str, Any]) -> str:
    """The status dict in the Prometheus text exposition format (version 0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    return generate_latest(registry).decode("utf-8")


class MetricsFile:
    """``--metrics-file``: the exposition, rewritten from each status the daemon writes.

    Each write goes to a new temp file beside the target (``.NAME.<hex>.tmp``, which the
    textfile collector, reading ``*.prom``, ignores), made 0644 whatever the umask,
    synced, and renamed over the target: a reader sees the old file or the new, never
    part of one, and a crash leaves no empty file. A symlink planted at the path is
    replaced, never written through.

    The status loop hands each write to a thread of this file's own (:meth:`submit`): a
    sync may wait long on a busy disk, and neither the loop nor ``status.json`` must
    wait with it, nor must it queue behind the pushers' reads in the loop's pool. A
    status that comes while the last write still runs is skipped (the next is newer).
    The final write at stop (:meth:`close`) runs after the one in flight: one lock keeps
    writes in turn, and a write older than one already done is dropped.
    """

    THREAD_NAME = "omirror-metrics"

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._dir, self._name = os.path.split(self.path)
        self._lock = threading.Lock()
        self._issued = 0
        self._written = 0
        self._error: str | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, self.THREAD_NAME)
        self._pending: concurrent.futures.Future[bool] | None = None

    def check(self) -> None:
        """At start: make sure the directory takes files, without touching the target
        (another daemon may own it until this one has its state directory)."""
        shown = show_name(os.fsencode(self.path))
        try:
            dir_fd = self._open_dir()
            try:
                if not self._name or self._is_dir(dir_fd):
                    raise OmirrorError(f"--metrics-file {shown}: is a directory; give a "
                                       "file name ending in .prom")
                temp, fd = self._temp(dir_fd)
                os.close(fd)
                os.unlink(temp, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise OmirrorError(
                f"--metrics-file {shown}: cannot write in "
                f"{show_name(os.fsencode(self._dir))}: {e.strerror or e} (under the "
                "systemd unit, the directory must be in ReadWritePaths=)") from None

    def submit(self, status: Mapping[str, Any]) -> bool:
        """From the loop: write this status in the file's thread; False if skipped
        because the last write still runs. The text is made here, from a status no
        other thread sees."""
        if self._pending is not None and not self._pending.done():
            return False
        data = exposition(status).encode("utf-8")
        self._pending = self._pool.submit(self._write, data, self._ticket())
        return True

    def close(self, status: Mapping[str, Any]) -> bool:
        """At stop: write this last status after any write in flight, and end the
        thread. False if it could not be written (logged)."""
        written = self.write(status)
        self._pool.shutdown(wait=True)
        return written

    def write(self, status: Mapping[str, Any]) -> bool:
        """Replace the file with this status's metrics now, in this thread; False (and
        logged, once per distinct error) if it cannot be written."""
        return self._write(exposition(status).encode("utf-8"), self._ticket())

    def _ticket(self) -> int:
        """The order of a write, taken when its status is."""
        self._issued += 1
        return self._issued

    def _write(self, data: bytes, ticket: int) -> bool:
        with self._lock:
            if ticket <= self._written:
                return True  # a newer status is on disk already
            try:
                self._replace(data)
            except OSError as e:
                error = f"{e.strerror or e}"
                if error != self._error:
                    log.warning("cannot write the metrics file %s: %s; trying again with "
                                "each status", show_name(os.fsencode(self.path)), error)
                self._error = error
                return False
            self._written = ticket
            if self._error is not None:
                log.info("the metrics file %s is written again",
                         show_name(os.fsencode(self.path)))
                self._error = None
            return True

    def _is_dir(self, dir_fd: int) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(self._name, dir_fd=dir_fd).st_mode)
        except FileNotFoundError:
            return False

    def _open_dir(self) -> int:
        return os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _temp(self, dir_fd: int) -> tuple[str, int]:
        temp = f".{self._name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, FILE_MODE, dir_fd=dir_fd)
        return temp, fd

    def _replace(self, data: bytes) -> None:
        dir_fd = self._open_dir()
        try:
            temp, fd = self._temp(dir_fd)
            try:
                with os.fdopen(fd, "wb") as f:
                    os.fchmod(f.fileno(), FILE_MODE)  # the umask took bits off
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temp, self._name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                try:
                    os.unlink(temp, dir_fd=dir_fd)
                except OSError:
                    pass
                raise
        finally:
            os.close(dir_fd)
