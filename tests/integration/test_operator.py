"""The operator's commands against real daemons: status, sync, log replay, and the
control socket as the daemon's claim on its state directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster import Cluster, Peer


def omirrord(*args: str, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "omirror", *args], capture_output=True,
                          text=True, timeout=60, env=full_env, stdin=subprocess.DEVNULL)


def status_json(p: Peer) -> dict[str, Any]:
    r = omirrord("status", "--json", "--state-dir", str(p.state))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def links_up(c: Cluster, p: Peer) -> bool:
    peers = status_json(p)["peers"]
    return len(peers) == len(c) - 1 and all(
        v["out"] == "up" and v["in"] == "up" for v in peers.values())


def test_status_reports_links_lag_and_bytes(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3)
    c.start()
    p0, p1, p2 = c.peers
    c.wait_until(lambda: all(links_up(c, p) for p in c.peers), 30, "every link is up")
    before = status_json(p0)
    assert before["name"] == p0.name and before["pid"] == p0.proc.pid
    assert before["phase"] == "running" and before["queue"] == 0
    assert before["watched_dirs"] >= 1 and before["polled"] == []
    assert before["conflicts"] == 0 and before["failing"] == {}
    assert before["last_scan"]["why"] == "startup" and before["last_scan"]["seconds"] >= 0
    for name in (p1.name, p2.name):
        link = before["peers"][name]
        assert link["out_since"] > 0 and link["in_since"] > 0
        assert abs(link["skew_s"]) < 1.0
        assert link["entries_behind"] == 0 and link["seconds_behind"] == 0.0

    (p0.data / "report.txt").write_bytes(b"x" * 5000)
    c.wait_converged()

    def sent_and_settled() -> bool:
        st = status_json(p0)
        return all(st["peers"][n]["bytes_sent"] >= before["peers"][n]["bytes_sent"] + 5000
                   and st["peers"][n]["entries_behind"] == 0 for n in (p1.name, p2.name))

    c.wait_until(sent_and_settled, 20, "p0's status counts the file sent to both peers")
    after = status_json(p0)
    assert after["last_seq"] > before["last_seq"]
    assert status_json(p1)["peers"][p0.name]["content_bytes_received"] >= 5000

    text = omirrord("status", "--state-dir", str(p0.state))
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert out.startswith(f"omirrord {p0.name} (pid {p0.proc.pid}), up ")
    for name in (p1.name, p2.name):
        block = out.split(f"peer {name}\n", 1)[1].split("\n\n", 1)[0]
        assert "link out  up since " in block and "link in   up since " in block
        assert "behind    in step" in block and "skew      " in block
        assert "sent      " in block and "received  " in block
    for label in ("queue ", "last scan     startup of ", "watched ", "polled        none",
                  "conflicts     0", "failing       none"):
        assert label in out, label
    # the state directory from the environment, as for every other option
    env = omirrord("status", env={"OMIRRORD_STATE_DIR": str(p1.state)})
    assert env.returncode == 0 and env.stdout.startswith(f"omirrord {p1.name} ")


def test_status_shows_a_peer_that_is_down_and_how_far_behind(
        make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(2)
    c.start()
    p0, p1 = c.peers
    c.wait_until(lambda: links_up(c, p0), 30, "the links are up")
    c.stop(1)
    c.wait_until(lambda: status_json(p0)["peers"][p1.name]["out"] != "up", 20,
                 "p0 sees its link to p1 go down")
    for i in range(3):
        (p0.data / f"while-away-{i}").write_text(str(i))
    c.wait_until(lambda: status_json(p0)["peers"][p1.name]["entries_behind"] >= 3, 20,
                 "p0 counts the entries p1 has not got")
    link = status_json(p0)["peers"][p1.name]
    assert link["seconds_behind"] > 0
    text = omirrord("status", "--state-dir", str(p0.state)).stdout
    block = text.split(f"peer {p1.name}\n", 1)[1]
    assert "behind    3 entries, " in block
    c.start(1)
    c.wait_converged()
    c.wait_until(lambda: status_json(p0)["peers"][p1.name]["entries_behind"] == 0, 20,
                 "p1 catches up")


def test_status_without_a_daemon_says_so_and_exits_2(tmp_path: Path) -> None:
    r = omirrord("status", "--state-dir", str(tmp_path))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"omirrord: error: no omirrord is running with --state-dir "
                        f"{tmp_path} (no control socket at {tmp_path}/control.sock)\n")
    for args in (["sync", "/data/x"], ["log", "replay", "--peer", "b", "--from", "0"]):
        r = omirrord(*args, "--state-dir", str(tmp_path))
        assert r.returncode == 2 and "no omirrord is running" in r.stderr


def test_sync_pushes_a_path_now(make_cluster: Callable[..., Cluster]) -> None:
    # a 30 s coalescing window: without sync the change would wait that long
    c = make_cluster(3, delay=30.0)
    c.start()
    p0 = c[0]
    c.wait_until(lambda: all(links_up(c, p) for p in c.peers), 30, "every link is up")
    (p0.data / "sub").mkdir()
    (p0.data / "sub" / "urgent.txt").write_text("now\n")
    (p0.data / "also.txt").write_text("me too\n")
    r = omirrord("sync", "/data/sub", "/data/also.txt/", "--state-dir", str(p0.state))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("rescanned /data/sub, /data/also.txt/: 2 files, "
                               "1 directory, 0 symlinks; recorded 3 changes (3 new, "
                               "0 changed, 0 deleted, 0 moved); log at seq ")
    assert "sending now to " in r.stdout
    c.wait_converged(timeout=15)
    assert (c[2].data / "sub" / "urgent.txt").read_text() == "now\n"
    # a deletion found by sync goes out as one, too
    (p0.data / "also.txt").unlink()
    r = omirrord("sync", "/data/also.txt", "--state-dir", str(p0.state))
    assert r.returncode == 0 and "1 deleted" in r.stdout, r.stderr
    c.wait_converged(timeout=15)
    assert not (c[1].data / "also.txt").exists()


def test_sync_refuses_paths_outside_this_hosts_sets(make_cluster: Callable[..., Cluster]
                                                    ) -> None:
    c = make_cluster(2, distfile_extra="\texcept /data/private ;")
    c.start()
    p0 = c[0]
    r = omirrord("sync", "/data/ok", "/etc/passwd", "relative", "/data/private/x",
                 "--state-dir", str(p0.state))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("omirrord: error: ")
    assert f"/etc/passwd is in no set of {p0.name} (its sets hold /data)" in r.stderr
    assert "'relative' is not an absolute path" in r.stderr
    assert "/data/private/x is excluded from set " in r.stderr
    assert "/data/ok" not in r.stderr  # a good path is not an error
    assert status_json(p0)["last_scan"]["why"] == "startup"  # nothing was scanned


def test_log_replay_sends_the_log_again(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3)
    c.start()
    p0, p1, p2 = c.peers
    c.wait_until(lambda: all(links_up(c, p) for p in c.peers), 30, "every link is up")
    for i in range(20):
        (p0.data / f"f{i:02d}").write_text(f"file {i}\n")
    c.wait_converged()
    c.wait_until(lambda: status_json(p0)["peers"][p1.name]["entries_behind"] == 0, 20,
                 "p1 has settled p0's log")
    last_seq = status_json(p0)["last_seq"]
    got = status_json(p1)["peers"][p0.name]["entries_received"]
    other = status_json(p2)["peers"][p0.name]["entries_received"]
    snapshot = c.snapshot(0)

    r = omirrord("log", "replay", "--peer", p1.name, "--from", "0",
                 "--state-dir", str(p0.state))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"replaying to {p1.name} from seq 0 (log at seq {last_seq})")
    # all of p0's log goes again but p1's own versions (the root's may be one) and p2's,
    # which p1 gets from p2 itself
    dump = omirrord("log", "dump", "--state-dir", str(p0.state)).stdout.splitlines()[1:]
    expected = sum(1 for line in dump if line.split("\t")[2] not in (p1.name, p2.name))
    assert expected >= 20
    c.wait_until(lambda: status_json(p1)["peers"][p0.name]["entries_received"]
                 >= got + expected, 30, f"p1 receives p0's {expected} entries again")
    c.wait_until(lambda: status_json(p0)["peers"][p1.name]["entries_behind"] == 0, 20,
                 "p1 settles the replay")
    assert status_json(p1)["peers"][p0.name]["entries_received"] <= got + last_seq
    assert status_json(p2)["peers"][p0.name]["entries_received"] == other  # p2 untouched
    c.wait_converged()
    assert c.snapshot(1) == snapshot and c.conflict_copies(1) == []
    assert "replaying our log from seq 0" in c.log_text(0)


def test_log_replay_of_an_unknown_peer_is_an_error(make_cluster: Callable[..., Cluster]
                                                   ) -> None:
    c = make_cluster(2)
    c.start()
    p0, p1 = c.peers
    c.wait_until(lambda: links_up(c, p0), 30, "the links are up")
    r = omirrord("log", "replay", "--peer", "nosuch", "--from", "0",
                 "--state-dir", str(p0.state))
    assert r.returncode == 2
    assert r.stderr == (f"omirrord: error: nosuch is not a peer of {p0.name}; its peers "
                        f"are {p1.name}\n")
    r = omirrord("log", "replay", "--peer", p1.name, "--from", "-1",
                 "--state-dir", str(p0.state))
    assert r.returncode == 2 and "--from" in r.stderr


def test_a_second_daemon_on_the_same_state_dir_refuses(make_cluster: Callable[..., Cluster]
                                                       ) -> None:
    c = make_cluster(2)
    c.start()
    p0 = c[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
    second = subprocess.run(c.command(p0), capture_output=True, text=True, timeout=60,
                            env=env, stdin=subprocess.DEVNULL)
    assert second.returncode == 2
    assert second.stderr.endswith(f"omirrord: error: another omirrord (pid {p0.proc.pid}) "
                                  f"runs with --state-dir {p0.state}\n")
    assert "scanned" not in second.stderr  # refused before touching anything
    assert status_json(p0)["pid"] == p0.proc.pid
    assert c.status(0)["pid"] == p0.proc.pid  # its status.json is not overwritten


def test_a_socket_left_by_a_killed_daemon_does_not_stop_the_next(
        make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(2)
    c.start()
    p0 = c[0]
    c.kill(0)
    sock = p0.state / "control.sock"
    assert sock.is_socket()  # SIGKILL leaves it behind
    r = omirrord("status", "--state-dir", str(p0.state))
    assert r.returncode == 2 and "no omirrord is running" in r.stderr
    c.start(0)
    assert status_json(p0)["pid"] == p0.proc.pid
    assert oct(sock.stat().st_mode & 0o777) == oct(0o660)
    c.stop(0)
    assert not sock.exists()  # a clean stop removes it
