"""Lag per peer and the text of ``omirrord status``, without a daemon."""

from __future__ import annotations

from omirror.link import LinkStats
from omirror.status import SeqTimes, behind, link_status, plural, render


def test_commit_times_name_the_batch_that_holds_a_seq() -> None:
    times = SeqTimes(last_seq=10, now=100.0)
    times.note(12, 200.0)
    times.note(15, 300.0)
    times.note(15, 400.0)  # no new seq: not a commit of anything
    assert times.committed(3) == 100.0  # before the start: as old as the start
    assert times.committed(11) == times.committed(12) == 200.0
    assert times.committed(13) == 300.0
    assert times.committed(16) is None  # not noted yet: just now


def test_behind_counts_entries_past_the_settled_seq_and_their_age() -> None:
    times = SeqTimes(last_seq=0, now=100.0)
    times.note(5, 110.0)
    times.note(9, 120.0)
    assert behind(LinkStats(settled_seq=9), 9, times, now=130.0) == {
        "entries_behind": 0, "seconds_behind": 0.0}
    assert behind(LinkStats(settled_seq=6), 9, times, now=130.0) == {
        "entries_behind": 3, "seconds_behind": 10.0}
    assert behind(LinkStats(settled_seq=0), 9, times, now=130.0)["seconds_behind"] == 20.0


def test_link_status_names_the_inbound_direction_in() -> None:
    fields = link_status(LinkStats(out="up", inbound="down"), 0, SeqTimes(0, 0.0))
    assert fields["out"] == "up" and fields["in"] == "down" and "inbound" not in fields


def test_render_has_a_block_per_peer_then_the_daemon() -> None:
    status = {
        "name": "alpha", "pid": 42, "started": 1000.0, "phase": "running", "last_seq": 7,
        "queue": 2, "watched_dirs": 1, "polled": ["/srv/big"], "stopped_sets": [],
        "last_scan": {"why": "startup", "at": 1000.0, "seconds": 0.5, "set": "www",
                      "recorded": 3},
        "peers": {"beta": {**link_status(LinkStats(out="up", inbound="up", out_since=1000.0,
                                                   in_since=1000.0, skew_s=3.5,
                                                   bytes_sent=2048, entries_sent=1),
                                         7, SeqTimes(7, 1000.0)), "seconds_behind": 90.0}},
        "conflicts": 1, "failing": {"/srv/www/x": "permission denied"},
    }
    text = render(status, now=1090.0)
    assert text.startswith("omirrord alpha (pid 42), up 1m30s, running; log at seq 7\n")
    assert "peer beta\n  link out  up since " in text and "(1m30s)" in text
    assert "  behind    7 entries, 1m30s (settled up to seq 0)" in text
    assert "  skew      +3.500 s  <- decides winners: run NTP" in text
    assert "  sent      2.0 KiB (1 entry, 0 B content)" in text
    assert "queue         2 paths waiting" in text
    assert "last scan     startup of www, 1m30s ago, took 0.500 s, 3 recorded" in text
    assert "watched       1 directory" in text and "polled        /srv/big (inotify" in text
    assert text.endswith("conflicts     1\nfailing       1\n  /srv/www/x: permission denied")


def test_plural() -> None:
    assert [plural(1, "entry"), plural(2, "entry"), plural(0, "file")] == [
        "1 entry", "2 entries", "0 files"]


def test_failing_paths_are_counted_all_and_listed_first_by_path() -> None:
    """A disk full under a flood of files fails thousands of paths; status, rewritten
    twice a second, lists the first hundred, escaped, and counts them all."""
    from omirror.status import FAILING_SHOWN, failing_status, render

    failing = {b"data/f%05d" % i: "No space left on device" for i in range(5000)}
    failing[b"data/a\nforged"] = "Permission denied"
    shown = failing_status(failing)
    assert shown["failing_count"] == 5001 and len(shown["failing"]) == FAILING_SHOWN
    assert "/data/a\\x0aforged" in shown["failing"]
    text = render({"name": "alpha", "peers": {}, **shown})
    assert "failing       5001" in text and "... and 4901 more" in text


def test_render_counts_the_specials_when_the_daemon_reports_them() -> None:
    base = {"name": "alpha", "pid": 42, "started": 1000.0, "last_seq": 7}
    assert "specials" not in render(base, now=1000.0)
    text = render({**base, "specials": {"runs": 5, "failed": 2, "queued": 1,
                                        "gathering": 1, "dropped": 0}}, now=1000.0)
    assert "specials      5 runs, 2 failed, 1 queued or running, 1 bursts gathering, " \
           "0 dropped" in text


def test_a_bandwidth_limit_is_in_the_peer_status_with_the_time_waited_on_it() -> None:
    fields = link_status(LinkStats(bwlimit_kib=512, bwlimit_wait_s=75.123456), 0,
                         SeqTimes(0, 0.0))
    assert fields["bwlimit_kib"] == 512 and fields["bwlimit_wait_s"] == 75.123
    base = {"name": "alpha", "pid": 42, "started": 1000.0, "last_seq": 0}
    text = render({**base, "peers": {"beta": fields}}, now=1000.0)
    assert "\n  bwlimit   512 KiB/s per link, waited 1m15s on it in all\n" in text
    unlimited = link_status(LinkStats(), 0, SeqTimes(0, 0.0))
    assert unlimited["bwlimit_kib"] == 0 and unlimited["bwlimit_wait_s"] == 0.0
    assert "bwlimit" not in render({**base, "peers": {"beta": unlimited}}, now=1000.0)
