"""One link's plumbing, shared by both directions and by ``--check``: the counters, what
a side needs from its daemon, the framed stream, the HELLO checks, and running a link's
tasks together.

A link carries one direction: push.py streams this host's log, receive.py applies a
peer's. Neither knows of the other; they meet only in the :class:`Context`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from omirror.bwlimit import Bucket
from omirror.clock import now_ns
from omirror.config import MirrorSet
from omirror.resolve import Resolver
from omirror.wire import PROTOCOL_VERSION, Bye, Hello, Message, ProtocolError, encode, read_message

if TYPE_CHECKING:
    from omirror.apply import Applier
    from omirror.scanner import Scanner
    from omirror.store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Entries in flight before a pusher waits for acknowledgements: enough to hide the
#: round trip, small enough to bound what either side holds.
WINDOW_ENTRIES = 2048
#: Inline content in flight before a pusher waits for acknowledgements: 2,048 small
#: files of up to 1 MiB (wire.INLINE_MAX) would otherwise be 2 GiB held per link.
WINDOW_BYTES = 16 << 20
#: A peer whose clock differs more than this is named in the log and in status: its
#: clock decides winners.
SKEW_WARN_S = 2.0


@dataclass
class LinkStats:
    """Counters of one peer, both directions; shown in status."""

    out: str = "down"
    inbound: str = "down"
    out_since: float = 0.0
    in_since: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    content_bytes_sent: int = 0
    content_bytes_received: int = 0
    entries_sent: int = 0
    entries_received: int = 0
    acked_seq: int = 0
    #: Every entry of our log up to this seq that the peer is to get has been acked (the
    #: ones not for it, e.g. its own versions, count once the pusher has read past them).
    settled_seq: int = 0
    skew_s: float = 0.0
    expected_out: int = 0  # entries the log held to send when the link began
    expected_in: int = 0  # entries the peer announced it would send
    compression: str = "none"
    last_error: str = ""
    #: ``--bwlimit``: KiB/s each link to this peer may write (0: no limit), and the
    #: seconds its links waited on it, in all
    bwlimit_kib: int = 0
    bwlimit_wait_s: float = 0.0


class Listening(Protocol):
    """A pusher, as the context tells it that the log grew (omirror/push.py)."""

    def log_grew(self) -> None: ...


class Context:
    """What a link needs from its daemon: the store, the tree and the resolver, the sets it
    shares with each peer, and the one thread that touches trees."""

    def __init__(self, name: str, store: Store, applier: Applier, scanner: Scanner,
                 root: bytes, sets_with: Callable[[str], Sequence[MirrorSet]],
                 tree: Callable[..., Awaitable[Any]]) -> None:
        self.name = name
        self.store = store
        self.applier = applier
        self.scanner = scanner
        self.root = root
        self.sets_with = sets_with
        self.tree = tree  # run a callable in the tree worker
        #: Run a callable in the stager (omirror/staging.py, Ahead), beside the tree
        #: worker; None where nothing is written ahead (``--once``).
        self.stage: Callable[..., Awaitable[Any]] | None = None
        #: Every link's receiver decides through this one resolver, in the tree worker.
        self.resolver = Resolver(store, applier, scanner)
        #: ``--bwlimit``: KiB/s each link may write (0: no limit); each gets its bucket.
        self.bwlimit_kib = 0
        #: Paths a receiver could not apply, with why: shown in status, by every link.
        self.failing: dict[bytes, str] = {}
        #: ``(peer, path)`` -> the title of a set holding ``path`` that this host shares
        #: with ``peer`` but has stopped (its root is missing or unmounted), or None.
        self.stopped: Callable[[str, bytes], str | None] = lambda peer, path: None
        #: The pushers streaming this host's log, each told when it grows
        self.pushers: set[Listening] = set()
        #: Peers with a link into this host up (how many: a reconnect overlaps its end)
        self._receiving: dict[str, int] = {}
        self._receiving_changed = asyncio.Event()
        self._anew: dict[str, int] = {}
        #: How far this host has read each peer's log (its epoch, the seq): a MARK
        #: samples it (omirror/receive.py)
        self.reached: dict[str, tuple[str, int]] = {}
        self._moved = asyncio.Event()

    @property
    def conflicts(self) -> int:
        """Concurrent edits met since the start, whichever side won."""
        return self.resolver.conflicts

    def notify(self) -> None:
        """Tell the pushers the log grew. Called in the loop (the store's listener
        hands it over)."""
        for pusher in list(self.pushers):
            pusher.log_grew()

    def receiving(self, peer: str, up: bool, *, anew: bool = False) -> None:
        """A link from ``peer`` into this host began (``up``) or ended. ``anew``: it
        began with everything, from a new store: what that peer had not sent of its
        former store may be gone (:meth:`restarts`)."""
        if up and anew:
            self._anew[peer] = self._anew.get(peer, 0) + 1
        count = self._receiving.get(peer, 0) + (1 if up else -1)
        if count > 0:
            self._receiving[peer] = count
        else:
            self._receiving.pop(peer, None)
        self._receiving_changed.set()
        self._receiving_changed = asyncio.Event()

    def moved(self) -> None:
        """A receiver saved its cursor: the others may ask their pushers for a MARK."""
        self._moved.set()
        self._moved = asyncio.Event()

    def moved_event(self) -> asyncio.Event:
        """Set at the next :meth:`moved`."""
        return self._moved

    def restarts(self, peer: str) -> int:
        """How often ``peer``'s link came up from a new store: a receiver that trusted
        that peer to send its own versions asks again for what it left out of them."""
        return self._anew.get(peer, 0)

    def direct_from(self) -> tuple[tuple[str, ...], asyncio.Event]:
        """The peers whose links into this host are up, and an event set when that
        changes: what each receiver tells its pusher (wire.Direct)."""
        return tuple(sorted(self._receiving)), self._receiving_changed


class Stream:
    """Counts bytes both ways and sends whole frames.

    Frames may be queued (:meth:`queue`) and written together (:meth:`flush`): SSH
    sends one packet, encrypted and authenticated as one, per write, so a pusher
    streaming small entries writes a page of them at once, not a packet each. Reads
    take what the channel holds, in chunks, and cut frames from it, rather than two
    reads per frame. With a ``limit`` (``--bwlimit``, omirror/bwlimit.py) each write
    waits for its tokens, in pieces.
    """

    #: Queued frames are written once they hold this much.
    FLUSH_AT = 256 << 10
    _READ = 256 << 10

    def __init__(self, reader: Any, writer: Any, stats: LinkStats,
                 limit: Bucket | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.stats = stats
        self.limit = limit
        self._out: list[bytes] = []
        self._out_size = 0
        self._in = b""
        self._at = 0

    async def readexactly(self, n: int) -> bytes:
        """``n`` bytes; ``asyncio.IncompleteReadError`` when the stream ends before."""
        while len(self._in) - self._at < n:
            chunk: bytes = await self.reader.read(max(self._READ, n))
            if not chunk:
                partial = self._in[self._at:]
                self._in, self._at = b"", 0
                raise asyncio.IncompleteReadError(partial, n)
            self._in = self._in[self._at:] + chunk
            self._at = 0
        data = self._in[self._at:self._at + n]
        self._at += n
        self.stats.bytes_received += n
        return data

    async def recv(self) -> Message:
        """The next frame, decoded and checked (omirror/wire.py)."""
        return await read_message(self)

    def queue(self, msg: Message) -> bool:
        """Add one frame to what the next :meth:`flush` writes; True once that is
        :data:`FLUSH_AT` or more (the caller flushes). The caller must flush before it
        waits for anything, or the peer never sees what it waits on."""
        frame = encode(msg)
        self._out.append(frame)
        self._out_size += len(frame)
        self.stats.bytes_sent += len(frame)
        return self._out_size >= self.FLUSH_AT

    async def flush(self) -> None:
        """Write what is queued in one write (limited: in pieces, each once its tokens
        are there); waits while the channel's buffer is full (SSH flow control)."""
        if self._out:
            out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out.clear()
            self._out_size = 0
            if self.limit is None:
                self.writer.write(out)
            else:
                self.stats.bwlimit_wait_s += await self.limit.write(self.writer, out)
        await self.writer.drain()

    async def send(self, msg: Message) -> None:
        """Send one frame, after what is queued."""
        self.queue(msg)
        await self.flush()

    async def expect(self, kind: type[T]) -> T:
        """The next frame, which must be a ``kind``: the handshake's fixed order."""
        msg = await self.recv()
        if isinstance(msg, Bye):
            raise ConnectionResetError(f"peer closed the link: {msg.why}")
        if not isinstance(msg, kind):
            raise ProtocolError(f"expected {kind.__name__}, got {type(msg).__name__}")
        return msg


