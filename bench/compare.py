#!/usr/bin/env python3
"""Benchmark: omirror against rsync over ssh, Unison over ssh and lsyncd, scenario by
scenario, on the same machine in the same run.

Run from the project root with the project's virtualenv, as root (apt-get installs
rsync, unison, lsyncd and openssh-server when they are missing)::

    .venv/bin/python bench/compare.py [--runs 3] [--scale 1.0] [--only 1,3,5]
                                      [--workdir DIR] [--keep] [--json]
                                      [--no-unison] [--no-lsyncd]

What runs, all on 127.0.0.1 and all started (and stopped) by this script:

* omirror: two ``omirrord`` peers, A and B (N in scenario 9), set up as an operator
  would (``ssh-keygen`` host keys, one peers file, one Distfile ``FILES = ( /data )``
  listing them all, each with its own ``--root`` and ``--state-dir``), omirrord's
  default delay.
* a private ``sshd -D`` (own config, host key, ``authorized_keys`` with a key made for
  the run, pid file in the work directory), which rsync, Unison and lsyncd go through;
  their ssh uses ``-c aes128-gcm@openssh.com`` when /proc/cpuinfo has the ``aes`` flag
  (omirror's asyncssh puts that cipher first already).
* rsync: ``rsync -a --stats -e 'ssh ...' SRC/ root@127.0.0.1:DST/``.
* Unison: ``unison SRC ssh://127.0.0.1//DST -batch -auto -silent -times -owner -group``
  with ``-sshargs`` for port, key and cipher, its archives in the work directory (the
  client's through ``$UNISON``, the server's through ``-servercmd 'env UNISON=DIR
  unison'``), so no archive of a user is read or written.
* lsyncd: ``lsyncd -nodaemon`` with ``default.rsyncssh`` (``delay = 0``, rsync with
  ``--stats``), through the same sshd.

Every source tree (the *corpus*) is built once per kind with fixed seeds; rsync, Unison
and lsyncd copy from it, omirror's A holds a copy of it (``cp -a``, untimed). ``sync``
runs between every setup step and the timed part after it, so that writeback of the
setup does not land in a measurement. In each run the tools take turns in an order
rotated by one each run; each scenario reports the median over ``--runs``.

The scenarios (sizes at ``--scale 1``; ``--scale`` multiplies file counts and sizes):

1. First copy of 10,000 files of 4 KiB (random bytes, 100 per directory) to an empty
   peer. 2. The same with 50,000 tiny files (0-100 bytes). 3. The same with one 1 GiB
   file. How each is timed:

   - omirror: A holds the corpus and has scanned it (started alone beforehand, untimed:
     its status.json appears once the startup scan is done and it listens). B starts
     with an empty tree and a fresh state directory; the time runs from B's start until
     A reports, over its control socket, that B has acknowledged A's whole log: A's
     link to B is up, has sent entries since B started (so the counters are this link's,
     not the last one's) and ``entries_behind`` is 0, and B lists no failing path. A
     receiver acknowledges an entry once it is applied (content fetched, fsynced,
     renamed into place) or has failed (then it is retried, and listed under
     ``failing`` in B's status: such a run is reported as a failure, not timed), so
     that is the cheapest exact criterion of "B's tree is complete"; A's control socket
     is asked every 20 ms, B's once A's side holds. B's tree is compared with the
     corpus afterwards, untimed. CPU time (utime + stime) of A over the timed part and
     of B, and both daemons' peak RSS (VmHWM), are in the details, with CPU per file. When this
     omirror's outbound link has no way to cut its reconnect backoff short (up to
     30 s), A is asked to relink at once (``replay`` from seq 0 over the control
     socket: an empty B is sent everything anyway) as soon as B listens, so that the
     time is B's start and the transfer, not A's backoff; the output says when.
   - rsync: into an empty directory; Unison: into an empty directory with empty
     archives; lsyncd: from its start until its log says the startup rsync finished,
     into an empty target.

4. Delta: 1 MiB of new random bytes written over the middle of that 1 GiB file (at
   half its size, rounded down to 4 KiB; the 1 MiB is not scaled: omirror's delta
   blocks are 1 MiB, and the scaled file is a whole number of MiB, at least 8, as
   1 GiB is). Time and bytes sent:

   - omirror: A and B running and in sync; from right after ``close()`` on A until A
     has recorded the change and B has acknowledged it (``entries_behind`` 0 again,
     nothing failing on B);
     bytes: the growth of A's ``bytes_sent`` to B (every frame, both links; also
     ``content_bytes_sent``) in A's status.
   - rsync: ``rsync -a --stats`` after the change, "Total bytes sent"; Unison: a run
     after the change with ``-fastcheck false`` (with its default fast check, which
     trusts size and mtime, it missed most same-size changes made within seconds of
     its last run: its maintainers advise exactly this for scripted changes), its bytes
     not measured; lsyncd (running, with its own copy
     of the source): from ``close()`` until its log says the rsync of that change
     finished, "Total bytes sent" from that rsync's ``--stats``.

5. Restart with nothing changed, 50,000 tiny files, every tool in sync beforehand:

   - omirror: both daemons stopped; the time runs from starting both until both report
     (status.json first, then the control socket every 20 ms) the startup scan done,
     the link up in both directions, ``entries_behind`` 0 each way, an empty queue
     and no failing path.
   - rsync: a no-op ``rsync -a`` of the synced tree (asserted to transfer nothing);
     Unison: a run with nothing changed and its archives present; lsyncd: from its start
     until its startup rsync of the synced tree finished.

6. Latency from ``close()`` on one peer to the complete file on the other, p50 and p99:
   ``bench/latency.py`` is run in this process (``--files 300 --rounds RUNS``),
   against lsyncd with ``delay = 0``.

7. Memory: the RSS (VmRSS of /proc/PID/status, summed over the process and its
   descendants) of one omirrord (its peer not running) once its startup scan of a tree
   of 100,000 and of 1,000,000 tiny files is done and it watches the tree, and on an
   empty tree; reported per tracked file, as RSS/files and (RSS - RSS on the empty
   tree)/files. Each run starts from a fresh state directory (a first scan); the RSS
   after a restart on the filled store is reported beside it. lsyncd (``default.rsync``,
   ``init = false``: nothing is copied) is measured on the same trees once its inotify
   watches (counted in /proc/PID/fdinfo) cover every directory.

8. Live burst: scenario 1's 10,000 files of 4 KiB copied with ``cp -a`` into a running
   source, timed from the start of ``cp -a`` until the other side holds every file:

   - omirror: a pair of its own; each run starts both peers on empty trees with fresh
     state directories and waits until they are linked, in sync and idle (both links
     up, nothing queued, ``entries_behind`` 0 each way). The time runs from the start of
     ``cp -a`` into A's tree until cp has ended, A's queue is empty, its ``last_seq``
     has grown by at least one entry per file, its link to B is up with
     ``entries_behind`` 0, B lists no failing path, and B's tree holds every file under
     its final name with its size (checked directory by directory, every 20 ms; a
     complete directory is not listed again). CPU time (utime + stime of
     /proc/PID/stat) and memory (VmRSS, VmHWM of /proc/PID/status) of both daemons are
     read before and after: the details give CPU per file and the peak's growth over
     the RSS before the burst, per file.
   - rsync: as in scenario 1, the corpus into an empty directory (there is no ``cp -a``
     in its time).
   - lsyncd: started on an empty source and an empty target, its startup rsync done;
     from the start of ``cp -a`` into its source until its target holds every file
     (the same check), then, untimed, until none of its rsyncs has run for 0.5 s.
   - Unison has no live mode: it is left out of this scenario ("not measured").

   Every copy is compared with the corpus afterwards, untimed; ``cp -a``'s own time
   (beside omirror, beside lsyncd) is in the details.

9. Fan-out: 2,000 files of 4 KiB (random bytes, 100 per directory, a seed of their
   own) copied with ``cp -a`` into one of N running peers, for N = 2, 5 and 10; omirror
   only (rsync, Unison and lsyncd: "not measured").

   - omirror: N ``omirrord`` on 127.0.0.1, one Distfile listing them all (every peer
     linked with every other). Each run starts all N on empty trees with fresh state
     directories and waits until every daemon has scanned and every link is up both
     ways with nothing queued and nothing behind. The time runs from the start of
     ``cp -a`` into peer 0's tree until cp has ended, each of the N-1 other trees holds
     every file under its final name with its size (as in scenario 8), peer 0's
     ``last_seq`` has grown by at least one entry per file, and every daemon answers
     over its control socket with an empty queue, no failing path and every link up
     both ways with ``entries_behind`` 0. Bytes: the growth over the burst of
     ``content_bytes_sent`` summed over every daemon and every peer of it (relays
     included), also as a ratio to (N-1) x the corpus's bytes; likewise
     ``bytes_sent`` (every frame) and ``entries_sent``. CPU (utime + stime) of all N
     daemons, also per file per receiving peer. Every copy is compared with the
     corpus afterwards, untimed.

10. A 40 ms round trip: 1,000 files of 4 KiB, and 40 files of 1 MiB (random bytes,
    seeds of their own), each copied with ``cp -a`` into a running peer. There is no
    netem here: every connection goes through a TCP proxy (``Proxy`` of
    ``tests/fault/faults.py``, an asyncio loop in a thread of this process) that delays
    every byte by 20 ms each way.

    - omirror: a pair of its own, each of its two connections (A's to B, B's to A)
      through a proxy of its own (``OMIRROR_TEST_DIAL``); timed as in scenario 8, from
      the start of ``cp -a`` into A until B holds every file and A's status shows B
      caught up and nothing failing; both peers start on empty trees with fresh state
      and are linked, in sync and idle (over the proxies) beforehand.
    - rsync: as in scenario 1, the corpus into an empty directory, its ssh given the
      port of a proxy in front of the private sshd (connection set-up included).
    - Unison and lsyncd: "not measured".

    The bytes that went through the proxies (both directions) are in the details; a
    1-byte echo through such a proxy (to an echo server in this process) is timed once
    and printed beside the configured delay.

Prints the machine (CPU, cores, kernel, file system, AES-NI), the tool versions and one
table: per scenario the medians of each tool, the ratios omirror/peer, the target and
whether omirror meets it. ``--json`` writes all samples as JSON to stdout (the table
then goes to stderr). Every process started is stopped (its process group: SIGTERM,
then SIGKILL), also on an error, Ctrl-C or SIGTERM, and the work directory is removed
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import inspect
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(HERE))
# scenario 10's delaying proxy (tests/fault/faults.py, which imports tests/integration's
# cluster.py); imported where it is used, last on the path so nothing here is shadowed
sys.path += [str(PROJECT / "tests" / "fault"), str(PROJECT / "tests" / "integration")]

import latency  # noqa: E402
import xxhash  # noqa: E402
from _common import (  # noqa: E402
    AES_CIPHER,
    OmirrorPair,
    Proc,
    Sshd,
    compile_bytecode,
    descendants,
    ensure_tools,
    first_line,
    has_aes,
    lua_str,
    machine_info,
    note,
    omirrord_argv,
    wait_for,
)

from omirror import control  # noqa: E402
from omirror import peers as omirror_peers  # noqa: E402
from omirror.errors import OmirrorError  # noqa: E402

if TYPE_CHECKING:
    from faults import Proxy  # type: ignore[import-not-found, unused-ignore]

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SEED = 20240603
PER_DIR = 100
TINY_MAX = 100
DELTA_BYTES = MiB
#: The smallest "1 GiB" file at small scales: omirror sends a block delta only from
#: 4 MiB on, and 1 MiB must stay a small part of the file.
BIG_MIN = 8 * MiB
#: How often a condition on omirror's control socket or lsyncd's log is polled.
POLL_S = 0.02
PEERS = ("rsync", "unison", "lsyncd")
#: Scenario 9's numbers of peers, and its target (for the largest N).
FAN_OUT = (2, 5, 10)
FAN_OUT_TARGET_S = 15.0
FAN_OUT_BYTES_TARGET = 1.2
#: Scenario 10's delay of every byte each way: a 40 ms round trip.
RTT_DELAY_S = 0.020


# -- sizes and targets -------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """The scenarios' sizes at ``scale``."""

    scale: float
    files_4k: int
    tiny: int
    big: int
    latency_files: int
    memory: tuple[int, int]
    fan_out: int  # files of 4 KiB
    rtt_4k: int  # files of 4 KiB
    rtt_1m: int  # files of 1 MiB

    @classmethod
    def at(cls, scale: float, runs: int) -> Sizes:
        def n(x: float) -> int:
            return max(1, round(x * scale))
        # the big file is a whole number of MiB, as 1 GiB is: the same block layout
        big = max(BIG_MIN, round(GiB * scale / MiB) * MiB)
        return cls(scale, n(10_000), n(50_000), big, max(runs, n(300)),
                   (n(100_000), n(1_000_000)), n(2_000), n(1_000), n(40))


