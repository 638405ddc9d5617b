"""The pushing side of a link: stream this host's log to one peer, and serve the content
it asks for.

The pusher says who it is; the receiver answers IHAVE with how far it holds our log (our
epoch and a seq); the pusher streams every entry after that seq, or everything when the
epoch differs or the floor of collected tombstones has passed the cursor (Heimdal's
TELLYOUEVERYTHING), then follows the log live. Small files travel inside their entry;
larger ones are asked for with WANT and sent in chunks, or as a block delta against the
receiver's old version. The index a ``--check`` reads is the same stream without
content.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from omirror import fsio
from omirror.clock import now_ns
from omirror.config import MirrorSet, set_for
from omirror.entry import Entry, Kind
from omirror.errors import OmirrorError
from omirror.link import (
    WINDOW_BYTES,
    WINDOW_ENTRIES,
    Context,
    LinkStats,
    Side,
    check_hello,
    run_together,
)
from omirror.owners import gid_named, uid_named
from omirror.paths import logical, show
from omirror.store import Record, StatSig
from omirror.wire import (
    ASK_AGAIN,
    CHUNK,
    INLINE_MAX,
    PROTOCOL_VERSION,
    Ack,
    AskedAgain,
    Bye,
    CaughtUp,
    Copy,
    Data,
    Direct,
    EntryMsg,
    Hello,
    Hole,
    IHave,
    Mark,
    NoData,
    Passed,
    ProtocolError,
    Start,
    Want,
)

log = logging.getLogger(__name__)

#: Log entries read per page.
_PAGE = 256
#: The small files of a page are read this much at a time (and held until sent).
_READ_AT_ONCE = 8 << 20
#: PASSED waits until the log has been quiet this long, or has passed this many seqs.
_PASSED_QUIET_S = 1.0
_PASSED_EVERY = 4096


class Pusher(Side):
    """Streams this host's log to one peer and serves that peer's WANTs.

    Live links follow the log for ever. With ``once`` the pusher stops when the peer has
    acknowledged everything the log held at the start, and says BYE (``--once``, and
    the index a ``--check`` reads). An ``index`` pusher sends every entry, the peer's
    own versions too, and no content: the reader only compares. ``replay_from``
    (``omirrord log replay``) starts the stream at that seq when the peer holds more:
    the entries after it are sent again, as if the peer's cursor were there.
    """

    def __init__(self, ctx: Context, peer: str, reader: Any, writer: Any, stats: LinkStats,
                 *, once: bool = False, index: bool = False,
                 replay_from: int | None = None) -> None:
        super().__init__(ctx, peer, reader, writer, stats)
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
        #: The end of the entries not for the peer that the log ended with when read,
        #: to be said in a PASSED (0: the last page ended with an entry sent)
        self._passed_due = 0
        #: Up to ``_held`` the peer holds all but the versions of ``_again`` (IHAVE)
        self._held = 0
        self._again: frozenset[str] = frozenset()
        #: The last MARK read, and the last answered (CAUGHTUP)
        self._mark = self._marked = 0
        #: Set when the stream should page the log again: it grew, a MARK came, DIRECT
        #: changed. The stream clears it before it reads a page, so that whatever
        #: happens while it reads wakes it again: nothing is slept through
        self._woken = asyncio.Event()
        self.acked = asyncio.Event()
        #: A receiver has one request open at a time; one that sends more and never
        #: reads what it asked for is not read further (its requests are not queued).
        self.wants: asyncio.Queue[Want] = asyncio.Queue(maxsize=4)
        #: Hosts whose own versions reach the peer from them (it says so: wire.Direct)
        self.direct: frozenset[str] = frozenset()
        #: :meth:`_links_earlier` of the entries of the page being sent, by seq
        self._link_cache: dict[int, bool] = {}

    async def run(self) -> None:
        """The handshake, then the stream, the acknowledgements and the content served,
        until the link fails (or, ``once``, until the peer holds everything)."""
        store = self.ctx.store
        await self.io.send(Hello(PROTOCOL_VERSION, self.ctx.name, store.epoch, now_ns()))
        check_hello(await self.io.expect(Hello), self.peer, self.stats)
        ihave = await self.io.expect(IHave)
        if not self.index:
            self.direct = frozenset(ihave.direct)
            self._held, self._again = ihave.held, frozenset(ihave.again)
        full = (ihave.epoch != store.epoch or ihave.seq > store.last_seq
                or ihave.seq < store.floor)
        start = 0 if full else ihave.seq
        if full:
            self._held = 0  # the receiver's cursor means nothing here
        if self.replay_from is not None and self.replay_from < start:
            log.info("peer=%s replaying our log from seq %d (it holds up to %d)", self.peer,
                     self.replay_from, start)
            start = self.replay_from
            self._held = 0  # all of it again, as asked
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
            elif isinstance(msg, Direct):
                self.direct = frozenset(msg.origins)
                self._woken.set()  # what was left out for the hosts no longer named
            elif isinstance(msg, Mark):
                self._mark = max(self._mark, msg.mark)
                self._woken.set()  # the stream looks again, and answers if caught up
            elif isinstance(msg, Bye):
                if msg.why.startswith(ASK_AGAIN):
                    raise AskedAgain(f"peer asks for our log again: {msg.why}")
                raise ConnectionResetError(f"peer closed the link: {msg.why}")
            else:
                raise ProtocolError(f"a receiver does not send {type(msg).__name__}")

    def _wanted(self, entry: Entry, sets: Sequence[MirrorSet]) -> bool:
        """Entries of the sets shared with this peer, except the peer's own versions (it
        made them, so it holds them or something newer) and those of the hosts it gets
        theirs from (it says which: DIRECT). A path excluded for this peer (by the one
        rule, :func:`config.set_for`) never leaves for it: not its name, not its size,
        digest or content."""
        if not self.index and (entry.stamp.origin == self.peer
                               or entry.stamp.origin in self.direct):
            return False
        return set_for(entry.path, sets) is not None

    def _reads_inline(self, record: Record) -> bool:
        """A small file travels with its entry (not in an index). A version the peer
        gets from its maker is not sent at all (``_wanted``), so what is relayed goes
        with its content: the peer has no other way to it."""
        entry = record.entry
        if self.index or entry.kind is not Kind.FILE or entry.size > INLINE_MAX:
            return False
        return not self._links_earlier(record)

    def _links_earlier(self, record: Record) -> bool:
        """Whether the entry's link hint names a path of a set shared with the peer
        whose version here holds the same content and comes earlier in the log: the
        peer holds that content, or gets it first, and links the entry to it, so its
        content stays here (if the peer cannot link, it asks for it)."""
        entry = record.entry
        if not entry.link:
            return False
        known = self._link_cache.get(record.seq)
        if known is None:
            source = None
            if set_for(entry.link, self.ctx.sets_with(self.peer)) is not None:
                source = self.ctx.store.committed(entry.link)
            known = source is not None and source.seq < record.seq \
                and source.entry.same_content(entry)
            if len(self._link_cache) >= _PAGE:
                self._link_cache.clear()
            self._link_cache[record.seq] = known
        return known

    @staticmethod
    def _outgoing(entry: Entry, sets: Sequence[MirrorSet]) -> Entry:
        """The entry as it may go to this peer: a rename from a path the peer does not
        share (an excluded one, another set) goes as a new file, without naming it, and
        a link hint to such a path is dropped."""
        if entry.moved_from is not None and set_for(entry.moved_from, sets) is None:
            entry = replace(entry, moved_from=None)
        if entry.link and set_for(entry.link, sets) is None:
            entry = replace(entry, link=b"")
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
        parents: dict[bytes, Record | None] = {}  # the records of one page share parents
        for record in records:
            if ahead.get(record.entry.path) == record.seq:
                continue
            chain: list[Record] = []
            path = record.entry.path
            while True:
                path = path.rpartition(b"/")[0]
                if not path or set_for(path, sets) is None:
                    break
                if path not in parents:
                    parents[path] = self.ctx.store.committed(path)
                parent = parents[path]
                # only a directory that must exist goes ahead: a deletion of the parent
                # must stay after the deletions of its children
                if parent is None or parent.entry.kind is not Kind.DIR \
                        or parent.seq < record.seq or ahead.get(path) == parent.seq:
                    break
                # a parent goes ahead whoever made it: its maker's own link may be behind
                if parent.entry.stamp.origin != self.peer or self.index:
                    chain.append(parent)
            for parent in reversed(chain):
                ahead[parent.entry.path] = parent.seq
                out.append((parent, True))
            out.append((record, False))
        return out

    async def _stream(self, position: int) -> None:
        """Follow the log from ``position``, told by the context when it grows."""
        self.ctx.pushers.add(self)
        try:
            await self._follow(position)
        finally:
            self.ctx.pushers.discard(self)

    def log_grew(self) -> None:
        """The store committed new versions (Context.notify)."""
        self._woken.set()

    async def _follow(self, position: int) -> None:
        store = self.ctx.store
        ahead: dict[bytes, int] = {}
        while True:
            sets = self.ctx.sets_with(self.peer)
            await self.io.flush()  # nothing queued waits while the stream does
            # cleared before the page is read: whatever is logged after this wakes it
            self._woken.clear()
            # neither the peer's own versions nor those it gets from their makers are
            # sent to it (``_wanted``): not even read, except in an index, which lists all
            page = store.page(position, _PAGE,
                              skip_origins=() if self.index else (self.peer, *self.direct))
            if not page:
                if self._mark > self._marked:
                    # everything for the peer up to here is sent: the answer follows it
                    await self.io.send(CaughtUp(self._mark, position))
                    self._marked = self._mark
                    self.passed = max(self.passed, position)
                if self.once:
                    await self._say_passed()
                    await self._finish()
                    return
                if self._passed_due > self.passed:
                    # the log ended with entries not for this peer: said once the log
                    # is quiet, not after every page of a burst
                    if not await self._wait(_PASSED_QUIET_S):
                        await self._say_passed()
                    continue
                await self._wait(5.0)
                continue
            position = page[-1].seq
            records = self._with_parents(
                [r for r in page if self._wanted(r.entry, sets)
                 and (r.seq > self._held or r.entry.stamp.origin in self._again)],
                sets, ahead)
            for group in _groups(records, self._reads_inline):
                await self._send_group(group, sets)
            if records:
                self._passed_due = 0  # what was sent moves the peer's cursor past it
            if not self.index and (not records or records[-1][0].seq != position):
                # the page ended with entries not for this peer (its own, say): its
                # cursor must pass them, or every reconnect pages them again
                self._passed_due = position
                if position - self.passed >= _PASSED_EVERY:
                    await self._say_passed()
            self.examined = position
            self._settle()
            await _let_others_run()

    async def _send_group(self, records: list[tuple[Record, bool]],
                          sets: Sequence[MirrorSet]) -> None:
        """Send entries, with the content of the small files among them (read first, all
        at once, in one thread hop)."""
        carried = [r for r, _ in records if self._reads_inline(r)]
        inline: dict[bytes, bytes] = {}
        if carried:
            # a live change was read as it was hashed: sent as read (omirror/recent.py)
            recent = self.ctx.scanner.recent
            unread = []
            for record in carried:
                data = recent.get(record.entry.path, record.entry.digest)
                if data is None:
                    unread.append(record)
                else:
                    inline[record.entry.path] = data
            if unread:
                await self.io.flush()  # what is queued goes while the files are read
                inline.update(await asyncio.to_thread(_read_inline, self.ctx.root, unread,
                                                      sets))
        for record, out_of_order in records:
            data = inline.pop(record.entry.path, None)
            size = 0 if data is None else len(data)
            while len(self.unacked) >= WINDOW_ENTRIES or (
                    self.inflight_bytes and self.inflight_bytes + size > WINDOW_BYTES):
                await self.io.flush()  # the acknowledgements wait for what is queued
                self.acked.clear()
                await self.acked.wait()
            if data is not None:
                self.stats.content_bytes_sent += len(data)
            # a page's entries go out in few writes (SSH packets), not one each
            if self.io.queue(EntryMsg(0 if out_of_order else record.seq,
                                      self._outgoing(record.entry, sets), data)):
                await self.io.flush()
                await _let_others_run()
            if not out_of_order and not self.index:  # an index reader applies nothing
                self.unacked.append(record.seq)     # and acknowledges nothing
                if size:
                    self.unacked_inline.append((record.seq, size))
                    self.inflight_bytes += size
            self.stats.entries_sent += 1

    async def _wait(self, timeout: float) -> bool:
        """Until the stream is woken (True: see ``_woken``) or ``timeout`` passes
        (False). A MARK wakes this pusher only: the others need not page their logs
        again for it."""
        if self._woken.is_set():
            return True
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            self._woken.set()
        timer = asyncio.get_running_loop().call_later(timeout, expire)
        try:
            await self._woken.wait()
        finally:
            timer.cancel()
        return not expired

    async def _say_passed(self) -> None:
        """PASSED for the entries not for this peer at the end of what was read.

        Not after every page: in a mesh most of a burst is skipped (the peer's own
        versions, those it gets from their makers), and each PASSED costs the peer a
        write of its cursor. Said once the log is quiet, every _PASSED_EVERY entries
        during a long burst, and before a BYE."""
        if self._passed_due > self.passed:
            await self.io.send(Passed(self._passed_due))
            self.passed = self._passed_due

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
        record = self.ctx.store.committed(want.path)
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
        digest = fsio.new_digest()
        complete = await self._send_range(fd, want, 0, st.st_size, digest)
        if not complete or digest.digest() != want.digest:
            await self.io.send(NoData(want.want_id, "the file changed while it was sent"))
            return False
        await self.io.send(Data(want.want_id, b"", True))
        return True

    async def _send_range(self, fd: int, want: Want, offset: int, length: int,
                          digest: fsio.Digest | None = None) -> bool:
        """Send a range of the file as it lies on disk: its holes as HOLE (never read,
        hashed as zeros), its data in chunks. False when the file ended before the
        range did (it shrank: what was sent is no version, and the caller says so)."""
        ranges = await asyncio.to_thread(lambda: list(fsio.extents(fd, offset, offset + length)))
        for start, part, is_data in ranges:
            if not is_data:
                if digest is not None and part > CHUNK:  # a large hole: off the loop
                    await asyncio.to_thread(fsio.hash_zeros, digest, part)
                elif digest is not None:
                    fsio.hash_zeros(digest, part)
                await self.io.send(Hole(want.want_id, part))
                continue
            pos, end = start, start + part
            while pos < end:
                chunk = await asyncio.to_thread(os.pread, fd, min(CHUNK, end - pos), pos)
                if not chunk:
                    return False
                pos += len(chunk)
                if digest is not None:
                    digest.update(chunk)
                self.stats.content_bytes_sent += len(chunk)
                await self.io.send(Data(want.want_id, chunk, False))
        return sum(part for _, part, _ in ranges) == length

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
        same, whole = await asyncio.to_thread(fsio.compare_blocks, fd, size, want.blocks)
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
            # a block that differs goes as it lies here: its holes as HOLE
            if not await self._send_range(fd, want, offset, length):
                break  # it shrank: the stat below says so
        if run_len:
            await self.io.send(Copy(want.want_id, run_start, run_len))
        if fsio.unchanged(os.fstat(fd), before):
            await self.io.send(Data(want.want_id, b"", True))
            return True
        await self.io.send(NoData(want.want_id, "the file changed while it was sent"))
        return False




async def _let_others_run() -> None:
    """Give the loop back between pages and between writes of a page: a write that the
    channel takes at once does not suspend, so a pusher with a backlog (the host where a
    burst is written, whose content is at hand: nothing to wait for) would run page after
    page in one step. With nine such pushers a step of the loop took seconds, keepalives
    went unanswered, and every peer dropped its link to that host."""
    await asyncio.sleep(0)


def _groups(records: list[tuple[Record, bool]],
            inline: Callable[[Record], bool]) -> Iterator[list[tuple[Record, bool]]]:
    """A page cut where the content of the files read ``inline`` would pass
    :data:`_READ_AT_ONCE`: a page of large "small" files is not held in memory whole."""
    group: list[tuple[Record, bool]] = []
    size = 0
    for record, out_of_order in records:
        if inline(record):
            if group and size + record.entry.size > _READ_AT_ONCE:
                yield group
                group, size = [], 0
            size += record.entry.size
        group.append((record, out_of_order))
    if group:
        yield group


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
    its entry is left out (the receiver will ask, and be told it changed), and so is a
    sparse one (the receiver will ask, and get its holes).

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
                fd, st = opener.open_file(top, entry.path)
            except (OSError, fsio.NotInTree, fsio.Swapped):
                continue
            try:
                if fsio.has_hole(fd, st):
                    # inline content is dense: a sparse file goes without it, and the
                    # receiver's WANT gets its holes as HOLE
                    continue
                data = os.read(fd, INLINE_MAX + 1)
            except OSError:
                continue
            finally:
                os.close(fd)
            if len(data) == entry.size and fsio.digest_bytes(data) == entry.digest:
                out[entry.path] = data
            opener.trim()
    return out
