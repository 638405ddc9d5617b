"""The status dict as Prometheus metrics, read back by prometheus_client's own parser,
and the file the daemon keeps them in."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from omirror.errors import OmirrorError
from omirror.link import LinkStats
from omirror.metrics import PHASES, MetricsFile, exposition
from omirror.status import SeqTimes, link_status

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and every family's type by its name."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"sample exposed twice: {key}"
            samples[key] = s.value
    return samples, types


def at(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


def full_status() -> dict[str, Any]:
    """A running daemon's status, every number distinct so a mix-up of fields shows."""
    times = SeqTimes(last_seq=40, now=1000.0)
    beta = link_status(LinkStats(out="up", inbound="connecting", out_since=1100.5,
                                 in_since=1200.25, bytes_sent=123_456_789_012,
                                 bytes_received=2222, content_bytes_sent=3333,
                                 content_bytes_received=4444, entries_sent=55,
                                 entries_received=66, acked_seq=38, settled_seq=37,
                                 skew_s=-2.5, compression="zlib@openssh.com",
                                 bwlimit_kib=2048, bwlimit_wait_s=12.5),
                       40, times)
    beta["seconds_behind"] = 77.125  # as the daemon computes it at its "now"
    gamma = link_status(LinkStats(out="down", inbound="up", settled_seq=40), 40, times)
    return {
        "name": "alpha", "pid": 4242, "started": 1000.5, "min_free": "1%",
        "phase": "running", "last_seq": 40, "queue": 9, "watched_dirs": 812,
        "polled": ["/srv/big", "/srv/huge"], "stopped_sets": ["backup"],
        "last_scan": {"why": "periodic", "at": 1500.75, "seconds": 4.211, "set": "web",
                      "recorded": 13},
        "peers": {"beta": beta, "gamma": gamma},
        "conflicts": 3, "failing": {"/srv/www/x": "Permission denied"},
        "failing_count": 5001,
        "low_disk": {"web": "20.0 MiB free, a file of 6.3 MiB waits, reserve 16.8 MiB"},
        "specials": {"runs": 21, "failed": 2, "dropped": 1, "queued": 4, "gathering": 6},
    }


def test_every_number_of_the_status_is_a_sample_with_its_value() -> None:
    status = full_status()
    samples, types = parse(exposition(status))
    assert at(samples, "omirror_info", name="alpha") == 1
    assert at(samples, "omirror_start_time_seconds") == 1000.5
    assert [at(samples, "omirror_phase", phase=p) for p in PHASES] == [0, 0, 1, 0, 0]
    assert at(samples, "omirror_log_last_seq") == 40
    assert at(samples, "omirror_queue_paths") == 9
    assert at(samples, "omirror_watched_directories") == 812
    assert at(samples, "omirror_polled_subtrees") == 2
    assert at(samples, "omirror_conflicts_total") == 3
    assert at(samples, "omirror_failing_paths") == 5001  # all, not the 1 listed
    assert at(samples, "omirror_last_scan_duration_seconds") == 4.211
    assert at(samples, "omirror_last_scan_timestamp_seconds") == 1500.75
    assert at(samples, "omirror_last_scan_recorded_changes") == 13
    assert at(samples, "omirror_specials_runs_total") == 21
    assert at(samples, "omirror_specials_failed_total") == 2
    assert at(samples, "omirror_specials_dropped_total") == 1
    assert at(samples, "omirror_specials_queued") == 4
    assert at(samples, "omirror_specials_gathering") == 6
    assert at(samples, "omirror_stopped_sets") == 1
    assert at(samples, "omirror_set_stopped", set="backup") == 1
    assert at(samples, "omirror_low_disk_sets") == 1
    assert at(samples, "omirror_set_low_disk", set="web") == 1

    assert at(samples, "omirror_peer_link_up", peer="beta", direction="out") == 1
    assert at(samples, "omirror_peer_link_up", peer="beta", direction="in") == 0  # connecting
    assert at(samples, "omirror_peer_link_up", peer="gamma", direction="out") == 0
    assert at(samples, "omirror_peer_link_up", peer="gamma", direction="in") == 1
    assert at(samples, "omirror_peer_link_changed_timestamp_seconds", peer="beta",
              direction="out") == 1100.5
    assert at(samples, "omirror_peer_link_changed_timestamp_seconds", peer="beta",
              direction="in") == 1200.25
    assert at(samples, "omirror_peer_behind_entries", peer="beta") == 3
    assert at(samples, "omirror_peer_behind_seconds", peer="beta") == 77.125
    assert at(samples, "omirror_peer_behind_entries", peer="gamma") == 0
    assert at(samples, "omirror_peer_behind_seconds", peer="gamma") == 0
    assert at(samples, "omirror_peer_settled_seq", peer="beta") == 37
    assert at(samples, "omirror_peer_clock_skew_seconds", peer="beta") == -2.5
    # a counter past 2**32 keeps every digit
    assert at(samples, "omirror_peer_bytes_total", peer="beta", direction="out") \
        == 123_456_789_012
    assert at(samples, "omirror_peer_bytes_total", peer="beta", direction="in") == 2222
    assert at(samples, "omirror_peer_content_bytes_total", peer="beta",
              direction="out") == 3333
    assert at(samples, "omirror_peer_content_bytes_total", peer="beta",
              direction="in") == 4444
    assert at(samples, "omirror_peer_entries_total", peer="beta", direction="out") == 55
    assert at(samples, "omirror_peer_entries_total", peer="beta", direction="in") == 66
    assert at(samples, "omirror_peer_bwlimit_bytes_per_second", peer="beta") == 2048 * 1024
    assert at(samples, "omirror_peer_bwlimit_wait_seconds_total", peer="beta") == 12.5
    assert at(samples, "omirror_peer_bwlimit_bytes_per_second", peer="gamma") == 0

    # counters are typed as counters (the parser names their family without _total)
    for counter in ("omirror_conflicts", "omirror_peer_bytes", "omirror_peer_entries",
                    "omirror_peer_content_bytes", "omirror_specials_runs",
                    "omirror_specials_failed", "omirror_specials_dropped",
                    "omirror_peer_bwlimit_wait_seconds"):
        assert types[counter] == "counter", counter
    assert {t for name, t in types.items() if not name.endswith(
        ("conflicts", "_bytes", "_entries", "_runs", "_failed", "_dropped",
         "_wait_seconds"))} == {"gauge"}
    assert all(name.startswith("omirror_") for name, _ in samples)


