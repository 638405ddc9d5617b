#!/usr/bin/env python3
"""Benchmark: what a no-change scan of a large tree costs omirror, against rsync and find.

Run from the project root with the project's virtualenv::

    .venv/bin/python bench/scan.py [--files 100000] [--runs 5] [--workdir DIR] [--keep] [--json]

It builds a tree of small files (deterministic content), mirrors it as ``FILES = ( /data )``
with ``--root <workdir>/src``, and times, in the same process and the same run:

* ``omirror first scan``: ``Scanner.scan_set`` on an empty store (every file hashed and
  recorded). One per run, each into a fresh store directory, taken after that run's other
  measurements; the store of the very first (untimed-in-the-table, setup) scan is the one
  the rescans use.
* ``omirror rescan``: ``Scanner(store, "bench").scan_set(mset, root)`` on the already
  scanned, unchanged tree, in-process (the cost the daemon pays; no interpreter start,
  no import, store kept open). Asserted to record nothing and to find every file unchanged.
* ``omirror rescan (subprocess)``: the same scan in a fresh ``python`` process (interpreter
  start + imports + ``Store.open`` + scan), for comparison with tools that pay a process
  start on every run.
* ``rsync -a -n -i src/data/ dst/data/`` against a copy synced beforehand: asserted to
  itemize nothing. Note that a local rsync walks and stats *both* trees (sender and
  receiver are two processes).
* ``find src/data -printf ''``: a bare walk, the lower bound (GNU find needs no stat for it).
* ``find src/data -printf '%i %s %T@ %C@\\n'``: a walk that stats every file, as a scan must.
* ``python os.walk + lstat``: the same in plain Python, for context.

Within a run the tools take turns in an order rotated by one each run, so no tool always
runs first or last. Nothing is dropped from any cache between tools: every number is a
warm-cache number, and the output says so. The table shows the median, min and max over
``--runs``.

With ``--json`` the results go to stdout as one JSON object and the table to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(PROJECT))

from omirror import config  # noqa: E402
from omirror.scanner import Scanner  # noqa: E402
from omirror.store import Store  # noqa: E402

DISTFILE = "HOSTS = ( bench )\nFILES = ( /data )\n${FILES} -> ${HOSTS}\n\tinstall ;\n"
HOST = "bench"
SEED = 20240601
PER_DIR = 100

#: The scan run by the subprocess variant; prints its stats as JSON.
SUBPROCESS_SCAN = textwrap.dedent("""
    import json, os, sys
    from omirror import config
    from omirror.scanner import Scanner
    from omirror.store import Store
    distfile, root, state = sys.argv[1:4]
    mset = config.parse(distfile, "<bench>").sets[0]
    store = Store.open(state)
    stats = Scanner(store, "bench").scan_set(mset, os.fsencode(root))
    store.close()
    print(json.dumps({"recorded": stats.recorded, "unchanged": stats.unchanged,
                      "files": stats.files, "dirs": stats.dirs}))
