"""``special`` and ``cmdspecial`` on real daemons: they run on the host that received a
peer's version, never for a local change, and never hold replication up."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from cluster import Cluster

MakeCluster = Callable[..., Cluster]
CONVERGE_S = 30


def omirrord(c: Cluster, i: int, *args: str) -> subprocess.CompletedProcess[str]:
    """A one-shot command (``--once``, ``--check``) as peer ``i``."""
    p = c[i]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
    return subprocess.run([sys.executable, "-m", "omirror", "-C", str(c.conf), "-n", p.name,
                           "--root", str(p.root), "--state-dir", str(p.state), "--peers",
                           str(p.peers_file), *args], capture_output=True, text=True,
                          timeout=60, env=env, stdin=subprocess.DEVNULL)


def gone(pid: int) -> bool:
    """Exited (a zombie its new parent has not reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def test_a_special_runs_on_the_receiver_told_the_path_never_for_a_local_change(
        make_cluster: MakeCluster, tmp_path: Path) -> None:
    out = tmp_path / "special.out"  # outside every tree
    c = make_cluster(2, distfile_extra=(
        "\tspecial /data/www \"printf '%s|%s|%s\\n' \\\"$FILE\\\" \\\"$REMFILE\\\" "
        f"\\\"$BASEFILE\\\" >> {out}\" ;"))
    c.start()
    (c[0].data / "www").mkdir()
    (c[0].data / "www" / "index.html").write_bytes(b"<h1>hi</h1>\n")
    c.wait_until(lambda: len(lines(out)) == 1, CONVERGE_S, "the receiver runs its special")
    assert (c[1].data / "www" / "index.html").read_bytes() == b"<h1>hi</h1>\n"
    assert lines(out) == [f"{c[1].data}/www/index.html|/data/www/index.html|index.html"]

    # a change made on host 1 runs its special on host 0 only; outside /data/www, nowhere
    (c[1].data / "www" / "local.html").write_bytes(b"local\n")
    (c[1].data / "elsewhere").write_bytes(b"not covered\n")
    c.wait_until(lambda: len(lines(out)) == 2, CONVERGE_S, "host 0 runs its special")
    c.wait_converged(CONVERGE_S)
    c.assert_stays(lambda: len(lines(out)) == 2, 1.5, "nothing else runs")
    assert lines(out)[1] == f"{c[0].data}/www/local.html|/data/www/local.html|local.html"
    counts = c.fresh_status(1)["specials"]
    assert (counts["runs"], counts["failed"]) == (1, 0)


def test_a_burst_of_files_runs_a_cmdspecial_once_with_all_of_them(
        make_cluster: MakeCluster, tmp_path: Path) -> None:
    out = tmp_path / "cmdspecial.out"
    c = make_cluster(2, distfile_extra=f"\tcmdspecial \"echo \\\"$FILES\\\" >> {out}\" ;")
    c.start()
    names = [f"f{i:02d}" for i in range(50)]
    for name in names:
        (c[0].data / name).write_bytes(name.encode())
    c.wait_converged(CONVERGE_S)
    c.wait_until(lambda: len(lines(out)) == 1, CONVERGE_S, "one cmdspecial run")
    c.assert_stays(lambda: len(lines(out)) == 1, 2.0, "no second run")
    assert sorted(lines(out)[0].split(":")) == [f"{c[1].data}/{n}" for n in names]


def test_a_failing_special_does_not_hold_the_files_that_follow(
        make_cluster: MakeCluster, tmp_path: Path) -> None:
    out = tmp_path / "special.out"
    c = make_cluster(2, distfile_extra=f"\tspecial \"echo $BASEFILE >> {out}; "
                                       "echo broken >&2; exit 3\" ;")
    c.start()
    for i in range(10):
        (c[0].data / f"f{i}").write_bytes(b"x" * i)
    c.wait_converged(CONVERGE_S)
    c.wait_until(lambda: len(lines(out)) == 10, CONVERGE_S, "every special ran")
    assert sorted(lines(out)) == sorted(f"f{i}" for i in range(10))
    c.wait_until(lambda: c.log_text(1).count("failed with exit status 3; output: broken")
                 == 10, CONVERGE_S, "each failure is logged with its status and output")
    (c[0].data / "after").write_bytes(b"still mirrored\n")
    c.wait_until(lambda: (c[1].data / "after").exists(), CONVERGE_S, "a later file arrives")
    counts = c.fresh_status(1)["specials"]
    assert counts["failed"] >= 10 and counts["runs"] >= counts["failed"]


def test_once_runs_the_specials_of_what_it_received_before_it_exits(
        make_cluster: MakeCluster, tmp_path: Path) -> None:
    out = tmp_path / "special.out"
    c = make_cluster(2, distfile_extra=f"\tspecial \"echo $REMFILE >> {out}\" ;\n"
                                       f"\tcmdspecial \"echo burst $FILES >> {out}\" ;")
    c.start(0)
    (c[0].data / "a").write_bytes(b"a")
    r = omirrord(c, 1, "--once")
    assert r.returncode == 0, r.stdout + r.stderr
    # run before the exit, the burst too (not a quiet second later); a --check runs none
    assert lines(out) == ["/data/a", f"burst {c[1].data}/a"]
    assert omirrord(c, 1, "--check").returncode == 0
    assert len(lines(out)) == 2


def test_a_hanging_special_is_stopped_at_its_timeout_and_at_the_daemons_stop(
        make_cluster: MakeCluster, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    c = make_cluster(2, extra_args=("--special-timeout", "3"), distfile_extra=(
        f"\tspecial \"echo $$ >> {pids}; exec sleep 60\" ;"))
    c.start()
    (c[0].data / "first").write_bytes(b"1")
    c.wait_until(lambda: "timed out after 3 s and was stopped" in c.log_text(1), CONVERGE_S,
                 "the first run times out")
    assert gone(int(lines(pids)[0]))
    (c[0].data / "second").write_bytes(b"2")
    c.wait_until(lambda: len(lines(pids)) == 2, CONVERGE_S, "the second run starts")
    c.stop(1)  # exits 0 (checked by stop), the running command stopped first
    assert gone(int(lines(pids)[1]))
    assert "1 special commands still running are stopped" in c.log_text(1)
