#!/usr/bin/env python3
"""Benchmark: latency from close() on one peer to the file being complete on another,
omirror against lsyncd (rsync over ssh), side by side in the same run.

Run from the project root with the project's virtualenv (as root, so that apt-get can
install lsyncd, openssh-server and rsync if they are missing)::

    .venv/bin/python bench/latency.py [--files 300] [--rounds 3] [--delay S] [--gap-ms 20]
                                      [--timeout 10] [--warmup 5] [--workdir DIR]
                                      [--keep] [--no-lsyncd] [--json]

What runs, all on 127.0.0.1 and all started by this script:

* omirror: two ``omirrord`` daemons set up as an operator would (an ``ssh-keygen`` host
  key per peer, one peers file, one Distfile with ``FILES = ( /data )``, each peer with
  its own ``--root``), with omirrord's default coalescing delay unless ``--delay`` is given.
  Files are written under peer A's tree and awaited under peer B's.
* lsyncd: a private ``sshd`` (own config, host key, authorized_keys and pid file in the
  work directory, ``-D`` in the foreground) and ``lsyncd -nodaemon`` with
  ``default.rsyncssh``, ``delay = 0``, pushing its source directory to a target directory
  through that sshd. If that cannot be made to work here, ``default.rsync`` to a local
  target directory is used instead and the output says so (a weaker comparison: no ssh).

Each file (1-4 KiB of random bytes, new name) is written with open/write/close, and
``time.perf_counter()`` is taken right after ``close()``. Arrival is detected by a thread
doing blocking reads of an inotify descriptor watching the destination directory
(IN_MOVED_TO, IN_CLOSE_WRITE, IN_CREATE): the time is taken as soon as ``read()``
returns, and the file is then checked (right size and right bytes); both tools rename a
complete file into place, so the first event at which the check passes is the arrival.
The next file is written ``--gap-ms`` after the previous one arrived (or was given up
on), so each file is measured on its own. A file that has not arrived within
``--timeout`` seconds is a miss: it counts as an infinitely late sample in the
percentiles and is reported.

The tools take turns in ``--rounds`` rounds, the order rotated each round, so machine
noise hits both. Both tools stay up for the whole run (one idles while the other is
measured). Before the rounds, each tool mirrors ``--warmup`` files that are not counted
(links up, lsyncd's start-up sync done, caches warm).

Prints the machine, the tool versions and a table (n, misses, p50, p95, p99, max in ms,
nearest-rank percentiles), the ratios omirror/lsyncd for p50 and p99, and whether omirror
meets its targets (p50 <= 5 ms, p99 <= 25 ms). ``--json`` writes the results to stdout
as JSON and the table to stderr. Every process started is stopped (its process group:
SIGTERM, then SIGKILL) and the work directory is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import math
import os
import random
import select
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    STARTUP_TIMEOUT_S,
    OmirrorPair,
    Proc,
    Sshd,
    compile_bytecode,
    ensure_tools,
    first_line,
    lua_str,
    machine_info,
    note,
    wait_for,
)

from omirror.cli import DEFAULT_DELAY_S  # noqa: E402

SEED = 20240602
MIN_SIZE, MAX_SIZE = 1024, 4096
TARGET_P50_MS, TARGET_P99_MS = 5.0, 25.0


# -- detecting arrival -------------------------------------------------------------------

IN_CLOEXEC = 0o2000000
IN_CREATE, IN_CLOSE_WRITE, IN_MOVED_TO = 0x100, 0x008, 0x080
IN_Q_OVERFLOW = 0x4000
_EVENT = struct.Struct("iIII")


class ArrivalWatcher:
    """Tells when a file appears, complete, in one directory.

    A dedicated thread blocks in ``read()`` on an inotify descriptor and takes
    ``time.perf_counter()`` the moment the read returns, before anything else; then it
    checks each named file it has been told to expect (size, then bytes) and records the
    arrival time of those that are complete. ``expect`` before writing the file;
    ``wait`` returns the arrival time or None after the timeout.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = os.fsencode(directory)
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(IN_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        wd = libc.inotify_add_watch(self._fd, ctypes.c_char_p(self.dir),
                                    IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_TO)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")
        self._lock = threading.Lock()
        self._expected: dict[bytes, tuple[bytes, threading.Event]] = {}
        self.arrived: dict[bytes, float] = {}
        self.overflows = 0
        self._wake_r, self._wake_w = os.pipe()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"arrival:{directory}",
                                        daemon=True)
        self._thread.start()

    def expect(self, name: str, content: bytes) -> None:
        with self._lock:
            self._expected[os.fsencode(name)] = (content, threading.Event())

    def wait(self, name: str, timeout: float) -> float | None:
        key = os.fsencode(name)
        with self._lock:
            _, event = self._expected[key]
        if event.wait(timeout):
            return self.arrived[key]
        return None

    def forget(self, name: str) -> None:
        with self._lock:
            self._expected.pop(os.fsencode(name), None)

    def present(self, name: str, content: bytes) -> bool:
        return self._complete(os.fsencode(name), content)

    def _complete(self, name: bytes, content: bytes) -> bool:
        try:
            fd = os.open(os.path.join(self.dir, name), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            if os.fstat(fd).st_size != len(content):
                return False
            return os.read(fd, len(content) + 1) == content
        finally:
            os.close(fd)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop:
            ready = [fd for fd, _ in poller.poll()]
            if self._fd not in ready:
                continue
            buf = os.read(self._fd, 65536)
            seen = time.perf_counter()
            names = set()
            pos = 0
            while pos + _EVENT.size <= len(buf):
                _wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
                pos += _EVENT.size
                name = buf[pos:pos + length].rstrip(b"\0")
                pos += length
                if mask & IN_Q_OVERFLOW:
                    self.overflows += 1
                elif name:
                    names.add(name)
            for name in names:
                with self._lock:
                    want = self._expected.get(name)
                if want is None or name in self.arrived:
                    continue
                content, event = want
                if self._complete(name, content):
                    self.arrived[name] = seen
                    event.set()

    def close(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)


# -- the tools ---------------------------------------------------------------------------


class Tool:
    key = ""
    label = ""
    src: Path
    dst: Path
    procs: list[Proc]

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs = []


class Omirror(Tool):
    key = "omirror"

    def __init__(self, work: Path, delay: float) -> None:
        self.label = f"omirror (-d {delay:g})"
        self.procs = []
        self.pair = OmirrorPair(work / "omirror", delay)
        self.src, self.dst = self.pair.data
        self.version = self.pair.version

    def start(self) -> None:
        for i in range(2):
            self.procs.append(self.pair.start(i))
        for i in range(2):
            wait_for(lambda i=i: self.pair.up(i), STARTUP_TIMEOUT_S,  # type: ignore[misc]
                     f"{self.procs[i].name} writes its status.json", tuple(self.procs))
        self.mode = "two omirrord on 127.0.0.1, asyncssh link"


class Lsyncd(Tool):
    key = "lsyncd"

    def __init__(self, work: Path, bins: dict[str, str]) -> None:
        self.bins = bins
        self.procs = []
        self.base = work / "lsyncd"
        self.base.mkdir()
        self.src = self.base / "src"
        self.dst = self.base / "dst"
        self.src.mkdir()
        self.dst.mkdir()
        self.fallback_reason = ""
        self.label = "lsyncd"
        self.mode = ""
        self.version = first_line([bins["lsyncd"], "--version"])

    # lsyncd ------------------------------------------------------------------------------

    def _start_lsyncd(self, sync: str) -> None:
        conf = self.base / "lsyncd.conf.lua"
        conf.write_text(
            "settings {\n"
            f"  logfile = {lua_str(self.base / 'lsyncd.log')},\n"
            f"  statusFile = {lua_str(self.base / 'lsyncd.status')},\n"
            "  nodaemon = true,\n"
            "  insist = false,\n"
            "}\n"
            f"sync {{\n{sync}}}\n")
        proc = Proc("lsyncd", [self.bins["lsyncd"], "-nodaemon", str(conf)],
                    self.base / "lsyncd.out")
        self.procs.append(proc)

    def start(self) -> None:
        common = (f"  source = {lua_str(self.src)},\n"
                  "  delay = 0,\n"
                  "  rsync = { archive = true, compress = false },\n")
        try:
            if "sshd" not in self.bins or "ssh" not in self.bins:
                raise RuntimeError("sshd or ssh is not installed")
            sshd = Sshd(self.base, self.bins)
            try:
                sshd.start()
            finally:
                if sshd.proc is not None:
                    self.procs.append(sshd.proc)
            port, key, user = sshd.port, sshd.key, sshd.user
            self._start_lsyncd(
                "  default.rsyncssh,\n" + common
                + f"  host = {lua_str(user + '@127.0.0.1' if user != 'root' else '127.0.0.1')},\n"
                f"  targetdir = {lua_str(self.dst)},\n"
                f"  ssh = {{ port = {port}, identityFile = {lua_str(key)},\n"
                "          options = { StrictHostKeyChecking = \"no\", "
                "UserKnownHostsFile = \"/dev/null\", BatchMode = \"yes\", "
                "LogLevel = \"ERROR\" } },\n")
            self.label = "lsyncd (rsyncssh, delay=0)"
            self.mode = (f"lsyncd default.rsyncssh, delay=0, through a private sshd on "
                         f"127.0.0.1:{port}")
            self.warm_check()
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            self.fallback_reason = f"lsyncd with default.rsyncssh did not work here: {e}"
            note(self.fallback_reason)
            note("FALLING BACK to default.rsync to a local directory (no ssh): a weaker "
                 "comparison")
            self.stop()
            for d in (self.dst,):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir()
            self._start_lsyncd("  default.rsync,\n" + common
                               + f"  target = {lua_str(self.dst)},\n")
            self.label = "lsyncd (rsync LOCAL fallback)"
            self.mode = "lsyncd default.rsync to a LOCAL directory (fallback: no ssh)"
            self.warm_check()

    def warm_check(self) -> None:
        """Wait for lsyncd's start-up sync: a probe file must arrive."""
        probe = self.src / "probe-start"
        probe.write_bytes(b"probe\n")
        wait_for(lambda: (self.dst / "probe-start").exists(), STARTUP_TIMEOUT_S,
                 "lsyncd's start-up sync carries a probe file", tuple(self.procs))


# -- measuring ---------------------------------------------------------------------------


class Workload:
    """Deterministic file sizes and contents."""

    def __init__(self) -> None:
        self.rng = random.Random(SEED)

    def content(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(MIN_SIZE, MAX_SIZE))


def write_file(path: Path, content: bytes) -> float:
    """Write and close a new file; the perf_counter right after close()."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return time.perf_counter()


class Samples:
    def __init__(self) -> None:
        self.ms: list[float] = []          # math.inf for a miss
        self.by_round: list[list[float]] = []
        self.missed: list[str] = []
        self.late: list[str] = []          # missed, but complete when given up on


def measure(tool: Tool, watcher: ArrivalWatcher, work: Workload, count: int, prefix: str,
            gap_s: float, timeout: float, samples: Samples | None) -> None:
    round_ms: list[float] = []
    for i in range(count):
        for p in tool.procs:
            if not p.running:
                raise RuntimeError(f"{p.name} exited with status {p.proc.returncode} "
                                   f"during the measurements:\n{p.tail()}")
        name = f"{prefix}-{i:04d}.dat"
        content = work.content()
        watcher.expect(name, content)
        t_close = write_file(tool.src / name, content)
        t_seen = watcher.wait(name, timeout)
        if t_seen is None:
            ms = math.inf
            if samples is not None:
                samples.missed.append(name)
                if watcher.present(name, content):
                    samples.late.append(name)
            note(f"{tool.key}: {name} did not arrive within {timeout:g} s (a miss)")
        else:
            ms = (t_seen - t_close) * 1000.0
        watcher.forget(name)
        round_ms.append(ms)
        time.sleep(gap_s)
    if samples is not None:
        samples.ms.extend(round_ms)
        samples.by_round.append(round_ms)


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (an observed value); misses are +inf."""
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100.0 * len(s)) - 1)]