""")


_T0 = time.perf_counter()


def note(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# -- setup -------------------------------------------------------------------------------


def ensure_rsync() -> str | None:
    """The path of rsync, installing it with apt-get if it is missing; None if that fails."""
    found = shutil.which("rsync")
    if found:
        return found
    note("rsync is not on PATH: installing it with apt-get")
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "rsync"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (OSError, subprocess.CalledProcessError) as e:
        note(f"could not install rsync ({e}); the rsync column is skipped")
        return None
    found = shutil.which("rsync")
    if not found:
        note("apt-get ran but rsync is still not on PATH; the rsync column is skipped")
    return found


def build_tree(data: Path, n: int) -> tuple[int, int]:
    """N files of 100-600 random bytes, ~PER_DIR per leaf directory, two levels deep.

    Returns (leaf directories, total bytes).
    """
    rng = random.Random(SEED)
    leaves = max(1, math.ceil(n / PER_DIR))
    fanout = max(1, math.ceil(math.sqrt(leaves)))
    total = 0
    made = 0
    for leaf in range(leaves):
        d = data / f"d{leaf // fanout:03d}" / f"e{leaf % fanout:03d}"
        d.mkdir(parents=True, exist_ok=True)
        count = min(PER_DIR, n - made)
        for i in range(count):
            body = rng.randbytes(rng.randint(100, 600))
            (d / f"f{made + i:07d}.dat").write_bytes(body)
            total += len(body)
        made += count
    assert made == n
    return leaves, total


def filesystem(where: Path) -> str:
    """The type of the file system holding ``where`` (findmnt names ext4; stat -f cannot)."""
    for argv in (["findmnt", "-n", "-o", "FSTYPE", "-T", str(where)],
                 ["stat", "-f", "-c", "%T", str(where)]):
        try:
            got = subprocess.run(argv, capture_output=True, text=True).stdout.strip()
        except OSError:
            continue
        if got:
            return got
    return "unknown"


def machine(rsync: str | None, where: Path) -> dict[str, str]:
    info = {
        "nproc": str(os.cpu_count()),
        "python": sys.version.split()[0] + " (" + platform.python_implementation() + ")",
        "kernel": platform.release(),
        "filesystem": filesystem(where),
        "find": subprocess.run(["find", "--version"], capture_output=True,
                               text=True).stdout.splitlines()[0],
        "rsync": "not available",
    }
    try:
        cpu = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
               if line.startswith("model name")]
        if cpu:
            info["cpu"] = cpu[0]
    except OSError:
        pass
    if rsync:
        info["rsync"] = subprocess.run([rsync, "--version"], capture_output=True,
                                       text=True).stdout.splitlines()[0]
    return info


# -- the measurements --------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def run_cmd(argv: list[str], *, capture: bool = False) -> str:
    proc = subprocess.run(argv, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode(errors="replace") if capture else ""


def py_walk_lstat(top: bytes) -> int:
    n = 0
    lstat = os.lstat
    join = os.path.join
    for dirpath, _dirnames, filenames in os.walk(top):
        for name in filenames:
            lstat(join(dirpath, name))
            n += 1
    return n


def check_rescan(stats, n: int) -> None:  # type: ignore[no-untyped-def]
    # The scanner counts unchanged directories in ``unchanged`` too (the top and every
    # subdirectory, each counted once in ``dirs``), so every file unchanged means
    # unchanged == files + dirs.
    assert stats.recorded == 0, f"no-change rescan recorded {stats.recorded} changes"
    assert stats.files == n, f"rescan saw {stats.files} files, expected {n}"
    assert stats.unchanged == n + stats.dirs, (
        f"rescan: unchanged={stats.unchanged}, expected {n} files + {stats.dirs} dirs")
    assert stats.hashed == 0, f"no-change rescan hashed {stats.hashed} files"


def profile_rescan(fn: Callable[[], None]) -> None:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(25)
        note(f"profile of one no-change rescan, top 25 by {key}:\n{buf.getvalue()}")


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000, help="files in the tree (100000)")
    ap.add_argument("--runs", type=int, default=5, help="runs; medians are reported (5)")
    ap.add_argument("--workdir", help="where to build the tree (default: a fresh "
                    "directory under /tmp); must be empty or not exist")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--profile", action="store_true",
                    help="after the runs, profile one in-process rescan with cProfile and "
                    "print the top 25 by cumulative and by own time to stderr")
    ap.add_argument("--json", action="store_true",
                    help="results as JSON on stdout (the table then goes to stderr)")
    args = ap.parse_args(argv)
    if args.files < 1 or args.runs < 1:
        ap.error("--files and --runs must be at least 1")

    out = sys.stderr if args.json else sys.stdout
    if args.workdir:
        work = Path(args.workdir).resolve()
        if work.exists() and any(work.iterdir()):
            ap.error(f"--workdir {work} is not empty")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="omirror-bench-scan-", dir="/tmp"))

    try:
        return bench(args, work, out)
    finally:
        if args.keep:
            note(f"kept {work}")
        else:
            note(f"removing {work} ...")
            shutil.rmtree(work, ignore_errors=True)
            note("done")


def bench(args: argparse.Namespace, work: Path, out) -> int:  # type: ignore[no-untyped-def]
    n = args.files
    rsync = ensure_rsync()
    src, dst = work / "src", work / "dst"
    data = src / "data"
    empty_a, empty_b = work / "empty-a", work / "empty-b"
    empty_a.mkdir()
    empty_b.mkdir()

    note(f"building {n} files under {data} ...")
    t_build, (leaves, total_bytes) = timed(lambda: build_tree(data, n))
    note(f"  {leaves} leaf directories, {total_bytes / 1e6:.1f} MB, {t_build:.1f} s")

    cfg = config.parse(DISTFILE, "<bench>")
    mset = cfg.sets[0]
    root = os.fsencode(str(src))

    # The initial scan creates the root marker (.omirror-root) in src/data, so it runs
    # before the rsync copy is made: otherwise the dry run would have a file to send.
    note("initial omirror scan (empty store) ...")
    (work / "state").mkdir()  # Store.open takes a path that does not exist as the db file
    store = Store.open(work / "state")
    t_initial, st0 = timed(lambda: Scanner(store, HOST).scan_set(mset, root))
    assert st0.files == n and st0.new == n + st0.dirs, (st0.files, st0.new, st0.dirs)
    note(f"  {t_initial:.2f} s, {st0.hashed} hashed, {st0.hashed_bytes / 1e6:.1f} MB")

    if rsync:
        note("making the rsync destination copy ...")
        dst.mkdir()
        run_cmd([rsync, "-a", f"{data}/", f"{dst}/data/"])
        left = run_cmd([rsync, "-a", "-n", "-i", f"{data}/", f"{dst}/data/"], capture=True)
        assert left == "", f"rsync copy is not in sync:\n{left[:2000]}"

    data_b = os.fsencode(str(data))
    subprocess_env = {**os.environ, "PYTHONPATH": str(PROJECT)}

    def omirror_rescan() -> None:
        stats = Scanner(store, HOST).scan_set(mset, root)
        check_rescan(stats, n)

    def omirror_rescan_subprocess() -> None:
        proc = subprocess.run([sys.executable, "-c", SUBPROCESS_SCAN, DISTFILE, str(src),
                               str(work / "state")], capture_output=True, text=True,
                              env=subprocess_env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"subprocess scan failed:\n{proc.stderr}")
        got = json.loads(proc.stdout)
        assert got["recorded"] == 0 and got["files"] == n, got
        assert got["unchanged"] == n + got["dirs"], got

    def rsync_dry_run() -> None:
        left = run_cmd([rsync, "-a", "-n", "-i", f"{data}/", f"{dst}/data/"],  # type: ignore[list-item]
                       capture=True)
        assert left == "", f"rsync dry run found work:\n{left[:2000]}"

    def rsync_empty() -> None:
        run_cmd([rsync, "-a", "-n", "-i", f"{empty_a}/", f"{empty_b}/"])  # type: ignore[list-item]

    def find_bare() -> None:
        run_cmd(["find", str(data), "-printf", ""])

    def find_stat() -> None:
        run_cmd(["find", str(data), "-printf", "%i %s %T@ %C@\n"])

    def py_walk() -> None:
        got = py_walk_lstat(data_b)
        assert got == n + 1, got  # + the root marker

    # (key, label, function)
    tools: list[tuple[str, str, Callable[[], None]]] = [
        ("omirror_rescan", "omirror rescan (in-process)", omirror_rescan),
    ]
    if rsync:
        tools.append(("rsync_dry_run", "rsync -a -n -i (dry run)", rsync_dry_run))
    tools += [
        ("find", "find -printf '' (bare walk)", find_bare),
        ("find_stat", "find -printf '%i %s %T@ %C@' (stat)", find_stat),
        ("py_walk_lstat", "python os.walk + lstat", py_walk),
        ("omirror_rescan_subprocess", "omirror rescan (subprocess)", omirror_rescan_subprocess),
    ]
    if rsync:
        tools.append(("rsync_empty", "rsync -a -n on an empty dir (start-up)", rsync_empty))

    samples: dict[str, list[float]] = {key: [] for key, _, _ in tools}
    first: list[float] = []
    first_bytes = 0
    for run in range(args.runs):
        k = run % len(tools)
        order = tools[k:] + tools[:k]
        note(f"run {run + 1}/{args.runs}: " + ", ".join(key for key, _, _ in order)
             + ", omirror_first_scan")
        for key, _, fn in order:
            dt, _ = timed(fn)
            samples[key].append(dt)
        # A first scan into a fresh store, after the run's rotated measurements.
        fresh = work / f"state-first-{run}"
        fresh.mkdir()
        fstore = Store.open(fresh)
        dt, fs = timed(lambda: Scanner(fstore, HOST).scan_set(mset, root))
        fstore.close()
        shutil.rmtree(fresh)
        assert fs.files == n and fs.hashed == n, (fs.files, fs.hashed)
        first.append(dt)
        first_bytes = fs.hashed_bytes
    if args.profile:
        profile_rescan(omirror_rescan)
    store.close()

    # -- report ------------------------------------------------------------------------
    results: dict[str, dict[str, float | int | str]] = {}
    for key, label, _ in tools:
        xs = samples[key]
        results[key] = {"label": label, "median_s": statistics.median(xs), "min_s": min(xs),
                        "max_s": max(xs), "runs": len(xs)}
    results["omirror_first_scan"] = {
        "label": "omirror first scan (empty store)", "median_s": statistics.median(first),
        "min_s": min(first), "max_s": max(first), "runs": len(first)}
    rescan = results["omirror_rescan"]["median_s"]
    ratios: dict[str, float | None] = {
        "omirror_rescan/rsync_dry_run": (rescan / results["rsync_dry_run"]["median_s"]
                                         if rsync else None),  # type: ignore[operator]
        "omirror_rescan/find": rescan / results["find"]["median_s"],  # type: ignore[operator]
        "omirror_rescan/find_stat": rescan / results["find_stat"]["median_s"],  # type: ignore[operator]
        "omirror_rescan/py_walk_lstat": rescan / results["py_walk_lstat"]["median_s"],  # type: ignore[operator]
    }
    fmed = results["omirror_first_scan"]["median_s"]
    first_rate = {"files_per_s": n / fmed, "mb_per_s": first_bytes / 1e6 / fmed,  # type: ignore[operator]
                  "hashed_bytes": first_bytes}
    info = machine(rsync, work)

    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"omirror scan benchmark: {n} files in {leaves} directories "
      f"({total_bytes / 1e6:.1f} MB), {args.runs} runs, median/min/max in seconds")
    p("all caches warm: nothing is dropped between tools; tool order rotated each run")
    p("machine: " + ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("rsync", "find")))
    p(f"         {info['rsync']}")
    p(f"         {info['find']}")
    p("")
    width = max(len(str(r["label"])) for r in results.values())
    p(f"{'tool':<{width}}  {'median':>8}  {'min':>8}  {'max':>8}")
    order_keys = ["omirror_first_scan"] + [key for key, _, _ in tools]
    for key in order_keys:
        r = results[key]
        p(f"{r['label']:<{width}}  {fmt_s(r['median_s']):>8}  {fmt_s(r['min_s']):>8}  "  # type: ignore[arg-type]
          f"{fmt_s(r['max_s']):>8}")  # type: ignore[arg-type]
    p("")
    for name, value in ratios.items():
        p(f"{name:<30} {'-' if value is None else f'{value:.2f}x'}")
    p(f"first scan: {first_rate['files_per_s']:,.0f} files/s, "
      f"{first_rate['mb_per_s']:.1f} MB/s hashed (median of {len(first)} fresh stores)")
    p("notes: the in-process rescan pays no process start; rsync, find and the subprocess "
      "row do (see the start-up row). A local rsync dry run stats both trees.")

    if args.json:
        json.dump({"files": n, "directories": leaves, "bytes": total_bytes,
                   "runs": args.runs, "caches": "warm", "machine": info,
                   "initial_scan_s": t_initial, "results": results, "ratios": ratios,
                   "first_scan": first_rate}, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
