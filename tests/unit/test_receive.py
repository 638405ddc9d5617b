"""The receiving side of a link in one process: what it holds when paths fail."""

from __future__ import annotations

import asyncio

import pytest
from linkfakes import Frames

from omirror import receive
from omirror.entry import Entry, Kind, Stamp
from omirror.link import Context, LinkStats
from omirror.receive import Receiver
from omirror.wire import EntryMsg


def test_a_link_with_too_many_failing_paths_takes_no_more_entries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What a peer can make this host hold is bounded: each path that cannot be applied
    is kept for a retry (without its content), up to MAX_FAILING per link; then the
    receiver takes no further entries (SSH flow control holds the peer) until one of
    them applies. Nothing is dropped."""
    monkeypatch.setattr(receive, "MAX_FAILING", 3)

    def msg(i: int) -> EntryMsg:
        return EntryMsg(i, Entry(b"data/f%d" % i, Kind.FILE, Stamp(i, "beta")), None)

    async def run() -> tuple[bool, bool]:
        ctx = Context("alpha", None, None, None, b"/", lambda peer: [], None)  # type: ignore[arg-type]
        receiver = Receiver(ctx, "beta", None, Frames(), LinkStats())
        for i in (1, 2):
            receiver._fail(msg(i), "No space left on device")
        await asyncio.wait_for(receiver._room_to_fail(), 5)  # two failing: room left
        receiver._fail(msg(3), "No space left on device")
        waiting = asyncio.ensure_future(receiver._room_to_fail())
        await asyncio.sleep(0.05)  # give it every chance to return wrongly
        held = not waiting.done()
        await receiver._settle(msg(2), None)  # data/f2 applies on a retry
        await asyncio.wait_for(waiting, 5)
        return held, b"data/f2" not in ctx.failing

    held, cleared = asyncio.run(run())
    assert held and cleared
