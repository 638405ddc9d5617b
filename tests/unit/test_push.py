"""The pushing side of a link in one process: what it serves when the tree or the peer
misbehaves."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import xxhash
from linkfakes import Frames
from test_fsio import holes_reported, make_sparse

from omirror import config
from omirror import store as store_module
from omirror.apply import Applier
from omirror.entry import Entry, Kind, Stamp
from omirror.link import Context, LinkStats
from omirror.push import _PAGE, Pusher, _read_inline
from omirror.scanner import MARKER, Scanner
from omirror.store import Record, Store
from omirror.wire import CaughtUp, Data, EntryMsg, Hole, NoData, Passed, Want

DISTFILE = "( /data ) -> ( alpha beta ) install ;\n"


def served(root: Path, store: Store, mset: config.MirrorSet, scanner: Scanner,
           want: Want) -> list[object]:
    """What a pusher of host alpha sends peer beta for ``want`` (within 10 s)."""
    async def run() -> list[object]:
        async def tree(fn, *args):  # type: ignore[no-untyped-def]
            return fn(*args)
        ctx = Context("alpha", store, Applier(os.fsencode(root), store, "alpha"), scanner,
                      os.fsencode(root), lambda peer: [mset], tree)
        frames = Frames()
        pusher = Pusher(ctx, "beta", None, frames, LinkStats())
        await asyncio.wait_for(pusher._serve(want), 10)
        return frames.sent

    return asyncio.run(run())


def test_a_file_that_does_not_hold_its_recorded_version_is_hashed_again(
        tmp_path: Path) -> None:
    """NODATA tells the peer a newer entry follows. When the record itself is wrong (it
    names content the file never held), no event would ever bring that entry: the pusher
    rehashes the file, and its real content becomes a new version for every peer."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / os.fsdecode(MARKER)).write_bytes(b"marker\n")
    f = root / "data" / "f"
    f.write_bytes(b"what the file holds")
    mset = config.parse(DISTFILE, "test.conf").sets[0]
    store = Store.open(tmp_path / "state")
    scanner = Scanner(store, "alpha")
    scanner.scan_set(mset, os.fsencode(root))
    # a record that names other content with the file's very stat: no scan looks again
    record = store.get(b"data/f")
    wrong = xxhash.xxh3_128(b"what the record says").digest()
    with store._lock, store._conn:  # the only way to make such a record by hand
        store._conn.execute("UPDATE entries SET digest=? WHERE path=?", (wrong, b"data/f"))
    assert store.get(b"data/f").entry.digest == wrong

    sent = served(root, store, mset, scanner, Want(1, b"data/f", wrong, 0, ()))
    assert isinstance(sent[-1], NoData) and any(isinstance(m, Data) for m in sent)
    after = store.get(b"data/f").entry
    assert after.digest == xxhash.xxh3_128(b"what the file holds").digest()
    assert after.stamp > record.entry.stamp and store.get(b"data/f").seq > record.seq
    store.close()


def test_a_pusher_that_is_done_waits_for_the_acknowledgement_of_its_last_passed(
        tmp_path: Path) -> None:
    """The receiver acknowledges a PASSED like entries; a BYE sent before that would
    leave the acknowledgement to a closed channel (``--once`` then failed its peer)."""
    store = Store.open(tmp_path / "state")

    async def run() -> tuple[list[object], list[object]]:
        async def tree(fn, *args):  # type: ignore[no-untyped-def]
            return fn(*args)
        ctx = Context("alpha", store, None, None, b"/", lambda peer: [], tree)  # type: ignore[arg-type]
        frames = Frames()
        pusher = Pusher(ctx, "beta", None, frames, LinkStats(), once=True)
        pusher.passed = 7
        finishing = asyncio.ensure_future(pusher._finish())
        await asyncio.sleep(0)  # let it run up to its wait
        before = list(frames.sent)
        pusher.stats.acked_seq = 7
        pusher.acked.set()
        await asyncio.wait_for(finishing, 5)
        return before, frames.sent

    before, after = asyncio.run(run())
    assert before == [] and [type(m).__name__ for m in after] == ["Bye"]
    store.close()


