"""Hard links stay links: real daemons on 127.0.0.1 (tests/integration/cluster.py).

Two names of one inode in a set are two names of one inode on every peer: the content
crosses once and the other name is linked to it, across renames, deletions and content
written through one name. Nothing here sleeps to synchronise: each step waits, with a
bound, until the trees say the right thing.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from cluster import Cluster

MakeCluster = Callable[..., Cluster]
CONVERGE_S = 30


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def linked(*paths: Path) -> bool:
    """All the paths exist and are one inode."""
    try:
        stats = [os.lstat(p) for p in paths]
    except FileNotFoundError:
        return False
    return len({(st.st_dev, st.st_ino) for st in stats}) == 1


def test_a_link_made_on_one_peer_is_a_link_on_the_other(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start()
    a, b = c[0].data, c[1].data
    (a / "d").mkdir()
    (a / "f").write_bytes(b"one content, two names\n")
    os.link(a / "f", a / "d" / "g")
    c.wait_until(lambda: linked(b / "f", b / "d" / "g"), CONVERGE_S,
                 "f and d/g are one inode on B")
    assert (b / "d" / "g").read_bytes() == b"one content, two names\n"

    # content written through one name, in place: no event for the other name
    new = b"new content, written through f only\n" * 100
    with open(a / "f", "r+b") as f:
        f.write(new)
    c.wait_until(lambda: read(b / "d" / "g") == new and linked(b / "f", b / "d" / "g"),
                 CONVERGE_S, "both names hold the new content, linked, on B")
    c.wait_converged(CONVERGE_S)
    assert linked(b / "f", b / "d" / "g") and os.lstat(b / "f").st_nlink == 2
    assert c.temp_files(1) == []


def test_renaming_or_deleting_one_name_keeps_the_link(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start()
    a, b = c[0].data, c[1].data
    (a / "x").write_bytes(b"linked\n")
    os.link(a / "x", a / "y")
    c.wait_until(lambda: linked(b / "x", b / "y"), CONVERGE_S, "x and y linked on B")

    os.rename(a / "x", a / "z")
    c.wait_until(lambda: not (b / "x").exists() and linked(b / "z", b / "y"), CONVERGE_S,
                 "x renamed to z on B, still linked with y")

    os.unlink(a / "y")
    c.wait_until(lambda: not (b / "y").exists(), CONVERGE_S, "y deleted on B")
    assert (b / "z").read_bytes() == b"linked\n" and os.lstat(b / "z").st_nlink == 1
    c.wait_converged(CONVERGE_S)


def test_a_link_found_by_the_catch_up_scan_crosses_once(make_cluster: MakeCluster) -> None:
    """A file and its link made before B ever ran: B links them, and the content crossed
    once (A's status counts the content bytes it sent to B)."""
    c = make_cluster(2)
    a, b = c[0].data, c[1].data
    content = os.urandom(200_000)
    (a / "sub").mkdir()
    (a / "big").write_bytes(content)
    os.link(a / "big", a / "sub" / "other-name")
    c.start(0)
    c.start(1)
    c.wait_until(lambda: linked(b / "big", b / "sub" / "other-name"), CONVERGE_S,
                 "both names linked on B")
    assert (b / "big").read_bytes() == content
    c.wait_converged(CONVERGE_S)
    sent = c.fresh_status(0)["peers"][c[1].name]["content_bytes_sent"]
    received = c.fresh_status(1)["peers"][c[0].name]["content_bytes_received"]
    assert sent == len(content) and received == len(content)


def link_groups(root: Path) -> set[frozenset[str]]:
    """The names under ``root`` that share an inode, as sets of relative paths (files
    with one name are groups of one)."""
    groups: dict[tuple[int, int], set[str]] = {}
    for directory, _, names in os.walk(root):
        for name in names:
            if name.startswith(".omirror"):
                continue
            p = Path(directory, name)
            st = os.lstat(p)
            groups.setdefault((st.st_dev, st.st_ino), set()).add(str(p.relative_to(root)))
    return {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize("seed, peers", [(20261202, 2), (7, 3)])
def test_random_link_writes_renames_and_deletions_end_with_the_same_links(
        make_cluster: MakeCluster, seed: int, peers: int) -> None:
    """A few hundred operations on A among a handful of names, links included, run back
    to back: every peer ends with the same content and the same names sharing inodes."""
    c = make_cluster(peers)
    c.start()
    a, b = c[0].data, c[1].data
    (a / "d").mkdir()
    rng = random.Random(seed)
    names = ["f1", "f2", "f3", "d/g1", "d/g2", "d/g3"]
    for step in range(300):
        existing = [n for n in names if (a / n).exists()]
        op = rng.choice(["write", "write", "append", "link", "link", "rename", "delete"])
        target = rng.choice(names)
        if op == "write" or not existing:
            (a / target).write_bytes(b"%d " % step * rng.randint(1, 300))
        elif op == "append":
            with open(a / rng.choice(existing), "ab") as f:
                f.write(b"+%d" % step)
        elif op == "link":
            source = rng.choice(existing)
            if source != target:
                if (a / target).exists():
                    (a / target).unlink()
                os.link(a / source, a / target)
        elif op == "rename":
            source = rng.choice(existing)
            if source != target:
                os.rename(a / source, a / target)
        else:
            (a / rng.choice(existing)).unlink()
    c.wait_until(lambda: c.converged() and all(
        link_groups(a) == link_groups(p.data) for p in c.peers[1:]), 60,
        "every peer holds A's content with A's links")
    assert link_groups(b) == link_groups(a)