def summarize(s: Samples) -> dict[str, object]:
    xs = s.ms
    arrived = [x for x in xs if math.isfinite(x)]
    out: dict[str, object] = {
        "n": len(xs), "arrived": len(arrived), "misses": len(s.missed),
        "missed_files": s.missed, "missed_but_present_at_timeout": s.late,
    }
    for q in (50, 95, 99):
        v = percentile(xs, q)
        out[f"p{q}_ms"] = v if math.isfinite(v) else None
    out["max_ms"] = max(xs) if all(math.isfinite(x) for x in xs) else None
    out["min_ms"] = min(arrived) if arrived else None
    out["mean_ms_of_arrived"] = statistics.fmean(arrived) if arrived else None
    out["round_p50_ms"] = [percentile(r, 50) if r else None for r in s.by_round]
    out["samples_ms"] = [round(x, 3) if math.isfinite(x) else None for x in xs]
    return out


def fmt_ms(v: object) -> str:
    if v is None:
        return "miss"
    return f"{v:.2f}" if v < 100 else f"{v:.1f}"  # type: ignore[operator]


def versions(tools: list[Tool], bins: dict[str, str]) -> dict[str, str]:
    out = {}
    for t in tools:
        out[t.key] = getattr(t, "version", "unknown")
    try:
        out["asyncssh"] = importlib.metadata.version("asyncssh")
    except importlib.metadata.PackageNotFoundError:
        out["asyncssh"] = "unknown"
    if "rsync" in bins:
        out["rsync"] = first_line([bins["rsync"], "--version"])
    if "ssh" in bins:
        out["openssh"] = first_line([bins["ssh"], "-V"])
    return out