def _recorded_then_fifo(tmp_path: Path, size: int) -> tuple[Path, Store, config.MirrorSet,
                                                             Scanner]:
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / os.fsdecode(MARKER)).write_bytes(b"marker\n")
    f = root / "data" / "f"
    f.write_bytes(b"x" * size)
    mset = config.parse(DISTFILE, "test.conf").sets[0]
    store = Store.open(tmp_path / "state")
    scanner = Scanner(store, "alpha")
    scanner.scan_set(mset, os.fsencode(root))
    f.unlink()
    os.mkfifo(f)  # its record still says FILE: no scan has looked since
    return root, store, mset, scanner


def test_a_recorded_file_swapped_for_a_fifo_is_not_read_inline(tmp_path: Path) -> None:
    """Reading a FIFO opened O_NONBLOCK raised BlockingIOError out of the page: the link
    dropped and met the same entry on every reconnect. It is left out instead."""
    root, store, mset, _ = _recorded_then_fifo(tmp_path, 100)
    record = store.get(b"data/f")
    assert record is not None and record.entry.kind is Kind.FILE
    assert _read_inline(os.fsencode(root), [record], [mset]) == {}
    store.close()


def test_a_fifo_is_never_opened_to_serve_content(tmp_path: Path) -> None:
    """A FIFO opened for reading without O_NONBLOCK waits for a writer for ever: the
    content server held a thread, and the peer's request, until the daemon died. The
    file must be a regular file, and the peer is told at once."""
    root, store, mset, scanner = _recorded_then_fifo(tmp_path, 200 << 10)
    record = store.get(b"data/f")
    assert record is not None

    sent = served(root, store, mset, scanner, Want(1, b"data/f", record.entry.digest, 0, ()))
    assert [type(m).__name__ for m in sent] == ["NoData"]
    store.close()


