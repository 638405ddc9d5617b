"""The intent log: what a receive batch announces before it changes the tree."""

from __future__ import annotations

from pathlib import Path

from omirror import intents
from omirror.entry import Entry, Kind, Stamp


def test_the_largest_entry_a_peer_may_send_is_read_back_and_so_is_what_follows(
        tmp_path: Path) -> None:
    """An entry whose vector holds 256 origins of 255 characters (about 70 KB) arrives in
    one frame. Its record was longer than the reader's bound, so it and every record
    after it were dropped at the next start: those changes were re-stamped as local."""
    vector = tuple((f"{i:03d}" + "h" * 252, 10**18 + i) for i in range(256))
    big = Entry(b"d/" + b"p" * 4000, Kind.SYMLINK, Stamp(10**18 + 300, "a"), vector=vector,
                target=b"t" * 4000)
    small = Entry(b"d/after", Kind.FILE, Stamp(10**18 + 301, "a"), size=1, digest=b"\0" * 16)
    log = intents.IntentLog(tmp_path)
    log.note(intents.Intent(big, 7))
    log.note(intents.Intent(small, 8))
    log.close()
    assert (tmp_path / intents.FILE_NAME).stat().st_size > 64 << 10
    assert [(i.entry, i.ino) for i in intents.read(tmp_path)] == [(big, 7), (small, 8)]


def test_a_torn_last_record_is_dropped_and_the_ones_before_it_kept(tmp_path: Path) -> None:
    first = Entry(b"d/a", Kind.TOMBSTONE, Stamp(10**18, "a"))
    log = intents.IntentLog(tmp_path)
    log.note(intents.Intent(first, 0))
    log.note(intents.Intent(Entry(b"d/b", Kind.TOMBSTONE, Stamp(10**18 + 1, "a")), 0))
    log.close()
    path = tmp_path / intents.FILE_NAME
    path.write_bytes(path.read_bytes()[:-3])  # a crash in the middle of the second write
    assert [i.entry for i in intents.read(tmp_path)] == [first]