async def run_together(*coros: Coroutine[Any, Any, None]) -> None:
    """Run a link's tasks until one ends; raise its failure, if it failed.

    The first to end ends the link (a reader that saw BYE, or any error), and the caller
    sorts errors by type (a peer that went away, a protocol error), which an
    ExceptionGroup would hide. A stop of the caller
    arrives as CancelledError; one that races a link error is not lost either, since a
    pending cancellation is delivered at the caller's next await. (asyncio.TaskGroup is
    not used: on Python 3.11 a child's failure can leave the parent task marked as
    being cancelled, which makes a lost peer look like a stop.)
    """
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        for task in tasks:  # a second failure while cancelled (a write to the closed
            if not task.cancelled():  # channel) is the same loss, not an error to log
                task.exception()
    for task in done:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error


def check_hello(hello: Hello, peer: str, stats: LinkStats) -> None:
    """Refuse a peer whose HELLO names another host than its key, or speaks another
    protocol; note its clock's skew, which decides winners."""
    if hello.name != peer:
        raise ProtocolError(f"the peer authenticated as {peer} says it is {hello.name}")
    if hello.version != PROTOCOL_VERSION:
        side = "that peer" if hello.version < PROTOCOL_VERSION else "this host"
        raise ProtocolError(f"peer speaks protocol {hello.version}, this omirrord "
                            f"{PROTOCOL_VERSION}: upgrade omirror on {side}, every peer "
                            "must speak the same protocol")
    stats.skew_s = (hello.now_ns - now_ns()) / 1e9
    if abs(stats.skew_s) > SKEW_WARN_S:
        log.warning("peer=%s clock differs from ours by %+.1f s: its clock decides which "
                    "version wins; run NTP on every host", peer, stats.skew_s)




class Side:
    """One end of a link: its daemon's context, the peer, the stream, the counters."""

    def __init__(self, ctx: Context, peer: str, reader: Any, writer: Any,
                 stats: LinkStats) -> None:
        self.ctx = ctx
        self.peer = peer
        self.io = Stream(reader, writer, stats, Bucket.kib(ctx.bwlimit_kib))
        self.stats = stats
