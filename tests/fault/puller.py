"""A puller for tests: a peer that asks a daemon for its log once, over a real SSH link,
and keeps every frame the daemon sends.

It plays a peer of the cluster with that peer's own key (``hostile.Hostile`` opens the
link through ``omirror.peers.open_link``, exactly as a daemon would) on the subsystem
``omirror-pull-1``: the daemon pushes to it until caught up, as it would to that peer's
``omirrord --once``. The puller acknowledges every ENTRY and PASSED it gets, as an honest
receiver does (so the daemon reaches its BYE), applies nothing, and records everything:
a test then counts what crossed the wire, not only what a real receiver would have
kept.
"""

from __future__ import annotations

import asyncio

from hostile import Closed, Hostile

from omirror.entry import Entry
from omirror.wire import PULL_SUBSYSTEM, Ack, Bye, Data, EntryMsg, Message, NoData, Passed, encode


class Puller(Hostile):
    """Peer ``me`` of cluster ``c``, pulling the log of peer ``target`` once."""

    def __enter__(self) -> Puller:
        return self

    def connect(self, subsystem: str = PULL_SUBSYSTEM, *, read: bool = True) -> Puller:
        super().connect(subsystem, read=read)
        return self

    def pull(self, timeout: float = 20) -> list[Message]:
        """Acknowledge what arrives until the daemon says BYE; return every frame
        received on the link. :class:`Closed` if the link ends without a BYE, an
        AssertionError if no BYE comes within ``timeout`` s."""

        async def run() -> None:
            assert self._arrived is not None
            seen, acked = 0, 0
            while True:
                async with self._arrived:
                    while len(self.received) == seen and not self.eof:
                        await self._arrived.wait()
                    new, seen, eof = self.received[seen:], len(self.received), self.eof
                if any(isinstance(m, Bye) for m in new):
                    return
                top = max((m.seq for m in new if isinstance(m, (EntryMsg, Passed))),
                          default=0)
                if top > acked:
                    self._writer.write(encode(Ack(top)))
                    await self._writer.drain()
                    acked = top
                if eof:
                    raise Closed(f"the daemon closed the pull without BYE (error: "
                                 f"{self.error}); got {self.received[-5:]}")

        try:
            self._call(asyncio.wait_for(run(), timeout), timeout + 10)
        except TimeoutError:
            raise AssertionError(f"no BYE within {timeout} s of pulling; got "
                                 f"{self.received[-5:]}") from None
        return list(self.received)

    def answer_to(self, want_id: int, timeout: float = 10) -> list[Message]:
        """Wait until the request ``want_id`` is answered (NODATA, or DATA up to its
        end); return every DATA and NODATA frame of that request."""
        self.wait_for(lambda m: (isinstance(m, NoData) and m.want_id == want_id)
                      or (isinstance(m, Data) and m.want_id == want_id and m.end),
                      timeout, f"the answer to request {want_id}")
        return [m for m in self.received
                if isinstance(m, (Data, NoData)) and m.want_id == want_id]

    def entry_msgs(self) -> list[EntryMsg]:
        return [m for m in self.received if isinstance(m, EntryMsg)]

    def entry_of(self, path: bytes) -> tuple[Entry, bytes | None] | None:
        """The last ENTRY received for ``path`` and its inline content, or None."""
        found = [m for m in self.entry_msgs() if m.entry.path == path]
        return (found[-1].entry, found[-1].data) if found else None
