"""Temp files: content built from data, holes and ranges of an older version."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash
from test_fsio import holes_reported, make_sparse

from omirror.entry import Entry, Kind, Stamp
from omirror.errors import ApplyError
from omirror.staging import TempFile

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def where(tmp_path: Path) -> Path:
    if not holes_reported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} does not report holes")
    return tmp_path


def entry_of(content: bytes) -> Entry:
    return Entry(path=b"data/f", kind=Kind.FILE, stamp=Stamp(1, "beta"), size=len(content),
                 digest=xxhash.xxh3_128(content).digest())


def temp_in(where: Path, content: bytes) -> TempFile:
    return TempFile(os.open(where, os.O_RDONLY | os.O_DIRECTORY), entry_of(content))


def built(where: Path, temp: TempFile) -> tuple[bytes, os.stat_result]:
    temp.finish()
    st = os.fstat(temp.fd)
    return (where / os.fsdecode(temp.name)).read_bytes(), st


def test_data_hole_data_and_a_trailing_hole_end_as_holes(where: Path) -> None:
    content = b"a" * (8 * KiB) + bytes(30 * MiB) + b"b" * (8 * KiB) + bytes(30 * MiB)
    with temp_in(where, content) as temp:
        temp.write(b"a" * (8 * KiB))
        temp.hole(30 * MiB)
        # the descriptor's offset is the bytes built so far, holes included
        assert os.lseek(temp.fd, 0, os.SEEK_CUR) == temp.size == 8 * KiB + 30 * MiB
        temp.write(b"b" * (8 * KiB))
        temp.hole(30 * MiB)
        data, st = built(where, temp)
    assert data == content and st.st_size == len(content)
    assert st.st_blocks * 512 < MiB  # 16 KiB of data, 60 MiB of holes
    assert (temp.data_bytes, temp.holes) == (16 * KiB, True)


def test_a_dense_large_file_is_still_allocated_as_it_comes(where: Path) -> None:
    content = b"z" * (3 * MiB)
    with temp_in(where, content) as temp:
        for i in range(3):
            temp.write(content[i * MiB:(i + 1) * MiB])
        data, st = built(where, temp)
    assert data == content and st.st_blocks * 512 >= 3 * MiB


def test_a_hole_past_the_end_of_the_entry_is_refused_and_leaves_nothing(
        where: Path) -> None:
    """A hostile HOLE longer than the file the WANT is for: the temp file goes."""
    content = b"a" * 4096 + bytes(MiB)
    temp = temp_in(where, content)
    temp.write(b"a" * 4096)
    with pytest.raises(ApplyError, match="more content than the"):
        temp.hole(MiB + 1)
    assert temp.fd == -1
    assert [n for n in os.listdir(where) if n.startswith(".omirror")] == []


def test_a_wrong_hole_fails_the_digest(where: Path) -> None:
    """A hole where the content holds data builds zeros, which its digest refuses."""
    content = b"q" * (2 * MiB)
    temp = temp_in(where, content)
    temp.hole(MiB)
    temp.write(b"q" * MiB)
    with pytest.raises(ApplyError, match="does not match its digest"):
        temp.finish()


def test_a_delta_copies_the_holes_of_the_old_version_as_holes(where: Path) -> None:
    old = make_sparse(where / "old", ((0, b"o" * (4 * KiB)), (20 * MiB, b"p" * (4 * KiB))),
                      32 * MiB)
    new = old[:16 * MiB] + b"n" * (4 * KiB) + old[16 * MiB + 4 * KiB:]
    old_fd = os.open(where / "old", os.O_RDONLY)
    try:
        with temp_in(where, new) as temp:
            temp.copy_from(old_fd, 0, 16 * MiB)
            temp.write(b"n" * (4 * KiB))
            temp.copy_from(old_fd, 16 * MiB + 4 * KiB, 16 * MiB - 4 * KiB)
            data, st = built(where, temp)
    finally:
        os.close(old_fd)
    assert data == new
    assert st.st_blocks * 512 < MiB


def test_a_copy_from_a_file_that_ends_early_is_refused(where: Path) -> None:
    (where / "short").write_bytes(b"s" * 100)
    fd = os.open(where / "short", os.O_RDONLY)
    try:
        temp = temp_in(where, b"s" * 200)
        with pytest.raises(ApplyError, match="ended 100 bytes early"):
            temp.copy_from(fd, 0, 200)
    finally:
        os.close(fd)
    assert temp.fd == -1
