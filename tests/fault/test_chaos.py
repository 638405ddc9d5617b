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

from chaos import Op, Seen, State, classify, run_seed

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
    """A chmod cycle made while the daemon was stopped ends where its record is: no
    version at all, by any tool that compares states. The same cycle on a running
    daemon, a second apart, was seen: losing it is a real failure."""
    stopped = [_chmod(43, 0o755, 0o750, 10.0, running=False),
               _chmod(44, 0o750, 0o700, 10.5, running=False),
               _chmod(59, 0o700, 0o755, 12.0, running=False)]
    assert classify(stopped[-1], "data/d0", stopped) == "ended where it began"
    seen = [_chmod(43, 0o755, 0o750, 10.0, running=True),
            _chmod(59, 0o750, 0o755, 11.0, running=True)]
    assert classify(seen[-1], "data/d0", seen) == ""
    restarted = [_chmod(43, 0o755, 0o750, 10.0, running=False, epoch=1),
                 _chmod(59, 0o750, 0o755, 12.0, running=False, epoch=2)]
    assert classify(restarted[-1], "data/d0", restarted) == "", \
        "a daemon started between the two ops recorded the first"
    elsewhere = [_chmod(43, 0o755, 0o750, 10.0, running=False),
                 _chmod(59, 0o750, 0o700, 12.0, running=False)]
    assert classify(elsewhere[-1], "data/d0", elsewhere) == ""
    write = Op(60, 2, "append", "data/f0 (+3 B)", 13_000_000_000, orphaned=True)
    write.seen["data/f0"] = Seen(State("file", 0o644, b"x" * 16), write.start_ns)
    assert classify(write, "data/f0", [write]) == "written into a replaced file"
