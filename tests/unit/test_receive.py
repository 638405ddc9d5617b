"""The receiving side of a link in one process: what it holds when paths fail."""

from __future__ import annotations

import asyncio

import pytest
from linkfakes import Frames

from omirror import receive
from omirror.entry import Entry, Kind, Stamp
from omirror.link import Context, LinkStats
from omirror.receive import Receiver
from omirror.wire import Direct, EntryMsg


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


def test_a_receiver_tells_its_pusher_which_hosts_reach_it_directly() -> None:
    """DIRECT lists the peers whose links into this host are up (not the pusher itself),
    and is sent again when that changes: the pusher then relays those hosts' versions
    without content, and with it again once such a link is down."""
    async def run() -> list[object]:
        ctx = Context("alpha", None, None, None, b"/", lambda peer: [], None)  # type: ignore[arg-type]
        frames = Frames()
        receiver = Receiver(ctx, "beta", None, frames, LinkStats())
        ctx.receiving("beta", True)
        ctx.receiving("gamma", True)
        telling = asyncio.ensure_future(receiver._tell_direct())

        async def until(n: int) -> None:
            for _ in range(500):
                if len(frames.sent) >= n:
                    return
                await asyncio.sleep(0.01)
        await until(1)
        ctx.receiving("delta", True)
        await until(2)
        ctx.receiving("gamma", True)  # a reconnect: the new link is up before the old ends
        ctx.receiving("gamma", False)
        ctx.receiving("delta", False)
        await until(3)
        ctx.receiving("gamma", False)
        await until(4)
        telling.cancel()
        return frames.sent

    assert asyncio.run(run()) == [Direct(("gamma",)), Direct(("delta", "gamma")),
                                  Direct(("gamma",)), Direct(())]