def test_a_relay_leaves_out_the_versions_of_a_host_the_peer_is_linked_to(
        tmp_path: Path) -> None:
    """In a mesh each host relays what it received. Relayed to everyone, each version
    crossed to each host once per peer (ten peers: nine entries per file per host); a
    peer that receives a host's versions from that host itself (it says so: DIRECT) gets
    none of them from a relay, and what is relayed goes with its content."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / os.fsdecode(MARKER)).write_bytes(b"marker\n")
    for name in ("ours", "gammas", "deltas"):
        (root / "data" / name).write_bytes(b"content of %s\n" % name.encode())
    mset = config.parse(DISTFILE, "test.conf").sets[0]
    store = Store.open(tmp_path / "state")
    Scanner(store, "alpha").scan_set(mset, os.fsencode(root))
    for name, origin in (("gammas", "gamma"), ("deltas", "delta")):  # received from them
        record = store.get(b"data/" + name.encode())
        assert record is not None
        store.put(replace(record.entry, stamp=Stamp(record.entry.stamp.time_ns + 1, origin)),
                  record.sig)

    names = {b"data/ours", b"data/gammas", b"data/deltas"}

    async def run() -> dict[bytes, bool]:
        async def tree(fn, *args):  # type: ignore[no-untyped-def]
            return fn(*args)
        ctx = Context("alpha", store, None, Scanner(store, "alpha"), os.fsencode(root),  # type: ignore[arg-type]
                      lambda peer: [mset], tree)
        frames = Frames()
        pusher = Pusher(ctx, "beta", None, frames, LinkStats())
        pusher.direct = frozenset({"gamma"})
        streaming = asyncio.ensure_future(pusher._stream(0))

        def carried() -> dict[bytes, bool]:
            return {m.entry.path: m.data is not None for m in frames.sent
                    if isinstance(m, EntryMsg) and m.entry.path in names}
        for _ in range(500):
            if pusher.examined == store.last_seq:
                break
            await asyncio.sleep(0.01)
        streaming.cancel()
        assert pusher.examined == store.last_seq, "the pusher did not read its log through"
        return carried()

    assert asyncio.run(run()) == {b"data/ours": True, b"data/deltas": True}
    store.close()


def test_a_name_linked_to_one_sent_before_travels_without_its_content(
        tmp_path: Path) -> None:
    """Hard links: the content crosses once; the receiver links the second name to the
    first (or asks for the content). A hint naming a path the peer does not share is
    not sent at all."""
    root = tmp_path / "root"
    (root / "data" / "private").mkdir(parents=True)
    (root / "data" / os.fsdecode(MARKER)).write_bytes(b"marker\n")
    (root / "data" / "a").write_bytes(b"shared content\n")
    os.link(root / "data" / "a", root / "data" / "b")
    (root / "data" / "lone").write_bytes(b"one name\n")
    mset = config.parse(DISTFILE + "    except /data/private ;\n", "test.conf").sets[0]
    store = Store.open(tmp_path / "state")
    Scanner(store, "alpha").scan_set(mset, os.fsencode(root))
    names = {b"data/a", b"data/b", b"data/lone"}

    async def run() -> dict[bytes, tuple[bool, bytes]]:
        async def tree(fn, *args):  # type: ignore[no-untyped-def]
            return fn(*args)
        ctx = Context("alpha", store, None, Scanner(store, "alpha"), os.fsencode(root),  # type: ignore[arg-type]
                      lambda peer: [mset], tree)
        frames = Frames()
        pusher = Pusher(ctx, "beta", None, frames, LinkStats())
        streaming = asyncio.ensure_future(pusher._stream(0))

        def carried() -> dict[bytes, tuple[bool, bytes]]:
            return {m.entry.path: (m.data is not None, m.entry.link) for m in frames.sent
                    if isinstance(m, EntryMsg) and m.entry.path in names}
        for _ in range(500):
            if len(carried()) == len(names):
                break
            await asyncio.sleep(0.01)
        streaming.cancel()
        return carried()

    a, b = store.get(b"data/a"), store.get(b"data/b")
    assert a is not None and b is not None
    first, second = sorted((a, b), key=lambda r: r.seq)  # in the order the scan listed them
    assert asyncio.run(run()) == {first.entry.path: (True, second.entry.path),
                                  second.entry.path: (False, first.entry.path),
                                  b"data/lone": (True, b"")}
    hidden = Pusher._outgoing(replace(a.entry, link=b"data/private/c"), [mset])
    assert hidden.link == b"" and Pusher._outgoing(a.entry, [mset]).link == b"data/b"
    store.close()


def test_a_page_of_large_small_files_is_read_a_few_mib_at_a_time() -> None:
    """Files up to 1 MiB travel inline; a page of 256 of them read at once would hold
    256 MiB. The page is cut where the content read at once would pass 8 MiB."""
    from omirror import push

    def record(i: int, size: int, kind: Kind = Kind.FILE) -> tuple[Record, bool]:
        entry = Entry(b"data/f%d" % i, kind, Stamp(i, "alpha"), size=size,
                      digest=b"\x01" * 16)
        return Record(entry, i, None), False

    mib = 1 << 20
    records = [record(i, mib) for i in range(20)] + [record(20, 0, Kind.DIR),
                                                     record(21, 5 * mib)]
    def small(r: Record) -> bool:
        return r.entry.kind is Kind.FILE and r.entry.size <= mib
    groups = list(push._groups(records, small))
    assert [len(g) for g in groups] == [8, 8, 6]  # a directory, and a file too large to
    assert [r for g in groups for r in g] == records  # travel inline, read nothing
    assert len(list(push._groups(records, lambda r: False))) == 1  # an index, relayed


def test_a_sparse_small_file_goes_without_its_content_and_is_served_with_its_holes(
        tmp_path: Path) -> None:
    """Inline content is dense: a sparse file of inline size is left out of its entry
    (the receiver asks for it), and what a WANT gets is its data and its holes."""
    if not holes_reported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} does not report holes")
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / os.fsdecode(MARKER)).write_bytes(b"marker\n")
    content = make_sparse(root / "data" / "sparse",
                          ((0, b"h" * 4096), (256 << 10, b"t" * 4096)), 512 << 10)
    (root / "data" / "dense").write_bytes(b"d" * 4096)
    mset = config.parse(DISTFILE, "test.conf").sets[0]
    store = Store.open(tmp_path / "state")
    scanner = Scanner(store, "alpha")
    scanner.scan_set(mset, os.fsencode(root))
    sparse, dense = store.get(b"data/sparse"), store.get(b"data/dense")
    assert sparse is not None and dense is not None
    assert sparse.entry.digest == xxhash.xxh3_128(content).digest()
    assert _read_inline(os.fsencode(root), [sparse, dense], [mset]) == \
        {b"data/dense": b"d" * 4096}

    sent = served(root, store, mset, scanner,
                  Want(1, b"data/sparse", sparse.entry.digest, 0, ()))
    assert [type(m).__name__ for m in sent] == ["Data", "Hole", "Data", "Hole", "Data"]
    rebuilt = b"".join(m.data if isinstance(m, Data) else
                       bytes(m.length if isinstance(m, Hole) else 0) for m in sent)
    assert rebuilt == content
    assert isinstance(sent[-1], Data) and sent[-1].end and sent[-1].data == b""
    store.close()


def _put_dirs(store: Store, prefix: bytes, origin: str, first: int) -> None:
    """Three pages of directory versions made by ``origin``, stamped from ``first`` on."""
    for i in range(3 * _PAGE):
        store.put(Entry(b"data/%s%d" % (prefix, i), Kind.DIR, Stamp(first + i, origin),
                        vector=((origin, first + i),)), None)


def _pusher_to_beta(store: Store, mset: config.MirrorSet) -> tuple[Context, Frames, Pusher]:
    """alpha's pusher to beta, writing into ``Frames``; its tree worker is the caller."""
    async def tree(fn, *args):  # type: ignore[no-untyped-def]
        return fn(*args)
    ctx = Context("alpha", store, None, None, b"/", lambda peer: [mset], tree)  # type: ignore[arg-type]
    frames = Frames()
    return ctx, frames, Pusher(ctx, "beta", None, frames, LinkStats())


