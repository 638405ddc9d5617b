"""One link's conversation: the pusher streams its change log, the receiver applies it.

A link carries one direction. The pusher says who it is; the receiver answers IHAVE with
how far it holds the pusher's log (the pusher's epoch and a seq); the pusher streams every
entry after that seq, or everything when the epoch differs or the floor of collected
tombstones has passed the cursor (Heimdal's TELLYOUEVERYTHING), then follows its log live.
Small files travel inside their entry; larger ones are asked for with WANT and arrive in
chunks, or as a block delta against the receiver's old version.

Everything that touches the tree runs in the daemon's tree worker (``ctx.tree``), one job
at a time, so an apply and the indexing of the same path never interleave. The receiver
acknowledges entries once they are applied or settled, and persists the cursor, so a
returning link resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import errno
import functools
import logging
import os
import stat
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Coroutine, Iterator, Sequence, TypeVar

import xxhash

from omirror import diskspace, fsio
from omirror.apply import (Applier, ApplyError, LocalChanged, TempFile, check_entry,
                           check_path)
from omirror.clock import now_ns
from omirror.config import MirrorSet, set_for
from omirror.entry import Entry, Kind, Outcome, decide
from omirror.errors import OmirrorError, PathRefused
from omirror.owners import gid_named, uid_named
from omirror.paths import logical, show
from omirror.progress import human_bytes
from omirror.scanner import Scanner
from omirror.store import Cursor, Record, StatSig, Store
from omirror.wire import (CHUNK, INLINE_MAX, PROTOCOL_VERSION, Ack, Bye, Copy, Data, EntryMsg,
                          Hello, IHave, Message, NoData, Passed, ProtocolError, Start, Want,
                          encode, read_message)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Entries in flight before the pusher waits for acknowledgements: enough to hide the
#: round trip, small enough to bound what either side holds.
WINDOW = 2048
#: Inline content in flight before the pusher waits for acknowledgements, and (twice
#: that) what a receiver queues before it stops reading: 2,048 small files of 64 KiB
#: would otherwise be 128 MiB held per link, twice that from a peer that ignores the
#: window. The receiver's bound must stay above the pusher's, or the content of a large
#: file could wait behind entries the receiver no longer reads.
WINDOW_BYTES = 16 << 20
QUEUE_BYTES = 2 * WINDOW_BYTES
#: Content chunks (1 MiB) a receiver holds for the request it has open.
_CONTENT_QUEUE = 8
#: Files at least this large are sent as a block delta when the receiver holds an older
#: version; the block size keeps the digest list small (16 bytes per MiB).
DELTA_MIN = 4 << 20
BLOCK = 1 << 20
#: A peer whose clock differs more than this is named in the log and in status: its
#: clock decides winners.
SKEW_WARN_S = 2.0
_ACK_EVERY = 64
_BATCH = 64  # entries applied in one tree-worker job and one store transaction
_PAGE = 256
_RETRY_FIRST_S, _RETRY_MAX_S = 1.0, 60.0
#: Paths one link keeps for a retry. Beyond it the receiver takes no further entries
#: from that peer until some apply (a disk full under a flood of files): what a peer
#: can make this host hold stays bounded, and nothing is dropped.
MAX_FAILING = 10_000
#: A receiver offers a block delta only for files of at most this many blocks (the
#: digests must fit one WANT frame); a larger file is fetched whole.
MAX_DELTA_BLOCKS = 100_000


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


class Context:
    """What a link needs from its daemon."""

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
        self.failing: dict[bytes, str] = {}
        #: ``(peer, path)`` -> the title of a set holding ``path`` that this host shares
        #: with ``peer`` but has stopped (its root is missing or unmounted), or None.
        self.stopped: Callable[[str, bytes], str | None] = lambda peer, path: None
        self.conflicts = 0
        self._changed = asyncio.Event()

    def notify(self, _seq: int = 0) -> None:
        """Wake the pushers: the log grew. Safe to call from any thread via the loop."""
        self._changed.set()

    async def wait_for_change(self, timeout: float) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass


class _Stream:
    """Counts bytes both ways and sends whole frames."""

    def __init__(self, reader: Any, writer: Any, stats: LinkStats) -> None:
        self.reader = reader
        self.writer = writer
        self.stats = stats

    async def readexactly(self, n: int) -> bytes:
        data = await self.reader.readexactly(n)
        self.stats.bytes_received += n
        return data

    async def recv(self) -> Message:
        return await read_message(self)

    async def send(self, msg: Message) -> None:
        frame = encode(msg)
        self.writer.write(frame)
        self.stats.bytes_sent += len(frame)
        await self.writer.drain()

    async def expect(self, kind: type[T]) -> T:
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
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def _check_hello(hello: Hello, peer: str, stats: LinkStats) -> None:
    if hello.name != peer:
        raise ProtocolError(f"the peer authenticated as {peer} says it is {hello.name}")
    if hello.version != PROTOCOL_VERSION:
        raise ProtocolError(f"peer speaks protocol {hello.version}, this omirrord "
                            f"{PROTOCOL_VERSION}")
    stats.skew_s = (hello.now_ns - now_ns()) / 1e9
    if abs(stats.skew_s) > SKEW_WARN_S:
        log.warning("peer=%s clock differs from ours by %+.1f s: its clock decides which "
                    "version wins; run NTP on every host", peer, stats.skew_s)


# -- the pushing side --------------------------------------------------------------------

class _Side:
    """One end of a link: its daemon's context, the peer, the stream, the counters."""

    def __init__(self, ctx: Context, peer: str, reader: Any, writer: Any,
                 stats: LinkStats) -> None:
        self.ctx = ctx
        self.peer = peer
        self.io = _Stream(reader, writer, stats)
        self.stats = stats


