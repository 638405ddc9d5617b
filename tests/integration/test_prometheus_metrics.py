"""``omirrord metrics`` and ``--metrics-file`` against real daemons: the exposition,
parsed back by prometheus_client's own parser, says what ``status --json`` says."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster import Cluster, Peer
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def omirrord(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
    return subprocess.run([sys.executable, "-m", "omirror", *args], capture_output=True,
                          text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


def status_json(p: Peer) -> dict[str, Any]:
    r = omirrord("status", "--json", "--state-dir", str(p.state))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def metrics_path(p: Peer) -> Path:
    return p.base / "omirror.prom"


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def at(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


def with_metrics_file(c: Cluster) -> Cluster:
    """Each daemon of ``c`` writes its own metrics file, beside its state directory."""
    command = c.command
    c.command = lambda p: [*command(p), "--metrics-file", str(metrics_path(p))]
    return c


def links_up(c: Cluster, p: Peer) -> bool:
    peers = status_json(p)["peers"]
    return len(peers) == len(c) - 1 and all(
        v["out"] == "up" and v["in"] == "up" for v in peers.values())


def check_against(status: dict[str, Any], text: str) -> None:
    """Every number of the status dict has its sample with the same value."""
    samples = parse(text)
    assert at(samples, "omirror_info", name=status["name"]) == 1
    assert at(samples, "omirror_start_time_seconds") == status["started"]
    assert at(samples, "omirror_phase", phase=status["phase"]) == 1
    assert sum(v for (name, _), v in samples.items() if name == "omirror_phase") == 1
    assert at(samples, "omirror_log_last_seq") == status["last_seq"]
    assert at(samples, "omirror_queue_paths") == status["queue"]
    assert at(samples, "omirror_watched_directories") == status["watched_dirs"]
    assert at(samples, "omirror_polled_subtrees") == len(status["polled"])
    assert at(samples, "omirror_stopped_sets") == len(status["stopped_sets"])
    assert at(samples, "omirror_low_disk_sets") == len(status["low_disk"])
    assert at(samples, "omirror_conflicts_total") == status["conflicts"]
    assert at(samples, "omirror_failing_paths") == status["failing_count"]
    scan = status["last_scan"]
    assert at(samples, "omirror_last_scan_duration_seconds") == scan["seconds"]
    assert at(samples, "omirror_last_scan_timestamp_seconds") == scan["at"]
    assert at(samples, "omirror_last_scan_recorded_changes") == scan["recorded"]
    specials = status["specials"]
    for field in ("runs", "failed", "dropped"):
        assert at(samples, f"omirror_specials_{field}_total") == specials[field]
    for field in ("queued", "gathering"):
        assert at(samples, f"omirror_specials_{field}") == specials[field]
    for name, peer in status["peers"].items():
        for direction, verb in (("out", "sent"), ("in", "received")):
            assert at(samples, "omirror_peer_link_up", peer=name, direction=direction) \
                == (peer[direction] == "up")
            assert at(samples, "omirror_peer_link_changed_timestamp_seconds", peer=name,
                      direction=direction) == peer[f"{direction}_since"]
            assert at(samples, "omirror_peer_bytes_total", peer=name,
                      direction=direction) == peer[f"bytes_{verb}"]
            assert at(samples, "omirror_peer_content_bytes_total", peer=name,
                      direction=direction) == peer[f"content_bytes_{verb}"]
            assert at(samples, "omirror_peer_entries_total", peer=name,
                      direction=direction) == peer[f"entries_{verb}"]
        assert at(samples, "omirror_peer_behind_entries", peer=name) == peer["entries_behind"]
        assert at(samples, "omirror_peer_behind_seconds", peer=name) == peer["seconds_behind"]
        assert at(samples, "omirror_peer_settled_seq", peer=name) == peer["settled_seq"]
        assert at(samples, "omirror_peer_clock_skew_seconds", peer=name) == peer["skew_s"]
        assert at(samples, "omirror_peer_bwlimit_bytes_per_second", peer=name) \
            == peer["bwlimit_kib"] * 1024
        assert at(samples, "omirror_peer_bwlimit_wait_seconds_total", peer=name) \
            == peer["bwlimit_wait_s"]
    peers_seen = {dict(labels)["peer"] for name, labels in samples
                  if name == "omirror_peer_link_up"}
    assert peers_seen == set(status["peers"])


def test_metrics_command_and_file_agree_with_status_json(
        make_cluster: Callable[..., Cluster]) -> None:
    c = with_metrics_file(make_cluster(2))
    c.start()
    p0, p1 = c.peers
    c.wait_until(lambda: links_up(c, p0) and links_up(c, p1), 30, "every link is up")
    for i in range(3):
        (p0.data / f"from-p0-{i}").write_bytes(b"%d" % i * 1000)
    (p1.data / "from-p1").write_bytes(b"y" * 3000)
    c.wait_converged()
    c.wait_until(lambda: all(v["entries_behind"] == 0 and v["entries_sent"] > 0
                             for p in (p0, p1) for v in status_json(p)["peers"].values()),
                 20, "each peer has sent its files and the other has settled them")

    def quiet_sample(p: Peer) -> tuple[dict[str, Any], str, str] | None:
        """status --json, the file rewritten after it, metrics, status --json again: if
        both statuses are equal nothing moved in between (the counters only grow).

        The file must be the second one written after the first call returned: the
        status in the first may have been taken before (the write runs in a thread),
        the next one's is taken after the first is renamed.
        """
        before = status_json(p)
        since = time.time_ns()
        for _ in range(2):
            c.wait_until(lambda since=since: metrics_path(p).stat().st_mtime_ns > since, 10,
                         f"{p.name} rewrites its metrics file")
            since = metrics_path(p).stat().st_mtime_ns
        from_file = metrics_path(p).read_text()
        command = omirrord("metrics", "--state-dir", str(p.state))
        assert command.returncode == 0 and command.stderr == "", command.stderr
        after = status_json(p)
        return (before, from_file, command.stdout) if before == after else None

    got: dict[str, tuple[dict[str, Any], str, str]] = {}

    def sampled(p: Peer) -> bool:
        sample = quiet_sample(p)
        if sample is not None:
            got[p.name] = sample
        return sample is not None

    for p, other in ((p0, p1), (p1, p0)):
        c.wait_until(lambda p=p: sampled(p), 30, f"{p.name} is quiet across two status "
                                                 "calls")
        status, from_file, from_command = got[p.name]
        assert status["pid"] == p.proc.pid and status["phase"] == "running"
        link = status["peers"][other.name]
        assert link["out"] == link["in"] == "up" and link["entries_behind"] == 0
        assert link["entries_sent"] >= (3 if p is p0 else 1)
        assert link["content_bytes_received"] >= 3000
        check_against(status, from_file)
        check_against(status, from_command)
        assert stat.S_IMODE(metrics_path(p).stat().st_mode) == 0o644
        # no temp file of ours is left beside it for the textfile collector to trip on
        assert sorted(f.name for f in p.base.iterdir() if "omirror.prom" in f.name) == [
            "omirror.prom"]

    # a link going down shows in the live metrics; the stopped daemon's file keeps its
    # last word: stopping, links down
    c.stop(1)
    final = parse(metrics_path(p1).read_text())
    assert at(final, "omirror_phase", phase="stopping") == 1
    assert at(final, "omirror_peer_link_up", peer=p0.name, direction="out") == 0
    assert at(final, "omirror_peer_link_up", peer=p0.name, direction="in") == 0
    assert at(final, "omirror_peer_entries_total", peer=p0.name, direction="out") >= 1
    c.wait_until(lambda: at(parse(metrics_path(p0).read_text()), "omirror_peer_link_up",
                            peer=p1.name, direction="out") == 0,
                 20, "p0's metrics file shows its link to p1 down")
    (p0.data / "while-away").write_text("later\n")
    c.wait_until(lambda: at(parse(metrics_path(p0).read_text()),
                            "omirror_peer_behind_entries", peer=p1.name) >= 1,
                 20, "p0's metrics file counts what p1 has not got")


def test_metrics_without_a_daemon_says_so_and_exits_2(tmp_path: Path) -> None:
    r = omirrord("metrics", "--state-dir", str(tmp_path))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"omirrord: error: no omirrord is running with --state-dir "
                        f"{tmp_path} (no control socket at {tmp_path}/control.sock)\n")


def test_a_metrics_file_the_daemon_cannot_write_stops_its_start(
        make_cluster: Callable[..., Cluster]) -> None:
    """Under the hardened unit a directory missing from ReadWritePaths= is read-only: the
    daemon says so at once instead of running without the metrics asked for."""
    c = make_cluster(1)
    p = c[0]
    command = c.command
    c.command = lambda p: [*command(p), "--metrics-file",
                           str(p.base / "missing" / "omirror.prom")]
    c.start(wait=False)
    rc = p.proc.wait(30)
    p.expected_exit = True
    assert rc == 2
    assert (f"omirrord: error: --metrics-file {p.base}/missing/omirror.prom: cannot write "
            f"in {p.base}/missing: No such file or directory") in c.log_text(0)
    assert not (p.state / "status.json").exists()
    assert not (p.state / "control.sock").exists()