def _streamed(store: Store, mset: config.MirrorSet,
              done: Callable[[Pusher, list[object]], bool],
              beside: Callable[[list[object]], Awaitable[None]] | None = None
              ) -> list[object]:
    """What alpha's pusher streams to beta from the start of its log until ``done``
    (within 5 s), with ``beside`` running as another task of the same loop."""
    async def run() -> list[object]:
        _ctx, frames, pusher = _pusher_to_beta(store, mset)
        other = None if beside is None else asyncio.ensure_future(beside(frames.sent))
        streaming = asyncio.ensure_future(pusher._stream(0))
        for _ in range(500):
            if done(pusher, frames.sent):
                break
            await asyncio.sleep(0.01)
        streaming.cancel()
        if other is not None:
            other.cancel()
        return frames.sent

    return asyncio.run(run())


def test_the_peers_own_versions_are_passed_without_being_read_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst a peer sent here is logged here too; the pusher back to that peer never
    sends it its own versions, and no longer reads them back, record by record, to
    drop them: it sends what others made and says where the log ended (PASSED)."""
    store = Store.open(tmp_path / "state")
    mset = config.parse(DISTFILE, "test.conf").sets[0]
    with store.batch():
        _put_dirs(store, b"f", "beta", 1)
        mine = store.put(Entry(b"data/ours", Kind.DIR, Stamp(10**6, "alpha"),
                               vector=(("alpha", 10**6),)), None)
        _put_dirs(store, b"g", "beta", 10**6 + 1)
    last = store.last_seq
    decoded = 0
    record = store_module._record

    def counted(row: tuple) -> Record:  # type: ignore[type-arg]
        nonlocal decoded
        decoded += 1
        return record(row)
    monkeypatch.setattr(store_module, "_record", counted)

    sent = _streamed(store, mset, lambda pusher, sent: any(
        isinstance(m, Passed) and m.seq == last for m in sent))
    assert [(m.seq, m.entry.path) for m in sent if isinstance(m, EntryMsg)] == [
        (mine, b"data/ours")]
    assert [m.seq for m in sent if isinstance(m, Passed)] == [last]
    assert decoded <= 4, f"{decoded} records read back to be dropped"
    store.close()


def test_a_pusher_says_passed_once_the_log_is_quiet_not_after_every_page(
        tmp_path: Path) -> None:
    """In a mesh most of what a host logs is not for a given peer (its own versions,
    those it gets from their makers). A PASSED after every page of that costs the peer
    a write of its cursor each time; one when the log has gone quiet moves the cursor
    as far."""
    store = Store.open(tmp_path / "state")
    mset = config.parse(DISTFILE, "test.conf").sets[0]

    async def run() -> list[object]:
        ctx, frames, pusher = _pusher_to_beta(store, mset)
        streaming = asyncio.ensure_future(pusher._stream(0))
        for i in range(1, 21):  # the peer's own versions, logged one by one
            store.put(Entry(b"data/b%d" % i, Kind.DIR, Stamp(i, "beta"),
                            vector=(("beta", i),)), None)
            ctx.notify()
            for _ in range(100):  # until the pusher has read it
                if pusher.examined == store.last_seq:
                    break
                await asyncio.sleep(0.005)
            assert pusher.examined == store.last_seq
        for _ in range(500):
            if any(isinstance(m, Passed) for m in frames.sent):
                break
            await asyncio.sleep(0.01)
        streaming.cancel()
        return frames.sent

    sent = asyncio.run(run())
    assert [m.seq for m in sent if isinstance(m, Passed)] == [store.last_seq]
    store.close()


def test_a_mark_is_answered_once_everything_for_the_peer_is_sent(tmp_path: Path) -> None:
    """CAUGHTUP follows every entry the log held for the peer when the pusher found
    nothing more to send after the MARK, and names where the log ended: the receiver
    settles it after all of them."""
    store = Store.open(tmp_path / "state")
    mset = config.parse(DISTFILE, "test.conf").sets[0]
    with store.batch():
        _put_dirs(store, b"d", "alpha", 1)
    store.put(Entry(b"data/theirs", Kind.DIR, Stamp(10**6, "beta"),
                    vector=(("beta", 10**6),)), None)

    def marked(pusher: Pusher, sent: list[object]) -> bool:
        pusher._mark = 3
        return any(isinstance(m, CaughtUp) for m in sent)
    sent = _streamed(store, mset, marked)
    answers = [i for i, m in enumerate(sent) if isinstance(m, CaughtUp)]
    assert [sent[i] for i in answers] == [CaughtUp(3, store.last_seq)]
    assert sum(isinstance(m, EntryMsg) for m in sent[:answers[0]]) == 3 * _PAGE
    store.close()


def _counting_pages(store: Store, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many pages each peer's pusher reads (by the first origin it skips: its peer)."""
    pages: dict[str, int] = {}
    page = store.page

    def counted(*args: Any, **kw: Any) -> list[Record]:
        skipped = kw.get("skip_origins") or ("",)
        pages[skipped[0]] = pages.get(skipped[0], 0) + 1
        return page(*args, **kw)
    monkeypatch.setattr(store, "page", counted)
    return pages


