"""A live change read once: what the watcher's scans read is what the pushers send."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from linkfakes import Frames

from omirror import config, push
from omirror.link import Context, LinkStats
from omirror.push import Pusher
from omirror.recent import MAX_FILE, RecentContent
from omirror.scanner import MARKER, Scanner
from omirror.store import Record, Store
from omirror.wire import EntryMsg

DISTFILE = "( /data ) -> ( alpha beta ) install ;\n"


def test_the_oldest_content_goes_first_and_a_large_file_is_never_held() -> None:
    recent = RecentContent(max_bytes=10)
    recent.put(b"a", b"da", b"1234")
    recent.put(b"b", b"db", b"5678")
    assert recent.get(b"a", b"da") == b"1234"
    assert recent.get(b"a", b"other digest") is None  # another version of the path
    recent.put(b"c", b"dc", b"90ab")  # over 10 bytes: the oldest put goes
    assert recent.get(b"a", b"da") is None
    assert recent.get(b"b", b"db") == b"5678" and recent.get(b"c", b"dc") == b"90ab"
    assert recent.size == 8
    recent.put(b"d", b"dd", b"x" * 11)
    assert recent.get(b"d", b"dd") is None and recent.size == 8
    big = RecentContent()
    big.put(b"e", b"de", b"x" * (MAX_FILE + 1))
    assert big.size == 0


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, Store, Scanner, config.MirrorSet]:
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / os.fsdecode(MARKER)).write_bytes(b"marker\n")
    store = Store.open(tmp_path / "state")
    scanner = Scanner(store, "alpha")
    mset = config.parse(DISTFILE, "test.conf").sets[0]
    scanner.scan_set(mset, os.fsencode(root))
    yield root, store, scanner, mset
    store.close()


def test_only_the_scans_of_live_events_keep_what_they_read(
        host: tuple[Path, Store, Scanner, config.MirrorSet]) -> None:
    root, store, scanner, mset = host
    (root / "data" / "small").write_bytes(b"small file\n")
    (root / "data" / "large").write_bytes(b"y" * (MAX_FILE + 1))
    with open(root / "data" / "sparse", "wb") as f:
        f.truncate(64 << 10)
        f.write(b"data at the start, a hole after it")
    scanner.scan_set(mset, os.fsencode(root))  # a full scan keeps nothing
    assert scanner.recent.size == 0
    for name in ("small", "large", "sparse"):
        (root / "data" / name).write_bytes((root / "data" / name).read_bytes() + b"more")
    with open(root / "data" / "sparse", "r+b") as f:
        f.truncate(128 << 10)
    scanner.scan_paths(mset, os.fsencode(root), [(b"data/small", False)])
    assert scanner.recent.size == 0  # not a scan of live events
    scanner.scan_paths(mset, os.fsencode(root),
                       [(b"data/small", False), (b"data/large", False),
                        (b"data/sparse", False)], force=True, keep=True)
    small = store.get(b"data/small")
    assert small is not None
    assert scanner.recent.get(b"data/small", small.entry.digest) == b"small file\nmore"
    for name in (b"data/large", b"data/sparse"):
        record = store.get(name)
        assert record is not None and scanner.recent.get(name, record.entry.digest) is None


def _sent(root: Path, store: Store, scanner: Scanner, mset: config.MirrorSet,
          path: bytes) -> list[EntryMsg]:
    async def run() -> list[EntryMsg]:
        async def tree(fn, *args):  # type: ignore[no-untyped-def]
            return fn(*args)
        ctx = Context("alpha", store, None, scanner, os.fsencode(root),  # type: ignore[arg-type]
                      lambda peer: [mset], tree)
        frames = Frames()
        streaming = asyncio.ensure_future(Pusher(ctx, "beta", None, frames,
                                                 LinkStats())._stream(0))
        for _ in range(500):
            if any(isinstance(m, EntryMsg) and m.entry.path == path for m in frames.sent):
                break
            await asyncio.sleep(0.01)
        streaming.cancel()
        return [m for m in frames.sent if isinstance(m, EntryMsg) and m.entry.path == path]
    return asyncio.run(run())


def test_a_live_change_goes_out_as_it_was_read_and_a_later_version_is_read_again(
        host: tuple[Path, Store, Scanner, config.MirrorSet],
        monkeypatch: pytest.MonkeyPatch) -> None:
    root, store, scanner, mset = host
    (root / "data" / "f").write_bytes(b"version one\n")
    scanner.scan_paths(mset, os.fsencode(root), [(b"data/f", False)], keep=True)
    read_again: list[bytes] = []
    read_inline = push._read_inline

    def counted(root_: bytes, records: list[Record],
                sets: list[config.MirrorSet]) -> dict[bytes, bytes]:
        read_again.extend(r.entry.path for r in records)
        return read_inline(root_, records, sets)
    monkeypatch.setattr(push, "_read_inline", counted)
    sent = _sent(root, store, scanner, mset, b"data/f")
    assert [m.data for m in sent] == [b"version one\n"] and read_again == []
    # a version recorded by a scan that kept nothing: what was kept is of another digest
    (root / "data" / "f").write_bytes(b"version two, longer\n")
    scanner.scan_paths(mset, os.fsencode(root), [(b"data/f", False)])
    sent = _sent(root, store, scanner, mset, b"data/f")
    assert [m.data for m in sent] == [b"version two, longer\n"]
    assert read_again == [b"data/f"]
