"""``--check`` and ``--once`` against real daemons, as an operator runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable

from cluster import Cluster

MakeCluster = Callable[..., Cluster]
CONVERGE_S = 30


def omirrord(c: Cluster, i: int, *args: str,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    p = c[i]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
    return subprocess.run([sys.executable, "-m", "omirror", "-C", str(c.conf), "-n", p.name,
                           "--root", str(p.root), "--state-dir", str(p.state), "--peers",
                           str(p.peers_file), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def state_files(c: Cluster, i: int) -> dict[str, bytes]:
    """Every file of a peer's state directory but the status file, byte for byte."""
    out = {}
    for name in sorted(os.listdir(c[i].state)):
        if name.startswith("status.json"):
            continue
        out[name] = (c[i].state / name).read_bytes()
    return out


def log_dump(c: Cluster, i: int) -> str:
    return subprocess.run([sys.executable, "-m", "omirror", "log", "dump", "--state-dir",
                           str(c[i].state)], capture_output=True, text=True, timeout=30,
                          check=True).stdout


def test_check_on_peers_in_sync_exits_0(make_cluster: MakeCluster) -> None:
    c = make_cluster(3)
    c.start()
    (c[0].data / "a.txt").write_bytes(b"a")
    (c[1].data / "d").mkdir()
    c.wait_converged(CONVERGE_S)
    c.stop(0)
    r = omirrord(c, 0, "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("in sync with 2 peers")


def test_check_names_each_difference_and_changes_nothing(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start()
    a, b = c[0].data, c[1].data
    for name in ("same", "edited-here", "edited-there", "deleted-here", "deleted-there"):
        (a / name).write_bytes(name.encode())
    c.wait_converged(CONVERGE_S)
    c.stop()
    (a / "edited-here").write_bytes(b"changed on A")
    (b / "edited-there").write_bytes(b"changed on B")
    (a / "deleted-here").unlink()
    (b / "deleted-there").unlink()
    (a / "new-here").write_bytes(b"new on A")
    (b / "new-there").write_bytes(b"new on B")
    c.start(1)  # B's daemon answers; A's is down: --check works without it
    c.wait_until(lambda: "new-there" in log_dump(c, 1), CONVERGE_S, "B records its edits")
    trees = [c.snapshot(i) for i in range(2)]
    stores = [state_files(c, 0), log_dump(c, 1)]
    r = omirrord(c, 0, "--check")
    assert r.returncode == 1, r.stdout + r.stderr
    actions = {line.split("/data/")[1].split()[0]: line[:12].strip()
               for line in r.stdout.splitlines() if "/data/" in line}
    assert actions == {"edited-here": "send", "new-here": "send", "deleted-here":
                       "delete there", "edited-there": "receive", "new-there": "receive",
                       "deleted-there": "delete here"}, r.stdout
    assert r.stdout.splitlines()[-1] == ("6 differences with 1 peer: 2 send, 2 receive, "
                                         "1 delete here, 1 delete there")
    as_json = json.loads(omirrord(c, 0, "check", "--json").stdout)
    assert sorted(i["path"] for i in as_json["plan"]) == sorted(f"/data/{n}" for n in actions)
    assert as_json["in_sync"] is False
    assert [c.snapshot(i) for i in range(2)] == trees  # nothing changed, anywhere
    assert [state_files(c, 0), log_dump(c, 1)] == stores


def test_check_with_no_peer_reachable_exits_2_with_the_reason(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    r = omirrord(c, 0, "--check")
    assert r.returncode == 2
    assert "no peer could be reached" in r.stdout and c[1].name in r.stdout


def test_once_reconciles_with_the_peers_and_exits(make_cluster: MakeCluster) -> None:
    c = make_cluster(3)
    c.start()
    (c[0].data / "base").write_bytes(b"base")
    c.wait_converged(CONVERGE_S)
    c.stop(0)
    (c[0].data / "made-while-down").write_bytes(b"from A" * 30_000)  # fetched, not inline
    (c[1].data / "made-by-b").write_bytes(b"from B")
    (c[2].data / "base").unlink()
    c.wait_converged(CONVERGE_S, peers=[1, 2])
    r = omirrord(c, 0, "--once")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{c[1].name}: reconciled" in r.stdout and f"{c[2].name}: reconciled" in r.stdout
    c.wait_converged(CONVERGE_S)  # B and C apply what A pushed; A holds theirs already
    assert c.converged([0, 1, 2])
    assert not (c[0].data / "base").exists()
    assert (c[0].data / "made-by-b").read_bytes() == b"from B"
    # the next run relays to each peer what this host took from the other one
    assert omirrord(c, 0, "--once").returncode == 0
    third = omirrord(c, 0, "--once")
    assert third.returncode == 0 and third.stdout.count("sent 0 entries") == 2, third.stdout


def test_once_names_a_peer_it_could_not_reach(make_cluster: MakeCluster) -> None:
    c = make_cluster(3)
    c.start(1)
    (c[0].data / "f").write_bytes(b"f")
    r = omirrord(c, 0, "--once")
    assert r.returncode == 1
    assert f"{c[2].name}: not reconciled" in r.stdout and f"{c[1].name}: reconciled" in r.stdout
    assert (c[1].data / "f").read_bytes() == b"f"


def test_once_refuses_to_run_beside_its_own_daemon(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start(0)
    r = omirrord(c, 0, "--once")
    assert r.returncode == 2 and "keeps this host in sync already" in r.stderr


def test_once_with_a_root_that_is_not_usable_names_its_set_and_fails(
        make_cluster: MakeCluster) -> None:
    """A root without its marker (an unmounted disk) stops its set. ``--once`` stopped
    it by unwatching a watcher it never had, and died with a traceback; it now says
    which set was not reconciled, and exits 1 having changed nothing there."""
    from omirror.scanner import MARKER

    c = make_cluster(2)
    c.start()  # the first start marks each root
    c.wait_converged(CONVERGE_S)
    c.stop(0)
    (c[0].data / os.fsdecode(MARKER)).unlink()
    (c[0].data / "kept").write_bytes(b"a file on the unmounted disk's mount point")
    r = omirrord(c, 0, "--once")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "not reconciled" in r.stdout, r.stdout + r.stderr
    assert "marker" in r.stderr, r.stderr
    assert not (c[1].data / "kept").exists()


def test_once_keeps_to_bwlimit_and_says_how_long_it_waited(make_cluster: MakeCluster) -> None:
    """1 MiB at 256 KiB/s after a burst of 256 KiB: about 3 s of waiting."""
    c = make_cluster(2)
    c.start(1)
    content = os.urandom(1 << 20)
    (c[0].data / "big").write_bytes(content)
    start = time.monotonic()
    r = omirrord(c, 0, "--once", "--bwlimit", "256")
    elapsed = time.monotonic() - start
    assert r.returncode == 0, r.stdout + r.stderr
    assert (c[1].data / "big").read_bytes() == content  # acknowledged: applied there
    waited = re.search(r"; waited (\d+\.\d) s on --bwlimit", r.stdout)
    assert waited is not None, r.stdout
    assert 2.0 <= float(waited.group(1)) <= elapsed, r.stdout