# -- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=300,
                    help="measured files per tool, spread over the rounds (300)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; tool order rotated (3)")
    ap.add_argument("--delay", type=float, default=DEFAULT_DELAY_S,
                    help=f"omirrord's -d coalescing delay in seconds (its default, "
                         f"{DEFAULT_DELAY_S:g})")
    ap.add_argument("--gap-ms", type=float, default=20.0,
                    help="pause after a file arrived before writing the next (20)")
    ap.add_argument("--timeout", type=float, default=10.0,
                    help="seconds after which a file that has not arrived is a miss (10)")
    ap.add_argument("--warmup", type=int, default=5,
                    help="files per tool mirrored before the rounds, not counted (5)")
    ap.add_argument("--workdir", help="work directory (default: a fresh one under /tmp); "
                    "must be empty or not exist")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    ap.add_argument("--no-lsyncd", action="store_true", help="measure omirror alone")
    ap.add_argument("--json", action="store_true",
                    help="results as JSON on stdout (the table then goes to stderr)")
    args = ap.parse_args(argv)
    if args.files < 1 or args.rounds < 1 or args.files < args.rounds:
        ap.error("need --files >= --rounds >= 1")
    if args.delay < 0 or args.timeout <= 0 or args.gap_ms < 0 or args.warmup < 0:
        ap.error("--delay, --gap-ms, --warmup must be >= 0 and --timeout > 0")
    compile_bytecode()

    if args.workdir:
        work = Path(args.workdir).resolve()
        if work.exists() and any(work.iterdir()):
            ap.error(f"--workdir {work} is not empty")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="omirror-bench-latency-", dir="/tmp"))
    tools: list[Tool] = []
    watchers: list[ArrivalWatcher] = []
    try:
        return bench(args, work, tools, watchers)
    finally:
        for w in watchers:
            w.close()
        for t in tools:
            t.stop()
        if args.keep:
            note(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def bench(args: argparse.Namespace, work: Path, tools: list[Tool],
          watchers: list[ArrivalWatcher]) -> int:
    out = sys.stderr if args.json else sys.stdout
    bins: dict[str, str] = {}
    if not args.no_lsyncd:
        bins = ensure_tools()
        missing = {"lsyncd", "sshd", "ssh", "rsync"} - set(bins)
        if "lsyncd" not in bins or "rsync" not in bins:
            note(f"cannot run lsyncd (missing {', '.join(sorted(missing))}): omirror alone")
    om = Omirror(work, args.delay)
    tools.append(om)
    note(f"starting two omirrord on 127.0.0.1 (-d {args.delay:g})")
    om.start()
    ls: Lsyncd | None = None
    if not args.no_lsyncd and "lsyncd" in bins and "rsync" in bins:
        ls = Lsyncd(work, bins)
        tools.append(ls)
        note("starting sshd and lsyncd")
        ls.start()
        note(f"lsyncd: {ls.mode}")
    for t in tools:
        w = ArrivalWatcher(t.dst)
        watchers.append(w)
        t.watcher = w  # type: ignore[attr-defined]

    load_start = os.getloadavg()
    gap_s = args.gap_ms / 1000.0
    work_rng = Workload()
    for t in tools:
        note(f"{t.key}: {args.warmup} warm-up files")
        measure(t, t.watcher, work_rng, args.warmup, "warm", gap_s,  # type: ignore[attr-defined]
                max(args.timeout, STARTUP_TIMEOUT_S), None)
    samples = {t.key: Samples() for t in tools}
    per_round = [args.files // args.rounds + (1 if r < args.files % args.rounds else 0)
                 for r in range(args.rounds)]
    for r, count in enumerate(per_round):
        k = r % len(tools)
        order = tools[k:] + tools[:k]
        note(f"round {r + 1}/{args.rounds}: {count} files each, order "
             + ", ".join(t.key for t in order))
        for t in order:
            measure(t, t.watcher, work_rng, count, f"r{r}", gap_s,  # type: ignore[attr-defined]
                    args.timeout, samples[t.key])
            p50 = percentile(samples[t.key].by_round[-1], 50)
            note(f"  {t.key}: round p50 {fmt_ms(p50 if math.isfinite(p50) else None)} ms")

    # -- report ------------------------------------------------------------------------
    results = {t.key: {"label": t.label, **summarize(samples[t.key])} for t in tools}
    overflows = {t.key: t.watcher.overflows for t in tools}  # type: ignore[attr-defined]
    o = results["omirror"]
    ratios: dict[str, float | None] = {}
    if ls is not None:
        lr = results["lsyncd"]
        for q in ("p50_ms", "p99_ms"):
            a, b = o[q], lr[q]
            ratios[f"omirror/lsyncd {q[:-3]}"] = (
                a / b if isinstance(a, float) and isinstance(b, float) and b else None)
    o50, o99 = o["p50_ms"], o["p99_ms"]
    targets = {
        "p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS,
        "p50_met": isinstance(o50, float) and o50 <= TARGET_P50_MS,
        "p99_met": isinstance(o99, float) and o99 <= TARGET_P99_MS,
    }
    info = machine_info(work)
    info["loadavg"] = (f"{load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end "
                       "(1-min; other work on the machine shows in the tails)")
    vers = versions(tools, bins)

    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"omirror latency benchmark: close() on one peer -> complete file on the other; "
      f"{args.files} files per tool ({MIN_SIZE}-{MAX_SIZE} bytes, new names), "
      f"{args.rounds} rounds, order rotated, {args.gap_ms:g} ms gap after each arrival")
    p("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    p("versions: " + "; ".join(f"{k} {v}" for k, v in vers.items()))
    p(f"omirror: {om.mode}, -d {args.delay:g}")
    if ls is not None:
        p(f"lsyncd:  {ls.mode}")
        if ls.fallback_reason:
            p(f"WARNING: {ls.fallback_reason}")
            p("WARNING: lsyncd runs the LOCAL default.rsync fallback (no ssh): a weaker "
              "comparison")
    p("detection: inotify on the destination directory, blocking reader thread, time "
      "taken when read() returns (resolution well under 0.1 ms)")
    p("")
    width = max(len(str(r["label"])) for r in results.values())
    p(f"{'tool':<{width}}  {'n':>4}  {'miss':>4}  {'p50':>7}  {'p95':>7}  {'p99':>7}  "
      f"{'max':>7}   (ms)")
    for r in results.values():
        p(f"{r['label']:<{width}}  {r['n']:>4}  {r['misses']:>4}  {fmt_ms(r['p50_ms']):>7}  "
          f"{fmt_ms(r['p95_ms']):>7}  {fmt_ms(r['p99_ms']):>7}  {fmt_ms(r['max_ms']):>7}")
    p("")
    for t in tools:
        rounds = ", ".join(fmt_ms(v if v is None or math.isfinite(v) else None)
                           for v in results[t.key]["round_p50_ms"])  # type: ignore[union-attr]
        p(f"{t.key} p50 per round: {rounds} ms")
    for name, value in ratios.items():
        p(f"ratio {name}: {'-' if value is None else f'{value:.3f}x'}")
    verdict = "MEETS" if targets["p50_met"] and targets["p99_met"] else "MISSES"
    p(f"omirror targets p50 <= {TARGET_P50_MS:g} ms: "
      f"{'met' if targets['p50_met'] else 'NOT met'}; p99 <= {TARGET_P99_MS:g} ms: "
      f"{'met' if targets['p99_met'] else 'NOT met'} -> {verdict} the targets")
    for key, r in results.items():
        if r["misses"]:
            p(f"{key}: {r['misses']} file(s) missed the {args.timeout:g} s bound "
              f"({len(r['missed_but_present_at_timeout'])} of them complete by then "
              "but unseen by the watcher)")
    if any(overflows.values()):
        p(f"WARNING: inotify queue overflow in the arrival watcher: {overflows}")

    if args.json:
        json.dump({"files": args.files, "rounds": args.rounds, "gap_ms": args.gap_ms,
                   "timeout_s": args.timeout, "warmup": args.warmup,
                   "omirror_delay_s": args.delay, "sizes": [MIN_SIZE, MAX_SIZE],
                   "machine": info, "versions": vers,
                   "lsyncd_mode": ls.mode if ls else None,
                   "lsyncd_fallback_reason": ls.fallback_reason if ls else None,
                   "percentiles": "nearest rank; a miss counts as +inf (null)",
                   "results": results, "ratios": ratios, "targets": targets,
                   "watcher_overflows": overflows}, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