@dataclass(frozen=True)
class Target:
    """What omirror should reach: ``omirror/peer <= limit`` (``peer`` set) or
    ``omirror <= limit``."""

    text: str
    limit: float
    peer: str = ""


@dataclass
class Metric:
    """One row of the table: one quantity, every tool's samples (one per run)."""

    scenario: int
    name: str
    unit: str  # "s", "ms", "B", "B/file", "x" (a ratio)
    target: Target | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def add(self, tool: str, value: float) -> None:
        self.samples.setdefault(tool, []).append(value)

    def median(self, tool: str) -> float | None:
        xs = self.samples.get(tool)
        return statistics.median(xs) if xs else None

    def ratio(self, peer: str) -> float | None:
        a, b = self.median("omirror"), self.median(peer)
        return a / b if a is not None and b else None

    def met(self) -> bool | None:
        if self.target is None:
            return None
        value = self.ratio(self.target.peer) if self.target.peer else self.median("omirror")
        return None if value is None else value <= self.target.limit

    def as_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "name": self.name, "unit": self.unit,
                "samples": self.samples,
                "median": {t: self.median(t) for t in self.samples},
                "ratio_omirror_to": {p: self.ratio(p) for p in PEERS if p in self.samples},
                "target": None if self.target is None else self.target.text,
                "target_met": self.met(), "failed": self.failed}


# -- trees and files -----------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    path: Path
    files: int
    dirs: int  # directories, the top one included
    bytes: int


def build_tree(top: Path, files: int, size: Callable[[random.Random], int],
               seed: int) -> Tree:
    """``files`` files of random bytes, ``PER_DIR`` per leaf directory, two levels deep."""
    rng = random.Random(seed)
    leaves = max(1, math.ceil(files / PER_DIR))
    fanout = max(1, math.ceil(math.sqrt(leaves)))
    top.mkdir(parents=True, exist_ok=True)
    dirs = {top}
    made = total = 0
    for leaf in range(leaves):
        d = top / f"d{leaf // fanout:03d}" / f"e{leaf % fanout:03d}"
        d.mkdir(parents=True, exist_ok=True)
        dirs.update((d, d.parent))
        for _ in range(min(PER_DIR, files - made)):
            body = rng.randbytes(size(rng))
            fd = os.open(d / f"f{made:07d}.dat", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, body)
            finally:
                os.close(fd)
            made += 1
            total += len(body)
    return Tree(top, made, len(dirs), total)


