"""Randomized convergence, a few fixed seeds (the long runs: bench/chaos.py --seeds N).

Each seed builds 3 to 5 daemons with every link through a proxy, runs random file
operations on random peers (running or not) mixed with kill -9, SIGTERM, restarts and
link cuts, then heals and holds the cluster to the model of last-writer-wins in
tests/fault/chaos.py: trees identical, every log naming the same stamp for every path,
no temp file, and every path holding what its newest write left.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from chaos import Op, Seen, State, classify, run_seed, versions_logged

#: Seeds chosen to cover 3, 4 and 5 peers with crashes, clean stops and link cuts.
SEEDS = (7, 11, 18)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_operations_crashes_and_cuts_converge_to_last_writer_wins(
        tmp_path: Path, seed: int) -> None:
    history: list[str] = []
    outcome = run_seed(tmp_path / f"seed-{seed}", seed, log=history.append)
    assert outcome.ops_ok > 20, f"seed {seed} did too little to prove anything: {outcome}"
    assert not outcome.problems, (
        f"seed {seed} ({outcome.peers} peers): " + "\n".join(outcome.problems)
        + "\nhistory:\n" + "\n".join(history))


def _chmod(n: int, before: int, after: int, start_s: float, *, running: bool,
           epoch: int = 1) -> Op:
    op = Op(n, 2, "chmod", f"data/d0 {after:o}", int(start_s * 1e9), running=running,
            epoch=epoch)
    op.before["data/d0"] = State("dir", before)
    op.seen["data/d0"] = Seen(State("dir", after), op.start_ns)
    return op


def test_the_model_accepts_only_a_change_no_daemon_could_see_and_says_which() -> None:
    """A chmod cycle made while the daemon was stopped, or while it never looked (its log
    records no version of the path in between), ends where its record is: no version
    at all, by any tool that compares states. The same cycle with a version recorded in
    between was seen: losing it is a real failure."""
    stopped = [_chmod(43, 0o755, 0o750, 10.0, running=False),
               _chmod(44, 0o750, 0o700, 10.5, running=False),
               _chmod(59, 0o700, 0o755, 12.0, running=False)]
    assert classify(stopped[-1], "data/d0", stopped) == "ended where it began"
    running = [_chmod(43, 0o755, 0o750, 10.0, running=True),
               _chmod(59, 0o750, 0o755, 11.0, running=True)]
    assert classify(running[-1], "data/d0", running) == "ended where it began"

    def recorded_at_10_5(peer: int, path: str, from_ns: int, to_ns: int) -> bool:
        return path == "data/d0" and from_ns <= 10_500_000_000 <= to_ns

    assert classify(running[-1], "data/d0", running, recorded_at_10_5) == "", \
        "the daemon recorded the state in between: the change back was a change"
    restarted = [_chmod(43, 0o755, 0o750, 10.0, running=False, epoch=1),
                 _chmod(59, 0o750, 0o755, 12.0, running=False, epoch=2)]
    assert classify(restarted[-1], "data/d0", restarted, recorded_at_10_5) == "", \
        "a daemon started between the two ops recorded the first"
    elsewhere = [_chmod(43, 0o755, 0o750, 10.0, running=False),
                 _chmod(59, 0o750, 0o700, 12.0, running=False)]
    assert classify(elsewhere[-1], "data/d0", elsewhere) == ""
    write = Op(60, 2, "append", "data/f0 (+3 B)", 13_000_000_000, orphaned=True)
    write.seen["data/f0"] = Seen(State("file", 0o644, b"x" * 16), write.start_ns)
    assert classify(write, "data/f0", [write]) == "written into a replaced file"


def test_the_model_reads_when_a_daemon_recorded_or_applied_a_path() -> None:
    log = ("2026-12-02 08:47:29,911 DEBUG omirror.apply: path=/data/d1/d2 applied dir "
           "stamp=1@a\n"
           "2026-12-02 08:47:30,002 DEBUG omirror.scanner: path=/data/f recorded file "
           "stamp=2@b\n"
           "2026-12-02 08:47:30,003 INFO omirror.daemon: path=/data/g recorded x\n")
    found = versions_logged(log)
    assert set(found) == {"data/d1/d2", "data/f"}
    assert found["data/f"][0] - found["data/d1/d2"][0] == 91_000_000
