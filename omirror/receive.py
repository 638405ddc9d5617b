"""The receiving side of a link: take one peer's log in order, have it applied, and
acknowledge it.

Frames are read as they come and queued, bounded in entries and in inline bytes, so a
peer beyond its window stops being read (SSH flow control then holds it). Entries go to
the tree worker in batches (omirror/resolve.py decides and applies them); one that needs
its content has it fetched (WANT, then chunks, holes or a block delta) into a temp file,
one request at a time; a hole stays a hole here. An entry is acknowledged once applied or
settled, and the cursor persisted below the oldest that failed, so a returning link
resumes where it stopped and failed paths are retried, with backoff, until they apply.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from omirror import diskspace, fsio, staging
from omirror.clock import now_ns
from omirror.entry import Kind
from omirror.errors import ApplyError, PathRefused
from omirror.link import (
    WINDOW_BYTES,
    WINDOW_ENTRIES,
    Context,
    LinkStats,
    Side,
    check_hello,
    run_together,
)
from omirror.paths import show
from omirror.resolve import Need, Result
from omirror.staging import Prepared, TempFile
from omirror.store import Cursor
from omirror.units import human_bytes
from omirror.wire import (
    ASK_AGAIN,
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

#: Entries, and inline bytes, a receiver queues before it stops reading the peer: twice
#: the pusher's window, so an honest pusher is never held by it, and a peer that ignores
#: the window can make it hold no more. The bytes must stay above the pusher's bound, or
#: the content of a large file could wait behind entries the receiver no longer reads.
QUEUE_ENTRIES = 2 * WINDOW_ENTRIES
QUEUE_BYTES = 2 * WINDOW_BYTES
#: Content chunks (1 MiB) a receiver holds for the request it has open.
_CONTENT_QUEUE = 8
#: Files at least this large are asked for as a block delta when this host holds an
#: older version; the block size keeps the digest list small (16 bytes per MiB).
DELTA_MIN = 4 << 20
BLOCK = 1 << 20
#: A receiver offers a block delta only for files of at most this many blocks (the
#: digests must fit one WANT frame); a larger file is fetched whole.
MAX_DELTA_BLOCKS = 100_000
_ACK_EVERY = 64
_BATCH = 128  # entries applied in one tree-worker job and one store transaction
_RETRY_FIRST_S, _RETRY_MAX_S = 1.0, 60.0
#: A host whose versions a pusher leaves out, trusting it to send them here itself, may
#: be away this long (a link that drops and comes back) before the pusher is asked for
#: what it left out of them.
RELINK_GRACE_S = 5.0
#: A MARK waits this long after a link moved, so that the end of a burst asks once.
MARK_GATHER_S = 0.1
#: Paths one link keeps for a retry. Beyond it the receiver takes no further entries
#: from that peer until some apply (a disk full under a flood of files): what a peer
#: can make this host hold stays bounded, and nothing is dropped.
MAX_FAILING = 10_000
#: Paths one link keeps until a component of theirs that is a symlink or a file here
#: becomes a directory. Beyond it such a path is skipped, as a refused one is.
MAX_WAITING = 1_000


#: What ends a batch and settles a seq once what came before it is applied.
_Settles = Passed | CaughtUp
_Queued = EntryMsg | _Settles


class _Entries(asyncio.Queue[_Queued]):
    """The entries a receiver has read and not yet applied."""

    # a queue's own storage, as asyncio's other queues make theirs
    def _init(self, maxsize: int) -> None:
        self._queue: collections.deque[_Queued] = collections.deque()

    def _put(self, item: _Queued) -> None:
        self._queue.append(item)

    def _get(self) -> _Queued:
        return self._queue.popleft()

    def peek(self, count: int) -> list[_Queued]:
        """The first ``count`` queued, left in the queue: what the stager writes ahead."""
        return list(itertools.islice(self._queue, count))


async def _staged(staging: asyncio.Future[Prepared]) -> Prepared | None:
    """What the stager wrote ahead; None if it failed (it is only a head start: every
    entry is applied whatever it did)."""
    try:
        return await staging
    except Exception as e:  # an OSError, or a bug: logged, and nothing is lost
        log.warning("writing files ahead failed: %s: %s", type(e).__name__, e)
        return None


@dataclass(frozen=True)
class _Waiting:
    """An entry refused because ``beyond`` is a symlink or a file here, kept (without
    its content) until a version makes ``beyond`` a directory."""

    msg: EntryMsg
    beyond: bytes


@dataclass
class _Failing:
    msg: EntryMsg
    error: str
    delay_s: float = _RETRY_FIRST_S
    due: float = field(default_factory=time.monotonic)


class Receiver(Side):
    """Applies one peer's log here, in order, and acknowledges it."""

    def __init__(self, ctx: Context, peer: str, reader: Any, writer: Any,
                 stats: LinkStats, *, once: bool = False) -> None:
        super().__init__(ctx, peer, reader, writer, stats)
        #: A pull that ends when the pusher is caught up (``--once``): the pusher closes
        #: the channel after its BYE, so nothing is sent unasked (no DIRECT), and its
        #: relays matter for no later entry.
        self.once = once
        self.entries: _Entries = _Entries(maxsize=QUEUE_ENTRIES)
        self.queued_bytes = 0  # inline content in ``entries``, at most QUEUE_BYTES
        self._dequeued = asyncio.Event()
        #: Content for the one request open at a time (``_open``); other content is
        #: dropped if it is the rest of a request given up, refused if never asked for.
        self.content: asyncio.Queue[Data | Copy | Hole | NoData] = \
            asyncio.Queue(_CONTENT_QUEUE)
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
        self._late: set[asyncio.Future[None]] = set()
        #: MARKs sent, the one open with what it sampled, and the seqs last answered
        self._marks = 0
        self._sampled: tuple[int, dict[str, tuple[str, int]]] | None = None
        self._answered = asyncio.Event()
        self._answered_at: dict[str, tuple[str, int]] = {}
        #: Up to ``_held`` (the cursor) the pusher sends again only the versions of
        #: ``_again``, whose records go once that is applied; the hosts trusted now,
        #: with how often each came back from a new store (Context.restarts)
        self._held = 0
        self._again: tuple[str, ...] = ()
        #: Paths whose content the peer could not send (NODATA), until a later version
        self._unheld: set[bytes] = set()
        self._trusting: dict[str, int] = {}
        #: Entries refused for a component that is no directory here, by path
        self.waiting: dict[bytes, _Waiting] = {}

    async def run(self) -> None:
        """The handshake, then reading, applying and retrying at once, until the peer
        says BYE or the link fails."""
        store = self.ctx.store
        hello = await self.io.expect(Hello)
        check_hello(hello, self.peer, self.stats)
        await self.io.send(Hello(PROTOCOL_VERSION, self.ctx.name, store.epoch, now_ns()))
        direct = () if self.once else self._trusted(self.ctx.direct_from()[0])
        resume = await self.ctx.tree(store.begin_receiving, self.peer, hello.epoch, direct)
        cursor = resume.cursor or Cursor("", 0)
        await self.io.send(IHave(cursor.epoch, resume.seq, direct, resume.held,
                                 resume.again))
        start = await self.io.expect(Start)
        if direct and start.seq < resume.seq:
            # everything, or a replay: what it leaves out now lies below the cursor. The
            # cursor keeps its old epoch until this is recorded, so a crash before it
            # asks for everything again
            await self.ctx.tree(store.trust, self.peer, hello.epoch, direct, start.seq)
        self.stats.expected_in += start.total
        self.epoch = hello.epoch
        self.done_seq = self.saved_seq = start.seq
        # what comes again of hosts that went away: their records go once it is applied
        self._held = 0 if start.full or start.seq < resume.seq else resume.held
        self._again = resume.again
        self._trusting = {o: self.ctx.restarts(o) for o in direct}
        if resume.again:
            log.info("peer=%s is asked again for what it left out of the versions of %s, "
                     "from its seq %d", self.peer, ", ".join(resume.again), start.seq)
        if start.full:
            log.info("peer=%s sends everything it has (new epoch %s)", self.peer, hello.epoch)
        tasks = [self._read_frames(), self._apply_all(), self._retry_failing()]
        if self.once:
            await run_together(*tasks)
            return
        self.ctx.receiving(self.peer, True,
                          anew=start.full and cursor.epoch not in ("", hello.epoch))
        try:
            await run_together(*tasks, self._tell_direct(), self._ask_caught_up())
        finally:
            self.ctx.receiving(self.peer, False)

    def _trusted(self, origins: tuple[str, ...]) -> tuple[str, ...]:
        """The hosts linked in here whose versions this peer may leave out: every set
        this host shares with the peer is one they share too, so whatever the peer
        would relay of theirs, they send here themselves."""
        sets = self.ctx.sets_with(self.peer)
        return tuple(o for o in origins
                     if o != self.peer and all(s.has_host(o) for s in sets))

    async def _tell_direct(self) -> None:
        """Keep the pusher told which hosts' own versions reach this host from them: it
        leaves those out, so that in a mesh each version crosses to each host once, not
        once per peer.

        Each is recorded (Store.trust) before the pusher is told. A host that goes away
        may not have sent everything the pusher left out of its versions: if it is not
        back within RELINK_GRACE_S (or comes back from a new store), the link ends with
        BYE, and the pusher, dialling again at once, streams again from the oldest seq
        since which it left anything out (Store.begin_receiving)."""
        trusted = self._trusting  # what IHAVE named, and each host named since
        told = tuple(trusted)
        lost_since: float | None = None
        while True:
            origins, changed = self.ctx.direct_from()
            origins = self._trusted(origins)
            if origins != told:
                new = [o for o in origins if o not in trusted]
                if new:
                    await self.ctx.tree(self.ctx.store.trust, self.peer, self.epoch, new,
                                        self.done_seq)
                    trusted.update((o, self.ctx.restarts(o)) for o in new)
                await self.io.send(Direct(origins))
                told = origins
            gone = sorted(o for o, n in trusted.items()
                          if o not in origins or self.ctx.restarts(o) != n)
            if not gone:
                lost_since = None
                await changed.wait()
                continue
            now = time.monotonic()
            lost_since = now if lost_since is None else lost_since
            anew = any(self.ctx.restarts(o) != trusted[o] for o in gone)
            if not anew and now - lost_since < RELINK_GRACE_S:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(),
                                           lost_since + RELINK_GRACE_S - now)
                continue
            why = f"{ASK_AGAIN}: {', '.join(gone)} went away before sending everything"
            await self.io.send(Bye(why))
            raise AskedAgain(f"{why}; {self.peer} is to send what it left out of theirs")

    async def _ask_caught_up(self) -> None:
        """Ask this peer, after the other links moved, to say when it is next caught up
        (MARK, then CAUGHTUP): from then on, what the other pushers left out of this
        peer's versions up to where they had got is held here, and a new link from them
        need not start that far back (Store.advance_trust). One MARK is open at a time;
        the end of a burst is gathered into one."""
        while True:
            if self._sampled is not None:
                self._answered.clear()
                await self._answered.wait()
                continue
            moved = self.ctx.moved_event()
            if not self._sample():
                await moved.wait()
                continue
            await asyncio.sleep(MARK_GATHER_S)  # a timer: the rest of a burst's end
            samples = self._sample()
            if samples:
                self._marks += 1
                self._sampled = (self._marks, samples)
                await self.io.send(Mark(self._marks))

    def _sample(self) -> dict[str, tuple[str, int]]:
        """How far each other link has read its peer's log (in which epoch), where it
        moved since the last answer."""
        return {peer: reached for peer, reached in self.ctx.reached.items()
                if peer != self.peer and reached != self._answered_at.get(peer)}

    async def _caught_up(self, mark: int) -> None:
        """This peer's CAUGHTUP is settled: everything it sent before is applied here."""
        if self._sampled is None or self._sampled[0] != mark:
            return  # not the MARK open: nothing was sampled for it
        samples = self._sampled[1]
        self._sampled = None
        self._answered.set()
        if self.retry or self._unheld or self.waiting:
            # a version of this peer's that failed here, that waits for its directory,
            # or that it could not send (it changed, and the newer one is not logged
            # yet), is not held here
            return
        await self.ctx.tree(self.ctx.store.advance_trust, self.peer, samples)
        self._answered_at.update(samples)

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
            elif isinstance(msg, (Passed, CaughtUp)):
                await self.entries.put(msg)  # in order: it settles what came before it
            elif isinstance(msg, (Data, Copy, Hole, NoData)):
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
        one job and one store transaction, and its small files are synced together.
        While it applies a batch, the stager writes the small files of what is queued
        behind it ahead (omirror/staging.py, Ahead)."""
        count = 0
        pending: list[EntryMsg] = []
        passed: Passed | CaughtUp | None = None  # taken from the queue, to settle after
        # ``pending``
        ahead: asyncio.Future[Prepared] | None = None
        try:
            while True:
                if not pending:
                    if passed is not None:
                        self.done_seq = max(self.done_seq, passed.seq)
                        if isinstance(passed, CaughtUp):
                            await self._caught_up(passed.mark)
                        passed = None
                    if self.entries.empty():
                        await self._save_cursor()
                    await self._room_to_fail()
                    item = await self.entries.get()
                    while not isinstance(item, _Settles):
                        pending.append(self._dequeue(item))
                        if len(pending) >= _BATCH or self.entries.empty():
                            break
                        item = self.entries.get_nowait()
                    else:
                        passed = item  # ends the batch: it settles only what came before
                    if not pending:
                        continue
                staged = None
                if ahead is not None:
                    staged = await _staged(ahead)
                    ahead = None
                ahead = self._stage_next()
                results = await self.ctx.tree(self._apply_batch, list(pending), staged)
                del pending[:len(results)]
                for msg, outcome in results:
                    await self._settle(msg, outcome)
                    if msg.seq:  # 0: a parent sent ahead of its place in the log
                        self.done_seq = msg.seq
                    count += 1
                    if count % _ACK_EVERY == 0:
                        await self._save_cursor()
        finally:
            if ahead is not None:  # the batch it was for will not run
                ahead.add_done_callback(self._drop_late)

    def _stage_next(self) -> asyncio.Future[Prepared] | None:
        """Have the small files queued behind the batch about to be applied written
        ahead, beside it; None when there are none, or nothing is written ahead (on a
        disk where creating a file is quick, it would cost more than it gains)."""
        if self.ctx.stage is None or not staging.CREATE_COST.slow():
            return None
        ahead = [(m.entry, m.data) for m in self.entries.peek(_BATCH)
                 if isinstance(m, EntryMsg)]
        if not any(data is not None for _, data in ahead):
            return None
        return asyncio.ensure_future(self.ctx.stage(
            self.ctx.resolver.stage, self.ctx.sets_with(self.peer), ahead))

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

    def _apply_batch(self, msgs: list[EntryMsg], staged: Prepared | None = None
                     ) -> list[tuple[EntryMsg, Result]]:
        """In the tree worker: the resolver applies ``msgs`` in order, up to the first
        that needs its content fetched, with what was written ahead for them."""
        outcomes = self.ctx.resolver.batch(
            self.peer, self.ctx.sets_with(self.peer), [(m.entry, m.data) for m in msgs],
            self._stopped, staged)
        return list(zip(msgs, outcomes))

    def _apply_one(self, msg: EntryMsg) -> Result:
        """In the tree worker: apply one entry again (a retry)."""
        return self.ctx.resolver.one(self.peer, self.ctx.sets_with(self.peer), msg.entry,
                                     msg.data, self._stopped)

    def _stopped(self, path: bytes) -> str | None:
        return self.ctx.stopped(self.peer, path)

    async def _settle(self, msg: EntryMsg, outcome: Result) -> None:
        """What follows an entry's application in the loop: its fetch, its failure or
        refusal, the end of its earlier failures."""
        self._unheld.discard(msg.entry.path)  # a later version of it came
        waited = self.waiting.pop(msg.entry.path, None)
        again = waited is not None and waited.msg is msg  # applied again, refused again
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
            # and closing the link would refuse it again on every reconnect. But where
            # the peer's own next version makes that component a directory (its log
            # holds the path's latest version, not the order of the changes), the path
            # waits for it
            if self._wait_for_directory(msg, outcome):
                log.log(logging.DEBUG if again else logging.WARNING,
                        "peer=%s %s; it waits until that is a directory here", self.peer,
                        outcome)
            else:
                log.warning("peer=%s sent a path that is refused here: %s", self.peer,
                            outcome)
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
        held = [f.msg.seq for f in self.retry.values() if f.msg.seq]
        held.extend(w.msg.seq for w in self.waiting.values() if w.msg.seq)
        if held:
            durable = min(durable, min(held) - 1)
        # while what was left out comes again, the cursor stays where it was: what lies
        # below it but theirs is held here (and their records ask for it again)
        cursor = Cursor(self.epoch, max(durable, self._held))
        await self.ctx.tree(self.ctx.store.set_cursor, self.peer, cursor)
        if self._again and durable >= self._held:
            gone = [o for o in self._again if o not in self._trusting]
            await self.ctx.tree(self.ctx.store.untrust, self.peer, gone)
            self._again = ()
        await self.io.send(Ack(self.done_seq))
        self.saved_seq = self.done_seq
        self.ctx.reached[self.peer] = (self.epoch, self.done_seq)
        self.ctx.moved()

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

    def _wait_for_directory(self, msg: EntryMsg, refused: PathRefused) -> bool:
        """Keep an entry refused for a component that is no directory here, until a
        version makes it one; False for a refusal no later version can lift, a deletion
        (nothing of the tree lies beyond that component to delete), or too many kept.

        The persisted cursor stays below it, as below a failed entry, so that a link
        that drops meanwhile has it sent again."""
        if refused.beyond is None or msg.entry.kind is Kind.TOMBSTONE \
                or len(self.waiting) >= MAX_WAITING:
            return False
        self.waiting[msg.entry.path] = _Waiting(replace(msg, data=None), refused.beyond)
        return True

    def _now_directories(self, waiting: list[_Waiting]) -> list[_Waiting]:
        """In the tree worker: those whose component is recorded as a directory now."""
        dirs = {}
        for beyond in {w.beyond for w in waiting}:  # a peer's many paths below one
            record = self.ctx.store.get(beyond)
            dirs[beyond] = record is not None and record.entry.kind is Kind.DIR
        return [w for w in waiting if dirs[w.beyond]]

    async def _retry_failing(self) -> None:
        """Apply each failed entry again when its time comes (doubling, up to a minute),
        and each waiting one once its component is a directory here."""
        while True:
            await asyncio.sleep(0.5)  # a timer: retries are due on their own schedule
            now = time.monotonic()
            for path, failing in list(self.retry.items()):
                if failing.due <= now and self.retry.get(path) is failing:
                    await self._apply(failing.msg)
            if self.waiting:
                ready: list[_Waiting] = await self.ctx.tree(self._now_directories,
                                                            list(self.waiting.values()))
                for waiting in ready:
                    if self.waiting.get(waiting.msg.entry.path) is waiting:
                        await self._apply(waiting.msg)

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
            old_fd, resumed = await self.ctx.tree(staging.open_partial, self.ctx.applier.dirs,
                                                  need.mset, entry)
            if resumed:
                log.info("peer=%s path=%s resumes a cut transfer: %s of %s are here",
                         self.peer, show(entry.path), human_bytes(resumed),
                         human_bytes(entry.size))
        if old_fd < 0 and need.old is not None and \
                DELTA_MIN <= need.old.entry.size <= MAX_DELTA_BLOCKS * BLOCK \
                and entry.size >= DELTA_MIN:
            old_fd = await self.ctx.tree(staging.open_old, self.ctx.applier.dirs, need.mset,
                                         need.old)
        if old_fd >= 0:
            try:
                digests, _ = await asyncio.to_thread(fsio.block_digests, old_fd, BLOCK)
                blocks = tuple(digests)
            except OSError:
                os.close(old_fd)
                old_fd = -1
        temp: TempFile | None = None
        begun = asyncio.ensure_future(self.ctx.tree(self._begin, need))
        try:
            try:
                temp = building = await asyncio.shield(begun)
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
                    # its newer version is to come from the peer's log: until it does,
                    # this host does not hold what the peer made (see _caught_up)
                    self._unheld.add(entry.path)
                    await self.ctx.tree(building.abort)
                    if resumed:
                        await self.ctx.tree(staging.drop_partial, self.ctx.applier.dirs,
                                            need.mset, entry)
                    return
                if isinstance(part, Copy):
                    if old_fd < 0:
                        raise ProtocolError("COPY without a delta base")
                    await self.ctx.tree(building.copy_from, old_fd, part.offset, part.length)
                    continue
                if isinstance(part, Hole):
                    # refused (ApplyError) when it passes the end of the entry's file
                    await self.ctx.tree(building.hole, part.length)
                    continue
                if part.data:
                    await self.ctx.tree(building.write, part.data)
                if part.end:
                    break
            await self.ctx.tree(self.ctx.resolver.install, self.peer,
                                self.ctx.sets_with(self.peer), need, building)
            if resumed:
                await self.ctx.tree(staging.drop_partial, self.ctx.applier.dirs,
                                    need.mset, entry)
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

    def _drop_late(self, ahead: asyncio.Future[Prepared]) -> None:
        """Remove what was written ahead for a batch that will not run, in the stager
        (a stage job may still hold it up: never in the loop)."""
        if self.ctx.stage is not None and not ahead.cancelled() \
                and ahead.exception() is None:
            task = asyncio.ensure_future(self.ctx.stage(self.ctx.applier.ahead.drop,
                                                        ahead.result()))
            self._late.add(task)  # held until done: a task nobody holds may be collected
            task.add_done_callback(self._late.discard)

    def _abort_late(self, begun: asyncio.Future[TempFile]) -> None:
        """Remove a temp file made for a fetch given up before it existed."""
        if not begun.cancelled() and begun.exception() is None:
            task = asyncio.ensure_future(self.ctx.tree(begun.result().abort))
            self._late.add(task)  # held until done: a task nobody holds may be collected
            task.add_done_callback(self._late.discard)

    def _begin(self, need: Need) -> TempFile:
        """In the tree worker: the temp file the content is built in."""
        return self.ctx.applier.begin_file(need.mset, need.entry)
