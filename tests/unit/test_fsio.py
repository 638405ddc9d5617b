"""Content as the file system holds it: data and holes, and digests that do not care."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from omirror import fsio

KiB, MiB = 1 << 10, 1 << 20
#: Where the data of the sparse file lies: 8 KiB at each offset, holes between.
PIECES = ((10 * MiB, b"a" * (8 * KiB)), (40 * MiB, b"b" * (8 * KiB)))
SIZE = 64 * MiB


def holes_reported(where: Path) -> bool:
    """The file system of ``where`` reports holes (ext4, xfs, tmpfs do)."""
    probe = where / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x", MiB)
        return os.lseek(fd, 0, os.SEEK_HOLE) == 0 and os.fstat(fd).st_blocks * 512 < MiB
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


@pytest.fixture
def sparse_dir(tmp_path: Path) -> Path:
    if not holes_reported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} does not report holes")
    return tmp_path


def make_sparse(path: Path, pieces: tuple[tuple[int, bytes], ...] = PIECES,
                size: int = SIZE) -> bytes:
    """Write a sparse file; return the same content, dense."""
    dense = bytearray(size)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for offset, data in pieces:
            os.pwrite(fd, data, offset)
            dense[offset:offset + len(data)] = data
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return bytes(dense)


def opened(path: Path) -> int:
    return os.open(path, os.O_RDONLY)


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes each ``os.pread`` returned, from now on."""
    reads: list[int] = []
    real: Callable[[int, int, int], bytes] = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        data = real(fd, n, offset)
        reads.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", pread)
    return reads


def test_extents_cover_the_file_and_name_its_data(sparse_dir: Path) -> None:
    make_sparse(sparse_dir / "f")
    fd = opened(sparse_dir / "f")
    try:
        ranges = list(fsio.extents(fd, 0, SIZE))
        tail = list(fsio.extents(fd, 40 * MiB + 4 * KiB, SIZE))
    finally:
        os.close(fd)
    # contiguous from 0 to the end, data and holes alternating
    assert ranges[0][0] == 0 and sum(length for _, length, _ in ranges) == SIZE
    for (o1, l1, d1), (o2, _, d2) in itertools.pairwise(ranges):
        assert o1 + l1 == o2 and d1 != d2
    data = [(o, n) for o, n, is_data in ranges if is_data]
    assert data == [(offset, len(piece)) for offset, piece in PIECES]
    assert ranges[-1][2] is False  # the file ends in a hole
    # a walk from the middle of a data range starts there
    assert tail[0] == (40 * MiB + 4 * KiB, 4 * KiB, True) and tail[1][2] is False


def test_a_dense_file_is_one_range_of_data_and_has_no_hole(sparse_dir: Path) -> None:
    (sparse_dir / "dense").write_bytes(b"d" * (3 * MiB))
    (sparse_dir / "empty").write_bytes(b"")
    make_sparse(sparse_dir / "sparse")
    fds = {name: opened(sparse_dir / name) for name in ("dense", "empty", "sparse")}
    try:
        assert list(fsio.extents(fds["dense"], 0, 3 * MiB)) == [(0, 3 * MiB, True)]
        assert list(fsio.extents(fds["empty"], 0, 0)) == []
        holes = {name: fsio.has_hole(fd, os.fstat(fd)) for name, fd in fds.items()}
    finally:
        for fd in fds.values():
            os.close(fd)
    assert holes == {"dense": False, "empty": False, "sparse": True}


def test_the_digest_of_a_sparse_file_is_that_of_its_bytes_and_holes_are_not_read(
        sparse_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dense = make_sparse(sparse_dir / "sparse")
    (sparse_dir / "dense").write_bytes(dense)
    fd, dense_fd = opened(sparse_dir / "sparse"), opened(sparse_dir / "dense")
    try:
        expected = fsio.digest_fd(dense_fd)
        reads = count_reads(monkeypatch)
        got = fsio.digest_fd(fd)
    finally:
        os.close(fd)
        os.close(dense_fd)
    assert got == expected == (fsio.digest_bytes(dense), SIZE)
    assert sum(reads) == 16 * KiB  # the data only; 64 MiB of holes never read


def test_block_digests_of_a_sparse_file_are_those_of_its_bytes(
        sparse_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dense = make_sparse(sparse_dir / "sparse")
    (sparse_dir / "dense").write_bytes(dense)
    fd, dense_fd = opened(sparse_dir / "sparse"), opened(sparse_dir / "dense")
    try:
        blocks, whole = fsio.block_digests(dense_fd, MiB)
        reads = count_reads(monkeypatch)
        assert fsio.block_digests(fd, MiB) == (blocks, whole)
        assert sum(reads) == 16 * KiB
        theirs = list(blocks)
        theirs[10] = b"\0" * 16  # the block of the first piece differs there
        same, whole_again = fsio.compare_blocks(fd, MiB, theirs[:50])
    finally:
        os.close(fd)
        os.close(dense_fd)
    assert whole == whole_again == fsio.digest_bytes(dense)
    assert len(blocks) == 64
    assert blocks[0] == fsio.digest_bytes(bytes(MiB))
    assert blocks[10] == fsio.digest_bytes(dense[10 * MiB:11 * MiB])
    # beyond the 50 digests given, nothing matches; the whole digest still counts them
    assert list(same) == [0 if i == 10 or i >= 50 else 1 for i in range(64)]


def test_a_block_partly_hole_is_read_only_where_it_holds_data(
        sparse_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One 4 MiB block holding both pieces of a smaller file."""
    pieces = ((4 * KiB, b"x" * (4 * KiB)), (1 * MiB, b"y" * (4 * KiB)))
    dense = make_sparse(sparse_dir / "f", pieces, 3 * MiB)
    fd = opened(sparse_dir / "f")
    try:
        reads = count_reads(monkeypatch)
        blocks, whole = fsio.block_digests(fd, 4 * MiB)
    finally:
        os.close(fd)
    assert blocks == [fsio.digest_bytes(dense)] and whole == fsio.digest_bytes(dense)
    assert sum(reads) == 8 * KiB


def test_zeros_are_hashed_in_pieces_as_one_run() -> None:
    digest = fsio.new_digest()
    fsio.hash_zeros(digest, 3 * fsio.CHUNK + 5)
    assert digest.digest() == fsio.digest_bytes(bytes(3 * fsio.CHUNK + 5))


@pytest.mark.parametrize("trailing_hole", [True, False])
def test_a_copy_keeps_the_holes_and_the_content(sparse_dir: Path, trailing_hole: bool) -> None:
    """What conflict copies and kept versions are made with: a sparse file stays sparse."""
    pieces = PIECES if trailing_hole else (*PIECES, (SIZE - 4 * KiB, b"c" * (4 * KiB)))
    source = sparse_dir / "source"
    make_sparse(source, pieces)
    copy = sparse_dir / "copy"
    src, dst = opened(source), os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fsio.copy_data(src, dst)
    finally:
        os.close(src)
        os.close(dst)
    assert copy.read_bytes() == source.read_bytes()
    assert os.stat(copy).st_size == SIZE
    assert os.stat(copy).st_blocks * 512 < MiB


def test_a_copy_of_a_dense_file_is_the_same_bytes(tmp_path: Path) -> None:
    source, copy = tmp_path / "source", tmp_path / "copy"
    source.write_bytes(os.urandom(3 * MiB + 5))
    src, dst = opened(source), os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fsio.copy_data(src, dst)
    finally:
        os.close(src)
        os.close(dst)
    assert copy.read_bytes() == source.read_bytes()