def test_a_daemon_still_starting_exposes_what_it_knows_and_nothing_made_up() -> None:
    """Before the store is open the status has no peers, scan, queue or specials: their
    series are absent, not 0 (a 0 would read as "in step", "nothing failing")."""
    samples, _ = parse(exposition({"name": "alpha", "pid": 1, "started": 5.0,
                                   "min_free": "1%", "phase": "starting"}))
    assert at(samples, "omirror_phase", phase="starting") == 1
    assert at(samples, "omirror_phase", phase="running") == 0
    names = {name for name, _ in samples}
    assert names == {"omirror_info", "omirror_start_time_seconds", "omirror_phase"}


def test_a_field_that_is_missing_or_not_a_number_gives_no_sample() -> None:
    status = full_status()
    status["peers"]["beta"].update(bytes_sent="lots", entries_sent=None, skew_s=True)
    del status["peers"]["beta"]["seconds_behind"]
    status["peers"]["delta"] = "not a peer"
    status["phase"] = "reticulating"  # a phase of a newer daemon
    status["last_scan"] = {}  # before the first scan
    samples, _ = parse(exposition(status))
    for name in ("omirror_peer_bytes_total", "omirror_peer_entries_total"):
        assert (name, frozenset({("peer", "beta"), ("direction", "out")})) not in samples
        assert at(samples, name, peer="beta", direction="in") > 0
    assert ("omirror_peer_clock_skew_seconds", frozenset({("peer", "beta")})) not in samples
    assert ("omirror_peer_behind_seconds", frozenset({("peer", "beta")})) not in samples
    assert not any(dict(labels).get("peer") == "delta" for _, labels in samples)
    assert at(samples, "omirror_phase", phase="reticulating") == 1
    assert at(samples, "omirror_phase", phase="running") == 0
    assert not any(name.startswith("omirror_last_scan") for name, _ in samples)


def test_label_values_come_back_as_they_were() -> None:
    """Peer names and set titles are escaped by the exposition, not by us: quotes,
    backslashes and line breaks must not end a label or a line."""
    odd_peer = 'be"ta\\x\n# TYPE evil gauge'
    odd_set = "web}\n omirror_failing_paths 0"
    status = full_status()
    status["peers"] = {odd_peer: status["peers"]["beta"]}
    status["low_disk"] = {odd_set: "short"}
    status["stopped_sets"] = []
    samples, types = parse(exposition(status))
    assert at(samples, "omirror_peer_bytes_total", peer=odd_peer, direction="in") == 2222
    assert at(samples, "omirror_set_low_disk", set=odd_set) == 1
    assert at(samples, "omirror_failing_paths") == 5001
    assert at(samples, "omirror_stopped_sets") == 0
    assert "evil" not in types


# -- the file ----------------------------------------------------------------------------

def read_back(path: Path) -> Samples:
    return parse(path.read_text())[0]


