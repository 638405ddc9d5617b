"""The low-disk guard's reserve: how it is written, and what it keeps free."""

from __future__ import annotations

import os

import pytest

from omirror.diskspace import DEFAULT_MIN_FREE, Reserve, parse_reserve, room


@pytest.mark.parametrize("text, reserve", [
    ("1%", Reserve(percent=1.0)), ("0.5 %", Reserve(percent=0.5)),
    ("512M", Reserve(size=512 << 20)), ("2GiB", Reserve(size=2 << 30)),
    ("1048576", Reserve(size=1 << 20)), ("64k", Reserve(size=64 << 10)),
    ("0", Reserve()),
])
def test_a_reserve_is_a_size_or_a_percentage(text: str, reserve: Reserve) -> None:
    assert parse_reserve(text) == reserve


@pytest.mark.parametrize("text", ["", "x", "-1", "1X", "100%", "150%", "%"])
def test_anything_else_is_refused_with_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="size|100%"):
        parse_reserve(text)


def test_no_reserve_is_false_and_the_default_keeps_one_percent(tmp_path: object) -> None:
    assert not Reserve() and DEFAULT_MIN_FREE
    fd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = os.fstatvfs(fd)
        free, keep = room(fd, DEFAULT_MIN_FREE)
        assert keep == int(st.f_blocks * st.f_frsize / 100)
        assert free == st.f_bavail * st.f_frsize
        assert room(fd, Reserve(size=12345))[1] == 12345
    finally:
        os.close(fd)