def write_big(top: Path, size: int) -> Tree:
    """One file of ``size`` random bytes, ``top/big.dat``."""
    top.mkdir(parents=True, exist_ok=True)
    with open(top / "big.dat", "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 16 * MiB))
            f.write(chunk)
            left -= len(chunk)
    return Tree(top, 1, 1, size)


def overwrite_middle(path: Path, size: int) -> float:
    """Write ``DELTA_BYTES`` of new random bytes at the middle of the file (rounded down
    to 4 KiB); return ``perf_counter()`` right after ``close()``."""
    data = os.urandom(DELTA_BYTES)
    offset = (size // 2) & ~(4 * KiB - 1)
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        while view:
            view = view[os.pwrite(fd, view, offset + len(data) - len(view)):]
    finally:
        os.close(fd)
    return time.perf_counter()


def copy_tree(src: Path, dst: Path) -> None:
    """``cp -a src/. dst/`` (dst made if missing)."""
    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", f"{src}/.", f"{dst}/"], check=True, timeout=7200)


def empty_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def sync_disks() -> None:
    """Flush the setup's writeback before a timed part."""
    os.sync()


def _digest(path: str) -> bytes:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.digest()


def _listing(top: Path) -> dict[str, os.stat_result]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not d.startswith(".omirror")]
        rel = os.path.relpath(dirpath, top)
        for name in dirnames + filenames:
            if name.startswith(".omirror"):
                continue
            path = os.path.join(dirpath, name)
            out[os.path.normpath(os.path.join(rel, name))] = os.lstat(path)
    return out


def tree_difference(src: Path, dst: Path) -> str | None:
    """The first difference between two trees, None if they are the same: names, kinds,
    sizes, file modes, file mtimes (whole seconds) and contents. The daemon's own
    ``.omirror*`` names and directory mtimes are left out (omirror keeps its own)."""
    a, b = _listing(src), _listing(dst)
    if a.keys() != b.keys():
        only_a = sorted(a.keys() - b.keys())[:3]
        only_b = sorted(b.keys() - a.keys())[:3]
        return (f"{len(a.keys() - b.keys())} paths missing in {dst} (e.g. {only_a}), "
                f"{len(b.keys() - a.keys())} extra (e.g. {only_b})")
    for rel, sa in a.items():
        sb = b[rel]
        if (sa.st_mode >> 12) != (sb.st_mode >> 12):
            return f"{rel}: kind differs"
        if os.path.isdir(src / rel) and not os.path.islink(src / rel):
            continue
        if sa.st_size != sb.st_size or (sa.st_mode & 0o7777) != (sb.st_mode & 0o7777) \
                or int(sa.st_mtime) != int(sb.st_mtime):
            return (f"{rel}: size/mode/mtime {sa.st_size}/{sa.st_mode:o}/{int(sa.st_mtime)} "
                    f"!= {sb.st_size}/{sb.st_mode:o}/{int(sb.st_mtime)}")
        if os.path.islink(src / rel):
            if os.readlink(src / rel) != os.readlink(dst / rel):
                return f"{rel}: link target differs"
        elif sa.st_size <= MiB:
            if (src / rel).read_bytes() != (dst / rel).read_bytes():
                return f"{rel}: content differs"
        elif _digest(str(src / rel)) != _digest(str(dst / rel)):
            return f"{rel}: content differs"
    return None


def check_same(tool: str, src: Path, dst: Path) -> None:
    diff = tree_difference(src, dst)
    if diff is not None:
        raise RuntimeError(f"{tool}: the copy differs from its source: {diff}")


class Arrival:
    """Whether ``dst`` holds every regular file of a source tree under its final name and
    with its size (both omirror and rsync rename a complete file into place), checked
    incrementally: a directory found complete is not listed again, and a check stops at
    the first incomplete directory, so polling it every ``POLL_S`` stays cheap. The
    contents are compared afterwards (``check_same``), untimed."""

    def __init__(self, src: Path, dst: Path) -> None:
        self.dst = dst
        self.todo: dict[str, dict[str, int]] = {}
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            sizes = {name: os.lstat(os.path.join(dirpath, name)).st_size
                     for name in sorted(filenames)}
            if sizes:
                self.todo[os.path.relpath(dirpath, src)] = sizes

    def complete(self) -> bool:
        for rel in list(self.todo):
            want = self.todo[rel]
            try:
                with os.scandir(self.dst / rel) as entries:
                    have = {e.name: e.stat(follow_symlinks=False).st_size for e in entries
                            if e.name in want and e.is_file(follow_symlinks=False)}
            except FileNotFoundError:
                return False
            if have != want:
                return False
            del self.todo[rel]
        return True


# -- processes and memory ------------------------------------------------------------------


def memory_of(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes, summed over ``pid`` and its descendants."""
    rss = hwm = 0
    for p in (pid, *descendants(pid)):
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * KiB
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1]) * KiB
    return rss, hwm


def cpu_of(pid: int) -> float:
    """User + system CPU seconds (utime + stime of /proc/PID/stat) of ``pid`` and its live
    descendants."""
    total = 0
    for p in (pid, *descendants(pid)):
        try:
            stat = Path(f"/proc/{p}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15: utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def inotify_watches(pid: int) -> int:
    """How many inotify watches the process holds (/proc/PID/fdinfo)."""
    count = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                count += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return count


def timeout_for(files: int, nbytes: int) -> float:
    """A generous bound for one copy or scan (it only turns a hang into an error)."""
    return 120.0 + files / 50.0 + nbytes / 1e6


# -- the run's context ---------------------------------------------------------------------


@dataclass
class Fixture:
    """One corpus and every tool's copy of it, shared by the scenarios that use it."""

    base: Path
    corpus: Tree
    pair: OmirrorPair
    dst: dict[str, Path]
    unison_dirs: tuple[Path, Path]  # client's and server's $UNISON
    synced: set[str] = field(default_factory=set)  # tools whose copy equals the corpus


class Bench:
    """What the scenarios share: the options, the tools, the sshd, what to stop."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.sizes = Sizes.at(args.scale, args.runs)
        self.bins: dict[str, str] = {}
        self.tools: list[str] = ["omirror"]
        self.sshd: Sshd | None = None
        self.cipher: str | None = AES_CIPHER if has_aes() else None
        #: Without a way to cut its backoff short, A's link to a returning B waits out
        #: the backoff (up to 30 s): then the first copy asks A to relink at once.
        self.relink = "wake" not in inspect.signature(omirror_peers.keep_linked).parameters
        self.fixtures: dict[str, Fixture] = {}
        self.pairs: list[OmirrorPair] = []
        self.procs: list[Proc] = []
        self.proxies: list[Proxy] = []
        self.notes: list[str] = []
        self.details: dict[str, Any] = {}
        self._counter = 0

    # -- set-up and tear-down ----------------------------------------------------------

    def setup(self) -> None:
        want = ["sshd", "ssh", "rsync"]
        if not self.args.no_unison:
            want.append("unison")
        if not self.args.no_lsyncd:
            want.append("lsyncd")
        self.bins = ensure_tools(tuple(want))
        for needed in ("sshd", "ssh", "rsync"):
            if needed not in self.bins:
                raise RuntimeError(f"{needed} is missing and could not be installed: "
                                   "no comparison is possible")
        self.tools.append("rsync")
        for tool in ("unison", "lsyncd"):
            if getattr(self.args, f"no_{tool}"):
                continue
            if tool in self.bins:
                self.tools.append(tool)
            else:
                self.notes.append(f"{tool} is missing and could not be installed: skipped")
        self.sshd = Sshd(self.work / "sshd", self.bins)
        try:
            self.sshd.start()
        finally:
            if self.sshd.proc is not None:
                self.procs.append(self.sshd.proc)

    def stop_all(self) -> None:
        for pair in reversed(self.pairs):
            with contextlib.suppress(Exception):
                pair.stop_all()
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        for proxy in reversed(self.proxies):
            with contextlib.suppress(Exception):
                proxy.stop()

    def log(self, stem: str) -> Path:
        self._counter += 1
        return self.logs / f"{self._counter:04d}-{stem}.log"

    def new_pair(self, base: Path, count: int = 2) -> OmirrorPair:
        pair = OmirrorPair(base, count=count)
        self.pairs.append(pair)
        return pair

    def delaying_proxy(self, port: int, name: str, delay: float) -> Proxy:
        """A proxy on 127.0.0.1 (a port of its own) to ``port`` that delays every byte
        by ``delay`` seconds each way (``tests/fault/faults.py``: an asyncio loop in a
        thread of this process); stopped with the rest."""
        import faults

        proxy = faults.Proxy(("127.0.0.1", port), name)
        self.proxies.append(proxy)
        proxy.start()
        proxy.delay(delay)
        return proxy

    def order(self, run: int) -> list[str]:
        k = run % len(self.tools)
        return self.tools[k:] + self.tools[:k]

    # -- running a command to its end -------------------------------------------------

    def run(self, name: str, argv: list[str], timeout: float,
            env: dict[str, str] | None = None) -> tuple[float, str]:
        """Run a command in its own process group to its end; (seconds, its output).

        The time runs from just before the process is started to its exit. A failure,
        a timeout or an interruption stops the whole process group."""
        log = self.log(name)
        t0 = time.perf_counter()
        proc = Proc(name, argv, log, env=env)
        try:
            rc = proc.proc.wait(timeout)
            seconds = time.perf_counter() - t0
        except subprocess.TimeoutExpired:
            proc.stop()
            raise RuntimeError(f"{name} did not finish within {timeout:.0f} s:\n"
                               f"{proc.tail()}") from None
        finally:
            proc.stop()
        if rc != 0:
            raise RuntimeError(f"{name} exited with status {rc}:\n{proc.tail()}")
        return seconds, log.read_text(errors="replace")

    # -- rsync ------------------------------------------------------------------------

    def ssh_command(self, port: int | None = None) -> list[str]:
        """ssh to the private sshd, or through ``port`` (a proxy in front of it)."""
        assert self.sshd is not None
        return [self.bins["ssh"], *self.sshd.options(self.cipher, port)]

    def remote(self, path: Path) -> str:
        assert self.sshd is not None
        return f"{self.sshd.user}@127.0.0.1:{path}/"

    def rsync(self, src: Path, dst: Path, timeout: float,
              port: int | None = None) -> tuple[float, dict[str, int]]:
        """``rsync -a --stats`` over ssh (through ``port`` if given); (seconds, its
        statistics)."""
        seconds, out = self.run("rsync", [self.bins["rsync"], "-a", "--stats", "-e",
                                          shlex.join(self.ssh_command(port)), f"{src}/",
                                          self.remote(dst)], timeout)
        return seconds, rsync_stats(out)

    # -- unison -----------------------------------------------------------------------

    def unison(self, fx: Fixture, src: Path, dst: Path, timeout: float,
               fastcheck: bool = True) -> float:
        """One Unison run SRC <-> ssh://127.0.0.1//DST with the fixture's archives."""
        assert self.sshd is not None
        client, server = fx.unison_dirs
        for d in (client, server):
            d.mkdir(parents=True, exist_ok=True)
        argv = [self.bins["unison"], str(src), f"ssh://127.0.0.1/{dst}", "-batch", "-auto",
                "-silent", "-times", "-owner", "-group", "-log=false",
                "-sshcmd", self.bins["ssh"],
                "-sshargs", " ".join(self.sshd.options(self.cipher)),
                "-servercmd", f"env UNISON={server} {self.bins['unison']}"]
        if not fastcheck:
            argv += ["-fastcheck", "false"]
        seconds, _ = self.run("unison", argv, timeout,
                              env={**os.environ, "UNISON": str(client)})
        return seconds

    def unison_forget(self, fx: Fixture) -> None:
        for d in fx.unison_dirs:
            shutil.rmtree(d, ignore_errors=True)

    # -- lsyncd -----------------------------------------------------------------------

    def lsyncd(self, name: str, src: Path, dst: Path, *, remote: bool = True,
               init: bool = True) -> Lsyncd:
        return Lsyncd(self, name, src, dst, remote=remote, init=init)

    def lsyncd_startup(self, name: str, src: Path, dst: Path, timeout: float) -> float:
        """Seconds from lsyncd's start until its startup rsync of ``src`` to ``dst`` ends
        (its first copy, or its no-op on a tree in sync); lsyncd is stopped after."""
        ls = self.lsyncd(name, src, dst)
        sync_disks()
        t0 = time.perf_counter()
        ls.start()
        try:
            ls.wait_log(Lsyncd.STARTUP, 0, timeout, "lsyncd's startup rsync ends")
            return time.perf_counter() - t0
        finally:
            ls.stop()

    # -- omirror --------------------------------------------------------------------

    def relink_a(self, pair: OmirrorPair) -> None:
        """Ask A to restart its link to B now (``omirrord log replay --from 0``)."""
        control.request(pair.states[0], "replay", timeout=10, peer=pair.names[1], from_seq=0)

    def relink_all(self, pair: OmirrorPair) -> None:
        """Ask every peer to restart its link to every other now (as ``relink_a``)."""
        for i, state in enumerate(pair.states):
            for j, name in enumerate(pair.names):
                if i != j:
                    control.request(state, "replay", timeout=10, peer=name, from_seq=0)


class Lsyncd:
    """One ``lsyncd -nodaemon``: rsyncssh through the private sshd (or, with
    ``remote=False``, default.rsync to a local target), ``delay = 0``, rsync with
    ``--stats``; its log is read for the end of the startup sync and of each list."""

    STARTUP = re.compile(r"Startup of .* finished")
    LIST_DONE = re.compile(r"Finished (\(list\): 0|a list after exitcode: 0)")
    FAILED = re.compile(r"Error|failed|exitcode: [1-9]")

    def __init__(self, bench: Bench, name: str, src: Path, dst: Path, *, remote: bool,
                 init: bool) -> None:
        self.bench = bench
        self.base = bench.logs / f"lsyncd-{name}"
        self.base.mkdir(parents=True, exist_ok=True)
        self.logfile = self.base / "lsyncd.log"
        self.out = self.base / "lsyncd.out"
        common = (f"  source = {lua_str(src)},\n  delay = 0,\n"
                  + ("" if init else "  init = false,\n")
                  + '  rsync = { archive = true, compress = false, _extra = { "--stats" } },\n')
        if remote:
            sshd = bench.sshd
            assert sshd is not None
            options = ('StrictHostKeyChecking = "no", UserKnownHostsFile = "/dev/null", '
                       'BatchMode = "yes", LogLevel = "ERROR"')
            if bench.cipher:
                options += f", Ciphers = {lua_str(bench.cipher)}"
            sync = ("  default.rsyncssh,\n" + common
                    + f"  host = {lua_str('127.0.0.1')},\n  targetdir = {lua_str(dst)},\n"
                    f"  ssh = {{ binary = {lua_str(bench.bins['ssh'])}, port = {sshd.port}, "
                    f"identityFile = {lua_str(sshd.key)},\n"
                    f"          options = {{ {options} }} }},\n")
        else:
            sync = "  default.rsync,\n" + common + f"  target = {lua_str(dst)},\n"
        self.conf = self.base / "lsyncd.conf.lua"
        self.conf.write_text("settings {\n"
                             f"  logfile = {lua_str(self.logfile)},\n"
                             "  nodaemon = true,\n  insist = false,\n}\n"
                             f"sync {{\n{sync}}}\n")
        self.proc: Proc | None = None

    def start(self) -> Proc:
        self.proc = Proc("lsyncd", [self.bench.bins["lsyncd"], "-nodaemon", str(self.conf)],
                         self.out)
        self.bench.procs.append(self.proc)
        return self.proc

    def log_size(self) -> int:
        try:
            return self.logfile.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def out_size(self) -> int:
        try:
            return self.out.stat().st_size
        except OSError:
            return 0

    def out_since(self, offset: int) -> str:
        with open(self.out, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def wait_log(self, pattern: re.Pattern[str], offset: int, timeout: float,
                 what: str) -> None:
        assert self.proc is not None

        def seen() -> bool:
            text = self.log_since(offset)
            if pattern.search(text):
                return True
            bad = self.FAILED.search(text)
            if bad:
                raise RuntimeError(f"lsyncd reports a failure while waiting until {what}: "
                                   f"{text[max(0, bad.start() - 200):bad.end() + 200]}")
            return False
        wait_for(seen, timeout, what, (self.proc,), POLL_S)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            with contextlib.suppress(ValueError):
                self.bench.procs.remove(self.proc)
            self.proc = None


def rsync_stats(out: str) -> dict[str, int]:
    """The numbers of rsync's ``--stats`` (the last block in ``out``) by name."""
    stats: dict[str, int] = {}
    for key, pattern in (("bytes_sent", r"Total bytes sent: ([\d,.]+)"),
                         ("bytes_received", r"Total bytes received: ([\d,.]+)"),
                         ("files_transferred",
                          r"Number of regular files transferred: ([\d,.]+)"),
                         ("literal", r"Literal data: ([\d,.]+)")):
        found = re.findall(pattern, out)
        if found:
            stats[key] = int(re.sub(r"\D", "", found[-1]))
    return stats


# -- omirror's view of itself ----------------------------------------------------------------


def link_of(status: dict[str, Any] | None, peer: str) -> dict[str, Any]:
    if not status:
        return {}
    return status.get("peers", {}).get(peer) or {}


def no_failing(status: dict[str, Any], who: str) -> None:
    """A receiver acknowledges an entry it could not apply too (it retries it later and
    lists it under ``failing``), so "nothing behind" alone does not prove a complete
    tree: a failing path ends the measurement with the daemon's own error."""
    failing = status.get("failing")
    if failing:
        shown = "; ".join(f"{p}: {e}" for p, e in list(failing.items())[:3])
        raise RuntimeError(f"omirror {who} reports {len(failing)} failing path(s): {shown}")


def caught_up(pair: OmirrorPair, sent_before: int) -> bool:
    """A's link to B is up, has sent entries since ``sent_before`` was read (so its
    counters are this link's, not an earlier link's), B has acknowledged all of A's log
    and has no failing path."""
    link = link_of(pair.status(0), pair.names[1])
    if not (link.get("out") == "up" and link.get("entries_sent", 0) > sent_before
            and link.get("entries_behind") == 0):
        return False
    return b_answers_clean(pair)


def recorded_and_acked(pair: OmirrorPair, seq_before: int, new: int = 1, *,
                       idle: bool = False) -> bool:
    """A's log has grown by at least ``new`` entries since ``seq_before`` (with ``idle``,
    nothing is left queued to record either), its link to B is up, B has acknowledged
    all of it and has no failing path."""
    st = pair.status(0)
    link = link_of(st, pair.names[1])
    if not (st and st["last_seq"] - seq_before >= new and not (idle and st.get("queue"))
            and link.get("out") == "up" and link.get("entries_behind") == 0):
        return False
    return b_answers_clean(pair)


def b_answers_clean(pair: OmirrorPair) -> bool:
    """B answers status and lists no failing path (one ends the measurement)."""
    st = pair.status(1)
    if not st:
        return False
    no_failing(st, "B")
    return True


def peer_label(pair: OmirrorPair, i: int) -> str:
    return "AB"[i] if pair.count == 2 else f"peer {i}"


def pair_in_sync(pair: OmirrorPair) -> bool:
    """Every daemon (started since its stats were last zero) has scanned, has its links
    with every other peer up both ways, nothing queued and nothing unacknowledged by any
    peer (for two peers: both links up, nothing pending either way)."""
    for i in range(pair.count):
        st = pair.status(i)
        if not st or st.get("phase") != "running" or st.get("queue"):
            return False
        no_failing(st, peer_label(pair, i))
        for j, name in enumerate(pair.names):
            if j == i:
                continue
            link = link_of(st, name)
            if link.get("out") != "up" or link.get("in") != "up" \
                    or link.get("entries_behind") != 0:
                return False
    return True


def start_fresh(bench: Bench, pair: OmirrorPair, timeout: float, what: str) -> None:
    """Every peer of ``pair`` on an empty tree with a fresh state directory, running,
    linked with every other, in sync and idle (scenarios 8-10, before each timed run)."""
    for i in range(pair.count):
        wipe_state(pair, i)
        empty_dir(pair.data[i])
    for i in range(pair.count):
        pair.start(i)
    for i in range(pair.count):
        pair.wait_up(i, timeout)
    if bench.relink:
        if pair.count == 2:
            bench.relink_a(pair)
        else:
            bench.relink_all(pair)
    wait_for(lambda: pair_in_sync(pair), timeout, what, pair.running(), POLL_S)


def wipe_state(pair: OmirrorPair, i: int) -> None:
    """Stop peer ``i`` and give it a fresh state directory (its host key kept)."""
    pair.stop(i)
    for entry in pair.states[i].iterdir():
        if not entry.name.startswith("host_key"):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


# -- fixtures ------------------------------------------------------------------------------


def fixture(bench: Bench, kind: str) -> Fixture:
    """The corpus of ``kind`` ("files4k", "tiny", "big") with every tool's destination,
    made on first use; omirror's A holds a copy of the corpus."""
    if kind in bench.fixtures:
        return bench.fixtures[kind]
    s = bench.sizes
    base = bench.work / kind
    corpus = base / "corpus" / "data"
    note(f"building the {kind} corpus")
    if kind == "files4k":
        tree = build_tree(corpus, s.files_4k, lambda rng: 4 * KiB, SEED + 1)
    elif kind == "tiny":
        tree = build_tree(corpus, s.tiny, lambda rng: rng.randint(0, TINY_MAX), SEED + 2)
    else:
        tree = write_big(corpus, s.big)
    pair = bench.new_pair(base / "omirror")
    copy_tree(corpus, pair.data[0])
    dst = {"rsync": base / "rsync" / "data", "unison": base / "unison" / "data",
           "lsyncd": base / "lsyncd" / "data", "omirror": pair.data[1]}
    for d in dst.values():
        d.mkdir(parents=True, exist_ok=True)
    fx = Fixture(base, tree, pair, dst, (base / "unison-client", base / "unison-server"))
    bench.fixtures[kind] = fx
    return fx


def start_a(bench: Bench, fx: Fixture) -> None:
    """Start A alone (if it is not running) and wait until its startup scan is done."""
    pair = fx.pair
    if pair.procs[0] is not None and pair.procs[0].running:
        return
    pair.start(0)
    pair.wait_up(0, timeout_for(fx.corpus.files, fx.corpus.bytes))


def bring_in_sync(bench: Bench, fx: Fixture, tools: list[str]) -> None:
    """Untimed: make every tool's copy equal the corpus (and Unison's archives match)."""
    timeout = timeout_for(fx.corpus.files, fx.corpus.bytes)
    for tool in tools:
        if tool in fx.synced:
            continue
        note(f"  setup: {tool} copies the {fx.base.name} corpus (untimed)")
        dst = fx.dst[tool]
        if tool == "omirror":
            pair = fx.pair
            pair.stop_all()
            pair.start(0)
            pair.start(1)
            for i in (0, 1):
                pair.wait_up(i, timeout)
            if bench.relink:
                bench.relink_a(pair)
            wait_for(lambda: pair_in_sync(pair), timeout, "the two omirrord are in sync",
                     pair.running(), 0.1)
        elif tool == "rsync":
            bench.rsync(fx.corpus.path, dst, timeout)
        elif tool == "unison":
            bench.unison(fx, fx.corpus.path, dst, timeout)
        elif tool == "lsyncd":
            copy_tree(fx.corpus.path, dst)
        check_same(tool, fx.corpus.path, dst)
        fx.synced.add(tool)


# -- scenarios 1-3: first copy -------------------------------------------------------------


def first_copy(bench: Bench, number: int, kind: str, title: str) -> list[Metric]:
    fx = fixture(bench, kind)
    corpus = fx.corpus
    timeout = timeout_for(corpus.files, corpus.bytes)
    metric = Metric(number, title, "s", Target("<= 1.0x rsync", 1.0, "rsync"))
    details: dict[str, Any] = {"omirror_b_listening_s": [], "rsync_bytes_sent": [],
                               "omirror_cpu_s": {"A": [], "B": []},
                               "omirror_cpu_us_per_file": [],
                               "omirror_hwm_bytes": {"A": [], "B": []}}
    note(f"scenario {number}: {title}: omirror's A scans the corpus (untimed)")
    pair = fx.pair
    pair.stop(1)
    start_a(bench, fx)
    failed: set[str] = set()
    for run in range(bench.args.runs):
        order = [t for t in bench.order(run) if t not in failed]
        note(f"scenario {number} run {run + 1}/{bench.args.runs}: order {', '.join(order)}")
        for tool in order:
            dst = fx.dst[tool]
            fx.synced.discard(tool)
            try:
                if tool == "omirror":
                    wipe_state(pair, 1)
                    empty_dir(pair.data[1])
                    sent_before = link_of(pair.status(0), pair.names[1]).get("entries_sent", 0)
                    sync_disks()
                    a_proc = pair.procs[0]
                    assert a_proc is not None
                    a_cpu = cpu_of(a_proc.pid)
                    t0 = time.perf_counter()
                    b_proc = pair.start(1)
                    pair.wait_up(1, timeout, POLL_S)
                    details["omirror_b_listening_s"].append(time.perf_counter() - t0)
                    if bench.relink:
                        bench.relink_a(pair)
                    wait_for(lambda: caught_up(pair, sent_before), timeout,
                             "B has acknowledged A's whole log", pair.running(), POLL_S)
                    seconds = time.perf_counter() - t0
                    cpu = {"A": cpu_of(a_proc.pid) - a_cpu, "B": cpu_of(b_proc.pid)}
                    for side, pid in (("A", a_proc.pid), ("B", b_proc.pid)):
                        details["omirror_cpu_s"][side].append(cpu[side])
                        details["omirror_hwm_bytes"][side].append(memory_of(pid)[1])
                    details["omirror_cpu_us_per_file"].append(
                        1e6 * (cpu["A"] + cpu["B"]) / max(1, corpus.files))
                    pair.stop(1)
                elif tool == "rsync":
                    empty_dir(dst)
                    sync_disks()
                    seconds, stats = bench.rsync(corpus.path, dst, timeout)
                    details["rsync_bytes_sent"].append(stats.get("bytes_sent"))
                elif tool == "unison":
                    empty_dir(dst)
                    bench.unison_forget(fx)
                    sync_disks()
                    seconds = bench.unison(fx, corpus.path, dst, timeout)
                else:
                    empty_dir(dst)
                    seconds = bench.lsyncd_startup(f"s{number}-r{run}", corpus.path, dst,
                                                   timeout)
                check_same(tool, corpus.path, dst)
            except (RuntimeError, OSError, OmirrorError, subprocess.SubprocessError) as e:
                note(f"  {tool} FAILED: {e}")
                metric.failed[tool] = str(e)[:2000]
                failed.add(tool)
                if tool == "omirror":
                    pair.stop(1)
                continue
            fx.synced.add(tool)
            metric.add(tool, seconds)
            note(f"  {tool}: {seconds:.3f} s")
    bench.details[f"scenario {number}"] = details
    return [metric]


# -- scenario 4: delta ---------------------------------------------------------------------


def delta(bench: Bench) -> list[Metric]:
    fx = fixture(bench, "big")
    size = fx.corpus.bytes
    timeout = timeout_for(1, size)
    name = f"1 MiB changed in a {human(size)} file"
    t_metric = Metric(4, f"{name}: time", "s", Target("<= 0.4x rsync", 0.4, "rsync"))
    b_metric = Metric(4, f"{name}: bytes sent", "B",
                      Target(f"<= 2% of the file ({human(0.02 * size)})", 0.02 * size))
    details: dict[str, list[Any]] = {"omirror_content_bytes_sent": [],
                                     "omirror_bytes_received": [],
                                     "rsync_bytes_received": [], "lsyncd_bytes_received": []}
    note("scenario 4: delta; setup (untimed): every tool holds the file")
    tools = list(bench.tools)
    bring_in_sync(bench, fx, [t for t in tools if t != "lsyncd"])
    pair = fx.pair
    if len(pair.running()) < 2:
        fx.synced.discard("omirror")
        bring_in_sync(bench, fx, ["omirror"])
    ls: Lsyncd | None = None
    lsrc = fx.base / "lsyncd-src" / "data"
    if "lsyncd" in tools:
        # lsyncd is live: it needs a source of its own, which nothing else changes
        bring_in_sync(bench, fx, ["lsyncd"])
        if not lsrc.exists():
            copy_tree(fx.corpus.path, lsrc)
        ls = bench.lsyncd("s4", lsrc, fx.dst["lsyncd"])
        sync_disks()
        ls.start()
        ls.wait_log(Lsyncd.STARTUP, 0, timeout, "lsyncd's startup rsync ends")
    failed: set[str] = set()
    try:
        for run in range(bench.args.runs):
            order = [t for t in bench.order(run) if t not in failed]
            note(f"scenario 4 run {run + 1}/{bench.args.runs}: order {', '.join(order)}")
            for tool in order:
                sent: float | None = None
                try:
                    if tool == "omirror":
                        src = pair.data[0]
                        before_st = pair.status(0)
                        before = link_of(before_st, pair.names[1])
                        seq_before = before_st["last_seq"] if before_st else 0
                        sync_disks()
                        t0 = overwrite_middle(src / "big.dat", size)
                        wait_for(lambda: recorded_and_acked(pair, seq_before), timeout,
                                 "A has recorded the change and B acknowledged it",
                                 pair.running(), POLL_S)
                        seconds = time.perf_counter() - t0
                        after = link_of(pair.status(0), pair.names[1])
                        sent = after["bytes_sent"] - before["bytes_sent"]
                        details["omirror_content_bytes_sent"].append(
                            after["content_bytes_sent"] - before["content_bytes_sent"])
                        details["omirror_bytes_received"].append(
                            after["bytes_received"] - before["bytes_received"])
                        check_same(tool, src, pair.data[1])
                    elif tool in ("rsync", "unison"):
                        src = fx.corpus.path
                        overwrite_middle(src / "big.dat", size)
                        sync_disks()
                        if tool == "rsync":
                            seconds, stats = bench.rsync(src, fx.dst[tool], timeout)
                            sent = stats.get("bytes_sent")
                            details["rsync_bytes_received"].append(stats.get("bytes_received"))
                        else:
                            # with fastcheck, Unison misses same-size changes made
                            # soon after a sync (tried here: 4 of 5 missed)
                            seconds = bench.unison(fx, src, fx.dst[tool], timeout,
                                                   fastcheck=False)
                        check_same(tool, src, fx.dst[tool])
                    else:
                        assert ls is not None
                        offset, out_offset = ls.log_size(), ls.out_size()
                        sync_disks()
                        t0 = overwrite_middle(lsrc / "big.dat", size)
                        ls.wait_log(Lsyncd.LIST_DONE, offset, timeout,
                                    "lsyncd's rsync of the change ends")
                        seconds = time.perf_counter() - t0
                        stats = rsync_stats(ls.out_since(out_offset))
                        sent = stats.get("bytes_sent")
                        details["lsyncd_bytes_received"].append(stats.get("bytes_received"))
                        check_same(tool, lsrc, fx.dst[tool])
                except (RuntimeError, OSError, OmirrorError, subprocess.SubprocessError,
                        KeyError, TypeError) as e:
                    note(f"  {tool} FAILED: {e}")
                    t_metric.failed[tool] = str(e)[:2000]
                    failed.add(tool)
                    fx.synced.discard(tool)
                    continue
                t_metric.add(tool, seconds)
                if sent is not None:
                    b_metric.add(tool, sent)
                note(f"  {tool}: {seconds:.3f} s"
                     + ("" if sent is None else f", {human(sent)} sent"))
    finally:
        if ls is not None:
            ls.stop()
    fx.synced.discard("lsyncd")  # its copy follows lsyncd's own source, not the corpus
    if "unison" in bench.tools:
        b_metric.failed.setdefault("unison", "not measured (Unison reports no byte counts)")
    bench.details["scenario 4"] = details
    return [t_metric, b_metric]


# -- scenario 5: restart with nothing changed ---------------------------------------------


def restart(bench: Bench) -> list[Metric]:
    fx = fixture(bench, "tiny")  # scenario 2's tree, and its copies when 2 ran
    files = fx.corpus.files
    timeout = timeout_for(files, fx.corpus.bytes)
    metric = Metric(5, f"restart, nothing changed, {files:,} files", "s",
                    Target("<= 0.7x rsync's no-op", 0.7, "rsync"))
    details: dict[str, list[Any]] = {"omirror_scans_done_s": []}
    note("scenario 5: restart; setup (untimed): every tool in sync")
    bring_in_sync(bench, fx, list(bench.tools))
    pair = fx.pair
    pair.stop_all()
    failed: set[str] = set()
    for run in range(bench.args.runs):
        order = [t for t in bench.order(run) if t not in failed]
        note(f"scenario 5 run {run + 1}/{bench.args.runs}: order {', '.join(order)}")
        for tool in order:
            dst = fx.dst[tool]
            try:
                if tool == "omirror":
                    sync_disks()
                    t0 = time.perf_counter()
                    procs = (pair.start(0), pair.start(1))
                    wait_for(lambda: pair.up(0) and pair.up(1), timeout,
                             "both omirrord have scanned and listen", procs, POLL_S)
                    details["omirror_scans_done_s"].append(time.perf_counter() - t0)
                    wait_for(lambda: pair_in_sync(pair), timeout,
                             "both links are up with nothing pending", procs, POLL_S)
                    seconds = time.perf_counter() - t0
                    pair.stop_all()
                elif tool == "rsync":
                    sync_disks()
                    seconds, stats = bench.rsync(fx.corpus.path, dst, timeout)
                    if stats.get("files_transferred"):
                        raise RuntimeError(f"rsync transferred {stats['files_transferred']} "
                                           "files of a tree in sync")
                elif tool == "unison":
                    sync_disks()
                    seconds = bench.unison(fx, fx.corpus.path, dst, timeout)
                else:
                    seconds = bench.lsyncd_startup(f"s5-r{run}", fx.corpus.path, dst, timeout)
                check_same(tool, fx.corpus.path, dst)
            except (RuntimeError, OSError, OmirrorError, subprocess.SubprocessError) as e:
                note(f"  {tool} FAILED: {e}")
                metric.failed[tool] = str(e)[:2000]
                failed.add(tool)
                if tool == "omirror":
                    pair.stop_all()
                fx.synced.discard(tool)
                continue
            metric.add(tool, seconds)
            note(f"  {tool}: {seconds:.3f} s")
    bench.details["scenario 5"] = details
    return [metric]


# -- scenario 6: latency (bench/latency.py) --------------------------------------------------


def latency_scenario(bench: Bench) -> list[Metric]:
    files = bench.sizes.latency_files
    note(f"scenario 6: latency, running bench/latency.py --files {files} "
         f"--rounds {bench.args.runs}")
    argv = ["--files", str(files), "--rounds", str(bench.args.runs), "--json",
            "--workdir", str(bench.work / "latency")]
    if "lsyncd" not in bench.tools:
        argv.append("--no-lsyncd")
    if bench.args.keep:
        argv.append("--keep")
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        rc = latency.main(argv)
    if rc != 0:
        raise RuntimeError(f"bench/latency.py exited with status {rc}")
    result = json.loads(captured.getvalue())
    bench.details["scenario 6"] = {"latency.py": {k: v for k, v in result.items()
                                                  if k != "results"},
                                   "results": {t: {k: v for k, v in r.items()
                                                   if k != "samples_ms"}
                                               for t, r in result["results"].items()}}
    metrics = []
    for q, limit in (("p50", latency.TARGET_P50_MS), ("p99", latency.TARGET_P99_MS)):
        m = Metric(6, f"latency close() -> visible, {q} ({files} files)", "ms",
                   Target(f"<= {limit:g} ms", limit))
        for tool, r in result["results"].items():
            value = r.get(f"{q}_ms")
            if value is None:
                m.failed[tool] = "misses reach this percentile"
            else:
                m.add(tool, value)
        metrics.append(m)
    return metrics


# -- scenario 7: memory --------------------------------------------------------------------


def memory(bench: Bench) -> list[Metric]:
    counts = [0, *bench.sizes.memory]
    pairs: dict[int, OmirrorPair] = {}
    trees: dict[int, Tree] = {}
    for n in counts:
        pair = bench.new_pair(bench.work / "memory" / f"n{n}")
        note(f"scenario 7: building a tree of {n:,} tiny files")
        trees[n] = build_tree(pair.data[0], n, lambda rng: rng.randint(0, TINY_MAX),
                              SEED + 7) if n else Tree(pair.data[0], 0, 1, 0)
        pairs[n] = pair
    target = Target("<= 300 B/file", 300.0)
    samples: dict[str, dict[int, list[tuple[int, int]]]] = {
        "omirror": {n: [] for n in counts}, "omirror_restarted": {n: [] for n in counts},
        "lsyncd": {n: [] for n in counts}}
    tools = ["omirror"] + (["lsyncd"] if "lsyncd" in bench.tools else [])
    failed: dict[str, str] = {}
    for run in range(bench.args.runs):
        k = run % len(tools)
        order = tools[k:] + tools[:k]
        note(f"scenario 7 run {run + 1}/{bench.args.runs}: order {', '.join(order)}")
        for tool in order:
            if tool in failed:
                continue
            try:
                for n in counts:
                    tree, pair = trees[n], pairs[n]
                    timeout = timeout_for(n, tree.bytes)
                    if tool == "omirror":
                        wipe_state(pair, 0)
                        for key in ("omirror", "omirror_restarted"):
                            sync_disks()
                            proc = pair.start(0)
                            pair.wait_up(0, timeout)
                            samples[key][n].append(memory_of(proc.pid))
                            pair.stop(0)
                    else:
                        target_dir = bench.work / "memory" / f"lsyncd-target-{n}"
                        target_dir.mkdir(parents=True, exist_ok=True)
                        ls = bench.lsyncd(f"s7-n{n}-r{run}", tree.path, target_dir,
                                          remote=False, init=False)
                        sync_disks()
                        proc = ls.start()
                        try:
                            wait_for(lambda: inotify_watches(proc.pid) >= tree.dirs, timeout,
                                     f"lsyncd watches all {tree.dirs} directories", (proc,),
                                     0.2)
                            samples["lsyncd"][n].append(memory_of(proc.pid))
                        finally:
                            ls.stop()
                    rss = samples["lsyncd" if tool == "lsyncd" else "omirror"][n][-1][0]
                    note(f"  {tool}, {n:,} files: RSS {human(rss)}")
            except (RuntimeError, OSError, OmirrorError, subprocess.SubprocessError) as e:
                note(f"  {tool} FAILED: {e}")
                failed[tool] = str(e)[:2000]
                for pair in pairs.values():
                    pair.stop_all()
    metrics = []
    for n in counts[1:]:
        per_file = Metric(7, f"RSS per tracked file, {n:,} files", "B/file", target)
        marginal = Metric(7, f"(RSS - RSS on an empty tree) per file, {n:,} files",
                          "B/file", target)
        for tool in tools:
            if tool in failed:
                per_file.failed[tool] = marginal.failed[tool] = failed[tool]
                continue
            for (rss, _), (empty, _) in zip(samples[tool][n], samples[tool][0]):
                per_file.add(tool, rss / n)
                marginal.add(tool, (rss - empty) / n)
        metrics += [per_file, marginal]
    bench.details["scenario 7"] = {
        "rss_bytes": {k: {str(n): [r for r, _ in v] for n, v in d.items()}
                      for k, d in samples.items()},
        "hwm_bytes": {k: {str(n): [h for _, h in v] for n, v in d.items()}
                      for k, d in samples.items()},
        "dirs": {str(n): t.dirs for n, t in trees.items()},
        "omirror_restarted_rss_per_file": {
            str(n): statistics.median(r / n for r, _ in samples["omirror_restarted"][n])
            for n in counts[1:] if samples["omirror_restarted"][n]},
    }
    for pair in pairs.values():
        pair.stop_all()
    return metrics


# -- scenario 8: live burst ------------------------------------------------------------------


def start_cp(bench: Bench, src: Path, dst: Path) -> Proc:
    """``cp -a src/. dst/`` started in its own process group (stopped with the rest on an
    error); the caller polls it."""
    proc = Proc("cp", ["cp", "-a", f"{src}/.", f"{dst}/"], bench.log("cp"))
    bench.procs.append(proc)
    return proc


def end_cp(bench: Bench, proc: Proc) -> None:
    proc.stop()
    with contextlib.suppress(ValueError):
        bench.procs.remove(proc)


def cp_done(proc: Proc) -> bool:
    """Whether cp has ended; an error if it failed."""
    rc = proc.proc.poll()
    if rc is None:
        return False
    if rc != 0:
        raise RuntimeError(f"cp -a exited with status {rc}:\n{proc.tail()}")
    return True


def live_burst(bench: Bench) -> list[Metric]:
    fx = fixture(bench, "files4k")  # scenario 1's corpus
    fx.pair.stop_all()  # scenario 1's A, idle: not part of this scenario
    corpus = fx.corpus
    timeout = timeout_for(corpus.files, corpus.bytes)
    metric = Metric(8, f"live burst, cp -a of {corpus.files:,} files of 4 KiB", "s",
                    Target("<= 1.0x rsync", 1.0, "rsync"))
    if "unison" in bench.tools:
        metric.failed["unison"] = "not measured (Unison has no live mode)"
    details: dict[str, Any] = {
        "cp_s": {"omirror": [], "lsyncd": []}, "omirror_after_cp_s": [],
        "lsyncd_after_cp_s": [], "omirror_entries": [], "rsync_bytes_sent": [],
        "omirror_cpu_s": {"A": [], "B": []}, "omirror_cpu_us_per_file": [],
        "omirror_rss_before_bytes": {"A": [], "B": []},
        "omirror_rss_after_bytes": {"A": [], "B": []},
        "omirror_hwm_after_bytes": {"A": [], "B": []},
        "omirror_hwm_growth_per_file": {"A": [], "B": []}}
    base = fx.base / "live"
    note("scenario 8: live burst; setup (untimed): an omirror pair, rsync's and lsyncd's "
         "directories")
    pair = bench.new_pair(base / "omirror")
    rsync_dst = base / "rsync" / "data"
    lsrc, ldst = base / "lsyncd-src" / "data", base / "lsyncd" / "data"
    tools = [t for t in bench.tools if t != "unison"]
    failed: set[str] = set()
    try:
        for run in range(bench.args.runs):
            order = [t for t in bench.order(run) if t in tools and t not in failed]
            note(f"scenario 8 run {run + 1}/{bench.args.runs}: order {', '.join(order)}")
            for tool in order:
                cp: Proc | None = None
                ls: Lsyncd | None = None
                try:
                    if tool == "omirror":
                        start_fresh(bench, pair, timeout,
                                    "the two omirrord are linked and in sync")
                        arrival = Arrival(corpus.path, pair.data[1])
                        pids = [p.pid for p in pair.running()]
                        sync_disks()
                        st = pair.status(0)
                        if not st:
                            raise RuntimeError("omirror A does not answer")
                        seq_before = st["last_seq"]
                        cpu_before = [cpu_of(pid) for pid in pids]
                        mem_before = [memory_of(pid) for pid in pids]
                        t0 = time.perf_counter()
                        cp = start_cp(bench, corpus.path, pair.data[0])
                        cp_end: list[float] = []

                        def omirror_done() -> bool:
                            assert cp is not None
                            if not cp_end:
                                if not cp_done(cp):
                                    return False
                                cp_end.append(time.perf_counter())
                            return recorded_and_acked(pair, seq_before, corpus.files,
                                                      idle=True) and arrival.complete()
                        wait_for(omirror_done, timeout,
                                 "A has recorded the copy, B has acknowledged it and holds "
                                 "every file", pair.running(), POLL_S)
                        seconds = time.perf_counter() - t0
                        cpu = [cpu_of(pid) - c for pid, c in zip(pids, cpu_before)]
                        mem_after = [memory_of(pid) for pid in pids]
                        st = pair.status(0)
                        details["omirror_entries"].append(
                            st["last_seq"] - seq_before if st else None)
                        details["cp_s"]["omirror"].append(cp_end[0] - t0)
                        details["omirror_after_cp_s"].append(seconds - (cp_end[0] - t0))
                        for who, c, (rss0, _), (rss1, hwm1) in zip("AB", cpu, mem_before,
                                                                    mem_after):
                            details["omirror_cpu_s"][who].append(c)
                            details["omirror_rss_before_bytes"][who].append(rss0)
                            details["omirror_rss_after_bytes"][who].append(rss1)
                            details["omirror_hwm_after_bytes"][who].append(hwm1)
                            details["omirror_hwm_growth_per_file"][who].append(
                                (hwm1 - rss0) / corpus.files)
                        details["omirror_cpu_us_per_file"].append(
                            1e6 * sum(cpu) / corpus.files)
                        check_same(tool, corpus.path, pair.data[1])
                        pair.stop_all()
                    elif tool == "rsync":
                        empty_dir(rsync_dst)
                        sync_disks()
                        seconds, stats = bench.rsync(corpus.path, rsync_dst, timeout)
                        details["rsync_bytes_sent"].append(stats.get("bytes_sent"))
                        check_same(tool, corpus.path, rsync_dst)
                    else:
                        empty_dir(lsrc)
                        empty_dir(ldst)
                        ls = bench.lsyncd(f"s8-r{run}", lsrc, ldst)
                        arrival = Arrival(corpus.path, ldst)
                        sync_disks()
                        proc = ls.start()
                        ls.wait_log(Lsyncd.STARTUP, 0, timeout, "lsyncd's startup rsync ends")
                        offset = ls.log_size()
                        sync_disks()
                        t0 = time.perf_counter()
                        cp = start_cp(bench, corpus.path, lsrc)
                        cp_end = []

                        def lsyncd_done() -> bool:
                            nonlocal offset
                            assert cp is not None and ls is not None
                            try:
                                with open(ls.logfile, "rb") as f:
                                    f.seek(offset)
                                    raw = f.read()
                            except FileNotFoundError:
                                raw = b""
                            offset += len(raw)
                            text = raw.decode(errors="replace")
                            bad = Lsyncd.FAILED.search(text)
                            if bad:
                                raise RuntimeError(
                                    "lsyncd reports a failure: "
                                    f"{text[max(0, bad.start() - 200):bad.end() + 200]}")
                            if not cp_end:
                                if not cp_done(cp):
                                    return False
                                cp_end.append(time.perf_counter())
                            return arrival.complete()
                        wait_for(lsyncd_done, timeout, "lsyncd's target holds every file",
                                 (proc,), POLL_S)
                        seconds = time.perf_counter() - t0
                        details["cp_s"]["lsyncd"].append(cp_end[0] - t0)
                        details["lsyncd_after_cp_s"].append(seconds - (cp_end[0] - t0))
                        # untimed: let lsyncd's last rsync (directories' times) end before
                        # it is stopped, so that no temp file is left behind
                        idle_since = [time.monotonic()]

                        def lsyncd_idle() -> bool:
                            if descendants(proc.pid):
                                idle_since[0] = time.monotonic()
                            return time.monotonic() - idle_since[0] >= 0.5
                        wait_for(lsyncd_idle, timeout, "lsyncd runs no rsync for 0.5 s",
                                 (proc,), POLL_S)
                        ls.stop()
                        check_same(tool, corpus.path, ldst)
                except (RuntimeError, OSError, OmirrorError, subprocess.SubprocessError,
                        KeyError, TypeError) as e:
                    note(f"  {tool} FAILED: {e}")
                    metric.failed[tool] = str(e)[:2000]
                    failed.add(tool)
                    if tool == "omirror":
                        pair.stop_all()
                    continue
                finally:
                    if cp is not None:
                        end_cp(bench, cp)
                    if ls is not None:
                        ls.stop()
                metric.add(tool, seconds)
                note(f"  {tool}: {seconds:.3f} s")
    finally:
        pair.stop_all()
    bench.details["scenario 8"] = details
    return [metric]


# -- scenario 9: fan-out to many peers -----------------------------------------------------


def sent_by_each(pair: OmirrorPair) -> list[dict[str, Any]]:
    """Per daemon, its counters summed over its peers (``content_bytes_sent``,
    ``bytes_sent``, ``entries_sent``: they grow for the daemon's life) and the
    ``out_since`` of each of its links out (it changes when a link goes down or up)."""
    rows = []
    for i in range(pair.count):
        st = pair.status(i)
        if not st:
            raise RuntimeError(f"omirror {peer_label(pair, i)} does not answer")
        links = [link_of(st, name) for j, name in enumerate(pair.names) if j != i]
        row: dict[str, Any] = {key: sum(link.get(key, 0) for link in links)
                               for key in ("content_bytes_sent", "bytes_sent", "entries_sent")}
        row["out_since"] = [link.get("out_since") for link in links]
        rows.append(row)
    return rows


def fan_out(bench: Bench) -> list[Metric]:
    files = bench.sizes.fan_out
    base = bench.work / "fan-out"
    note(f"scenario 9: fan-out; building its corpus, {files:,} files of 4 KiB")
    corpus = build_tree(base / "corpus" / "data", files, lambda rng: 4 * KiB, SEED + 9)
    timeout = timeout_for(corpus.files, corpus.bytes)
    metrics: list[Metric] = []
    details: dict[str, Any] = {"corpus_files": corpus.files, "corpus_bytes": corpus.bytes}
    for n in FAN_OUT:
        receivers = n - 1
        title = f"fan-out to {receivers} peer{'s' if receivers > 1 else ''}"
        t_metric = Metric(9, f"{title}, {files:,} x 4 KiB", "s",
                          Target(f"<= {FAN_OUT_TARGET_S:g} s", FAN_OUT_TARGET_S)
                          if n == max(FAN_OUT) else None)
        b_metric = Metric(9, f"{title}: content bytes sent / ({receivers} x corpus)", "x",
                          Target(f"<= {FAN_OUT_BYTES_TARGET:g}x", FAN_OUT_BYTES_TARGET))
        for tool in bench.tools:
            if tool != "omirror":
                t_metric.failed[tool] = "not measured (omirror only: N peers of one mirror)"
        metrics += [t_metric, b_metric]
        d: dict[str, list[Any]] = {
            "cp_s": [], "after_cp_s": [], "held_s": [], "done_s": [], "content_bytes_sent": [],
            "content_bytes_sent_by_source": [], "content_bytes_per_receiver": [],
            "bytes_sent": [], "entries_sent": [], "entries_recorded": [], "cpu_s": [],
            "cpu_us_per_file_per_receiver": [], "links_restarted": []}
        details[f"N={n}"] = d
        note(f"scenario 9, N={n}: setup (untimed): {n} omirrord, one Distfile")
        mesh = bench.new_pair(base / f"n{n}", count=n)
        try:
            for run in range(bench.args.runs):
                note(f"scenario 9, N={n}, run {run + 1}/{bench.args.runs}")
                cp: Proc | None = None
                try:
                    start_fresh(bench, mesh, timeout, f"the {n} omirrord are linked and in sync")
                    arrivals = [Arrival(corpus.path, mesh.data[j]) for j in range(1, n)]
                    pids = [p.pid for p in mesh.running()]
                    sync_disks()
                    st = mesh.status(0)
                    if not st:
                        raise RuntimeError("omirror peer 0 does not answer")
                    seq_before = st["last_seq"]
                    before = sent_by_each(mesh)
                    cpu_before = [cpu_of(pid) for pid in pids]
                    t0 = time.perf_counter()
                    cp = start_cp(bench, corpus.path, mesh.data[0])
                    cp_end: list[float] = []
                    held: list[float] = []

                    def all_done() -> bool:
                        assert cp is not None
                        if not cp_end:
                            if not cp_done(cp):
                                return False
                            cp_end.append(time.perf_counter())
                        if not held:
                            if not all(a.complete() for a in arrivals):
                                return False
                            held.append(time.perf_counter())
                        st = mesh.status(0)
                        if not st or st["last_seq"] - seq_before < corpus.files:
                            return False
                        return pair_in_sync(mesh)
                    wait_for(all_done, timeout,
                             f"the {receivers} other peers hold every file and every "
                             "daemon has nothing behind", mesh.running(), POLL_S)
                    seconds = time.perf_counter() - t0
                    cpu = sum(cpu_of(pid) - c for pid, c in zip(pids, cpu_before))
                    after = sent_by_each(mesh)
                    st = mesh.status(0)
                    grown = {key: [a[key] - b[key] for a, b in zip(after, before)]
                             for key in ("content_bytes_sent", "bytes_sent", "entries_sent")}
                    content = sum(grown["content_bytes_sent"])
                    ratio = content / (receivers * corpus.bytes)
                    d["cp_s"].append(cp_end[0] - t0)
                    d["after_cp_s"].append(seconds - (cp_end[0] - t0))
                    d["held_s"].append(held[0] - t0)
                    d["done_s"].append(seconds)
                    d["content_bytes_sent"].append(content)
                    d["content_bytes_sent_by_source"].append(grown["content_bytes_sent"][0])
                    d["content_bytes_per_receiver"].append(content / receivers)
                    d["bytes_sent"].append(sum(grown["bytes_sent"]))
                    d["entries_sent"].append(sum(grown["entries_sent"]))
                    d["entries_recorded"].append(st["last_seq"] - seq_before if st else None)
                    d["cpu_s"].append(cpu)
                    d["cpu_us_per_file_per_receiver"].append(
                        1e6 * cpu / (corpus.files * receivers))
                    d["links_restarted"].append(sum(
                        x != y for a, b in zip(after, before)
                        for x, y in zip(a["out_since"], b["out_since"])))
                    for j in range(1, n):
                        check_same("omirror", corpus.path, mesh.data[j])
                except (RuntimeError, OSError, OmirrorError, subprocess.SubprocessError,
                        KeyError, TypeError) as e:
                    note(f"  omirror FAILED: {e}")
                    t_metric.failed["omirror"] = b_metric.failed["omirror"] = str(e)[:2000]
                    break
                finally:
                    if cp is not None:
                        end_cp(bench, cp)
                    mesh.stop_all()
                t_metric.add("omirror", seconds)
                b_metric.add("omirror", ratio)
                note(f"  omirror: {seconds:.3f} s, content {human(content)} sent "
                     f"({ratio:.2f}x of {receivers} x the corpus), CPU {cpu:.2f} s")
        finally:
            mesh.stop_all()
    bench.details["scenario 9"] = details
    return metrics


# -- scenario 10: a 40 ms round trip -------------------------------------------------------


def echo_round_trip(bench: Bench, delay: float, probes: int = 5) -> float:
    """The median time of a 1-byte echo through a proxy like scenario 10's (``delay``
    each way) to an echo server in a thread of this process: what such a proxy makes of
    a round trip."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        def echo() -> None:
            with contextlib.suppress(OSError):  # the server closed under accept()
                conn, _ = server.accept()
                with conn:
                    while data := conn.recv(64):
                        conn.sendall(data)
        thread = threading.Thread(target=echo, daemon=True, name="echo")
        thread.start()
        proxy = bench.delaying_proxy(server.getsockname()[1], "echo", delay)
        times = []
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
                for _ in range(probes):
                    t0 = time.perf_counter()
                    conn.sendall(b"x")
                    if conn.recv(1) != b"x":
                        raise RuntimeError("the echo through the proxy came back wrong")
                    times.append(time.perf_counter() - t0)
        finally:
            proxy.stop()
            bench.proxies.remove(proxy)
        thread.join(10)
    return statistics.median(times)


def round_trip(bench: Bench) -> list[Metric]:
    s = bench.sizes
    base = bench.work / "round-trip"
    note(f"scenario 10: a {2000 * RTT_DELAY_S:.0f} ms round trip; building its corpora, "
         f"{s.rtt_4k:,} files of 4 KiB and {s.rtt_1m:,} of 1 MiB")
    corpora = [("4k", build_tree(base / "corpus-4k" / "data", s.rtt_4k,
                                 lambda rng: 4 * KiB, SEED + 10), "4 KiB"),
               ("1m", build_tree(base / "corpus-1m" / "data", s.rtt_1m,
                                 lambda rng: MiB, SEED + 11), "1 MiB")]
    assert bench.sshd is not None
    pair = bench.new_pair(base / "omirror")
    ports = [int(name.rpartition(":")[2]) for name in pair.names]
    # A's connection to B through one proxy, B's to A through another; rsync's ssh
    # through a third, in front of the private sshd
    a_to_b = bench.delaying_proxy(ports[1], "A -> B", RTT_DELAY_S)
    b_to_a = bench.delaying_proxy(ports[0], "B -> A", RTT_DELAY_S)
    to_sshd = bench.delaying_proxy(bench.sshd.port, "ssh", RTT_DELAY_S)
    pair.env[0] = {"OMIRROR_TEST_DIAL": f"{pair.names[1]}=127.0.0.1:{a_to_b.port}"}
    pair.env[1] = {"OMIRROR_TEST_DIAL": f"{pair.names[0]}=127.0.0.1:{b_to_a.port}"}
    rsync_dst = base / "rsync" / "data"
    tools = [t for t in bench.tools if t in ("omirror", "rsync")]
    metrics: list[Metric] = []
    details: dict[str, Any] = {"delay_each_way_s": RTT_DELAY_S,
                               "round_trip_s": 2 * RTT_DELAY_S,
                               "echo_round_trip_s": echo_round_trip(bench, RTT_DELAY_S)}
    note(f"  a 1-byte echo through such a proxy: {1000 * details['echo_round_trip_s']:.1f} ms")
    try:
        for kind, corpus, size in corpora:
            timeout = timeout_for(corpus.files, corpus.bytes)
            metric = Metric(10, f"{2000 * RTT_DELAY_S:.0f} ms round trip, cp -a of "
                            f"{corpus.files:,} files of {size}", "s",
                            Target("<= 1.0x rsync", 1.0, "rsync"))
            for tool in ("unison", "lsyncd"):
                if tool in bench.tools:
                    metric.failed[tool] = "not measured (omirror and rsync only)"
            metrics.append(metric)
            d: dict[str, Any] = {"files": corpus.files, "bytes": corpus.bytes,
                                 "cp_s": [], "omirror_after_cp_s": [],
                                 "omirror_proxied_bytes": [], "rsync_proxied_bytes": [],
                                 "rsync_bytes_sent": []}
            details[kind] = d
            failed: set[str] = set()
            for run in range(bench.args.runs):
                order = [t for t in bench.order(run) if t in tools and t not in failed]
                note(f"scenario 10 ({size} files) run {run + 1}/{bench.args.runs}: "
                     f"order {', '.join(order)}")
                for tool in order:
                    cp: Proc | None = None
                    try:
                        if tool == "omirror":
                            start_fresh(bench, pair, timeout, "the two omirrord are linked "
                                        "(through the proxies) and in sync")
                            arrival = Arrival(corpus.path, pair.data[1])
                            sync_disks()
                            st = pair.status(0)
                            if not st:
                                raise RuntimeError("omirror A does not answer")
                            seq_before = st["last_seq"]
                            proxied = a_to_b.forwarded + b_to_a.forwarded
                            t0 = time.perf_counter()
                            cp = start_cp(bench, corpus.path, pair.data[0])
                            cp_end: list[float] = []

                            def omirror_done() -> bool:
                                assert cp is not None
                                if not cp_end:
                                    if not cp_done(cp):
                                        return False
                                    cp_end.append(time.perf_counter())
                                return arrival.complete() and recorded_and_acked(
                                    pair, seq_before, corpus.files, idle=True)
                            wait_for(omirror_done, timeout,
                                     "A has recorded the copy, B has acknowledged it and "
                                     "holds every file", pair.running(), POLL_S)
                            seconds = time.perf_counter() - t0
                            d["cp_s"].append(cp_end[0] - t0)
                            d["omirror_after_cp_s"].append(seconds - (cp_end[0] - t0))
                            d["omirror_proxied_bytes"].append(
                                a_to_b.forwarded + b_to_a.forwarded - proxied)
                            check_same(tool, corpus.path, pair.data[1])
                            pair.stop_all()
                        else:
                            empty_dir(rsync_dst)
                            proxied = to_sshd.forwarded
                            sync_disks()
                            seconds, stats = bench.rsync(corpus.path, rsync_dst, timeout,
                                                         port=to_sshd.port)
                            d["rsync_proxied_bytes"].append(to_sshd.forwarded - proxied)
                            d["rsync_bytes_sent"].append(stats.get("bytes_sent"))
                            check_same(tool, corpus.path, rsync_dst)
                    except (RuntimeError, OSError, OmirrorError, subprocess.SubprocessError,
                            KeyError, TypeError) as e:
                        note(f"  {tool} FAILED: {e}")
                        metric.failed[tool] = str(e)[:2000]
                        failed.add(tool)
                        if tool == "omirror":
                            pair.stop_all()
                        continue
                    finally:
                        if cp is not None:
                            end_cp(bench, cp)
                    metric.add(tool, seconds)
                    note(f"  {tool}: {seconds:.3f} s")
    finally:
        pair.stop_all()
        for proxy in (a_to_b, b_to_a, to_sshd):
            proxy.stop()
            with contextlib.suppress(ValueError):
                bench.proxies.remove(proxy)
    bench.details["scenario 10"] = details
    return metrics


# -- output --------------------------------------------------------------------------------


def human(n: float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "B":
        return human(value)
    if unit == "s":
        return f"{value:.3f}"
    if unit == "ms":
        return f"{value:.2f}" if value < 100 else f"{value:.1f}"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.0f}"


def versions(bench: Bench) -> dict[str, str]:
    b = bench.bins
    out = {"omirror": first_line([*omirrord_argv(), "-V"])}
    try:
        out["asyncssh"] = importlib.metadata.version("asyncssh")
    except importlib.metadata.PackageNotFoundError:
        out["asyncssh"] = "unknown"
    if "rsync" in b:
        out["rsync"] = first_line([b["rsync"], "--version"])
    if "unison" in b:
        out["unison"] = first_line([b["unison"], "-version"])
    if "lsyncd" in b:
        out["lsyncd"] = first_line([b["lsyncd"], "--version"])
    if "ssh" in b:
        out["openssh"] = first_line([b["ssh"], "-V"])
    return out


def table(metrics: list[Metric], tools: list[str]) -> list[str]:
    peers = [t for t in PEERS if t in tools]
    head = ["scenario", "unit", "omirror", *peers, *(f"o/{p}" for p in peers), "target", "met"]
    rows = []
    for m in metrics:
        cells = [f"{m.scenario} {m.name}", m.unit]
        for tool in ("omirror", *peers):
            v = m.median(tool)
            cells.append("FAIL" if v is None and tool in m.failed
                         and not m.failed[tool].startswith("not measured") else fmt(v, m.unit))
        for p in peers:
            r = m.ratio(p)
            cells.append("-" if r is None else f"{r:.2f}x")
        met = m.met()
        cells += [m.target.text if m.target else "", "-" if met is None else
                  ("yes" if met else "NO")]
        rows.append(cells)
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = []
    for r in [head, *rows]:
        lines.append("  ".join(str(c).ljust(w) if i in (0, 1, len(head) - 2, len(head) - 1)
                               else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip())
    return lines


def fan_out_lines(d9: dict[str, Any]) -> list[str]:
    """Scenario 9's cost per receiving peer, one line per N (medians)."""
    med = statistics.median
    lines = []
    for count in FAN_OUT:
        d = d9.get(f"N={count}", {})
        if not d.get("content_bytes_sent"):
            continue
        corpus, files, receivers = d9["corpus_bytes"], d9["corpus_files"], count - 1
        lines.append(
            f"9: N={count}: content sent {med(d['content_bytes_sent']) / corpus:.2f}x the "
            f"corpus ({human(corpus)}), "
            f"{med(d['content_bytes_sent']) / (receivers * corpus):.2f}x of {receivers} x "
            f"the corpus, {human(med(d['content_bytes_per_receiver']))} per receiving peer "
            f"({human(med(d['content_bytes_sent_by_source']))} from peer 0); "
            f"{med(d['entries_sent']):,.0f} entries sent, "
            f"{med(d['entries_sent']) / (files * receivers):.1f} per file per receiving "
            f"peer; CPU of all {count} daemons "
            f"{med(d['cpu_s']):.2f} s, {med(d['cpu_us_per_file_per_receiver']):.0f} us per "
            f"file per receiving peer; cp -a {med(d['cp_s']):.3f} s, every file on every "
            f"peer after {med(d['held_s']):.3f} s, nothing behind anywhere after "
            f"{med(d['done_s']):.3f} s; links restarted during the "
            f"burst: {max(d['links_restarted'])} (medians; the last a max)")
    return lines


def round_trip_lines(d10: dict[str, Any]) -> list[str]:
    """Scenario 10's delay and each sub-scenario's bytes through the proxies (medians)."""
    if not d10:
        return []
    med = statistics.median
    lines = [f"10: round trip {1000 * d10['round_trip_s']:.0f} ms: a proxy delaying every "
             f"byte {1000 * d10['delay_each_way_s']:.0f} ms each way on each of omirror's "
             "two connections and in front of rsync's sshd; a 1-byte echo through such a "
             f"proxy took {1000 * d10['echo_round_trip_s']:.1f} ms (median of 5)"]
    for kind in ("4k", "1m"):
        d = d10.get(kind)
        if not d:
            continue
        parts = []
        if d["omirror_after_cp_s"]:
            parts.append(f"omirror done {med(d['omirror_after_cp_s']):.3f} s after cp -a "
                         f"ended ({med(d['cp_s']):.3f} s), "
                         f"{human(med(d['omirror_proxied_bytes']))} through its proxies")
        if d["rsync_proxied_bytes"]:
            parts.append(f"rsync {human(med(d['rsync_proxied_bytes']))} through its proxy")
        if parts:
            lines.append(f"10: {d['files']:,} files of {human(d['bytes'] / d['files'])}: "
                         + "; ".join(parts) + " (medians)")
    return lines


def report(bench: Bench, metrics: list[Metric], info: dict[str, str],
           vers: dict[str, str], out: Any) -> None:
    def p(*a: object) -> None:
        print(*a, file=out)
    s = bench.sizes
    p(f"omirror against {', '.join(t for t in bench.tools if t != 'omirror')}: "
      f"--scale {s.scale:g}, --runs {bench.args.runs} (medians), tool order rotated each run")
    p("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    p("versions: " + "; ".join(f"{k} {v}" for k, v in vers.items()))
    p(f"ssh: {'-c ' + bench.cipher if bench.cipher else 'default ciphers (no AES-NI)'} for "
      "rsync, unison and lsyncd, through a private sshd on 127.0.0.1; omirror: asyncssh, "
      "aes128-gcm first")
    if bench.relink:
        p("omirror first copy: A is asked to relink to B at once (replay from 0) as soon "
          "as B listens: this omirror has nothing that cuts its reconnect backoff short")
    else:
        p("omirror first copy: A's link to B comes up by itself (this omirror cuts its "
          "reconnect backoff short when the peer connects in)")
    for n in bench.notes:
        p(f"note: {n}")
    p("")
    for line in table(metrics, bench.tools):
        p(line)
    p("")
    for m in metrics:
        for tool, why in m.failed.items():
            p(f"{m.scenario} {m.name}: {tool}: {why.splitlines()[0][:300]}")
    d7 = bench.details.get("scenario 7", {}).get("omirror_restarted_rss_per_file")
    if d7:
        p("7: omirror RSS per file after a restart on the filled store: "
          + ", ".join(f"{int(n):,} files {v:.0f} B" for n, v in d7.items()))
    d5 = bench.details.get("scenario 5", {}).get("omirror_scans_done_s")
    if d5:
        p(f"5: omirror, both scans done and listening after (median) "
          f"{statistics.median(d5):.3f} s; the rest is the links coming up")
    for number in (1, 2, 3):
        dn = bench.details.get(f"scenario {number}", {})
        if dn.get("omirror_cpu_us_per_file"):
            cpu, hwm = dn["omirror_cpu_s"], dn["omirror_hwm_bytes"]
            p(f"{number}: omirror CPU {statistics.median(dn['omirror_cpu_us_per_file']):.0f} us "
              f"per file (A {statistics.median(cpu['A']):.2f} s, B "
              f"{statistics.median(cpu['B']):.2f} s); peak RSS (VmHWM) A "
              f"{human(statistics.median(hwm['A']))}, B {human(statistics.median(hwm['B']))}"
              " (medians)")
    d8 = bench.details.get("scenario 8", {})
    if d8.get("omirror_cpu_us_per_file"):
        def med(xs: list[float]) -> float:
            return statistics.median(xs)
        cp_o, cp_l = d8["cp_s"]["omirror"], d8["cp_s"]["lsyncd"]
        p(f"8: cp -a itself took {med(cp_o):.3f} s beside omirror"
          + (f", {med(cp_l):.3f} s beside lsyncd" if cp_l else "")
          + f"; omirror was done {med(d8['omirror_after_cp_s']):.3f} s after cp ended"
          + (f", lsyncd {med(d8['lsyncd_after_cp_s']):.3f} s" if d8["lsyncd_after_cp_s"]
             else "") + " (medians)")
        cpu, hwm = d8["omirror_cpu_s"], d8["omirror_hwm_after_bytes"]
        growth = d8["omirror_hwm_growth_per_file"]
        p(f"8: omirror CPU {med(d8['omirror_cpu_us_per_file']):.0f} us per file "
          f"(A {med(cpu['A']):.2f} s, B {med(cpu['B']):.2f} s); peak RSS (VmHWM) "
          f"A {human(med(hwm['A']))}, B {human(med(hwm['B']))}, "
          f"{med(growth['A']):.0f} and {med(growth['B']):.0f} B per file over the RSS "
          "before the burst (medians)")
    for line in fan_out_lines(bench.details.get("scenario 9", {})) \
            + round_trip_lines(bench.details.get("scenario 10", {})):
        p(line)
    if s.scale != 1.0:
        p(f"targets are meant for --scale 1; at --scale {s.scale:g} the fixed 1 MiB change "
          f"is {100 * DELTA_BYTES / s.big:.1f}% of the file")


# -- main ----------------------------------------------------------------------------------


def parse_only(text: str) -> set[int]:
    try:
        chosen = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--only takes scenario numbers like 1,3,5: {text!r}") from None
    if not chosen or not chosen <= set(range(1, 11)):
        raise argparse.ArgumentTypeError(f"--only takes numbers from 1 to 10: {text!r}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per scenario; medians (3)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiplies the file counts and sizes (1.0)")
    ap.add_argument("--only", type=parse_only, default=set(range(1, 11)),
                    help="the scenarios to run, e.g. 1,3,5 (all)")
    ap.add_argument("--workdir", help="work directory (default: a fresh one under /tmp); "
                    "must be empty or not exist")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    ap.add_argument("--json", action="store_true",
                    help="results as JSON on stdout (the table then goes to stderr)")
    ap.add_argument("--no-unison", action="store_true", help="leave Unison out")
    ap.add_argument("--no-lsyncd", action="store_true", help="leave lsyncd out")
    args = ap.parse_args(argv)
    if args.runs < 1 or not args.scale > 0:
        ap.error("--runs must be >= 1 and --scale > 0")
    if args.workdir:
        work = Path(args.workdir).resolve()
        if work.exists() and any(work.iterdir()):
            ap.error(f"--workdir {work} is not empty")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="omirror-bench-compare-", dir="/tmp"))

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    # a shell starts background jobs with SIGINT ignored; this script honours it anyway
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    compile_bytecode()
    bench = Bench(args, work)
    try:
        return run(bench)
    except KeyboardInterrupt as e:
        note(f"interrupted ({str(e) or 'Ctrl-C'}): stopping everything this run started")
        return 130
    finally:
        # the clean-up is bounded (SIGKILL after a timeout): let no second signal cut it
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        try:
            bench.stop_all()
            if args.keep:
                note(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous)


def run(bench: Bench) -> int:
    args = bench.args
    out = sys.stderr if args.json else sys.stdout
    bench.setup()
    s = bench.sizes
    note(f"tools: {', '.join(bench.tools)}; scale {s.scale:g}: {s.files_4k:,} x 4 KiB, "
         f"{s.tiny:,} tiny (also restarted), {human(s.big)}, latency "
         f"{s.latency_files} files, memory {s.memory[0]:,} and {s.memory[1]:,} files, "
         f"fan-out {s.fan_out:,} x 4 KiB, round trip {s.rtt_4k:,} x 4 KiB and "
         f"{s.rtt_1m:,} x 1 MiB")
    scenarios: dict[int, Callable[[], list[Metric]]] = {
        1: lambda: first_copy(bench, 1, "files4k",
                              f"first copy, {s.files_4k:,} files of 4 KiB"),
        2: lambda: first_copy(bench, 2, "tiny",
                              f"first copy, {s.tiny:,} files of 0-{TINY_MAX} B"),
        3: lambda: first_copy(bench, 3, "big", f"first copy, one {human(s.big)} file"),
        4: lambda: delta(bench),
        5: lambda: restart(bench),
        6: lambda: latency_scenario(bench),
        7: lambda: memory(bench),
        8: lambda: live_burst(bench),
        9: lambda: fan_out(bench),
        10: lambda: round_trip(bench),
    }
    metrics: list[Metric] = []
    for number in sorted(args.only):
        metrics += scenarios[number]()
        for kind in free_after(number, args.only):
            release(bench, kind)
    info, vers = machine_info(bench.work), versions(bench)
    report(bench, metrics, info, vers, out)
    if args.json:
        json.dump({"scale": s.scale, "runs": args.runs, "sizes": s.__dict__,
                   "machine": info, "versions": vers,
                   "ssh_cipher": bench.cipher, "omirror_relink_on_first_copy": bench.relink,
                   "tools": bench.tools, "notes": bench.notes,
                   "metrics": [m.as_json() for m in metrics], "details": bench.details},
                  sys.stdout, indent=2)
        print()
    return 0


def free_after(number: int, only: set[int]) -> Iterator[str]:
    """The fixtures no scenario after ``number`` needs (their disk space is freed)."""
    later = {n for n in only if n > number}
    users = {"files4k": {1, 8}, "big": {3, 4}, "tiny": {2, 5}}
    for kind, used_by in users.items():
        if number in used_by and not later & used_by:
            yield kind


def release(bench: Bench, kind: str) -> None:
    fx = bench.fixtures.pop(kind, None)
    if fx is None:
        return
    fx.pair.stop_all()
    if not bench.args.keep:
        shutil.rmtree(fx.base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