def test_the_file_is_replaced_whole_readable_by_all_and_leaves_no_temp_file(
        tmp_path: Path) -> None:
    target = tmp_path / "omirror.prom"
    target.write_text("old\n")
    os.chmod(target, 0o600)
    metrics = MetricsFile(str(target))
    old_umask = os.umask(0o077)
    try:
        metrics.check()
        assert metrics.write(full_status())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert at(read_back(target), "omirror_queue_paths") == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["omirror.prom"]


def test_a_symlink_at_the_path_is_replaced_not_written_through(tmp_path: Path) -> None:
    """The directory may be open to others (a textfile directory of loose mode): a
    symlink planted there to a file of ours must not make us overwrite that file."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = tmp_path / "omirror.prom"
    target.symlink_to(victim)
    assert MetricsFile(str(target)).write(full_status())
    assert victim.read_text() == "precious\n"
    assert not target.is_symlink()
    assert at(read_back(target), "omirror_conflicts_total") == 3


def test_a_slow_write_skips_the_statuses_meanwhile_and_the_final_one_comes_last(
        tmp_path: Path) -> None:
    """A sync stuck on a busy disk must not queue a write per status (twice a second),
    and the write at stop must land after it, not be overwritten by it."""
    target = tmp_path / "omirror.prom"
    metrics = MetricsFile(str(target))
    replace = metrics._replace
    entered, release = threading.Event(), threading.Event()
    written: list[bytes] = []

    def slow(data: bytes) -> None:
        entered.set()
        assert release.wait(10)
        replace(data)
        written.append(data)

    metrics._replace = slow  # type: ignore[method-assign]
    assert metrics.submit({**full_status(), "queue": 1})
    assert entered.wait(10)
    assert not metrics.submit({**full_status(), "queue": 2})  # the first still runs
    closing = threading.Thread(target=metrics.close,
                               args=({**full_status(), "phase": "stopping"},))
    closing.start()
    release.set()
    closing.join(10)
    assert not closing.is_alive()
    samples = read_back(target)
    assert at(samples, "omirror_phase", phase="stopping") == 1
    assert len(written) == 2 and b"omirror_queue_paths 1.0" in written[0]
    assert not any(t.name.startswith(MetricsFile.THREAD_NAME) for t in threading.enumerate())


def test_a_write_older_than_the_last_one_done_is_dropped(tmp_path: Path) -> None:
    """Had the final write taken the lock first, the older one must not follow it."""
    target = tmp_path / "omirror.prom"
    metrics = MetricsFile(str(target))
    early = metrics._ticket()
    assert metrics.write({**full_status(), "phase": "stopping"})
    assert metrics._write(exposition({**full_status(), "phase": "running"}).encode(), early)
    assert at(read_back(target), "omirror_phase", phase="stopping") == 1


def test_a_directory_that_takes_no_file_stops_the_start(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "omirror.prom"
    with pytest.raises(OmirrorError, match=r"^--metrics-file .*/no/omirror.prom: cannot "
                                           r"write in .*/no: No such file or directory "
                                           r"\(under the systemd unit, .*ReadWritePaths="):
        MetricsFile(str(missing)).check()
    with pytest.raises(OmirrorError, match=r"/omirror.prom: is a directory; give a file"):
        (tmp_path / "omirror.prom").mkdir()
        MetricsFile(str(tmp_path / "omirror.prom")).check()
    (tmp_path / "omirror.prom").rmdir()
    with pytest.raises(OmirrorError, match="is a directory"):
        MetricsFile(str(tmp_path) + "/").check()
    # the check leaves nothing behind, and does not make the file
    assert list(tmp_path.iterdir()) == []
    MetricsFile(str(tmp_path / "omirror.prom")).check()
    assert list(tmp_path.iterdir()) == []


def test_a_failing_write_is_logged_once_and_its_end_too(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Rewritten twice a second: a full disk must not flood the log."""
    target = tmp_path / "omirror.prom"
    target.mkdir()  # a directory where the file should be: every rename fails
    metrics = MetricsFile(str(target))
    with caplog.at_level(logging.INFO, logger="omirror.metrics"):
        assert not metrics.write(full_status())
        assert not metrics.write(full_status())
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        assert "cannot write the metrics file " + str(target) in caplog.text
        target.rmdir()
        assert metrics.write(full_status())
        assert metrics.write(full_status())
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "is written again" in caplog.records[1].getMessage()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["omirror.prom"]


def test_a_daemon_without_a_metrics_file_never_imports_prometheus_client() -> None:
    """prometheus_client costs some 40 ms of every start (a restart with nothing changed
    is measured in bench/compare.py, scenario 5): only --metrics-file loads it."""
    code = ("import sys, omirror.cli, omirror.daemon; "
            "print(sorted(m for m in sys.modules if m.startswith('prometheus_client')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"
