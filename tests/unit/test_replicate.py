"""The pusher's answer to a WANT whose file does not hold the version its record names."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import xxhash

from omirror import config
from omirror.apply import Applier
from omirror.replicate import Context, LinkStats, Pusher
from omirror.scanner import MARKER, Scanner
from omirror.store import Store
from omirror.wire import Data, NoData, Want, decode

DISTFILE = "( /data ) -> ( alpha beta ) install ;\n"


class Frames:
    """A writer that keeps the messages it is given."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def write(self, frame: bytes) -> None:
        self.sent.append(decode(frame[4:]))

    async def drain(self) -> None:
        return None


def test_a_file_that_does_not_hold_its_recorded_version_is_hashed_again(
        tmp_path: Path) -> None:
    """NODATA tells the peer a newer entry follows. When the record itself is wrong (it
    names content the file never held), no event would ever bring that entry: the pusher
    rehashes the file, and its real content becomes a new version for every peer."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / os.fsdecode(MARKER)).write_bytes(b"marker\n")
    f = root / "data" / "f"
    f.write_bytes(b"what the file holds")
    mset = config.parse(DISTFILE, "test.conf").sets[0]
    store = Store.open(tmp_path / "state")
    scanner = Scanner(store, "alpha")
    scanner.scan_set(mset, os.fsencode(root))
    # a record that names other content with the file's very stat: no scan looks again
    record = store.get(b"data/f")
    wrong = xxhash.xxh3_128(b"what the record says").digest()
    with store._lock, store._conn:  # the only way to make such a record by hand
        store._conn.execute("UPDATE entries SET digest=? WHERE path=?", (wrong, b"data/f"))
    assert store.get(b"data/f").entry.digest == wrong

    async def run() -> list[object]:
        async def tree(fn, *args):  # type: ignore[no-untyped-def]
            return fn(*args)
        ctx = Context("alpha", store, Applier(os.fsencode(root), store, "alpha"), scanner,
                      os.fsencode(root), lambda peer: [mset], tree)
        frames = Frames()
        pusher = Pusher(ctx, "beta", None, frames, LinkStats())
        await pusher._serve(Want(1, b"data/f", wrong, 0, ()))
        return frames.sent

    sent = asyncio.run(run())
    assert isinstance(sent[-1], NoData) and any(isinstance(m, Data) for m in sent)
    after = store.get(b"data/f").entry
    assert after.digest == xxhash.xxh3_128(b"what the file holds").digest()
    assert after.stamp > record.entry.stamp and store.get(b"data/f").seq > record.seq
    store.close()


def test_a_pusher_that_is_done_waits_for_the_acknowledgement_of_its_last_passed(
        tmp_path: Path) -> None:
    """The receiver acknowledges a PASSED like entries; a BYE sent before that would
    leave the acknowledgement to a closed channel (``--once`` then failed its peer)."""
    store = Store.open(tmp_path / "state")

    async def run() -> tuple[list[object], list[object]]:
        async def tree(fn, *args):  # type: ignore[no-untyped-def]
            return fn(*args)
        ctx = Context("alpha", store, None, None, b"/", lambda peer: [], tree)  # type: ignore[arg-type]
        frames = Frames()
        pusher = Pusher(ctx, "beta", None, frames, LinkStats(), once=True)
        pusher.passed = 7
        finishing = asyncio.ensure_future(pusher._finish())
        await asyncio.sleep(0)  # let it run up to its wait
        before = list(frames.sent)
        pusher.stats.acked_seq = 7
        pusher.acked.set()
        await asyncio.wait_for(finishing, 5)
        return before, frames.sent

    before, after = asyncio.run(run())
    assert before == [] and [type(m).__name__ for m in after] == ["Bye"]
    store.close()
