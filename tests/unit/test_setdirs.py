"""A set's directories reached through descriptors: what a batch may reuse."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash

from omirror import config
from omirror.entry import Entry, Kind, Stamp
from omirror.scanner import MARKER
from omirror.setdirs import SetDirs
from omirror.staging import Prepared

DISTFILE = "( /data ) -> ( alpha beta ) install ;\n"


def _tree(tmp_path: Path) -> tuple[Path, SetDirs, config.MirrorSet]:
    root = tmp_path / "root"
    (root / "data" / "d").mkdir(parents=True)
    (root / "data" / os.fsdecode(MARKER)).write_bytes(b"marker\n")
    return root, SetDirs(os.fsencode(root)), config.parse(DISTFILE, "test.conf").sets[0]


def _file(path: bytes) -> Entry:
    return Entry(path, Kind.FILE, Stamp(10**18, "beta"), vector=(("beta", 10**18),),
                 mode=0o644, owner="root", group="root", mtime_ns=10**18, size=1,
                 digest=xxhash.xxh3_128(b"x").digest())


def _where(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def test_a_batch_reuses_a_directory_it_opened_while_it_is_where_its_path_says(
        tmp_path: Path) -> None:
    root, dirs, mset = _tree(tmp_path)
    with dirs.holding_roots():
        first = dirs.open_parent(mset, b"data/d/f", create=False, action="write")
        assert first is not None and first[1] == b"f"
        assert _where(first[0]) == str(root / "data" / "d")
        second = dirs.open_parent(mset, b"data/d/g", create=False, action="write")
        assert second is not None and _where(second[0]) == str(root / "data" / "d")
        assert list(dirs._parents) == [b"data/d"]
    assert dirs._parents == {}  # nothing is held beyond the batch


def test_a_directory_renamed_during_a_batch_is_never_written_through(
        tmp_path: Path) -> None:
    """A user who can write the tree may move a directory away (even out of the tree)
    between two files of one batch: what the batch held of it is checked before each
    use, so the next file's directory is looked up again, by its path."""
    root, dirs, mset = _tree(tmp_path)
    outside = tmp_path / "outside"
    with dirs.holding_roots():
        opened = dirs.open_parent(mset, b"data/d/f", create=False, action="write")
        assert opened is not None
        os.close(opened[0])
        os.rename(root / "data" / "d", outside)
        assert dirs.open_parent(mset, b"data/d/g", create=False, action="write") is None
        (root / "data" / "d").mkdir()  # a new directory of that name: that one is used
        again = dirs.open_parent(mset, b"data/d/g", create=False, action="write")
        assert again is not None and _where(again[0]) == str(root / "data" / "d")
        os.rmdir(root / "data" / "d")  # removed: not used either
        assert dirs.open_parent(mset, b"data/d/h", create=False, action="write") is None


def test_a_prepared_file_is_taken_without_a_walk_only_while_its_directory_is_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file written ahead is installed only into the directory its path names now.
    Told by one readlink while that directory is in place (a walk per file was a
    sizeable part of a receiver's time); once it was moved away, or replaced by a
    directory of the same name, the temp file is not used."""
    root, dirs, mset = _tree(tmp_path)
    walks: list[bytes] = []
    walk = SetDirs.open_parent

    def counted(self: SetDirs, mset: config.MirrorSet, path: bytes, **kw: object
                ) -> tuple[int, bytes] | None:
        walks.append(path)
        return walk(self, mset, path, **kw)  # type: ignore[arg-type]
    prepared = Prepared(dirs)
    entries = {name: _file(b"data/d/" + name) for name in (b"f", b"g", b"h")}
    for entry in entries.values():
        assert prepared.prepare(mset, entry, b"x", 0)
    monkeypatch.setattr(SetDirs, "open_parent", counted)
    taken = prepared.take(mset, entries[b"f"])
    assert taken is not None and walks == []
    taken.abort()
    os.rename(root / "data" / "d", tmp_path / "away")
    (root / "data" / "d").mkdir()
    assert prepared.take(mset, entries[b"g"]) is None
    assert walks == [b"data/d/g"]  # not told so by the readlink: looked up, and refused
    os.rmdir(root / "data" / "d")
    assert prepared.take(mset, entries[b"h"]) is None
    assert os.listdir(tmp_path / "away") == []  # the temp files not taken are removed