async def _until_true(cond: Callable[[], bool], what: str, within_s: float = 5.0) -> None:
    for _ in range(int(within_s * 100)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


def test_a_mark_wakes_an_idle_pusher_alone(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A MARK read while the pusher waits for its log to grow is answered at once, and
    wakes no other pusher: a peer that sends MARKs cannot make every link page its log."""
    store = Store.open(tmp_path / "state")
    mset = config.parse(DISTFILE, "test.conf").sets[0]
    store.put(Entry(b"data/d", Kind.DIR, Stamp(1, "alpha"), vector=(("alpha", 1),)), None)
    pages = _counting_pages(store, monkeypatch)

    async def run() -> list[object]:
        ctx, frames, pusher = _pusher_to_beta(store, mset)
        other = Pusher(ctx, "gamma", None, Frames(), LinkStats())
        streams = [asyncio.ensure_future(p._stream(0)) for p in (pusher, other)]
        await _until_true(lambda: pusher.examined == other.examined == store.last_seq,
                          "both pushers read the log")
        before = pages.get("gamma")
        pusher._mark = 1  # as _read_replies does with a MARK
        pusher._woken.set()
        await _until_true(lambda: any(isinstance(m, CaughtUp) for m in frames.sent),
                          "the MARK is answered well within the 5 s an idle pusher sleeps")
        assert pages.get("gamma") == before
        for stream in streams:
            stream.cancel()
        return frames.sent

    assert CaughtUp(1, store.last_seq) in asyncio.run(run())
    store.close()


def test_a_version_logged_as_the_pusher_finds_its_log_ended_is_sent_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wake of a version logged between the pusher's last page and its wait must not
    be lost: the pusher would sleep through it until its next look, seconds later."""
    store = Store.open(tmp_path / "state")
    mset = config.parse(DISTFILE, "test.conf").sets[0]
    page = store.page

    async def run() -> list[object]:
        ctx, frames, pusher = _pusher_to_beta(store, mset)

        def and_meanwhile(*args: Any, **kw: Any) -> list[Record]:
            found = page(*args, **kw)
            if not found and store.last_seq == 0:  # the log ended: a version comes now
                store.put(Entry(b"data/late", Kind.DIR, Stamp(1, "alpha"),
                                vector=(("alpha", 1),)), None)
                ctx.notify()
            return found
        monkeypatch.setattr(store, "page", and_meanwhile)
        streaming = asyncio.ensure_future(pusher._stream(0))
        try:  # 2 s: well within the 5 s of an idle pusher's sleep
            await _until_true(lambda: any(isinstance(m, EntryMsg) for m in frames.sent),
                              "the version is sent, not slept through", within_s=2.0)
        finally:
            streaming.cancel()
        return frames.sent

    assert [m.entry.path for m in asyncio.run(run()) if isinstance(m, EntryMsg)] == \
        [b"data/late"]
    store.close()


def test_below_the_peers_cursor_only_the_hosts_asked_again_are_sent(tmp_path: Path) -> None:
    """A link that starts again below the peer's cursor (IHAVE: held, again) resends
    there only the versions of the hosts that went away; beyond the cursor, all."""
    store = Store.open(tmp_path / "state")
    mset = config.parse(DISTFILE, "test.conf").sets[0]
    made = [(b"data/a1", "alpha"), (b"data/g1", "gamma"), (b"data/d1", "delta"),
            (b"data/a2", "alpha"), (b"data/g2", "gamma"), (b"data/d2", "delta")]
    seqs = {}
    for n, (path, origin) in enumerate(made, 1):
        seqs[path] = store.put(Entry(path, Kind.DIR, Stamp(n, origin),
                                     vector=((origin, n),)), None)
    held = seqs[b"data/d1"]

    def started(pusher: Pusher, sent: list[object]) -> bool:
        if pusher.examined is None:
            pusher._held, pusher._again = held, frozenset({"gamma"})
        return pusher.examined == store.last_seq
    sent = _streamed(store, mset, started)
    assert [m.entry.path for m in sent if isinstance(m, EntryMsg)] == [
        b"data/g1", b"data/a2", b"data/g2", b"data/d2"]
    store.close()


def test_a_pusher_with_a_backlog_gives_the_loop_back_between_pages(tmp_path: Path) -> None:
    """Writes the channel takes at once do not suspend: a pusher must yield by itself,
    or a host with a backlog for many peers answers nothing else (keepalives included)
    until every backlog is sent."""
    store = Store.open(tmp_path / "state")
    mset = config.parse(DISTFILE, "test.conf").sets[0]
    with store.batch():
        _put_dirs(store, b"d", "alpha", 1)
    last = store.last_seq
    seen: list[int] = []

    async def other_task(sent: list[object]) -> None:
        while True:
            seen.append(sum(isinstance(m, EntryMsg) for m in sent))
            await asyncio.sleep(0)
    _streamed(store, mset, lambda pusher, sent: pusher.examined == last, other_task)
    assert any(0 < n < 3 * _PAGE for n in seen), "the stream ran in one step"
    store.close()
