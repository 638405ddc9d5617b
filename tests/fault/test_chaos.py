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

from chaos import run_seed

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
