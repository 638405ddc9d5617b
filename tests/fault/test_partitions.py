"""Links that break: a cut during a burst, a partition A|B with C between, three peers
writing the same files at once. Every link runs through a proxy (tests/fault/faults.py).

Each scenario ends as every fault scenario does: trees identical on every peer, every
winner the one the stamps name (every peer's log records the same stamp for every path,
and the content is what that stamp's writer wrote), no temp file left, no entry lost,
daemons still running.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cluster import Cluster, file_digest
from faults import (
    MB,
    Mesh,
    Proxy,
    Stamp,
    assert_sound,
    conflict_name,
    content_sent,
    link_state,
    links_down,
    links_up,
    log_stamps,
    temp_write_position,
    write_big,
)

MakeCluster = Callable[..., Cluster]
Proxies = Callable[[Cluster], Mesh]
CONVERGE_S = 30


def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def count(d: Path) -> int:
    try:
        return sum(1 for n in os.listdir(d) if not n.startswith(".omirror"))
    except FileNotFoundError:
        return 0


def recorded(c: Cluster, i: int, path: str, newer_than: Stamp | None = None) -> Stamp | None:
    """Peer i's recorded stamp of /data/<path> if it is its own and newer than given."""
    got = log_stamps(c, i, f"/data/{path}").get(f"/data/{path}")
    if got is None or got[0].origin != c[i].name:
        return None
    if newer_than is not None and not got[0] > newer_than:
        return None
    return got[0]


# ------------------------------------------------------------------------------ the proxy