class Pusher(_Side):
    """Streams this host's log to one peer and serves that peer's WANTs.

    Live links follow the log for ever. With ``once`` the pusher stops when the peer has
    acknowledged everything the log held at the start, and says BYE (``--once``, and
    the index a ``--check`` reads). An ``index`` pusher sends every entry, the peer's
    own versions too, and no content: the reader only compares. ``replay_from``
    (``omirrord log replay``) starts the stream at that seq when the peer holds more:
    the entries after it are sent again, as if the peer's cursor were there.
    """

    def __init__(self, *args: Any, once: bool = False, index: bool = False,
                 replay_from: int | None = None) -> None:
        super().__init__(*args)
        self.once = once or index
        self.index = index
        self.replay_from = replay_from
        #: How far the stream has read the log; None until START is sent.
        self.examined: int | None = None
        self.unacked: collections.deque[int] = collections.deque()
        #: (seq, bytes) of the entries in flight that carry content, and their sum
        self.unacked_inline: collections.deque[tuple[int, int]] = collections.deque()
        self.inflight_bytes = 0
        #: The last PASSED sent: a BYE waits for its acknowledgement too, or the peer's
        #: acknowledgement would find the channel closed
        self.passed = 0
        self.acked = asyncio.Event()
        #: A receiver has one request open at a time; one that sends more and never
        #: reads what it asked for is not read further (its requests are not queued).
        self.wants: asyncio.Queue[Want] = asyncio.Queue(maxsize=4)

    async def run(self) -> None:
        store = self.ctx.store
        await self.io.send(Hello(PROTOCOL_VERSION, self.ctx.name, store.epoch, now_ns()))
        _check_hello(await self.io.expect(Hello), self.peer, self.stats)
        ihave = await self.io.expect(IHave)
        full = (ihave.epoch != store.epoch or ihave.seq > store.last_seq
                or ihave.seq < store.floor)
        start = 0 if full else ihave.seq
        if self.replay_from is not None and self.replay_from < start:
            log.info("peer=%s replaying our log from seq %d (it holds up to %d)", self.peer,
                     self.replay_from, start)
            start = self.replay_from
        if full and ihave.epoch:
            log.info("peer=%s holds %s of our log, which is not usable (our epoch %s, "
                     "floor %d): sending everything", self.peer,
                     f"{ihave.epoch}:{ihave.seq}", store.epoch, store.floor)
        total = store.count_since(start)
        self.stats.expected_out += total
        await self.io.send(Start(start, full, total))
        self.examined = start
        self.stats.acked_seq = start  # what this peer holds now, not what an earlier link saw
        self._settle()
        await run_together(self._read_replies(), self._serve_wants(), self._stream(start))

    async def _read_replies(self) -> None:
        while True:
            msg = await self.io.recv()
            if isinstance(msg, Ack):
                self.stats.acked_seq = max(self.stats.acked_seq, msg.seq)
                while self.unacked and self.unacked[0] <= msg.seq:
                    self.unacked.popleft()
                while self.unacked_inline and self.unacked_inline[0][0] <= msg.seq:
                    self.inflight_bytes -= self.unacked_inline.popleft()[1]
                self._settle()
                self.acked.set()
            elif isinstance(msg, Want):
                await self.wants.put(msg)
            elif isinstance(msg, Bye):
                raise ConnectionResetError(f"peer closed the link: {msg.why}")
            else:
                raise ProtocolError(f"a receiver does not send {type(msg).__name__}")

    def _wanted(self, entry: Entry, sets: Sequence[MirrorSet]) -> bool:
        """Entries of the sets shared with this peer, except the peer's own versions:
        it made them, so it holds them or something newer. A path excluded for this peer
        (by the one rule, :func:`config.set_for`) never leaves for it: not its name, not
        its size, digest or content."""
        if entry.stamp.origin == self.peer and not self.index:
            return False
        return set_for(entry.path, sets) is not None

    @staticmethod
    def _outgoing(entry: Entry, sets: Sequence[MirrorSet]) -> Entry:
        """The entry as it may go to this peer: a rename from a path the peer does not
        share (an excluded one, another set) goes as a new file, without naming it."""
        if entry.moved_from is not None and set_for(entry.moved_from, sets) is None:
            entry = replace(entry, moved_from=None)
        if entry.uid < 0 or entry.gid < 0:
            # recorded before versions carried numeric ids: this host's ids of the names
            uid, gid = uid_named(entry.owner), gid_named(entry.group)
            entry = replace(entry, uid=entry.uid if entry.uid >= 0 or uid is None else uid,
                            gid=entry.gid if entry.gid >= 0 or gid is None else gid)
        return entry

    def _with_parents(self, records: list[Record], sets: Sequence[MirrorSet],
                      ahead: dict[bytes, int]) -> list[tuple[Record, bool]]:
        """Put a directory's entry before its children's when its own change is later in
        the log (a chmod after the files were made), so the receiver never has to make a
        parent up; an entry already sent ahead is not sent again at its place. Entries
        sent ahead are marked: they are not a position in the log."""
        out: list[tuple[Record, bool]] = []
        for record in records:
            if ahead.get(record.entry.path) == record.seq:
                continue
            chain: list[Record] = []
            path = record.entry.path
            while True:
                path = path.rpartition(b"/")[0]
                if not path or set_for(path, sets) is None:
                    break
                parent = self.ctx.store.get(path)
                # only a directory that must exist goes ahead: a deletion of the parent
                # must stay after the deletions of its children
                if parent is None or parent.entry.kind is not Kind.DIR \
                        or parent.seq < record.seq or ahead.get(path) == parent.seq:
                    break
                if self._wanted(parent.entry, sets):
                    chain.append(parent)
            for parent in reversed(chain):
                ahead[parent.entry.path] = parent.seq
                out.append((parent, True))
            out.append((record, False))
        return out

    async def _stream(self, position: int) -> None:
        store = self.ctx.store
        ahead: dict[bytes, int] = {}
        while True:
            sets = self.ctx.sets_with(self.peer)
            page = [r for r in _page(store, position)]
            if not page:
                if self.once:
                    await self._finish()
                    return
                await self.ctx.wait_for_change(timeout=5.0)
                continue
            position = page[-1].seq
            records = self._with_parents([r for r in page if self._wanted(r.entry, sets)],
                                         sets, ahead)
            inline = {} if self.index else await asyncio.to_thread(
                _read_inline, self.ctx.root, [r for r, _ in records], sets)
            for record, out_of_order in records:
                data = inline.get(record.entry.path)
                size = 0 if data is None else len(data)
                while len(self.unacked) >= WINDOW or (
                        self.inflight_bytes and self.inflight_bytes + size > WINDOW_BYTES):
                    self.acked.clear()
                    await self.acked.wait()
                if data is not None:
                    self.stats.content_bytes_sent += len(data)
                await self.io.send(EntryMsg(0 if out_of_order else record.seq,
                                            self._outgoing(record.entry, sets), data))
                if not out_of_order and not self.index:  # an index reader applies nothing
                    self.unacked.append(record.seq)     # and acknowledges nothing
                    if size:
                        self.unacked_inline.append((record.seq, size))
                        self.inflight_bytes += size
                self.stats.entries_sent += 1
            if not self.index and (not records or records[-1][0].seq != position):
                # the page ended with entries not for this peer (its own, say): say so,
                # or its cursor stays behind them and every reconnect pages them again
                await self.io.send(Passed(position))
                self.passed = position
            self.examined = position
            self._settle()

    def _settle(self) -> None:
        """Status: everything read from the log and not waiting for an ack is settled."""
        if self.examined is not None:
            self.stats.settled_seq = self.unacked[0] - 1 if self.unacked else self.examined

    async def _finish(self) -> None:
        """Once everything sent is acknowledged, say goodbye. An entry is acknowledged
        only once applied, its content fetched included, so no WANT is left open."""
        while self.unacked or self.stats.acked_seq < self.passed:
            self.acked.clear()
            await self.acked.wait()
        await self.io.send(Bye("caught up"))

    async def _serve_wants(self) -> None:
        while True:
            want = await self.wants.get()
            await self._serve(want)

    async def _serve(self, want: Want) -> None:
        """Send the content a receiver asked for, if it may have it and it is still here.

        The file is opened through descriptors from its set's root (omirror/fsio.py),
        so a directory swapped for a symlink cannot make root send a file from outside
        the tree; it must be a regular file (a FIFO swapped in is refused, not waited
        on), and its content leaves only once it is known to be the version asked for.
        """
        sets = self.ctx.sets_with(self.peer)
        mset = set_for(want.path, sets)
        if mset is None:
            log.warning("peer=%s asked for %s, which is in no set this host shares with "
                        "it: refused", self.peer, show(want.path))
            await self.io.send(NoData(want.want_id, "not in a set we share"))
            return
        record = self.ctx.store.get(want.path)
        if record is None or record.entry.kind is not Kind.FILE \
                or record.entry.digest != want.digest:
            await self.io.send(NoData(want.want_id, "that version is no longer here"))
            return
        try:
            fd, st = await asyncio.to_thread(_open_served, self.ctx.root, mset, want.path)
        except (OSError, fsio.NotInTree, fsio.Swapped) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            await self.io.send(NoData(want.want_id, reason[:200] or "cannot open"))
            if not isinstance(e, OSError):
                await self._recheck(mset, want.path)
            return
        try:
            if want.block_size and want.blocks:
                sent = await self._send_delta(fd, want)
            else:
                sent = await self._send_whole(fd, want, st, record)
        finally:
            os.close(fd)
        if not sent:
            await self._recheck(mset, want.path)

    async def _recheck(self, mset: MirrorSet, path: bytes) -> None:
        """The file did not hold the version its record names (NODATA was sent, and the
        peer waits for a newer entry). Usually a change in progress, whose events bring
        that entry; but a record that is simply wrong would never be followed by one, so
        the file is hashed again now and what it holds is recorded."""
        try:
            await self.ctx.tree(functools.partial(
                self.ctx.scanner.scan_paths, mset, self.ctx.root, [(path, False)],
                force=True))
        except OmirrorError as e:  # a root gone, say: the daemon says so elsewhere
            log.debug("path=%s not rescanned: %s", show(path), e)

    async def _send_whole(self, fd: int, want: Want, st: os.stat_result,
                          record: Record) -> bool:
        """Stream a whole file. It is known to hold the wanted version when its stat is
        the one recorded with that version's digest (as a scan trusts it); otherwise it
        is hashed first, and nothing is sent unless it matches. A write during the
        stream is caught at the end, and the receiver discards what it got."""
        if record.sig is None or StatSig.of(st) != record.sig:
            whole, _ = await asyncio.to_thread(fsio.digest_fd, fd)
            if whole != want.digest:
                await self.io.send(NoData(want.want_id, "the file changed before it was "
                                                        "sent"))
                return False
        digest = xxhash.xxh3_128()
        offset = 0
        while True:
            chunk = await asyncio.to_thread(os.pread, fd, CHUNK, offset)
            offset += len(chunk)
            digest.update(chunk)
            end = len(chunk) < CHUNK
            self.stats.content_bytes_sent += len(chunk)
            await self.io.send(Data(want.want_id, chunk, end and digest.digest() == want.digest))
            if end:
                break
        if digest.digest() != want.digest:
            await self.io.send(NoData(want.want_id, "the file changed while it was sent"))
            return False
        return True

    async def _send_delta(self, fd: int, want: Want) -> bool:
        """Send only the blocks that differ from the receiver's old version.

        The whole file is hashed first: if it no longer is the wanted version, nothing
        is sent. Unchanged blocks become COPY instructions, merged when adjacent; only
        the changed blocks are read again. A file changed while it is sent is caught by
        its stat here, or else by the receiver, which checks the digest of what it built.
        """
        size = want.block_size
        before = os.fstat(fd)
        # one byte per block, not a digest: the peer chooses the block size, and a
        # list of digests of small blocks of a large file would be gigabytes
        same, whole = await asyncio.to_thread(compare_blocks, fd, size, want.blocks)
        if whole != want.digest:
            await self.io.send(NoData(want.want_id, "the file changed before it was sent"))
            return False
        file_size = before.st_size
        run_start, run_len = 0, 0
        for index, matched in enumerate(same):
            offset = index * size
            length = min(size, file_size - offset)  # the last block may be short
            if matched:
                if run_len and run_start + run_len == offset:
                    run_len += length
                else:
                    if run_len:
                        await self.io.send(Copy(want.want_id, run_start, run_len))
                    run_start, run_len = offset, length
                continue
            if run_len:
                await self.io.send(Copy(want.want_id, run_start, run_len))
                run_len = 0
            data = await asyncio.to_thread(os.pread, fd, size, offset)
            for part in range(0, len(data), CHUNK):
                piece = data[part:part + CHUNK]
                self.stats.content_bytes_sent += len(piece)
                await self.io.send(Data(want.want_id, piece, False))
        if run_len:
            await self.io.send(Copy(want.want_id, run_start, run_len))
        if fsio.unchanged(os.fstat(fd), before):
            await self.io.send(Data(want.want_id, b"", True))
            return True
        await self.io.send(NoData(want.want_id, "the file changed while it was sent"))
        return False


