#!/usr/bin/env python3
"""Long randomized convergence runs: many seeds of tests/fault/chaos.py.

Run from the project root with the project's virtualenv::

    .venv/bin/python bench/chaos.py --seeds 1000 [--first 0] [--jobs 2] [--steps N]
                                    [--workdir DIR] [--keep-failures] [--verbose]
                                    [--load [--io-load]]

Each seed builds its own cluster of 3 to 5 ``omirrord`` daemons on 127.0.0.1 (every
link through a proxy that can cut it), runs that seed's random operations, crashes and
link cuts, heals, waits for the cluster to quiesce and checks it against the model of
last-writer-wins (see the docstring of tests/fault/chaos.py). ``--jobs`` seeds run at
once, each in a process of its own. A seed either passes or is reported with what broke
and the history of its steps (operations and faults, in order), and the cluster's logs
are kept under the work directory with ``--keep-failures``.

``--load`` runs a CPU hog per core beside the clusters for the whole run (and
``--io-load`` adds a writer that fsyncs 1 MiB at a time in the work directory), so that
the races a busy host widens show at the rate they would there: production hosts are
loaded, and a harness that passes only on an idle machine proves too little.

Prints one line per seed, then a summary: seeds run, passed, failed (with their
numbers), operations and faults injected, and time per seed. Exit status 0 when every
seed passed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests" / "fault"), str(HERE.parent / "tests" / "integration")]

from _common import compile_bytecode  # noqa: E402
from chaos import Outcome, run_seed  # noqa: E402


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one(seed: int, work: str, steps: int | None, keep: bool) -> tuple[Outcome, list[str]]:
    base = Path(work) / f"seed-{seed}"
    history: list[str] = []
    try:
        outcome = run_seed(base, seed, steps=steps, log=history.append)
    except Exception as e:  # the harness itself broke: report it as this seed's failure
        outcome = Outcome(seed, 0, 0, 0, 0, 0, 0, 0.0, [f"harness error: {e!r}"])
    if not outcome.problems or not keep:
        shutil.rmtree(base, ignore_errors=True)
    elif base.exists():
        (base / "history.txt").write_text("\n".join(history) + "\n")
    return outcome, history


_CPU_HOG = "while True:\n    pass\n"
_IO_HOG = """
import os, sys
block = os.urandom(1 << 20)
path = sys.argv[1]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
written = 0
while True:
    os.write(fd, block)
    os.fsync(fd)
    written += len(block)
    if written >= 256 << 20:  # keep the file small: the disk, not its space, is loaded
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        written = 0
"""


def start_load(work: Path, io: bool) -> list[subprocess.Popen[bytes]]:
    """One busy process per core (and a syncing writer): the load of a busy host."""
    hogs = [subprocess.Popen([sys.executable, "-c", _CPU_HOG])
            for _ in range(os.cpu_count() or 1)]
    if io:
        hogs.append(subprocess.Popen([sys.executable, "-c", _IO_HOG,
                                      str(work / "io-load.bin")]))
    return hogs


def stop_load(hogs: list[subprocess.Popen[bytes]]) -> None:
    for hog in hogs:
        hog.kill()
    for hog in hogs:
        hog.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=100, help="how many seeds")
    ap.add_argument("--first", type=int, default=0, help="the first seed")
    ap.add_argument("--jobs", type=int, default=2, help="seeds at once")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per seed (default: 40 to 90, decided by the seed)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep-failures", action="store_true",
                    help="keep the cluster directories (logs, trees) of failed seeds")
    ap.add_argument("--verbose", action="store_true",
                    help="print the history of every failed seed")
    ap.add_argument("--load", action="store_true",
                    help="run a CPU-bound process per core beside the clusters")
    ap.add_argument("--io-load", action="store_true",
                    help="with --load: also a writer that fsyncs 1 MiB at a time")
    args = ap.parse_args(argv)
    compile_bytecode()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="omirror-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    seeds = range(args.first, args.first + args.seeds)
    started = time.monotonic()
    hogs = start_load(work, args.io_load) if args.load else []
    try:
        outcomes = run_all(args, work, seeds)
    finally:
        stop_load(hogs)
    return report(args, work, seeds, outcomes, started)


def run_all(args: argparse.Namespace, work: Path, seeds: range) -> list[Outcome]:
    outcomes: list[Outcome] = []
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(one, s, str(work), args.steps, args.keep_failures): s
                   for s in seeds}
        for future in concurrent.futures.as_completed(futures):
            outcome, history = future.result()
            outcomes.append(outcome)
            verdict = "ok" if not outcome.problems else "FAILED"
            print(f"seed {outcome.seed}: {verdict} peers={outcome.peers} "
                  f"steps={outcome.steps} ops={outcome.ops_ok}+{outcome.ops_failed} failed "
                  f"faults={outcome.faults} paths={outcome.paths} {outcome.seconds:.1f}s",
                  flush=True)
            for finding in outcome.accepted:
                print(f"    accepted, {finding[:300]}", flush=True)
            for problem in outcome.problems[:10]:
                text = problem if args.verbose else problem.split("\n", 1)[0][:300]
                print(f"    {text}", flush=True)
            if outcome.problems and args.verbose:
                print("    history:\n      " + "\n      ".join(history), flush=True)
    return outcomes


def report(args: argparse.Namespace, work: Path, seeds: range, outcomes: list[Outcome],
           started: float) -> int:
    failed = sorted(o.seed for o in outcomes if o.problems)
    times = [o.seconds for o in outcomes if o.seconds]
    print(f"\n{len(outcomes)} seeds ({seeds.start}..{seeds.stop - 1}): "
          f"{len(outcomes) - len(failed)} passed, {len(failed)} failed"
          + (f" (seeds {', '.join(map(str, failed))})" if failed else ""))
    accepted = [(o.seed, a.split(":", 1)[0]) for o in outcomes for a in o.accepted]
    if accepted:
        print(f"accepted findings (classes inherent to state comparison, "
              f"docs/architecture.rst): {len(accepted)}: "
              + ", ".join(f"seed {seed} {why}" for seed, why in accepted))
    print(f"operations: {sum(o.ops_ok for o in outcomes)} done, "
          f"{sum(o.ops_failed for o in outcomes)} refused by the tree as it was; faults: "
          f"{sum(o.faults for o in outcomes)}; peers per seed: "
          f"{min((o.peers for o in outcomes), default=0)}-"
          f"{max((o.peers for o in outcomes), default=0)}"
          + (f"; load: {os.cpu_count()} CPU hogs" + (" + fsync writer" if args.io_load else "")
             if args.load else ""))
    if times:
        print(f"time per seed: median {statistics.median(times):.1f} s, "
              f"max {max(times):.1f} s; wall {time.monotonic() - started:.0f} s "
              f"with {args.jobs} at once")
    if not args.workdir and not (failed and args.keep_failures):
        shutil.rmtree(work, ignore_errors=True)
    elif failed and args.keep_failures:
        note(f"failed seeds' clusters kept under {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