def test_proxy_delays_cuts_blackholes_and_restores() -> None:
    """The toolkit itself, against an echo server: no daemon needed."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def echo() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=echo, daemon=True).start()
    proxy = Proxy(server.getsockname()).start()
    try:
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        s.sendall(b"plain")
        assert s.recv(100) == b"plain"
        proxy.delay(0.2)
        t0 = time.monotonic()
        s.sendall(b"late")
        assert s.recv(100) == b"late" and time.monotonic() - t0 >= 0.4  # both ways
        proxy.delay(0)
        proxy.blackhole()
        s.sendall(b"held")
        s.settimeout(0.3)
        with pytest.raises(socket.timeout):
            s.recv(100)
        proxy.restore()
        s.settimeout(5)
        assert s.recv(100) == b"held"  # a black hole holds, it does not lose
        proxy.cut()
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        s2 = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        try:
            assert s2.recv(100) == b""  # refused while cut
        except ConnectionResetError:
            pass
        proxy.restore()
        s3 = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        s3.sendall(b"again")
        assert s3.recv(100) == b"again"
        assert (proxy.accepted, proxy.refused, proxy.reset) == (2, 1, 1), proxy
        for sock in (s, s2, s3):
            sock.close()
    finally:
        proxy.stop()
        server.close()


# ------------------------------------------------------------------------------ 3

BURST, BIG_FILES = 2_000, 10


@pytest.mark.timeout(240)
def test_link_cut_and_restored_during_a_burst_loses_nothing(
        make_cluster: MakeCluster, proxies: Proxies) -> None:
    c = make_cluster(2)
    mesh = proxies(c)
    c.start()
    c.wait_until(lambda: links_up(c, 0, 1), CONVERGE_S, "the link is up both ways")
    a, b = c[0].data, c[1].data
    (a / "burst").mkdir()
    (b / "back").mkdir()
    c.wait_converged(CONVERGE_S)
    expected: dict[str, bytes] = {}

    def make(where: Path, rel: str, data: bytes) -> None:
        write(where / rel, data)
        expected[rel] = data

    # files of 2 MiB go through WANT and DATA: some are in flight when the cut comes
    for n in range(BIG_FILES):
        make(a, f"burst/big{n}", os.urandom(2 << 20))
    for n in range(BURST // 2):
        make(a, f"burst/f{n:04d}", b"file %d\n" % n)
    c.wait_until(lambda: count(b / "burst") >= 50, CONVERGE_S,
                 "the burst has begun to arrive")
    mesh.cut(0, 1)
    arrived_at_cut = count(b / "burst")
    for n in range(BURST // 2, BURST):  # the rest of the burst, into a cut link
        make(a, f"burst/f{n:04d}", b"file %d\n" % n)
    for n in range(200):  # and the other way
        make(b, f"back/g{n:03d}", b"from B %d\n" % n)
    c.wait_until(lambda: links_down(c, 0, 1), CONVERGE_S,
                 "both ends see the link down")
    held = count(b / "burst")
    assert held < BURST + BIG_FILES, "the whole burst arrived through a cut link"
    c.assert_stays(lambda: links_down(c, 0, 1), 1.0, "the link stays down while cut")
    mesh.restore(0, 1)
    c.wait_until(lambda: links_up(c, 0, 1), CONVERGE_S, "the link is back up")
    c.wait_converged(60)
    for rel, data in expected.items():
        for p in c.peers:
            assert read(p.data / rel) == data, f"{p.name}: {rel} lost or wrong"
    assert_sound(c)
    stamps = log_stamps(c, 0)
    for rel in expected:
        assert stamps[f"/data/{rel}"][0].origin == c[0 if rel.startswith("burst") else 1].name
    assert c.conflict_copies(0) == []
    cut = mesh.link(0, 1).reset + mesh.link(1, 0).reset
    assert cut >= 2, f"the cut broke {cut} connections, expected both of the link's"
    print(f"cut with {arrived_at_cut} of {BURST + BIG_FILES} arrived, {held} when the link "
          f"was seen down; proxies: {mesh.link(0, 1)}, {mesh.link(1, 0)}")


# ------------------------------------------------------------------------------ 4

@pytest.mark.timeout(240)
def test_partition_a_b_with_c_between_converges_through_c_and_after_healing(
        make_cluster: MakeCluster, proxies: Proxies) -> None:
    c = make_cluster(3)
    mesh = proxies(c)
    c.start()
    a, b, cc = (p.data for p in c.peers)
    write(a / "shared.txt", b"base\n")
    for n in range(5):
        write(a / f"base{n}.txt", b"base %d\n" % n)
    c.wait_converged(CONVERGE_S)
    c.wait_until(lambda: all(links_up(c, i, j) for i, j in ((0, 1), (0, 2), (1, 2))),
                 CONVERGE_S, "every link is up")

    mesh.cut(0, 1)
    c.wait_until(lambda: links_down(c, 0, 1), CONVERGE_S, "A and B see their link down")
    # The same file edited on both sides before either edit can reach the other: C
    # relays, but a second of latency on C's links keeps the two edits concurrent.
    base = log_stamps(c, 0)["/data/shared.txt"][0]
    mesh.delay(0, 2, 1.0)
    mesh.delay(1, 2, 1.0)
    write(a / "shared.txt", b"edit made on A\n")
    c.wait_until(lambda: recorded(c, 0, "shared.txt", base) is not None, 10,
                 "A records its edit")
    a_stamp = recorded(c, 0, "shared.txt", base)
    write(b / "shared.txt", b"edit made on B, later\n")
    c.wait_until(lambda: recorded(c, 1, "shared.txt", base) is not None, 10,
                 "B records its edit")
    b_stamp = recorded(c, 1, "shared.txt", base)
    assert a_stamp is not None and b_stamp is not None and a_stamp < b_stamp
    assert read(b / "shared.txt") == b"edit made on B, later\n", \
        "A's edit reached B before B's own edit was recorded: not concurrent"
    mesh.delay(0, 2, 0)
    mesh.delay(1, 2, 0)
    # different files on each side: new, deleted, renamed, a directory
    for n in range(10):
        write(a / f"from-a{n}.txt", b"A %d\n" % n)
        write(b / f"from-b{n}.txt", b"B %d\n" % n)
    (a / "base0.txt").unlink()
    os.rename(b / "base1.txt", b / "base1-renamed-on-b.txt")
    (b / "dir-b").mkdir()
    write(b / "dir-b" / "inner", b"inner\n")
    write(cc / "from-c.txt", b"C\n")

    c.wait_converged(CONVERGE_S)  # through C alone
    assert links_down(c, 0, 1), "the A-B link came up through a cut"
    winner = b"edit made on B, later\n"
    copy = "data/" + conflict_name("shared.txt", a_stamp)
    for i in range(3):
        st = log_stamps(c, i)["/data/shared.txt"][0]
        assert st == b_stamp, f"{c[i].name}: shared.txt's winner is {st}, not B's {b_stamp}"
        assert read(c[i].data / "shared.txt") == winner
        assert c.conflict_copies(i) == [copy.encode()]
        assert read(c[i].root / copy) == b"edit made on A\n"
        for n in range(10):
            assert read(c[i].data / f"from-a{n}.txt") == b"A %d\n" % n
            assert read(c[i].data / f"from-b{n}.txt") == b"B %d\n" % n
        assert read(c[i].data / "dir-b" / "inner") == b"inner\n"
        assert read(c[i].data / "from-c.txt") == b"C\n"
    assert read(a / "base1-renamed-on-b.txt") == b"base 1\n"
    assert not (cc / "base0.txt").exists() and not (b / "base1.txt").exists()
    before_heal = c.snapshot(0)

    mesh.restore(0, 1)
    c.wait_until(lambda: links_up(c, 0, 1), 60, "the healed A-B link is up")
    c.wait_converged(CONVERGE_S)
    assert c.snapshot(0) == before_heal, "healing changed the converged trees"
    assert_sound(c)
    # the healed link carries changes by itself: C is cut off from both now
    mesh.cut(0, 2)
    mesh.cut(1, 2)
    write(a / "after-heal.txt", b"straight from A to B\n")
    c.wait_until(lambda: read(b / "after-heal.txt") == b"straight from A to B\n",
                 CONVERGE_S, "A's new file reaches B over the healed link")
    mesh.restore(0, 2)
    mesh.restore(1, 2)
    c.wait_converged(60)
    assert_sound(c)
    assert [len(c.conflict_copies(i)) for i in range(3)] == [1, 1, 1]


@pytest.mark.timeout(180)
def test_what_a_relay_left_out_comes_from_it_once_the_maker_stays_away(
        make_cluster: MakeCluster, proxies: Proxies) -> None:
    """B leaves A's versions out of its stream to C while C says A's own link into it is
    up (C gets them from A). Here A's link to C goes silent (a black hole: C sees it up
    until its keepalives fail) while A writes: B gets the files, C does not get them
    from A. Once C has dropped A's link and A stays away past the grace, C ends B's link
    to be sent again what B left out, and gets A's files from B."""
    c = make_cluster(3)
    mesh = proxies(c)
    c.start()
    a, b, cc = (p.data for p in c.peers)
    c.wait_until(lambda: all(links_up(c, i, j) for i, j in ((0, 1), (0, 2), (1, 2))),
                 CONVERGE_S, "every link is up")
    mesh.link(0, 2).blackhole()
    files = {f"left-out{n}.txt": b"made on A while its link to C was silent %d\n" % n
             for n in range(5)}
    for name, data in files.items():
        write(a / name, data)
    c.wait_until(lambda: all(read(b / n) == d for n, d in files.items()), CONVERGE_S,
                 "B holds A's files")
    c.wait_until(lambda: all(read(cc / n) == d for n, d in files.items()), 60,
                 "C gets A's files from B")
    assert link_state(c, 2, 0)[1] != "up", "C got the files while A's link still looked up"
    mesh.restore(0, 2)
    c.wait_until(lambda: links_up(c, 0, 2), 60, "A's link to C is back")
    c.wait_converged(CONVERGE_S)
    assert_sound(c)


