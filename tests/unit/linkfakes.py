"""Stand-ins for a link's transport, for the unit tests of its two sides."""

from __future__ import annotations

import struct

from omirror.wire import decode


class Frames:
    """A writer that keeps the messages it is given."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def write(self, frames: bytes) -> None:
        """One write may hold several frames (omirror/link.py queues a page's)."""
        at = 0
        while at < len(frames):
            (length,) = struct.unpack_from(">I", frames, at)
            self.sent.append(decode(frames[at + 4:at + 4 + length]))
            at += 4 + length

    async def drain(self) -> None:
        return None
