"""What "done" means for the live engine: real daemons on 127.0.0.1, real inotify, real SSH.

Each test starts a cluster of omirrord processes (tests/integration/cluster.py), changes
the trees as a user would, and waits, with a bound, until every tree says the right
thing. Nothing here sleeps to synchronise: a sleep only lets the clock move on where a
test needs one edit to be stamped later than another, and says so.

Every daemon still running at the end gets SIGTERM and must exit 0 (the fixture's
teardown), so each test also checks a clean shutdown.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cluster import Cluster, Peer

MakeCluster = Callable[..., Cluster]
MB = 1 << 20
#: bound for a handful of small changes to reach every peer
CONVERGE_S = 30


# ------------------------------------------------------------------------------ helpers

def write(path: Path | bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read(path: Path | bytes) -> bytes | None:
    """The file's content, or None if there is no such file."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def mode_of(path: Path | bytes) -> int:
    return os.lstat(path).st_mode & 0o7777


def assert_everywhere(c: Cluster, rel: str | bytes, *, content: bytes | None = None,
                      mode: int | None = None, link: bytes | None = None,
                      is_dir: bool = False, absent: bool = False,
                      peers: list[int] | None = None) -> None:
    """Check one path (relative to the data dir) on every trusted peer (or ``peers``)."""
    brel = os.fsencode(rel)
    for i in (peers if peers is not None else [p.index for p in c.peers if p.trusted]):
        path = os.path.join(os.fsencode(c[i].data), brel)
        where = f"peer {i} {c[i].name}: {brel!r}"
        if absent:
            assert not os.path.lexists(path), f"{where} exists, expected it gone"
            continue
        assert os.path.lexists(path), f"{where} is missing"
        if content is not None:
            found = read(path)
            assert found == content, f"{where} holds {found!r:.80}, expected {content!r:.80}"
        if mode is not None:
            assert mode_of(path) == mode, f"{where} has mode {mode_of(path):o}, expected {mode:o}"
        if link is not None:
            assert os.path.islink(path) and os.readlink(path) == link, \
                f"{where} is not a symlink to {link!r}"
        if is_dir:
            assert os.path.isdir(path) and not os.path.islink(path), f"{where} is not a directory"


def assert_clean(c: Cluster, conflicts: bool = False) -> None:
    """No temp file left on any peer and (unless expected) no conflict copy anywhere.

    The trees can agree while a peer still settles a relay of what it already holds (its
    content written ahead, then dropped): temp files must be gone within a bound, and one
    that stays is a leak."""
    c.wait_until(lambda: not any(c.temp_files(p.index) for p in c.peers), 10,
                 "no peer has a temp file left")
    for p in c.peers:
        if not conflicts and p.trusted:
            assert c.conflict_copies(p.index) == [], f"{p.name} has unexpected conflict copies"


def content_bytes_sent(status: dict) -> int:
    """Content bytes this daemon has sent, summed over its links to every peer."""
    return sum(link.get("content_bytes_sent", 0) for link in status.get("peers", {}).values())


def links_up(c: Cluster, i: int, others: list[int]) -> bool:
    """Peer ``i``'s links with ``others`` are up both ways, as both ends report them."""
    st = c.status(i).get("peers", {})
    for j in others:
        mine = st.get(c[j].name, {})
        theirs = c.status(j).get("peers", {}).get(c[i].name, {})
        if not (mine.get("out") == mine.get("in") == theirs.get("out") == theirs.get("in")
                == "up"):
            return False
    return True


def uniform_file(path: Path, letter: bytes, size: int) -> bool:
    """The file holds exactly ``size`` bytes of ``letter`` (cheap when the size is off)."""
    try:
        if path.stat().st_size != size:
            return False
    except FileNotFoundError:
        return False
    with open(path, "rb") as f:
        block = letter * MB
        while chunk := f.read(MB):
            if chunk != block[:len(chunk)]:
                return False
    return True


def write_uniform(path: Path, letter: bytes, size: int) -> None:
    block = letter * (4 * MB)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[:size % len(block)])


# ------------------------------------------------------------------------------ 1