# ------------------------------------------------------------------------------ 5

FILES, RACING_ROUNDS = 10, 4


def content(peer: int, round_: int, f: int) -> bytes:
    # one in three is large enough to travel by WANT and DATA
    body = b"peer %d round %d file %d\n" % (peer, round_, f)
    return body * (5000 if f % 3 == 0 else 1)


def writer_of(data: bytes) -> tuple[int, int, int]:
    peer, round_, f = (int(x) for x in data.split(b"\n", 1)[0].split()[1::2])
    return peer, round_, f


@pytest.mark.timeout(240)
def test_three_peers_editing_the_same_files_at_once_agree_and_lose_no_write(
        make_cluster: MakeCluster, proxies: Proxies) -> None:
    c = make_cluster(3)
    mesh = proxies(c)
    c.start()
    c.wait_until(lambda: all(links_up(c, i, j) for i, j in ((0, 1), (0, 2), (1, 2))),
                 CONVERGE_S, "every link is up")
    rng = random.Random(5)
    names = [f"f{f}.txt" for f in range(FILES)]

    def edit_everywhere(round_: int, atomic: bool = False) -> None:
        """All three peers write all files at once (a barrier starts them together): in
        place (O_TRUNC, so a scan may catch a file empty), or ``atomic``, written beside
        the tree and renamed in."""
        start = threading.Barrier(3)
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                start.wait(5)
                order = list(range(FILES))
                random.Random(round_ * 10 + i).shuffle(order)
                for f in order:
                    if atomic:
                        staging = c[i].base / names[f]
                        write(staging, content(i, round_, f))
                        os.rename(staging, c[i].data / names[f])
                    else:
                        write(c[i].data / names[f], content(i, round_, f))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors

    # racing rounds: every peer writes while the others' versions are on the wire
    for round_ in range(RACING_ROUNDS):
        edit_everywhere(round_)
        time.sleep(rng.uniform(0, 0.1))  # rounds overlap the propagation, on purpose
    c.wait_converged(60)
    assert_sound(c)
    stamps = log_stamps(c, 0)
    for i in range(3):
        for f, name in enumerate(names):
            data = read(c[i].data / name)
            assert data is not None, f"{c[i].name}: {name} is gone"
            peer, _, f_of = writer_of(data)
            winner = stamps[f"/data/{name}"][0]
            assert f_of == f and c[peer].name == winner.origin, \
                f"{c[i].name}: {name} holds peer {peer}'s content, its stamp names {winner}"
        for copy in c.conflict_copies(i):
            data = read(c[i].root / copy.decode())
            assert data is not None
            if data == b"":  # a version a scan caught between O_TRUNC and write()
                continue
            peer, _, f = writer_of(data)
            assert copy.startswith(f"data/{names[f]}.omirror-conflict-{c[peer].name}-"
                                   .encode()), f"{copy!r} holds peer {peer}'s content"
    racing_copies = set(c.conflict_copies(0))

    # the last round with every link cut: three versions of each file, surely concurrent
    before = {f: log_stamps(c, 0)[f"/data/{name}"][0] for f, name in enumerate(names)}
    mesh.cut_all()
    c.wait_until(lambda: all(links_down(c, i, j) for i, j in ((0, 1), (0, 2), (1, 2))),
                 CONVERGE_S, "every link is down")
    last = RACING_ROUNDS
    edit_everywhere(last, atomic=True)  # each peer records exactly one version
    mine: dict[tuple[int, int], Stamp] = {}

    def all_recorded() -> bool:
        for i in range(3):
            if all((i, f) in mine for f in range(FILES)):
                continue
            logged = log_stamps(c, i)
            for f, name in enumerate(names):
                st = logged[f"/data/{name}"][0]
                if st.origin == c[i].name and st > before[f]:
                    mine[i, f] = st
        return len(mine) == 3 * FILES

    c.wait_until(all_recorded, 30, "each peer records its own last edit of every file")
    mesh.restore_all()
    c.wait_converged(60)
    assert_sound(c)
    stamps = log_stamps(c, 0)
    for f, name in enumerate(names):
        best = max(range(3), key=lambda i: mine[i, f])
        assert stamps[f"/data/{name}"][0] == mine[best, f], name
        for i in range(3):
            assert read(c[i].data / name) == content(best, last, f), \
                f"{c[i].name}: {name} is not the largest stamp's content"
            for loser in set(range(3)) - {best}:
                copy = c[i].data / conflict_name(name, mine[loser, f])
                assert read(copy) == content(loser, last, f), \
                    f"{c[i].name}: peer {loser}'s last write of {name} is lost"
    new_copies = set(c.conflict_copies(0)) - racing_copies
    assert len(new_copies) == 2 * FILES, sorted(new_copies)
    print(f"{len(racing_copies)} conflict copies from the racing rounds, "
          f"{len(new_copies)} from the cut round")


