"""The one form of sizes and times that people read, wherever they read them."""

from __future__ import annotations

import pytest

from omirror.units import human_bytes, human_time


@pytest.mark.parametrize("n, shown", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (5 << 20, "5.0 MiB"), (3 << 30, "3.0 GiB"), (1 << 50, "1024.0 TiB"),
])
def test_sizes_are_binary_as_min_free_reads_them(n: int, shown: str) -> None:
    assert human_bytes(n) == shown


def test_the_same_size_reads_the_same_in_status_progress_and_the_disk_reserve() -> None:
    from omirror import diskspace, status

    reserve = diskspace.parse_reserve("512M")
    assert str(reserve) == human_bytes(512 << 20) == "512.0 MiB"
    text = status.render({"name": "a", "peers": {"b": {
        "bytes_sent": 3 << 20, "content_bytes_sent": 1 << 20,
        "bytes_received": 0, "content_bytes_received": 0}}})
    assert "3.0 MiB" in text and "1.0 MiB content" in text


def test_remaining_time_reads_like_a_clock() -> None:
    assert human_time(125) == "2:05" and human_time(3725) == "1:02:05"