def test_changes_made_on_different_peers_converge_on_all(make_cluster: MakeCluster) -> None:
    c = make_cluster(3)
    c.start()
    a, b, cc = (p.data for p in c.peers)

    # create files and directories on A
    write(a / "f.txt", b"one\n")
    (a / "d" / "sub").mkdir(parents=True)
    write(a / "d" / "inner.txt", b"inner\n")
    write(a / "d" / "sub" / "deep.txt", b"deep\n")
    write(a / "gone.txt", b"bye\n")
    (a / "tree").mkdir()
    write(a / "tree" / "t1", b"t1\n")
    write(a / "tree" / "t2", b"t2\n")
    c.wait_converged(CONVERGE_S)
    assert_everywhere(c, "f.txt", content=b"one\n")
    assert_everywhere(c, "d/sub/deep.txt", content=b"deep\n")
    assert_everywhere(c, "tree/t2", content=b"t2\n")

    # modify on B; chmod a file and a directory on C; symlink and mkdir on A
    write(b / "f.txt", b"two, and longer\n")
    os.chmod(cc / "d" / "inner.txt", 0o600)
    os.chmod(cc / "d", 0o750)
    os.symlink("f.txt", a / "ln")
    (a / "empty").mkdir()
    c.wait_converged(CONVERGE_S)
    assert_everywhere(c, "f.txt", content=b"two, and longer\n")
    assert_everywhere(c, "d/inner.txt", content=b"inner\n", mode=0o600)
    assert_everywhere(c, "d", is_dir=True, mode=0o750)
    assert_everywhere(c, "ln", link=b"f.txt")
    assert_everywhere(c, "empty", is_dir=True)

    # rename a file on C, rename a directory on B, delete files and directories on A
    os.rename(cc / "f.txt", cc / "g.txt")
    os.rename(b / "d", b / "e")
    (a / "gone.txt").unlink()
    shutil.rmtree(a / "tree")
    (a / "empty").rmdir()
    c.wait_converged(CONVERGE_S)
    assert_everywhere(c, "g.txt", content=b"two, and longer\n")
    assert_everywhere(c, "f.txt", absent=True)
    assert_everywhere(c, "ln", link=b"f.txt")  # now dangling, still mirrored as it is
    assert_everywhere(c, "e", is_dir=True, mode=0o750)
    assert_everywhere(c, "e/inner.txt", content=b"inner\n", mode=0o600)
    assert_everywhere(c, "e/sub/deep.txt", content=b"deep\n")
    for gone in ("d", "gone.txt", "tree", "empty"):
        assert_everywhere(c, gone, absent=True)
    assert_clean(c)


# ------------------------------------------------------------------------------ 2

