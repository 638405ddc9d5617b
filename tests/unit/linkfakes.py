"""Stand-ins for a link's transport, for the unit tests of its two sides."""

from __future__ import annotations

from omirror.wire import decode


class Frames:
    """A writer that keeps the messages it is given."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def write(self, frame: bytes) -> None:
        self.sent.append(decode(frame[4:]))

    async def drain(self) -> None:
        return None