def _page(store: Store, position: int) -> list[Record]:
    out = []
    for record in store.since(position):
        out.append(record)
        if len(out) >= _PAGE:
            break
    return out


def _top_of(path: bytes, sets: Sequence[MirrorSet]) -> bytes | None:
    """The logical root, of the set that holds ``path`` among ``sets``, below which it
    is opened; None when no set does."""
    mset = set_for(path, sets)
    root = None if mset is None else mset.root_of(path)
    return None if root is None else logical(root)


def _open_served(root: bytes, mset: MirrorSet, path: bytes) -> tuple[int, os.stat_result]:
    """Open a file a receiver asked for, through descriptors from its set's root."""
    top = mset.root_of(path)
    if top is None:
        raise FileNotFoundError(errno.ENOENT, "not in the set")
    with fsio.Opener(root) as opener:
        return opener.open_file(logical(top), path)


def _read_inline(root: bytes, records: list[Record],
                 sets: Sequence[MirrorSet]) -> dict[bytes, bytes]:
    """Read the small files of a page in one thread hop; a file that no longer matches
    its entry is left out (the receiver will ask, and be told it changed).

    Each file is opened through descriptors from its set's root, and must be a regular
    file (a FIFO would block, a device is no content): the directories of one page are
    opened once. What is read leaves only if it has the entry's digest.
    """
    out: dict[bytes, bytes] = {}
    with fsio.Opener(root) as opener:
        for record in records:
            entry = record.entry
            if entry.kind is not Kind.FILE or entry.size > INLINE_MAX:
                continue
            top = _top_of(entry.path, sets)
            if top is None:
                continue
            try:
                fd, _ = opener.open_file(top, entry.path)
            except (OSError, fsio.NotInTree, fsio.Swapped):
                continue
            try:
                data = os.read(fd, INLINE_MAX + 1)
            except OSError:
                continue
            finally:
                os.close(fd)
            if len(data) == entry.size and fsio.digest_bytes(data) == entry.digest:
                out[entry.path] = data
            opener.trim()
    return out