# ------------------------------------------------------------------------------ 6

def test_a_frozen_peer_is_shown_down_within_10_s_and_holds_up_no_other_link(
        make_cluster: MakeCluster) -> None:
    """SIGSTOP leaves a peer's TCP connections open while nothing answers on them: only
    keepalives tell. The other links go on at their pace meanwhile, and when the peer
    thaws it catches up."""
    c = make_cluster(3)
    c.start()
    a, b, frozen = 0, 1, 2
    c.wait_until(lambda: all(links_up(c, i, j) for i, j in ((0, 1), (0, 2), (1, 2))),
                 CONVERGE_S, "every link is up")
    write(c[a].data / "before.txt", b"before\n")
    c.wait_converged(CONVERGE_S)
    c[frozen].proc.send_signal(signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        # a change while it is frozen: the link to it blocks, the one to B must not
        for n in range(20):
            write(c[a].data / f"during{n}.txt", b"during %d\n" % n)
        c.wait_until(lambda: all((c[b].data / f"during{n}.txt").exists() for n in range(20)),
                     5, "B got A's changes while C is frozen")
        reached_b = time.monotonic() - stopped
        c.wait_until(lambda: "up" not in link_state(c, a, frozen) + link_state(c, b, frozen),
                     10 - (time.monotonic() - stopped), "A and B show C down within 10 s")
        shown_down = time.monotonic() - stopped
        # still no hold-up: a single file crosses A -> B at once
        write(c[a].data / "later.txt", b"later\n")
        c.wait_until(lambda: (c[b].data / "later.txt").exists(), 5,
                     "B got a change of A's after C was shown down")
    finally:
        c[frozen].proc.send_signal(signal.SIGCONT)
    c.wait_until(lambda: all(links_up(c, i, j) for i, j in ((0, 1), (0, 2), (1, 2))),
                 CONVERGE_S, "every link is up again once C thaws")
    c.wait_converged(CONVERGE_S)
    assert (c[frozen].data / "later.txt").read_bytes() == b"later\n"
    assert_sound(c)
    print(f"B had the 20 files {reached_b:.2f} s after C froze; C shown down after "
          f"{shown_down:.1f} s")


# ------------------------------------------------------------------------------ 7

@pytest.mark.timeout(240)
def test_a_large_transfer_cut_in_the_middle_resumes_from_what_arrived(
        make_cluster: MakeCluster, proxies: Proxies) -> None:
    """The link is cut when B has 60% of a 256 MiB file. What arrived is kept; when the
    link is back and the same version is asked for again, only the rest crosses (a block
    delta against what is kept): far less than the 1.6 times the file a restart from
    zero sends."""
    size = 256 * MB
    c = make_cluster(2)
    mesh = proxies(c)
    c.start()
    c.wait_until(lambda: links_up(c, 0, 1), CONVERGE_S, "the link is up both ways")
    big = c[0].data / "big.bin"
    write_big(big, size, seed=7)
    digest = file_digest(big)
    c.wait_until(lambda: temp_write_position(c, 1) > size * 6 // 10, 120,
                 "B has received 60% of big.bin")
    mesh.cut(0, 1)
    c.wait_until(lambda: links_down(c, 0, 1), CONVERGE_S, "both ends see the link down")
    sent_before = content_sent(c, 0)
    kept = [p for p in os.listdir(c[1].data) if p.startswith(".omirror-part-")]
    assert len(kept) == 1, f"what arrived was not kept: {os.listdir(c[1].data)}"
    kept_size = (c[1].data / kept[0]).stat().st_size
    assert kept_size >= size // 2, kept_size
    mesh.restore(0, 1)
    c.wait_until(lambda: (c[1].data / "big.bin").exists(), 120, "big.bin is installed on B")
    c.wait_converged(120)
    assert file_digest(c[1].data / "big.bin") == digest
    assert_sound(c)
    sent = content_sent(c, 0) - sent_before
    assert sent < size // 2, (f"{sent / MB:.0f} MiB of content sent after the cut for a "
                              f"{size // MB} MiB file of which {kept_size / MB:.0f} MiB "
                              "arrived: the transfer restarted")
    assert "resumes a cut transfer" in c.log_text(1)
    assert not [p for p in os.listdir(c[1].data) if p.startswith(".omirror-part-")]
    print(f"kept {kept_size / MB:.0f} MiB at the cut ({sent_before / MB:.0f} MiB sent by "
          f"then); {sent / MB:.0f} MiB of content sent after it, for {size // MB} MiB")
