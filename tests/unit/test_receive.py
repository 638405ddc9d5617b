"""The receiving side of a link in one process: what it holds when paths fail."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import xxhash
from linkfakes import Frames

from omirror import config, receive
from omirror.apply import Applier
from omirror.entry import Entry, Kind, Stamp
from omirror.link import Context, LinkStats
from omirror.receive import Receiver
from omirror.scanner import MARKER, Scanner
from omirror.store import Cursor, Store
from omirror.wire import ASK_AGAIN, AskedAgain, Bye, Data, Direct, EntryMsg, Mark, Want


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


async def _until(sent: list[object], n: int) -> None:
    for _ in range(500):
        if len(sent) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(sent)} messages sent, not {n}: {sent}")


def _context(tmp_path: Path) -> tuple[Context, Store]:
    store = Store.open(tmp_path / "state")

    async def tree(fn, *args):  # type: ignore[no-untyped-def]
        return fn(*args)
    return Context("alpha", store, None, None, b"/", lambda peer: [], tree), store  # type: ignore[arg-type]


def test_a_receiver_tells_its_pusher_which_hosts_reach_it_directly_and_records_it_first(
        tmp_path: Path) -> None:
    """DIRECT lists the peers whose links into this host are up (not the pusher itself),
    and is sent again when that changes: the pusher leaves out those hosts' versions.
    Each host is recorded as trusted, since the seq the receiver had reached, before
    the pusher hears of it: a restart must know what it may have been left without."""
    ctx, store = _context(tmp_path)

    async def run() -> list[object]:
        frames = Frames()
        receiver = Receiver(ctx, "beta", None, frames, LinkStats())
        ctx.receiving("beta", True)
        ctx.receiving("gamma", True)
        telling = asyncio.ensure_future(receiver._tell_direct())
        await _until(frames.sent, 1)
        assert store.trusts("beta") == {"gamma": 0}
        receiver.done_seq = 7
        ctx.receiving("delta", True)
        await _until(frames.sent, 2)
        assert store.trusts("beta") == {"gamma": 0, "delta": 7}
        ctx.receiving("gamma", True)  # a reconnect: the new link is up before the old ends
        ctx.receiving("gamma", False)
        ctx.receiving("delta", False)
        await _until(frames.sent, 3)
        ctx.receiving("delta", True)  # back within the grace: nothing to ask again
        await _until(frames.sent, 4)
        assert not telling.done()
        telling.cancel()
        return frames.sent

    assert asyncio.run(run()) == [Direct(("gamma",)), Direct(("delta", "gamma")),
                                  Direct(("gamma",)), Direct(("delta", "gamma"))]
    store.close()


def _gamma_goes(ctx: Context, anew: bool, within_s: float
               ) -> tuple[list[object], BaseException | None]:
    """What beta's receiver sends, and how its DIRECT task ends (within ``within_s``),
    when gamma, linked in and trusted, goes away (``anew``: comes back from a new store
    first)."""
    async def run() -> tuple[list[object], BaseException | None]:
        frames = Frames()
        receiver = Receiver(ctx, "beta", None, frames, LinkStats())
        ctx.receiving("gamma", True)
        telling = asyncio.ensure_future(receiver._tell_direct())
        await _until(frames.sent, 1)
        if anew:
            ctx.receiving("gamma", True, anew=True)
        ctx.receiving("gamma", False)
        await asyncio.wait([telling], timeout=within_s)
        return frames.sent, telling.exception() if telling.done() else None
    return asyncio.run(run())


def test_a_trusted_host_that_stays_away_ends_the_link_to_be_sent_again_what_was_left_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pusher left out gamma's versions, trusting gamma to send them here; gamma
    went away and did not come back within the grace: the receiver says BYE (ASK_AGAIN)
    and ends the link, so that the pusher dials again and streams from the oldest seq
    since which it left anything out."""
    monkeypatch.setattr(receive, "RELINK_GRACE_S", 0.2)
    ctx, store = _context(tmp_path)
    sent, error = _gamma_goes(ctx, anew=False, within_s=5)
    assert sent[:2] == [Direct(("gamma",)), Direct(())]
    assert isinstance(sent[2], Bye) and sent[2].why.startswith(ASK_AGAIN)
    assert isinstance(error, AskedAgain)
    store.close()


def test_a_trusted_host_back_from_a_new_store_ends_the_link_at_once(
        tmp_path: Path) -> None:
    """A host whose link comes back from a new store (everything sent again, another
    epoch) may no longer hold what it had not sent: the link whose pusher trusted it
    ends at once, without waiting for the grace."""
    ctx, store = _context(tmp_path)
    sent, error = _gamma_goes(ctx, anew=True, within_s=receive.RELINK_GRACE_S / 2)
    assert isinstance(sent[-1], Bye) and sent[-1].why.startswith(ASK_AGAIN)
    assert isinstance(error, AskedAgain)
    store.close()