def _blocks(fd: int, size: int) -> Iterator[bytes]:
    """An open file, from its start, in blocks of ``size`` (the last may be short)."""
    offset = 0
    while data := os.pread(fd, size, offset):
        yield data
        offset += len(data)
        if len(data) < size:
            return


def compare_blocks(fd: int, size: int,
                   theirs: Sequence[bytes]) -> tuple[bytearray, bytes]:
    """Which blocks of an open file have the digests ``theirs`` (1 where they do), and
    the digest of the whole file."""
    whole = xxhash.xxh3_128()
    same = bytearray()
    for index, data in enumerate(_blocks(fd, size)):
        whole.update(data)
        same.append(index < len(theirs) and xxhash.xxh3_128_digest(data) == theirs[index])
    return same, whole.digest()


def block_digests(fd: int, size: int) -> tuple[list[bytes], bytes]:
    """Digests of each block of an open file, and of the whole file."""
    whole = xxhash.xxh3_128()
    blocks = []
    for data in _blocks(fd, size):
        whole.update(data)
        blocks.append(xxhash.xxh3_128_digest(data))
    return blocks, whole.digest()


# -- the receiving side ------------------------------------------------------------------

class Purpose(enum.Enum):
    INSTALL = "install"  # the incoming version wins: it becomes the file here
    CONFLICT = "conflict"  # the incoming version lost a concurrent edit: keep it beside


@dataclass
class Need:
    """An entry that waits for its content from the pusher."""

    mset: MirrorSet
    entry: Entry
    purpose: Purpose
    old: Record | None = None  # the local version a delta is built against


#: What applying one entry came to: done (None), a fetch to make, or why it failed.
_Outcome = Need | ApplyError | PathRefused | None


@dataclass
class _Failing:
    msg: EntryMsg
    error: str
    delay_s: float = _RETRY_FIRST_S
    due: float = field(default_factory=time.monotonic)


