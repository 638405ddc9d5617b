"""``--bwlimit``: a token bucket that paces what one link writes.

A first scan of a big tree, or a tree restored from a backup, would otherwise take the
whole of a line the mirrored services share (a WAN link between sites). Each link
(one SSH session, one direction of replication) gets a bucket of its own; the stream
asks it before each piece it writes (omirror/link.py ``Stream.flush``), so entries,
inline content, DATA chunks, ACKs and WANTs all count.

The bucket holds a number, never data: what waits is only the frames the stream had
queued anyway. A write that finds too few tokens takes them on credit and sleeps on the
event loop (``asyncio.sleep``) until the credit is paid, so the loop runs on and a
second writer of the same link, who asks later, waits behind the first one's debt. A
write larger than the burst goes in pieces (:data:`PIECE`), so the line sees an even
flow and not a second's worth at once and then silence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

KIB = 1024
#: How much an idle link may write at once before pacing starts, in seconds of its rate:
#: an ACK or a lone small file goes at once, a transfer settles at the rate within a
#: second.
BURST_S = 1.0
#: The largest piece written at once when paced (less when the burst is smaller).
PIECE = 64 << 10


class Bucket:
    """Tokens are bytes; they refill at ``rate`` per second up to ``burst``.

    ``clock`` and ``sleep`` are the monotonic clock and ``asyncio.sleep``; tests give
    a fake clock whose sleep advances it.
    """

    def __init__(self, rate: float, *, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        if rate <= 0:
            raise ValueError(f"a bandwidth limit must be positive, not {rate}")
        self.rate = float(rate)
        self.burst = self.rate * BURST_S if burst is None else float(burst)
        self.piece = max(1, min(PIECE, int(self.burst)))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._at = clock()
        #: Seconds the writers of this bucket were told to wait, in all.
        self.waited = 0.0
        self._writing = asyncio.Lock()

    @classmethod
    def kib(cls, kib_per_s: int) -> Bucket | None:
        """The bucket of ``--bwlimit KIB``; None for 0, no limit."""
        return cls(kib_per_s * KIB) if kib_per_s > 0 else None

    def reserve(self, n: int) -> float:
        """Take ``n`` bytes' tokens now, on credit if need be, and return how many
        seconds to wait before writing them (0 when they were there)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def take(self, n: int) -> float:
        """Wait until ``n`` bytes may be written; the seconds waited."""
        wait = self.reserve(n)
        if wait > 0:
            self.waited += wait
            await self._sleep(wait)
        return wait

    async def write(self, writer: Any, data: bytes) -> float:
        """Write ``data`` in paced pieces; the seconds waited. One write at a time: the
        pieces of two frames of the same link must not interleave. The pieces are views
        of ``data`` (the channel copies what it is given), so nothing is copied twice."""
        waited = 0.0
        view = memoryview(data)
        async with self._writing:
            for at in range(0, len(view), self.piece):
                piece = view[at:at + self.piece]
                waited += await self.take(len(piece))
                writer.write(piece)
        return waited