def test_a_mark_answered_lets_the_other_links_start_from_where_they_had_got(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """beta's pusher left out gamma's versions since seq 5. Once beta's link moved (to
    40), the receiver of gamma's link asks gamma for a MARK; gamma's CAUGHTUP, settled
    here, says this host holds every version gamma had made by then, so beta need no
    longer be asked for gamma's versions up to 40. An answer while one of gamma's
    entries waits for a retry, or while gamma could not send a version's content (a
    newer one is to come), advances nothing; nor does a sample of another epoch."""
    monkeypatch.setattr(receive, "MARK_GATHER_S", 0.01)
    ctx, store = _context(tmp_path)
    store.trust("beta", "e1", ["gamma"], 5)
    store.trust("delta", "e2", ["gamma"], 5)

    async def run() -> None:
        frames = Frames()
        from_gamma = Receiver(ctx, "gamma", None, frames, LinkStats())
        asking = asyncio.ensure_future(from_gamma._ask_caught_up())
        ctx.reached.update(beta=("e1", 40), delta=("e1", 30), gamma=("e3", 77))
        ctx.moved()
        await _until(frames.sent, 1)
        assert frames.sent == [Mark(1)]
        ctx.reached["beta"] = ("e1", 60)  # moved after the MARK: not covered by its answer
        await from_gamma._caught_up(1)
        assert store.trusts("beta") == {"gamma": 40}
        assert store.trusts("delta") == {"gamma": 5}  # its store is another epoch now
        ctx.moved()
        await _until(frames.sent, 2)  # beta moved on: a second MARK
        from_gamma.retry[b"data/x"] = receive._Failing(
            EntryMsg(9, Entry(b"data/x", Kind.FILE, Stamp(9, "gamma")), None), "EIO")
        await from_gamma._caught_up(2)
        assert store.trusts("beta") == {"gamma": 40}
        from_gamma.retry.clear()
        from_gamma._unheld.add(b"data/y")  # gamma could not send it: NODATA
        ctx.reached["beta"] = ("e1", 70)
        ctx.moved()
        await _until(frames.sent, 3)
        await from_gamma._caught_up(3)
        assert store.trusts("beta") == {"gamma": 40}
        y = EntryMsg(12, Entry(b"data/y", Kind.FILE, Stamp(12, "gamma")), None)
        await from_gamma._settle(y, None)  # its later version came, and is applied
        ctx.moved()
        await _until(frames.sent, 4)
        await from_gamma._caught_up(4)
        assert store.trusts("beta") == {"gamma": 70}
        await from_gamma._caught_up(7)  # never asked: ignored
        asking.cancel()

    asyncio.run(run())
    store.close()


def test_a_path_refused_beyond_a_symlink_here_is_applied_once_that_is_a_directory(
        tmp_path: Path) -> None:
    """A peer's log holds each path's latest version, not the order of its changes: its
    ``d/f`` can come while ``d`` is still a symlink here, and its version making ``d`` a
    directory after. ``d/f`` is refused then (nothing goes through a symlink), and must
    not be dropped: it waits, and is applied once ``d`` is a directory here, with the
    persisted cursor below it meanwhile. Nothing reaches the symlink's target."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / os.fsdecode(MARKER)).write_bytes(b"marker\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "data" / "d").symlink_to(outside)
    mset = config.parse("( /data ) -> ( alpha beta ) install ;\n", "test.conf").sets[0]
    store = Store.open(tmp_path / "state")
    scanner = Scanner(store, "alpha")
    applier = Applier(os.fsencode(root), store, "alpha")
    scanner.expected_absent = applier.expected_absent
    scanner.scan_set(mset, os.fsencode(root))

    async def tree(fn, *args):  # type: ignore[no-untyped-def]
        return fn(*args)
    ctx = Context("alpha", store, applier, scanner, os.fsencode(root), lambda peer: [mset],
                  tree)
    content = b"f, made in d while d is a directory on beta\n"
    t = 3 * 10**18
    f = Entry(b"data/d/f", Kind.FILE, Stamp(t, "beta"), vector=(("beta", t),), mode=0o644,
              owner="root", group="root", mtime_ns=10**18, size=len(content),
              digest=xxhash.xxh3_128(content).digest())
    d = Entry(b"data/d", Kind.DIR, Stamp(t + 1, "beta"), vector=(("beta", t + 1),),
              mode=0o755, owner="root", group="root", mtime_ns=10**18)

    async def run() -> None:
        frames = Frames()
        receiver = Receiver(ctx, "beta", None, frames, LinkStats())
        receiver.epoch = "e1"
        await receiver._apply(EntryMsg(5, f, content))
        assert not (outside / "f").exists()
        assert not (root / "data" / "d" / "f").exists()
        receiver.done_seq = 6
        await receiver._apply(EntryMsg(6, d, None))
        assert (root / "data" / "d").is_dir() and not (root / "data" / "d").is_symlink()
        await receiver._save_cursor()
        assert store.cursor("beta") == Cursor("e1", 4)  # below what waits
        retrying = asyncio.ensure_future(receiver._retry_failing())
        await _until(frames.sent, 2)  # the ACK, then the WANT of f's content
        want = frames.sent[-1]
        assert isinstance(want, Want) and want.path == b"data/d/f"
        await receiver.content.put(Data(want.want_id, content, True))
        for _ in range(500):
            if (root / "data" / "d" / "f").exists():
                break
            await asyncio.sleep(0.01)
        retrying.cancel()
        assert (root / "data" / "d" / "f").read_bytes() == content
        assert not receiver.waiting
        assert os.listdir(outside) == []

    asyncio.run(run())
    store.close()
