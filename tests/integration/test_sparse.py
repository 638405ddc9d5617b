"""Sparse files keep their holes on every peer: fetched whole, small enough to travel
inline, relayed, and changed in place (a block delta). Real daemons on 127.0.0.1
(tests/integration/cluster.py); the trees live where pytest puts its temp dirs, whose
file system must report holes (ext4, xfs and tmpfs do), or the tests are skipped."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cluster import Cluster, file_digest

MakeCluster = Callable[..., Cluster]
KiB, MiB = 1 << 10, 1 << 20
CONVERGE_S = 60


@pytest.fixture(autouse=True)
def holes_reported(tmp_path: Path) -> None:
    """Skip unless the file system the cluster lives on reports holes."""
    probe = tmp_path / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x", MiB)
        ok = os.lseek(fd, 0, os.SEEK_HOLE) == 0 and os.fstat(fd).st_blocks * 512 < MiB
    except OSError:
        ok = False
    finally:
        os.close(fd)
        probe.unlink()
    if not ok:
        pytest.skip(f"the file system of {tmp_path} does not report holes")


def write_sparse(path: Path, size: int, pieces: dict[int, bytes]) -> None:
    """Write the file beside the mirrored tree (under the peer's root, outside /data),
    then rename it into place, so that the daemon sees it once, whole."""
    temp = path.parent.parent / ("unmirrored-" + path.name)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset, data in pieces.items():
            os.pwrite(fd, data, offset)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    os.rename(temp, path)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def content_sent(c: Cluster, i: int) -> int:
    return sum(link["content_bytes_sent"] for link in c.fresh_status(i)["peers"].values())


def arrived(c: Cluster, i: int, name: str, source: Path) -> Callable[[], bool]:
    """Peer ``i`` holds ``name`` with the content of ``source``."""
    def check() -> bool:
        there = c[i].data / name
        try:
            return there.stat().st_size == source.stat().st_size \
                and file_digest(there) == file_digest(source)
        except FileNotFoundError:
            return False
    return check


def test_a_sparse_64_mib_file_arrives_with_its_holes(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start()
    a = c[0].data / "disk.img"
    write_sparse(a, 64 * MiB, {10 * MiB: b"a" * (4 * KiB), 40 * MiB: b"b" * (4 * KiB)})
    assert allocated(a) < MiB
    c.wait_until(arrived(c, 1, "disk.img", a), CONVERGE_S, "B holds disk.img")
    b = c[1].data / "disk.img"
    assert allocated(b) < MiB, f"B's copy takes {allocated(b)} bytes on disk"
    with open(b, "rb") as f:
        assert f.read(4) == b"\0" * 4
        f.seek(40 * MiB)
        assert f.read(4 * KiB + 1) == b"b" * (4 * KiB) + b"\0"
    # the holes did not cross as zeros either
    assert content_sent(c, 0) < MiB
    c.wait_converged(CONVERGE_S)


def test_a_sparse_file_of_inline_size_keeps_its_hole_also_when_relayed(
        make_cluster: MakeCluster) -> None:
    """512 KiB would travel in its entry, which holds content densely: it goes without
    it, and is fetched. C, away while A wrote it, gets it from B alone (A is down):
    relayed by B, it keeps its holes too."""
    c = make_cluster(3)
    c.start()
    c.stop(2)
    a = c[0].data / "small.img"
    write_sparse(a, 512 * KiB, {0: b"h" * (4 * KiB), 256 * KiB: b"t" * (4 * KiB)})
    c.wait_until(arrived(c, 1, "small.img", a), CONVERGE_S, "B holds small.img")
    assert allocated(c[1].data / "small.img") < 128 * KiB
    c.stop(0)
    c.start(2)
    c.wait_until(arrived(c, 2, "small.img", c[1].data / "small.img"), CONVERGE_S,
                 "C holds small.img, from B")
    assert allocated(c[2].data / "small.img") < 128 * KiB
    c.start(0)
    c.wait_converged(CONVERGE_S)


def test_a_change_in_a_sparse_file_travels_as_a_delta_and_keeps_the_holes(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start()
    a = c[0].data / "vm.img"
    write_sparse(a, 64 * MiB, {8 * MiB: b"x" * MiB, 48 * MiB: b"y" * MiB})
    c.wait_until(arrived(c, 1, "vm.img", a), CONVERGE_S, "B holds vm.img")
    before = content_sent(c, 0)
    with open(a, "r+b") as f:  # in place, in the middle of a hole
        f.seek(32 * MiB)
        f.write(b"z" * (4 * KiB))
    c.wait_until(arrived(c, 1, "vm.img", a), CONVERGE_S, "B holds the new vm.img")
    b = c[1].data / "vm.img"
    assert allocated(b) < 3 * MiB, f"B's copy takes {allocated(b)} bytes on disk"
    with open(b, "rb") as f:
        f.seek(32 * MiB - 1)
        assert f.read(4 * KiB + 2) == b"\0" + b"z" * (4 * KiB) + b"\0"
    # a whole transfer would have sent the 2 MiB of data again; the delta sends the
    # changed block's data only, and its holes as holes
    assert content_sent(c, 0) - before < 64 * KiB
    c.wait_converged(CONVERGE_S)
