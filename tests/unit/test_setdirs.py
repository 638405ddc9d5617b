"""A set's directories reached through descriptors: what a batch may reuse."""

from __future__ import annotations

import os
from pathlib import Path

from omirror import config
from omirror.scanner import MARKER
from omirror.setdirs import SetDirs

DISTFILE = "( /data ) -> ( alpha beta ) install ;\n"


def _tree(tmp_path: Path) -> tuple[Path, SetDirs, config.MirrorSet]:
    root = tmp_path / "root"
    (root / "data" / "d").mkdir(parents=True)
    (root / "data" / os.fsdecode(MARKER)).write_bytes(b"marker\n")
    return root, SetDirs(os.fsencode(root)), config.parse(DISTFILE, "test.conf").sets[0]


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