class Receiver(_Side):
    """Applies one peer's log here, in order, and acknowledges it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.entries: asyncio.Queue[EntryMsg | Passed] = asyncio.Queue(maxsize=WINDOW * 2)
        self.queued_bytes = 0  # inline content in ``entries``, at most QUEUE_BYTES
        self._dequeued = asyncio.Event()
        #: Content for the one request open at a time (``_open``); other content is
        #: dropped if it is the rest of a request given up, refused if never asked for.
        self.content: asyncio.Queue[Data | Copy | NoData] = asyncio.Queue(_CONTENT_QUEUE)
        self._open: int | None = None
        self._fetching = asyncio.Lock()
        self.epoch = ""
        self.done_seq = 0
        self.saved_seq = 0
        self.retry: dict[bytes, _Failing] = {}
        #: Set each time a path leaves ``retry``: a link with MAX_FAILING paths failing
        #: waits for it before it takes more entries.
        self._retry_shrank = asyncio.Event()
        self._want_id = 0

    async def run(self) -> None:
        store = self.ctx.store
        hello = await self.io.expect(Hello)
        _check_hello(hello, self.peer, self.stats)
        await self.io.send(Hello(PROTOCOL_VERSION, self.ctx.name, store.epoch, now_ns()))
        cursor = store.cursor(self.peer) or Cursor("", 0)
        await self.io.send(IHave(cursor.epoch, cursor.seq))
        start = await self.io.expect(Start)
        self.stats.expected_in += start.total
        self.epoch = hello.epoch
        self.done_seq = self.saved_seq = start.seq
        if start.full:
            log.info("peer=%s sends everything it has (new epoch %s)", self.peer, hello.epoch)
        await run_together(self._read_frames(), self._apply_all(), self._retry_failing())

    async def _read_frames(self) -> None:
        while True:
            msg = await self.io.recv()
            if isinstance(msg, EntryMsg):
                self.stats.entries_received += 1
                size = 0 if msg.data is None else len(msg.data)
                self.stats.content_bytes_received += size
                while self.queued_bytes and self.queued_bytes + size > QUEUE_BYTES:
                    self._dequeued.clear()  # a peer beyond the window: stop reading it
                    await self._dequeued.wait()
                self.queued_bytes += size
                await self.entries.put(msg)
            elif isinstance(msg, Passed):
                await self.entries.put(msg)  # in order: it settles what came before it
            elif isinstance(msg, (Data, Copy, NoData)):
                if isinstance(msg, Data):
                    self.stats.content_bytes_received += len(msg.data)
                if msg.want_id == self._open:
                    await self.content.put(msg)
                elif not 0 < msg.want_id <= self._want_id:
                    raise ProtocolError(f"content for request {msg.want_id}, which was "
                                        "never made")
            elif isinstance(msg, Bye):
                # the pusher sends BYE only when everything it sent is acknowledged
                log.info("peer=%s ended its stream: %s", self.peer, msg.why)
                return
            else:
                raise ProtocolError(f"a pusher does not send {type(msg).__name__}")

    async def _apply_all(self) -> None:
        """Apply entries in order, in batches: what is queued goes to the tree worker in
        one job and one store transaction, and its small files are synced together."""
        count = 0
        pending: list[EntryMsg] = []
        passed: Passed | None = None  # taken from the queue, to settle after ``pending``
        while True:
            if not pending:
                if passed is not None:
                    self.done_seq = max(self.done_seq, passed.seq)
                    passed = None
                if self.entries.empty():
                    await self._save_cursor()
                await self._room_to_fail()
                item = await self.entries.get()
                while not isinstance(item, Passed):
                    pending.append(self._dequeue(item))
                    if len(pending) >= _BATCH or self.entries.empty():
                        break
                    item = self.entries.get_nowait()
                else:
                    passed = item  # ends the batch: it settles only what came before it
                if not pending:
                    continue
            results = await self.ctx.tree(self._apply_batch, list(pending))
            del pending[:len(results)]
            for msg, outcome in results:
                await self._settle(msg, outcome)
                if msg.seq:  # 0: a parent sent ahead of its place in the log
                    self.done_seq = msg.seq
                count += 1
                if count % _ACK_EVERY == 0:
                    await self._save_cursor()

    async def _room_to_fail(self) -> None:
        """Wait while this link holds MAX_FAILING paths to retry: the peer's further
        entries stay unread (SSH flow control holds it) until some of those apply."""
        if len(self.retry) < MAX_FAILING:
            return
        log.warning("peer=%s %d paths cannot be applied here (see omirrord status): no "
                    "further entries are taken from this peer until some of them are",
                    self.peer, len(self.retry))
        while len(self.retry) >= MAX_FAILING:
            self._retry_shrank.clear()
            await self._retry_shrank.wait()

    def _dequeue(self, msg: EntryMsg) -> EntryMsg:
        if msg.data is not None:
            self.queued_bytes -= len(msg.data)
            self._dequeued.set()
        return msg

    def _apply_batch(self, msgs: list[EntryMsg]) -> list[tuple[EntryMsg, _Outcome]]:
        """In the tree worker: apply ``msgs`` in order until one needs its content
        fetched (it ends the batch: what follows may depend on it)."""
        ctx = self.ctx
        results: list[tuple[EntryMsg, _Outcome]] = []
        try:
            with ctx.applier.holding_roots():  # opened once for the batch, not per entry
                self._prepare(msgs)
                with ctx.store.batch():
                    for msg in msgs:
                        outcome = self._apply_one(msg)
                        results.append((msg, outcome))
                        if isinstance(outcome, Need):
                            break
                    self._scan_strays()
        finally:
            ctx.applier.discard_prepared()
        return results

    def _scan_strays(self) -> None:
        """Record what the applier put into a directory a user renamed meanwhile, where
        it really is (the watcher drops the event of our own rename into place)."""
        ctx = self.ctx
        for path in ctx.applier.take_strays():
            try:
                mset = check_path(path, ctx.sets_with(self.peer))
            except PathRefused:
                continue  # out of the sets shared with this peer: the rescan has it
            ctx.scanner.scan_paths(mset, ctx.root, [(path, False)])

    def _prepare(self, msgs: list[EntryMsg]) -> None:
        """Write the small files of a batch that will be installed, then sync them all at
        once: one journal commit for the batch instead of one per file. Only a guess to
        save time: each entry is decided again when it is applied."""
        ctx = self.ctx
        for msg in msgs:
            entry = msg.entry
            if msg.data is None or entry.kind is not Kind.FILE or entry.moved_from \
                    or len(ctx.applier.prepared) >= _BATCH:
                continue
            try:
                mset = check_path(entry.path, ctx.sets_with(self.peer))
            except PathRefused:
                continue
            record = ctx.store.get(entry.path)
            local = None if record is None else record.entry
            if decide(local, entry).outcome is not Outcome.TAKE or (
                    local is not None and local.kind is Kind.FILE
                    and local.digest == entry.digest):
                continue
            ctx.applier.prepare(mset, entry, msg.data)
        if len(ctx.applier.prepared) > 1:
            ctx.applier.sync_prepared()

    def _apply_one(self, msg: EntryMsg) -> _Outcome:
        """Apply one entry; whatever goes wrong is this entry's failure, never the
        link's: an error nobody foresaw is logged with its traceback and the entry is
        retried like any failed one, so the other paths and peers go on."""
        try:
            return self._apply_entry(msg)
        except (ApplyError, PathRefused) as e:
            return e
        except Exception as e:  # a bug, met on one entry: not the end of the link
            log.error("peer=%s path=%s could not be applied: %s: %s", self.peer,
                      show(msg.entry.path), type(e).__name__, e, exc_info=True)
            return ApplyError(msg.entry.path, None, f"cannot apply {show(msg.entry.path)}: "
                                                    f"{type(e).__name__}: {e}")

    async def _settle(self, msg: EntryMsg, outcome: _Outcome) -> None:
        """What follows an entry's application in the loop: its fetch, its failure or
        refusal, the end of its earlier failures."""
        if isinstance(outcome, Need):
            try:
                await self._fetch(outcome, msg)
            except (ApplyError, PathRefused) as e:
                outcome = e
            else:
                outcome = None
        if isinstance(outcome, ApplyError):
            # a file waiting for disk space is tried again soon: it waits for space, not
            # for a fault to pass, and checking costs a statvfs
            self._fail(msg, str(outcome),
                       diskspace.RETRY_S if isinstance(outcome, diskspace.LowDisk) else None)
        elif isinstance(outcome, PathRefused):
            # found while applying: a symlink or a file where the path needs a directory,
            # a set root. Skipped like a path check_path refuses: retrying cannot help,
            # and closing the link would refuse it again on every reconnect
            log.warning("peer=%s sent a path that is refused here: %s", self.peer, outcome)
            if self.retry.pop(msg.entry.path, None) is not None:
                self.ctx.failing.pop(msg.entry.path, None)
                self._retry_shrank.set()
        else:
            # the status entry may be an earlier link's (this peer reconnected, or
            # another peer's link failed it): the path is applied now, whoever failed it
            retried = self.retry.pop(msg.entry.path, None) is not None
            if retried:
                self._retry_shrank.set()
            if self.ctx.failing.pop(msg.entry.path, None) is not None or retried:
                log.info("peer=%s path=%s applied after earlier failures", self.peer,
                         show(msg.entry.path))

    async def _save_cursor(self) -> None:
        """Acknowledge what is settled; persist the cursor below the oldest failing entry
        so that a restart retries it."""
        if self.done_seq == self.saved_seq:
            return
        durable = self.done_seq
        if self.retry:
            durable = min(durable, min((f.msg.seq for f in self.retry.values() if f.msg.seq),
                                       default=durable + 1) - 1)
        cursor = Cursor(self.epoch, durable)
        await self.ctx.tree(self.ctx.store.set_cursor, self.peer, cursor)
        await self.io.send(Ack(self.done_seq))
        self.saved_seq = self.done_seq

    async def _apply(self, msg: EntryMsg) -> None:
        await self._settle(msg, await self.ctx.tree(self._apply_one, msg))

    def _fail(self, msg: EntryMsg, error: str, delay_s: float | None = None) -> None:
        previous = self.retry.get(msg.entry.path)
        delay = _RETRY_FIRST_S if previous is None else min(previous.delay_s * 2, _RETRY_MAX_S)
        if delay_s is not None:
            delay = delay_s
        # without its content: a retry asks for it again, so that a disk full under a
        # stream of small files does not hold all of them in memory
        self.retry[msg.entry.path] = _Failing(replace(msg, data=None), error, delay,
                                              time.monotonic() + delay)
        self.ctx.failing[msg.entry.path] = error
        log.warning("peer=%s %s; retrying in %.0f s", self.peer, error, delay)

    async def _retry_failing(self) -> None:
        while True:
            await asyncio.sleep(0.5)  # a timer: retries are due on their own schedule
            now = time.monotonic()
            for path, failing in list(self.retry.items()):
                if failing.due <= now and self.retry.get(path) is failing:
                    await self._apply(failing.msg)

    # -- deciding and applying (in the tree worker) ---------------------------------------

    def _apply_entry(self, msg: EntryMsg) -> Need | None:
        """Decide between the local version and the incoming one, and apply the winner.

        A local change the scanner has not recorded yet is recorded first (by scanning
        that path), so that it takes part in the decision instead of being overwritten.
        """
        ctx, incoming = self.ctx, msg.entry
        try:
            mset = check_path(incoming.path, ctx.sets_with(self.peer))
            check_entry(incoming)
        except PathRefused as e:
            stopped = ctx.stopped(self.peer, incoming.path)
            if stopped is not None:
                # not refused for good: it applies once the set runs again, so it is
                # retried and the persisted cursor stays below it (a restart resends it)
                raise ApplyError(incoming.path, None,
                                 f"cannot apply {show(incoming.path)}: its set "
                                 f"({stopped}) is stopped on this host (see the log)") \
                    from None
            log.warning("peer=%s sent a path that is refused here: %s", self.peer, e)
            return None
        if msg.data is not None and fsio.digest_bytes(msg.data) != incoming.digest:
            # what came is no version at all, and it would come the same on a retry
            log.warning("peer=%s path=%s sent content that does not match its digest: "
                        "refused", self.peer, show(incoming.path))
            return None
        for _ in range(3):
            record = ctx.store.get(incoming.path)
            local = None if record is None else record.entry
            decision = decide(local, incoming)
            if decision.outcome is not Outcome.TAKE:
                if record is not None and record.entry.vector != decision.vector:
                    ctx.store.set_vector(incoming.path, decision.vector)
                if decision.loser is None:
                    return None
                ctx.conflicts += 1
                log.warning("peer=%s path=%s concurrent edits: ours (%s) wins, theirs (%s) "
                            "is kept as a conflict copy", self.peer, show(incoming.path),
                            local.stamp if local else "-", incoming.stamp)
                if msg.data is not None:
                    ctx.applier.write_conflict_copy(mset, incoming, msg.data)
                    return None
                return Need(mset, incoming, Purpose.CONFLICT)
            winner = replace(incoming, vector=decision.vector)
            force = False
            if record is not None and ctx.applier.moved_away(mset, incoming.path):
                # this host applied a peer's rename of the path: its file is gone, its
                # tombstone may never come (the peer's log holds a newer version of the
                # path now, this one): nothing here to keep or to compare
                record = None
            if ctx.applier.disk_matches(mset, incoming.path, record):
                try:
                    return self._take(mset, winner, record, decision.loser, msg.data)
                except LocalChanged:  # new content, maybe not yet a new stat: rehash it
                    force = True
            elif self._settle_without_disk(mset, winner, record):
                return None
            # the disk differs from the record: a local change, unless the path lies
            # beyond a symlink, where what the disk shows is outside the tree (refused)
            ctx.applier.check_parents(mset, incoming.path)
            ctx.scanner.scan_paths(mset, ctx.root, [(incoming.path, False)], force=force)
        raise ApplyError(incoming.path, None,
                         f"cannot apply {show(incoming.path)}: it keeps changing here")

    def _settle_without_disk(self, mset: MirrorSet, winner: Entry,
                             record: Record | None) -> bool:
        """Cases where the disk already is what the incoming version says: record only.

        A deletion of a path that is already gone, or a file that is already in place
        (the new name of a file whose old name was recorded with the same inode).
        """
        applier = self.ctx.applier
        if winner.kind is Kind.TOMBSTONE:
            if applier.lstat(mset, winner.path) is not None:
                return False
            self.ctx.store.put(winner, None)
            applier.expected_absent.discard(winner.path)
            log.debug("path=%s recorded tombstone stamp=%s (already absent)",
                      show(winner.path), winner.stamp)
            return True
        if winner.kind is not Kind.FILE or winner.moved_from is None:
            return False
        source = self.ctx.store.get(winner.moved_from)
        if source is None or source.sig is None or source.entry.digest != winner.digest:
            return False
        here = applier.lstat(mset, winner.path)
        if here is None or not stat.S_ISREG(here.st_mode) or (here.st_ino, here.st_size) != (
                source.sig.ino, source.sig.size):
            return False
        applier.adopt(mset, winner, StatSig.of(here))
        return True

    def _take(self, mset: MirrorSet, winner: Entry, record: Record | None,
              loser: Entry | None, data: bytes | None) -> Need | None:
        ctx, applier = self.ctx, self.ctx.applier
        local = None if record is None else record.entry
        if loser is not None and local is not None and local.kind is Kind.FILE:
            ctx.conflicts += 1
            log.warning("peer=%s path=%s concurrent edits: theirs (%s) wins, ours (%s) is "
                        "kept as a conflict copy", self.peer, show(winner.path),
                        winner.stamp, local.stamp)
            applier.keep_conflict_copy(mset, winner.path, local.stamp, local.digest)
            record, local = None, None
        if winner.kind is Kind.DIR:
            # a renamed directory is made anew, and each entry below it moves its own
            # file: renaming the old directory whole would also carry what the peer
            # never moved (children made here since, or the directory made again after
            # the peer's rename), leaving them where no log has them
            applier.make_dir(mset, winner)
        elif winner.kind is Kind.SYMLINK:
            applier.make_symlink(mset, winner)
        elif winner.kind is Kind.TOMBSTONE:
            applier.delete(mset, winner)
            applier.expected_absent.discard(winner.path)
            if applier.lstat(mset, winner.path) is not None:
                # a directory kept for what it holds that the deleting peer never had:
                # record it all now (the directory again, newer than the tombstone),
                # or the peers would not have these files until the next full rescan
                ctx.scanner.scan_paths(mset, ctx.root, [(winner.path, True)])
        elif local is not None and local.kind is Kind.FILE and local.digest == winner.digest \
                and record is not None and record.sig is not None:
            applier.adopt(mset, winner, record.sig)
        elif winner.moved_from is not None and self._move_file(mset, winner):
            return None  # a rename stays a rename, even for a file small enough to send
        elif data is not None:
            applier.write_file(mset, winner, data)
        else:
            old = record if local is not None and local.kind is Kind.FILE else None
            return Need(mset, winner, Purpose.INSTALL, old)
        return None

    def _move_file(self, mset: MirrorSet, winner: Entry) -> bool:
        moved_from = winner.moved_from
        if moved_from is None or set_for(moved_from, self.ctx.sets_with(self.peer)) \
                is not mset:
            # a rename is applied within one set only: taking a file out of another
            # set (one the peer may not even share), or out of an excluded path, would
            # move it out of where the peer may write
            return False
        source = self.ctx.store.get(moved_from)
        if source is None or source.entry.kind is not Kind.FILE \
                or source.entry.digest != winner.digest \
                or not self.ctx.applier.disk_matches(mset, source.entry.path, source):
            return False
        # a source version newer than the rename (a chmod made here since) stays where it
        # is, since it wins over the rename's tombstone there: the content is copied
        move = source.entry.stamp < winner.stamp
        self.ctx.applier.copy_local(mset, winner, source.entry.path, move=move)
        return True

    # -- content ---------------------------------------------------------------------------

    async def _fetch(self, need: Need, msg: EntryMsg) -> None:
        """Ask for the content of a version and build it in a temp file, then install it
        if it still wins when it is complete. One request is open at a time (a retry
        waits for the fetch in progress): content frames carry no path, only the id."""
        async with self._fetching:
            self._drop_content()
            try:
                await self._fetch_one(need, msg)
            finally:
                self._open = None
                self._drop_content()  # what came for it after it was given up

    def _drop_content(self) -> None:
        while not self.content.empty():
            self.content.get_nowait()

    async def _fetch_one(self, need: Need, msg: EntryMsg) -> None:
        self._want_id += 1
        want_id = self._open = self._want_id
        entry = need.entry
        old_fd = -1
        blocks: tuple[bytes, ...] = ()
        resumed = 0
        if DELTA_MIN <= entry.size <= MAX_DELTA_BLOCKS * BLOCK:
            # what arrived of this very version before a cut: the delta against it asks
            # only for the rest
            old_fd, resumed = await self.ctx.tree(self.ctx.applier.open_partial,
                                                  need.mset, entry)
            if resumed:
                log.info("peer=%s path=%s resumes a cut transfer: %s of %s are here",
                         self.peer, show(entry.path), human_bytes(resumed),
                         human_bytes(entry.size))
        if old_fd < 0 and need.old is not None and \
                DELTA_MIN <= need.old.entry.size <= MAX_DELTA_BLOCKS * BLOCK \
                and entry.size >= DELTA_MIN:
            old_fd = await self.ctx.tree(self.ctx.applier.open_old, need.mset, need.old)
        if old_fd >= 0:
            try:
                digests, _ = await asyncio.to_thread(block_digests, old_fd, BLOCK)
                blocks = tuple(digests)
            except OSError:
                os.close(old_fd)
                old_fd = -1
        temp: TempFile | None = None
        begun = asyncio.ensure_future(self.ctx.tree(self._begin, need))
        try:
            try:
                temp = await asyncio.shield(begun)
            except asyncio.CancelledError:
                # the worker makes the temp file anyway: remove it once it exists
                begun.add_done_callback(self._abort_late)
                raise
            await self.io.send(Want(want_id, entry.path, entry.digest,
                                    BLOCK if blocks else 0, blocks))
            while True:
                part = await self.content.get()
                if part.want_id < want_id:
                    continue  # queued for a request given up just before this one
                if part.want_id != want_id:
                    raise ProtocolError(f"content for request {part.want_id} while "
                                        f"{want_id} is open")
                if isinstance(part, NoData):
                    log.debug("peer=%s path=%s no longer available: %s", self.peer,
                              show(entry.path), part.why)
                    await self.ctx.tree(temp.abort)
                    if resumed:
                        await self.ctx.tree(self.ctx.applier.drop_partial, need.mset, entry)
                    return
                if isinstance(part, Copy):
                    if old_fd < 0:
                        raise ProtocolError("COPY without a delta base")
                    await self.ctx.tree(temp.copy_from, old_fd, part.offset, part.length)
                    continue
                if part.data:
                    await self.ctx.tree(temp.write, part.data)
                if part.end:
                    break
            await self.ctx.tree(self._install, need, temp)
            if resumed:
                await self.ctx.tree(self.ctx.applier.drop_partial, need.mset, entry)
        except BaseException as e:
            if temp is not None:
                # cut (the link, a shutdown): what arrived is kept for a resume; content
                # that is wrong, or a peer that broke the protocol, leaves nothing
                cut = not isinstance(e, (ApplyError, PathRefused, ProtocolError))
                await asyncio.shield(self.ctx.tree(temp.keep_partial if cut else temp.abort))
            raise
        finally:
            if old_fd >= 0:
                os.close(old_fd)

    def _abort_late(self, begun: asyncio.Future[TempFile]) -> None:
        if not begun.cancelled() and begun.exception() is None:
            asyncio.ensure_future(self.ctx.tree(begun.result().abort))

    def _begin(self, need: Need) -> TempFile:
        return self.ctx.applier.begin_file(need.mset, need.entry)

    def _install(self, need: Need, temp: TempFile) -> None:
        """Install completed content, deciding again: the local version may have changed
        while the content travelled."""
        try:
            with self.ctx.applier.holding_roots():
                self._install_decided(need, temp)
        finally:
            self._scan_strays()

    def _install_decided(self, need: Need, temp: TempFile) -> None:
        temp.finish()
        ctx, entry = self.ctx, need.entry
        if need.purpose is Purpose.CONFLICT:
            ctx.applier.write_conflict_copy(need.mset, entry, temp)
            return
        for _ in range(3):
            record = ctx.store.get(entry.path)
            if record is not None and ctx.applier.moved_away(need.mset, entry.path):
                # as in _apply_entry: a peer's rename applied here took the file away,
                # and its tombstone may never come (that peer holds a newer version of
                # the path now, this one): nothing here to keep or to compare
                record = None
            if ctx.applier.disk_matches(need.mset, entry.path, record):
                break
            ctx.scanner.scan_paths(need.mset, ctx.root, [(entry.path, False)])
        else:
            temp.abort()
            raise ApplyError(entry.path, None,
                             f"cannot apply {show(entry.path)}: it keeps changing here")
        local = None if record is None else record.entry
        decision = decide(local, entry)
        if decision.outcome is not Outcome.TAKE:
            if record is not None and record.entry.vector != decision.vector:
                ctx.store.set_vector(entry.path, decision.vector)
            if decision.loser is not None:
                ctx.conflicts += 1
                ctx.applier.write_conflict_copy(need.mset, entry, temp)
            else:
                temp.abort()
            return
        if decision.loser is not None and local is not None and local.kind is Kind.FILE:
            ctx.conflicts += 1
            try:
                ctx.applier.keep_conflict_copy(need.mset, entry.path, local.stamp, local.digest)
            except LocalChanged:  # record the new content now; the retry decides again
                ctx.scanner.scan_paths(need.mset, ctx.root, [(entry.path, False)], force=True)
                raise
        try:
            ctx.applier.install_file(need.mset, replace(entry, vector=decision.vector), temp)
        except LocalChanged:  # changed here while the content came: record, decide again
            ctx.scanner.scan_paths(need.mset, ctx.root, [(entry.path, False)], force=True)
            raise

