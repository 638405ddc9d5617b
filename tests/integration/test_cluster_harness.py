"""The integration harness itself (cluster.py), checked without needing live mirroring.

Generated configuration, keys, snapshots and convergence on hand-made trees, status and
waiting, and process handling with a stand-in daemon whose behaviour on SIGTERM is
chosen by the test; a real omirrord is started only to see it accept what the harness
generated.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash
from cluster import Cluster, Peer
from conftest import omirror_children

from omirror import config, peerkeys

MakeCluster = Callable[..., Cluster]

#: A stand-in for omirrord: writes status.json with its pid, then waits for SIGTERM and
#: exits with the status given ("ignore" ignores SIGTERM; "die" exits 5 at once).
STAND_IN = r"""
import json, os, signal, sys, time
state, on_term = sys.argv[1], sys.argv[2]
if on_term == "die":
    sys.exit(5)
if on_term == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(int(on_term)))
tmp = os.path.join(state, "status.json.tmp")
with open(tmp, "w") as f:
    json.dump({"pid": os.getpid(), "name": "stand-in omirror"}, f)
os.rename(tmp, os.path.join(state, "status.json"))
print("stand-in running", flush=True)
while True:
    time.sleep(0.05)
"""


def stand_in(c: Cluster, on_term: dict[int, str]) -> None:
    """Make ``c`` run the stand-in instead of omirrord (``omirror`` stays in argv, so the
    leak check recognises it)."""
    def command(p: Peer) -> list[str]:
        return [sys.executable, "-c", STAND_IN, str(p.state), on_term.get(p.index, "0"),
                "omirror-stand-in"]

    c.command = command  # type: ignore[method-assign]


def test_config_peers_file_and_keys_are_generated_as_an_operator_would(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(3)
    names = [p.name for p in c.peers]
    assert len(set(p.port for p in c.peers)) == 3
    assert all(n.startswith("127.0.0.1:") for n in names)
    for f in (c.conf, c.peers_file):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    cfg = config.load(c.conf)  # the project's own parser, with its safety checks
    assert [h.name for h in cfg.hosts()] == names
    for name in names:
        (mset,) = cfg.sets_of(name)
        assert mset.files == ("/data",)
    keys = peerkeys.load_peers(c.peers_file)
    assert sorted(keys) == sorted(names)
    for p in c.peers:
        assert p.peers_file == c.peers_file
        assert p.data == p.root / "data" and p.data.is_dir()
        assert stat.S_IMODE(p.state.stat().st_mode) == 0o700
        key_file = p.state / "host_key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        pub = " ".join((p.state / "host_key.pub").read_text().split()[:2])
        assert keys[p.name].openssh == pub
        assert pub.startswith("ssh-ed25519 ")


def test_distfile_extra_and_several_files_dirs(make_cluster: MakeCluster) -> None:
    c = make_cluster(2, files=("/data", "/etc/app"), distfile_extra="\texcept_pat ( \\.swp$ ) ;")
    (mset,) = config.load(c.conf).sets_of(c[0].name)
    assert mset.files == ("/data", "/etc/app")
    assert mset.except_pats == (r"\.swp$",)
    for p in c.peers:
        assert (p.root / "data").is_dir() and (p.root / "etc" / "app").is_dir()
    (c[1].root / "etc" / "app" / "x").write_text("x")
    assert (b"etc/app/x" in c.snapshot(1)) and not c.converged()


def test_untrusted_peer_is_in_hosts_but_not_in_the_shared_peers_file(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(2, untrusted=1)
    intruder = c[2]
    assert not intruder.trusted and [p.trusted for p in c.peers] == [True, True, False]
    assert intruder.name in [h.name for h in config.load(c.conf).hosts()]
    assert sorted(peerkeys.load_peers(c.peers_file)) == sorted([c[0].name, c[1].name])
    assert intruder.peers_file != c.peers_file
    assert sorted(peerkeys.load_peers(intruder.peers_file)) == sorted(p.name for p in c.peers)
    # convergence is judged on the trusted peers only unless told otherwise
    (intruder.data / "mine").write_text("intruder")
    assert c.converged() and not c.converged([0, 2])


def build_tree(data: Path) -> None:
    (data / "f.txt").write_bytes(b"hello\n")
    os.chmod(data / "f.txt", 0o640)
    (data / "d" / "e").mkdir(parents=True)
    os.chmod(data / "d", 0o750)
    (data / "d" / "e" / "deep").write_bytes(b"x" * 3_000_000)
    os.symlink("f.txt", data / "ln")
    os.symlink("/nowhere/at/all", data / "d" / "dangling")
    bdata = os.fsencode(data)
    os.mkdir(os.path.join(bdata, b"dir-\xff"))
    with open(os.path.join(bdata, b"dir-\xff", b"caf\xe9.txt"), "wb") as f:
        f.write(b"latin-1 name")


def test_snapshot_records_kind_mode_size_digest_and_link_target(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    build_tree(c[0].data)
    (c[0].data / ".omirror-root").write_text("marker")
    (c[0].data / "d" / ".omirror-tmp-123").write_text("half a file")
    os.mkdir(c[0].data / ".omirror-stuff")
    (c[0].data / ".omirror-stuff" / "inside").write_text("daemon's")
    snap = c.snapshot(0)
    umask_dir = stat.S_IMODE((c[0].data).stat().st_mode)
    assert snap == {
        b"data": ("dir", umask_dir),
        b"data/f.txt": ("file", 0o640, 6, xxhash.xxh3_128_digest(b"hello\n")),
        b"data/d": ("dir", 0o750),
        b"data/d/e": ("dir", umask_dir),
        b"data/d/e/deep": ("file", snap[b"data/d/e/deep"][1], 3_000_000,
                           xxhash.xxh3_128_digest(b"x" * 3_000_000)),
        b"data/ln": ("link", b"f.txt"),
        b"data/d/dangling": ("link", b"/nowhere/at/all"),
        b"data/dir-\xff": ("dir", umask_dir),
        b"data/dir-\xff/caf\xe9.txt": ("file", snap[b"data/dir-\xff/caf\xe9.txt"][1], 12,
                                       xxhash.xxh3_128_digest(b"latin-1 name")),
    }
    assert c.snapshot(0, digests=False)[b"data/f.txt"] == ("file", 0o640, 6, None)
    assert c.temp_files(0) == [c[0].data / "d" / ".omirror-tmp-123"]


@pytest.mark.parametrize("change", [
    "content", "mode", "link_target", "extra_dir", "missing_file", "file_for_dir", "dir_mode",
])
def test_converged_sees_any_single_difference(make_cluster: MakeCluster, change: str) -> None:
    c = make_cluster(3)
    for p in c.peers:
        build_tree(p.data)
    (c[1].data / ".omirror-tmp-x").write_text("the daemon's own files never count")
    assert c.converged() and c.converged([0, 2])
    d = c[2].data
    if change == "content":  # same size, same mode, one byte differs
        with open(d / "d" / "e" / "deep", "r+b") as f:
            f.seek(2_999_999)
            f.write(b"y")
    elif change == "mode":
        os.chmod(d / "f.txt", 0o600)
    elif change == "link_target":
        os.unlink(d / "ln")
        os.symlink("g.txt", d / "ln")
    elif change == "extra_dir":
        (d / "new").mkdir()
    elif change == "missing_file":
        os.unlink(os.path.join(os.fsencode(d), b"dir-\xff", b"caf\xe9.txt"))
    elif change == "file_for_dir":
        (d / "d" / "e" / "deep").unlink()
        (d / "d" / "e" / "deep").mkdir()
    elif change == "dir_mode":
        os.chmod(d / "d", 0o700)
    assert not c.converged()
    assert c.converged([0, 1])
    with pytest.raises(AssertionError, match=r"peers \[0, 1, 2\] converge"):
        c.wait_converged(timeout=0.2)
    c.wait_converged(timeout=1, peers=[0, 1])


def test_status_is_the_json_file_or_empty(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    assert c.status(0) == {}
    doc = {"name": c[0].name, "pid": 1, "last_seq": 3, "peers": {}}
    (c[0].state / "status.json").write_text(json.dumps(doc))
    assert c.status(0) == doc


def test_wait_until_names_what_it_waited_for_and_shows_the_logs(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c[1].log.write_text("line one\nthe last words of peer one\n")
    start = time.monotonic()
    with pytest.raises(AssertionError) as e:
        c.wait_until(lambda: False, timeout=0.2, what="pigs fly")
    assert time.monotonic() - start < 5
    assert "pigs fly" in str(e.value) and "the last words of peer one" in str(e.value)
    assert c[1].name in str(e.value)
    polls = []
    c.wait_until(lambda: polls.append(1) or len(polls) >= 3, timeout=5)
    assert len(polls) == 3


def test_assert_stays_fails_when_the_invariant_breaks(make_cluster: MakeCluster) -> None:
    c = make_cluster(1)
    c.assert_stays(lambda: True, 0.1, "always")
    end = time.monotonic() + 0.1
    with pytest.raises(AssertionError, match="no longer true: until soon"):
        c.assert_stays(lambda: time.monotonic() < end, 5, "until soon")


def test_start_waits_for_status_and_stop_wants_exit_0(make_cluster: MakeCluster) -> None:
    c = make_cluster(3)
    stand_in(c, {})
    c.start()
    assert all(p.running for p in c.peers)
    assert {pid for pid, _ in omirror_children()} >= {p.proc.pid for p in c.peers}
    assert c.status(1)["pid"] == c[1].proc.pid
    assert c[1].log.read_text().startswith(f"--- harness: start #1 of {c[1].name}")
    c.wait_until(lambda: "stand-in running" in c.log_text(1), 10, "the stand-in logs")
    c.stop(1)
    assert not c[1].running and c[1].proc.returncode == 0
    c.check_alive()  # a peer the harness stopped is not a death
    c.start(1)  # a restart appends to the same log
    assert c[1].log.read_text().count("--- harness: start #") == 2
    c.stop()
    assert not any(p.running for p in c.peers)
    c.close()  # nothing left to do


def test_stop_fails_on_a_nonzero_exit_and_kills_one_that_ignores_sigterm(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    stand_in(c, {0: "3", 1: "ignore"})
    c.start()
    with pytest.raises(AssertionError, match="exited with status 3 on SIGTERM, expected 0"):
        c.stop(0)
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"did not exit within 0.5 s of SIGTERM \(killed\)"):
        c.stop(1, timeout=0.5)
    assert time.monotonic() - start < 5
    assert not c[1].running and c[1].proc.returncode == -9
    assert omirror_children() == []


def test_a_daemon_that_dies_fails_the_wait_at_once(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    stand_in(c, {1: "die"})
    c.start(0)
    c.start(1, wait=False)
    start = time.monotonic()
    with pytest.raises(AssertionError, match="exited with status 5 while the test expected"):
        c.wait_until(lambda: False, timeout=30, what="never")
    assert time.monotonic() - start < 10
    c.check_alive()  # reported once
    c.kill(0)
    assert c[0].proc.returncode == -9
    c.close()


def test_close_stops_everything_and_reports_unclean_exits(make_cluster: MakeCluster) -> None:
    c = make_cluster(3)
    stand_in(c, {1: "4", 2: "die"})
    c.start(0)
    c.start(1)
    c.start(2, wait=False)
    c[2].proc.wait(10)
    with pytest.raises(AssertionError) as e:
        c.close()
    assert f"{c[1].name} exited with status 4 on SIGTERM" in str(e.value)
    assert f"{c[2].name} had exited on its own with status 5" in str(e.value)
    assert not any(p.running for p in c.peers)
    c.close()  # idempotent, and now clean


def test_real_omirrord_accepts_what_the_harness_generated(make_cluster: MakeCluster) -> None:
    """The daemon takes the command line and the generated Distfile and peers file.

    What it does next depends on the version (before the live engine it scans and exits
    2, saying so), so it is killed here: a clean stop is the live tests' business.
    """
    c = make_cluster(2)
    (c[0].data / "hello.txt").write_text("hello")
    c.start(0, wait=False)
    c[0].expected_exit = True  # this test judges the daemon's fate itself
    c.wait_until(lambda: not c[0].running or (c[0].state / "state.db").exists()
                 or c.status(0).get("pid") == c[0].proc.pid, 60,
                 "omirrord gets past its configuration to its store, or exits")
    c.kill(0)
    log = c.log_text(0)
    assert log.startswith(f"--- harness: start #1 of {c[0].name}")
    assert "Usage:" not in log and "No such option" not in log, log
    for line in log.splitlines():  # config errors name the file (omirrd.conf:3:7: ...)
        assert not ("rror" in line and (str(c.conf) in line or str(c.peers_file) in line)), log
    assert isinstance(c[0], Peer) and repr(c[0]) == f"Peer(0, {c[0].name})"
