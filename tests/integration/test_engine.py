"""Properties of the live engine beyond the acceptance list: no echo, parents first,
compressed links, configuration reload."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cluster import Cluster

MakeCluster = Callable[..., Cluster]
CONVERGE_S = 30


def origins_in_log(c: Cluster, i: int) -> set[str]:
    """The origins of every version in peer i's change log (``omirrord log dump``)."""
    out = subprocess.run([sys.executable, "-m", "omirror", "log", "dump", "--state-dir",
                          str(c[i].state)], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return {line.split("\t")[2] for line in out.splitlines() if not line.startswith("#")}


def received(status: dict) -> int:
    return sum(link.get("entries_received", 0) for link in status.get("peers", {}).values())


def test_no_entry_goes_back_to_its_origin(make_cluster: MakeCluster) -> None:
    c = make_cluster(3)
    c.start()
    # each peer's startup scan records its root directory: those versions settle first,
    # the latest on every peer
    c.wait_until(lambda: len({frozenset(origins_in_log(c, i)) for i in range(3)}) == 1
                 and len(origins_in_log(c, 0)) == 1, CONVERGE_S, "the roots settle")
    root_origin = origins_in_log(c, 0)
    baseline = received(c.fresh_status(0))
    a = c[0].data
    for n in range(20):
        (a / f"f{n}").write_bytes(b"%d\n" % n)
    (a / "d").mkdir()
    (a / "d" / "x").write_bytes(b"x")
    os.symlink("f1", a / "ln")
    c.wait_converged(CONVERGE_S)
    (a / "f3").write_bytes(b"changed")
    os.chmod(a / "f4", 0o600)
    (a / "f5").unlink()
    os.rename(a / "d", a / "e")
    c.wait_converged(CONVERGE_S)
    statuses = [c.fresh_status(i) for i in range(3)]
    assert received(statuses[0]) == baseline, \
        f"the origin received entries back: {statuses[0]['peers']}"
    for i in (1, 2):  # the receivers applied A's versions and made none of their own
        assert origins_in_log(c, i) == {c[0].name} | root_origin
    c.assert_stays(lambda: c.fresh_status(0)["last_seq"] == statuses[0]["last_seq"]
                   and received(c.status(0)) == baseline, 2, "nothing bounces back later")


def test_directory_changed_after_its_files_reaches_a_new_peer_with_its_mode(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(3)
    c.start(0)
    c.start(1)
    a = c[0].data
    (a / "d" / "sub").mkdir(parents=True)
    (a / "d" / "sub" / "f").write_bytes(b"f")
    os.chmod(a / "d", 0o700)  # the directory's version is now later than its files'
    os.chmod(a / "d" / "sub", 0o711)
    c.wait_converged(CONVERGE_S, peers=[0, 1])
    c.start(2)  # a peer that never held the directory catches up from the log
    c.wait_converged(CONVERGE_S)
    for p in c.peers:
        assert (p.data / "d").stat().st_mode & 0o7777 == 0o700, p.name
        assert (p.data / "d" / "sub").stat().st_mode & 0o7777 == 0o711, p.name
    # C made up no parent of its own: its only version is its root's, from its start
    assert origins_in_log(c, 2) <= {c[0].name, c[1].name, c[2].name}
    log_c = subprocess.run([sys.executable, "-m", "omirror", "log", "dump", "--state-dir",
                            str(c[2].state), "--origin", c[2].name], capture_output=True,
                           text=True, timeout=30, check=True).stdout
    assert [ln.split("\t")[4] for ln in log_c.splitlines()[1:]] in ([], ["/data"])


def test_compressed_links_mirror(make_cluster: MakeCluster) -> None:
    c = make_cluster(2, extra_args=("-z",))
    c.start()
    big = b"compressible line of text\n" * 100_000
    (c[0].data / "big.txt").write_bytes(big)
    (c[1].data / "small.txt").write_bytes(b"the other way\n")
    c.wait_converged(CONVERGE_S)
    assert (c[1].data / "big.txt").read_bytes() == big
    status = c.fresh_status(0)["peers"][c[1].name]
    assert status["content_bytes_sent"] >= len(big)
    assert status["compression"] == "zlib@openssh.com"


def test_links_are_not_compressed_unless_asked(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start()
    (c[0].data / "f").write_bytes(b"x")
    c.wait_converged(CONVERGE_S)
    assert c.fresh_status(0)["peers"][c[1].name]["compression"] == "none"


def test_sighup_rereads_the_distfile(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start()
    (c[0].data / "before.tmp").write_bytes(b"mirrored while no rule excludes it")
    c.wait_converged(CONVERGE_S)
    text = c.conf.read_text().replace("\tinstall ;\n", "\tinstall ;\n\texcept_pat ( \\.tmp$ ) ;\n")
    c.conf.write_text(text)
    for p in c.peers:
        os.kill(p.proc.pid, signal.SIGHUP)
    c.wait_until(lambda: all("reloading" in c.log_text(i) for i in range(2)), 10,
                 "both daemons reload")
    (c[0].data / "after.tmp").write_bytes(b"excluded now")
    (c[0].data / "after.txt").write_bytes(b"still mirrored")
    c.wait_until(lambda: (c[1].data / "after.txt").exists(), CONVERGE_S,
                 "a file the new rules keep is mirrored")
    c.assert_stays(lambda: not (c[1].data / "after.tmp").exists(), 1,
                   "a file the new rules exclude stays where it was made")
    assert (c[1].data / "before.tmp").exists()  # an exclusion deletes nothing


def test_a_deleted_tree_reaches_a_returning_peer_completely(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start()
    a = c[0].data
    (a / "tree" / "sub").mkdir(parents=True)
    for n in range(5):
        (a / "tree" / "sub" / f"f{n}").write_bytes(b"%d" % n)
    os.chmod(a / "tree", 0o750)  # the directory's version is later than its files'
    c.wait_converged(CONVERGE_S)
    c.stop(1)
    shutil.rmtree(a / "tree")
    c.wait_until(lambda: "deleted=7" in c.log_text(0) or not (a / "tree").exists(), 10,
                 "A records the deletion")
    c.start(1)  # catches up: children's tombstones, then the directories'
    c.wait_converged(CONVERGE_S)
    assert not (c[1].data / "tree").exists()


def sent(c: Cluster, i: int) -> int:
    return sum(link["content_bytes_sent"] for link in c.fresh_status(i)["peers"].values())


def test_a_change_in_the_middle_of_a_large_file_travels_as_a_block_delta(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start()
    size = (32 << 20) + 54321  # the last block is short, and unchanged: copied, not sent
    data = bytearray(os.urandom(size))
    (c[0].data / "big.bin").write_bytes(data)
    c.wait_converged(60)
    before = sent(c, 0)
    data[size // 2 + 12345: size // 2 + 12345 + (1 << 20)] = os.urandom(1 << 20)
    with open(c[0].data / "big.bin", "r+b") as f:  # in place, as a database would
        f.seek(size // 2 + 12345)
        f.write(data[size // 2 + 12345: size // 2 + 12345 + (1 << 20)])
    c.wait_until(lambda: (c[1].data / "big.bin").read_bytes() == bytes(data), 60,
                 "the changed file arrives")
    c.wait_converged(30)
    delta = sent(c, 0) - before
    assert 0 < delta <= 2 * (1 << 20) + 4096, f"{delta} bytes of content for 1 MiB changed"


def test_a_large_file_that_lost_a_conflict_is_fetched_and_kept(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start()
    (c[0].data / "doc.bin").write_bytes(b"base" * 1000)
    c.wait_converged(CONVERGE_S)
    c.stop(1)
    ours = os.urandom(1 << 20)  # past the inline limit: the loser's content is fetched
    (c[0].data / "doc.bin").write_bytes(ours)
    time.sleep(0.05)  # not synchronisation: B's edit must be stamped later than A's
    theirs = os.urandom(1 << 20)
    (c[1].data / "doc.bin").write_bytes(theirs)
    c.start(1)
    c.wait_until(lambda: all(len(c.conflict_copies(i)) == 1 for i in range(2)), CONVERGE_S,
                 "a conflict copy on both peers")
    c.wait_converged(CONVERGE_S)
    for p in c.peers:
        assert (p.data / "doc.bin").read_bytes() == theirs
        (copy,) = c.conflict_copies(p.index)
        assert Path(os.fsdecode(os.path.join(os.fsencode(p.root), copy))).read_bytes() == ours


def test_a_renamed_small_file_is_renamed_on_the_peers_not_rewritten(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(3)
    c.start()
    (c[0].data / "old.txt").write_bytes(b"small enough to travel inline\n")
    (c[0].data / "d").mkdir()
    (c[0].data / "d" / "x").write_bytes(b"x\n")
    c.wait_converged(CONVERGE_S)
    inodes = {i: ((c[i].data / "old.txt").stat().st_ino,
                  (c[i].data / "d" / "x").stat().st_ino) for i in (1, 2)}
    os.rename(c[0].data / "old.txt", c[0].data / "new.txt")
    os.rename(c[0].data / "d", c[0].data / "e")
    c.wait_converged(CONVERGE_S)
    for i in (1, 2):
        assert ((c[i].data / "new.txt").stat().st_ino,
                (c[i].data / "e" / "x").stat().st_ino) == inodes[i], f"{c[i].name} rewrote"


def test_a_relay_sends_no_content_to_a_peer_that_has_the_origin(
        make_cluster: MakeCluster) -> None:
    """Each peer relays what it receives, so that a peer cut off from the origin still
    gets it; but a peer linked to the origin gets the content from the origin, and a
    relay sends it the entry alone. Relayed inline, every file crossed to every peer
    once per other peer (three peers: twice the bytes; ten: nine times)."""
    c = make_cluster(3)
    c.start()

    def all_linked() -> bool:
        statuses = [c.fresh_status(i)["peers"] for i in range(3)]
        return all(len(s) == 2 and all(v["out"] == "up" and v["in"] == "up"
                                       for v in s.values()) for s in statuses)
    c.wait_until(all_linked, CONVERGE_S, "every link is up both ways")
    before = [c.fresh_status(i)["peers"] for i in range(3)]
    total = 0
    for n in range(40):
        content = os.urandom(1024 + n)
        (c[0].data / f"f{n}").write_bytes(content)
        total += len(content)
    c.wait_converged(CONVERGE_S)
    c.wait_until(lambda: all(c.fresh_status(i)["queue"] == 0 for i in range(3)), CONVERGE_S,
                 "every queue is empty")
    after = [c.fresh_status(i)["peers"] for i in range(3)]

    def sent(i: int, j: int) -> int:
        return (after[i][c[j].name]["content_bytes_sent"]
                - before[i][c[j].name]["content_bytes_sent"])
    assert sent(0, 1) == sent(0, 2) == total  # the origin sends each peer every file
    # a relayed entry reaches a peer before the origin's only if the origin's link is
    # behind: then the peer asks the relay; seldom, never for most files
    assert sent(1, 2) + sent(2, 1) < total / 2, \
        f"relays sent {sent(1, 2)} and {sent(2, 1)} bytes of content for {total}"