@pytest.mark.timeout(180)
def test_peer_down_catches_up_also_by_relay_without_resurrecting_deletions(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(3)
    c.start()
    a, _b, cc = (p.data for p in c.peers)
    write(a / "keep.txt", b"v1\n")
    write(a / "doomed.txt", b"doomed\n")
    (a / "doomed-dir").mkdir()
    write(a / "doomed-dir" / "x", b"x\n")
    c.wait_converged(CONVERGE_S)

    # C is down while A changes things; it catches up when it returns
    c.stop(2)
    write(a / "new1.txt", b"new1\n")
    write(a / "keep.txt", b"v2, edited while C was down\n")
    (a / "doomed.txt").unlink()
    c.wait_converged(CONVERGE_S, peers=[0, 1])
    c.start(2)
    c.wait_converged(CONVERGE_S)
    assert_everywhere(c, "new1.txt", content=b"new1\n")
    assert_everywhere(c, "keep.txt", content=b"v2, edited while C was down\n")
    assert_everywhere(c, "doomed.txt", absent=True)

    # C down again; A's changes reach B, then A goes down too: C must get them from B
    c.stop(2)
    write(a / "new2.txt", b"new2, made on A while C was down\n")
    shutil.rmtree(a / "doomed-dir")
    c.wait_converged(CONVERGE_S, peers=[0, 1])
    c.stop(0)
    # edits on C's tree while its daemon is down (not concurrent: C holds keep.txt's
    # latest version), to go out when it starts
    write(cc / "offline.txt", b"written while C's daemon was down\n")
    write(cc / "keep.txt", b"v3, edited on C while its daemon was down\n")
    c.start(2)
    c.wait_converged(CONVERGE_S, peers=[1, 2])
    assert_everywhere(c, "new2.txt", content=b"new2, made on A while C was down\n", peers=[1, 2])
    assert_everywhere(c, "offline.txt", content=b"written while C's daemon was down\n",
                      peers=[1, 2])
    assert_everywhere(c, "keep.txt", content=b"v3, edited on C while its daemon was down\n",
                      peers=[1, 2])
    for gone in ("doomed-dir", "doomed.txt"):  # C's old copies did not come back
        assert_everywhere(c, gone, absent=True, peers=[1, 2])

    # and A, back, gets C's offline edits
    c.start(0)
    c.wait_converged(CONVERGE_S)
    assert_everywhere(c, "offline.txt", content=b"written while C's daemon was down\n")
    assert_everywhere(c, "keep.txt", content=b"v3, edited on C while its daemon was down\n")
    for gone in ("doomed-dir", "doomed.txt"):
        assert_everywhere(c, gone, absent=True)
    assert_clean(c)


# ------------------------------------------------------------------------------ 3

def test_concurrent_edits_keep_the_later_and_a_conflict_copy_of_the_other(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(3)
    c.start()
    a, b, cc = (p.data for p in c.peers)
    write(a / "shared.txt", b"base\n")
    c.wait_converged(CONVERGE_S)

    c.stop(1)
    write(a / "shared.txt", b"edit made on A\n")
    c.wait_converged(CONVERGE_S, peers=[0, 2])  # A's edit is stamped and has travelled
    assert read(cc / "shared.txt") == b"edit made on A\n"
    # Not synchronisation: let the clock move past A's stamp and the coarse file-time
    # tick, so that B's edit (stamped with its ctime by B's startup scan) is the later.
    time.sleep(0.1)
    write(b / "shared.txt", b"edit made on B, later, while its daemon was down\n")
    c.start(1)

    winner = b"edit made on B, later, while its daemon was down\n"
    c.wait_until(lambda: all(read(p.data / "shared.txt") == winner
                             and len(c.conflict_copies(p.index)) == 1 for p in c.peers),
                 CONVERGE_S, "every peer holds B's later edit and one conflict copy")
    c.wait_converged(CONVERGE_S)
    prefix = f"data/shared.txt.omirror-conflict-{c[0].name}-".encode()
    for p in c.peers:
        (copy,) = c.conflict_copies(p.index)
        assert copy.startswith(prefix) and len(copy) > len(prefix), \
            f"{p.name}: conflict copy {copy!r} is not named {prefix!r}<time>"
        assert read(os.path.join(os.fsencode(p.root), copy)) == b"edit made on A\n"
    assert_clean(c, conflicts=True)


# ------------------------------------------------------------------------------ 4

BURST = 20_000


@pytest.mark.timeout(300)
def test_burst_of_20000_new_files_past_the_inotify_queue_arrives_complete(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start()
    burst, there = c[0].data / "burst", c[1].data / "burst"
    burst.mkdir()
    c.wait_until(there.is_dir, CONVERGE_S, "the burst directory reaches peer 1")

    # As fast as Python goes: three or more events per file, 60,000 events or more into
    # an inotify queue that holds 16,384 (fs.inotify.max_queued_events) by default.
    where = os.fsencode(burst)
    for n in range(BURST):
        fd = os.open(os.path.join(where, b"f%05d" % n), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     0o644)
        os.write(fd, b"file %d\n" % n)
        os.close(fd)

    def arrived() -> int:
        return sum(1 for n in os.listdir(there) if not n.startswith(".omirror"))

    c.wait_until(lambda: arrived() == BURST, 180,
                 f"all {BURST} files of the burst are on peer 1")
    c.wait_converged(60)
    for n in (0, 1, BURST // 2, BURST - 1):
        assert read(there / f"f{n:05d}") == b"file %d\n" % n
    assert_clean(c)


# ------------------------------------------------------------------------------ 5

BIG = 200 * MB


class Reader(threading.Thread):
    """Reads a file whole, again and again, and judges each read: all old or all new.

    Each read goes through one descriptor, so it sees one inode: a receiver that
    renames a complete temp file into place gives whole reads of either; one that writes
    into the file in place, truncates it, or deletes it first, is caught.
    """

    BLOCK = 4 * MB

    def __init__(self, path: Path, size: int) -> None:
        super().__init__(name="omirror-test-reader", daemon=True)
        self.path, self.size = path, size
        self.reads = {"old": 0, "new": 0}
        self.violations: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            while not self.halt.is_set() and not self.violations and not self.reads["new"]:
                verdict = self.read_once()
                if verdict in self.reads:
                    self.reads[verdict] += 1
                else:
                    self.violations.append(verdict)
        except BaseException as e:  # a thread's error must reach the test
            self.violations.append(f"reader crashed: {e!r}")

    def read_once(self) -> str:
        blocks = {"old": b"A" * self.BLOCK, "new": b"B" * self.BLOCK}
        buf = bytearray(self.BLOCK)
        try:
            f = open(self.path, "rb", buffering=0)
        except FileNotFoundError:
            return f"the file was missing (after {self.reads} whole reads)"
        with f:
            kind, total = None, 0
            while n := f.readinto(buf):
                chunk = buf if n == self.BLOCK else buf[:n]
                here = next((k for k, blk in blocks.items()
                             if chunk == (blk if n == self.BLOCK else blk[:n])), "mixed")
                if here == "mixed" or (kind is not None and here != kind):
                    return (f"a read saw a mixture: {kind or here} content then "
                            f"{bytes(chunk[:1])!r}... at offset {total}")
                kind, total = here, total + n
        if total != self.size:
            return f"a read of {kind} content was {total} bytes long, not {self.size}"
        return kind or "empty"


@pytest.mark.timeout(300)
def test_reader_of_a_200_mb_file_being_replaced_sees_old_or_new_never_a_mixture(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start()
    src, dst = c[0], c[1]
    write_uniform(src.data / "big", b"A", BIG)
    c.wait_until(lambda: uniform_file(dst.data / "big", b"A", BIG), 120,
                 "the old 200 MB content is on peer 1")

    reader = Reader(dst.data / "big", BIG)
    reader.start()
    try:
        c.wait_until(lambda: reader.reads["old"] > 0 or bool(reader.violations), 30,
                     "the reader has read the old content whole once")
        # The sender replaces the file atomically (written beside the tree, renamed in),
        # so only the old and the new content ever exist there: anything else a reader
        # on the receiver sees is the receiver's doing.
        staging = src.base / "staging"
        staging.mkdir()
        write_uniform(staging / "big", b"B", BIG)
        os.rename(staging / "big", src.data / "big")
        c.wait_until(lambda: reader.reads["new"] > 0 or bool(reader.violations)
                     or not reader.is_alive(), 180, "the reader sees the new content")
    finally:
        reader.halt.set()
        reader.join(60)
    assert not reader.violations, reader.violations
    assert reader.reads["old"] > 0 and reader.reads["new"] > 0, reader.reads
    c.wait_converged(60)
    assert_clean(c)


# ------------------------------------------------------------------------------ 6

PARTS, PART = 20, 10 * MB


@pytest.mark.timeout(300)
def test_renamed_directory_of_200_mb_moves_without_its_content_on_the_wire(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(3)
    c.start()
    a = c[0].data
    (a / "big-dir").mkdir()
    for n in range(PARTS):
        write(a / "big-dir" / f"part{n:02d}.bin", os.urandom(PART))
    c.wait_converged(150)

    def sent_by_all() -> int:
        """Content bytes sent by every daemon over every link, as of a status written
        after this call (the counters count since each daemon started)."""
        return sum(content_bytes_sent(c.fresh_status(p.index)) for p in c.peers)

    before = sent_by_all()
    assert before >= PARTS * PART, \
        f"content_bytes_sent totals {before} after 200 MB went out: the counter does not count"
    os.rename(a / "big-dir", a / "moved-dir")

    def moved(p: Peer) -> bool:
        d = p.data / "moved-dir"
        return (not (p.data / "big-dir").exists() and d.is_dir()
                and len([n for n in os.listdir(d) if not n.startswith(".omirror")]) == PARTS)

    c.wait_until(lambda: all(moved(p) for p in c.peers), 120,
                 "the renamed directory is in place, and the old name gone, on every peer")
    c.wait_converged(60)
    after = sent_by_all()
    assert after >= before, f"content_bytes_sent went down ({before} -> {after}): " \
                            "the counters must count since the daemon started"
    assert after - before < MB, \
        f"renaming a 200 MB directory sent {after - before} bytes of content"
    assert_clean(c)


# ------------------------------------------------------------------------------ 7

def test_file_names_that_are_not_utf8_mirror(make_cluster: MakeCluster) -> None:
    c = make_cluster(3)
    c.start()
    a, b, cc = (os.fsencode(p.data) for p in c.peers)
    write(os.path.join(a, b"caf\xe9.txt"), b"latin-1 name\n")
    os.mkdir(os.path.join(a, b"dir-\xff"))
    write(os.path.join(a, b"dir-\xff", b"inner-\xfe\x80"), b"inside\n")
    c.wait_converged(CONVERGE_S)
    assert_everywhere(c, b"caf\xe9.txt", content=b"latin-1 name\n")
    assert_everywhere(c, b"dir-\xff", is_dir=True)
    assert_everywhere(c, b"dir-\xff/inner-\xfe\x80", content=b"inside\n")

    # changed from the other peers too: an edit on B, a directory rename on C
    write(os.path.join(b, b"caf\xe9.txt"), b"edited on B\n")
    os.rename(os.path.join(cc, b"dir-\xff"), os.path.join(cc, b"dir-\xc3\x28"))
    c.wait_converged(CONVERGE_S)
    assert_everywhere(c, b"caf\xe9.txt", content=b"edited on B\n")
    assert_everywhere(c, b"dir-\xff", absent=True)
    assert_everywhere(c, b"dir-\xc3\x28/inner-\xfe\x80", content=b"inside\n")
    assert_clean(c)


# ------------------------------------------------------------------------------ 8

def test_peer_not_in_the_peers_file_gets_nothing_and_writes_nothing(
        make_cluster: MakeCluster) -> None:
    # peer 3 is in HOSTS, has a key and a peers file of its own naming everyone, but
    # the real peers' peers file does not list it
    c = make_cluster(3, untrusted=1)
    intruder = c[3]
    write(intruder.data / "planted.txt", b"from the intruder\n")
    (intruder.data / "planted-dir").mkdir()
    write(intruder.data / "planted-dir" / "x", b"x\n")
    planted = c.snapshot(3)
    write(c[0].data / "real.txt", b"real\n")
    c.start()

    def untouched() -> bool:
        if c.snapshot(3) != planted:
            return False
        return not any(os.path.lexists(p.data / n) for p in c.peers if p.trusted
                       for n in ("planted.txt", "planted-dir"))

    c.wait_converged(CONVERGE_S)  # the real peers, among themselves
    assert_everywhere(c, "real.txt", content=b"real\n")
    assert untouched()
    # the real peers keep working while the intruder keeps trying
    write(c[1].data / "real2.txt", b"still working\n")
    c.wait_converged(CONVERGE_S)
    assert_everywhere(c, "real2.txt", content=b"still working\n")
    c.assert_stays(untouched, 5, "the intruder's tree is unchanged and its files are on "
                                 "no real peer")
    real = [p for p in c.peers if p.trusted]
    pairs = [(p, intruder) for p in real] + [(intruder, p) for p in real]
    for p, other in pairs:
        link = c.status(p.index).get("peers", {}).get(other.name, {})
        assert link.get("out") != "up" and link.get("in") != "up", \
            f"{p.name} reports a link with {other.name} up: {link}"
    assert_clean(c)


# ------------------------------------------------------------------------------ 9

def test_sigterm_exits_0_and_a_restart_with_nothing_changed_converges_at_once(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(3)
    c.start()
    a = c[0].data
    for d in range(3):
        (a / f"dir{d}").mkdir()
        for n in range(10):
            write(a / f"dir{d}" / f"f{n}", b"content %d %d\n" % (d, n) * (n + 1))
    os.symlink("dir0/f0", a / "ln")
    c.wait_converged(CONVERGE_S)
    c.wait_until(lambda: all(links_up(c, i, [j for j in range(3) if j != i])
                             for i in range(3)), CONVERGE_S, "every link is up")
    before = {i: c.fresh_status(i) for i in range(3)}

    c.stop(1)  # SIGTERM; stop() asserts exit status 0
    c.start(1)
    c.wait_until(lambda: links_up(c, 1, [0, 2]), 15,
                 "the restarted peer's links are up again, both ways")
    c.wait_converged(5)
    after = {i: c.fresh_status(i) for i in range(3)}
    for i in range(3):
        assert after[i]["last_seq"] == before[i]["last_seq"], \
            f"{c[i].name} recorded new versions on a restart where nothing changed"
    for i in (0, 2):
        assert content_bytes_sent(after[i]) == content_bytes_sent(before[i]), \
            f"{c[i].name} sent content to a peer that already had it all"
    received = sum(link.get("entries_received", 0) for link in after[1]["peers"].values())
    assert received == 0, f"the restarted peer was sent {received} entries it already had"

    # and it is live again
    write(c[1].data / "after-restart.txt", b"made after the restart\n")
    c.wait_converged(CONVERGE_S)
    assert_everywhere(c, "after-restart.txt", content=b"made after the restart\n")
    c.stop()
    assert_clean(c)


def test_a_file_changed_while_the_startup_scan_runs_after_it_was_read_is_recorded(
        make_cluster: MakeCluster) -> None:
    """A change landing after the startup scan read a file, but before the scan is over,
    is caught by its inotify event: the watches are up before the scan begins. (Taken the
    other way round, such a change waited for the hourly rescan.)"""
    c = make_cluster(2)
    a = c[0].data
    dirs, per_dir = 20, 1000
    for d in range(dirs):
        (a / f"d{d:02}").mkdir()
        for n in range(per_dir):
            write(a / f"d{d:02}" / f"f{n:04}", b"%d %d\n" % (d, n))
    total = dirs * per_dir + dirs
    db = c[0].state / "state.db"

    def recorded() -> tuple[int, bytes | None]:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
                rows = con.execute("select count(*) from entries").fetchone()[0]
                first = con.execute("select path from entries where kind = 1 "
                                    "order by seq limit 1").fetchone()
        except sqlite3.Error:  # not made yet
            return 0, None
        return rows, None if first is None else bytes(first[0])

    c.start(0, wait=False)
    seen: list[tuple[int, bytes | None]] = []
    c.wait_until(lambda: seen.append(recorded()) or seen[-1][1] is not None, 60,
                 "the startup scan records its first file")
    rows, first = seen[-1]
    assert first is not None
    changed = c[0].root / os.fsdecode(first)
    with open(changed, "ab") as f:
        f.write(b"appended during the scan\n")
    expected = read(changed)
    still_scanning = recorded()[0] < total
    c.wait_until(lambda: c.status_of(c[0]).get("pid") == c[0].proc.pid, 60,
                 "the daemon is up")
    c.start(1)
    c.wait_converged(CONVERGE_S)
    assert_everywhere(c, os.fsdecode(first)[len("data/"):], content=expected)
    # the window this test is about was open: the change landed mid-scan
    assert still_scanning or rows < total, \
        "the startup scan was over before the change: make the tree larger"


def test_a_peers_log_holding_only_our_versions_is_resumed_not_resent_after_a_restart(
        make_cluster: MakeCluster) -> None:
    """The peer's pusher sends none of its entries back to their origin, but says how far
    it read (PASSED): the origin's cursor moves past them, so a restart resumes there
    instead of having the peer page through its whole log again."""
    c = make_cluster(2)
    c.start()
    for n in range(200):
        write(c[0].data / f"f{n}", b"%d\n" % n)
    c.wait_converged(CONVERGE_S)
    db = c[0].state / "state.db"

    def cursor_seq() -> int:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
                row = con.execute("select seq from cursors where peer = ?",
                                  (c[1].name,)).fetchone()
        except sqlite3.Error:
            return -1
        return -1 if row is None else int(row[0])

    c.wait_until(lambda: cursor_seq() >= 200 and cursor_seq() == c.status(1)["last_seq"],
                 CONVERGE_S, f"{c[0].name} holds {c[1].name}'s log up to its last seq")
    c.stop(0)
    c.start(0)
    c.wait_until(lambda: links_up(c, 0, [1]), CONVERGE_S, "the links are up again")
    restarted = c.log_text(0).rsplit("--- harness: start #2", 1)[1]
    assert "sends everything it has" not in restarted, \
        f"{c[1].name} resent its whole log to {c[0].name} after a restart"
    write(c[0].data / "after", b"after\n")
    c.wait_converged(CONVERGE_S)


def test_a_users_file_of_a_daemon_name_renamed_into_place_reaches_the_peers(
        make_cluster: MakeCluster) -> None:
    """A user who writes ``.omirror-tmp-<hex>`` (the form of the daemon's temp files) and
    renames it over a file of the tree has changed that file like any other write: the
    change goes out at once, not at the next periodic rescan, an hour later."""
    c = make_cluster(2)
    c.start()
    a = c[0].data
    write(a / "index.html", b"the old page\n")
    c.wait_converged(CONVERGE_S)
    write(a / ".omirror-tmp-0123456789abcdef", b"the new page, put in place by a user\n")
    os.rename(a / ".omirror-tmp-0123456789abcdef", a / "index.html")
    c.wait_converged(CONVERGE_S)
    assert_everywhere(c, "index.html", content=b"the new page, put in place by a user\n")
    assert_clean(c)
