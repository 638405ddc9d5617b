"""The watcher on real inotify, real directories and a real asyncio loop."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from omirror import tempnames
from omirror.watcher import (
    IN_CREATE,
    IN_ISDIR,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    IN_UNMOUNT,
    EventKind,
    PathEvent,
    Watcher,
    parse_events,
)

CREATED, CHANGED, DELETED, MOVED, OVERFLOW = (EventKind.CREATED, EventKind.CHANGED,
                                              EventKind.DELETED, EventKind.MOVED,
                                              EventKind.OVERFLOW)
HOLD_S = 0.2
TIMEOUT_S = 10.0


class Recorder:
    """Collects what on_events delivers; awaits conditions with a bound, never a guess."""

    def __init__(self) -> None:
        self.events: list[PathEvent] = []
        self.calls = 0
        self.threads: set[str] = set()

    def __call__(self, events: list[PathEvent]) -> None:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        self.events.extend(events)

    async def wait_for(self, found: Callable[[list[PathEvent]], object],
                       timeout_s: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not found(self.events):
            if time.monotonic() > deadline:
                pytest.fail(f"condition not met in {timeout_s} s; events: {self.events!r}")
            await asyncio.sleep(0.005)

    async def wait_event(self, kind: EventKind, path: bytes, **fields: object) -> PathEvent:
        def match(e: PathEvent) -> bool:
            return (e.kind is kind and e.path == path
                    and all(getattr(e, k) == v for k, v in fields.items()))
        await self.wait_for(lambda events: any(map(match, events)))
        return next(e for e in self.events if match(e))

    def paths(self, kind: EventKind | None = None) -> set[bytes]:
        return {e.path for e in self.events if kind is None or e.kind is kind}


@pytest.fixture(autouse=True)
def no_leaked_thread() -> Iterator[None]:
    yield
    leaked = [t.name for t in threading.enumerate() if t.name == "omirror-inotify"]
    assert not leaked, f"reader thread left running: {leaked}"


@pytest.fixture
def tree(tmp_path: Path) -> bytes:
    top = tmp_path / "tree"
    top.mkdir()
    return os.fsencode(top)


@pytest.fixture
def outside(tmp_path: Path) -> bytes:
    place = tmp_path / "outside"
    place.mkdir()
    return os.fsencode(place)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def watcher(tree: bytes, recorder: Recorder) -> AsyncIterator[Watcher]:
    w = Watcher(asyncio.get_running_loop(), recorder, move_hold_s=HOLD_S)
    assert w.watch_tree(tree) == []
    w.start()
    yield w
    w.close()


def write(path: bytes, data: bytes = b"x") -> None:
    with open(path, "wb") as f:
        f.write(data)


async def settle(recorder: Recorder, watcher: Watcher, tree: bytes) -> None:
    """Wait until every event so far is delivered: a marker file's event comes last."""
    marker = tree + b"/zz-settle-%d" % recorder.calls
    write(marker, b"")
    await recorder.wait_event(CHANGED, marker, closed=True)
    os.unlink(marker)
    await recorder.wait_event(DELETED, marker)


# -- files ------------------------------------------------------------------------------

async def test_file_create_modify_close(watcher: Watcher, recorder: Recorder,
                                        tree: bytes) -> None:
    path = tree + b"/a.txt"
    write(path, b"hello")
    await recorder.wait_event(CHANGED, path, closed=True)
    kinds = [(e.kind, e.closed) for e in recorder.events if e.path == path]
    assert kinds == [(CREATED, False), (CHANGED, False), (CHANGED, True)]
    assert recorder.threads == {"MainThread"}  # delivered in the loop thread


async def test_events_carry_when_they_were_read_not_when_the_loop_took_them(
        watcher: Watcher, recorder: Recorder, tree: bytes) -> None:
    """The coalescing window runs from the read: a busy loop must not stretch it."""
    seen: list[float] = []
    watcher._on_events = lambda events: (seen.append(watcher.read_s), recorder(events))
    path = tree + b"/stamped"
    write(path, b"x")
    deadline = time.monotonic() + TIMEOUT_S
    while not watcher._inbox:  # the reader thread has read them; the loop is held here
        assert time.monotonic() < deadline, "the reader thread read nothing"
        time.sleep(0.001)
    held_until = time.monotonic()
    await recorder.wait_event(CHANGED, path, closed=True)
    assert seen and seen[0] <= held_until


async def test_attrib_and_delete_of_a_file(watcher: Watcher, recorder: Recorder,
                                           tree: bytes) -> None:
    path = tree + b"/a"
    write(path)
    await recorder.wait_event(CHANGED, path, closed=True)
    recorder.events.clear()
    os.chmod(path, 0o600)
    await recorder.wait_event(CHANGED, path, closed=True, is_dir=False)
    os.unlink(path)
    await recorder.wait_event(DELETED, path, is_dir=False)


async def test_attrib_of_a_watched_directory_itself(watcher: Watcher, recorder: Recorder,
                                                    tree: bytes) -> None:
    os.chmod(tree, 0o750)
    await recorder.wait_event(CHANGED, tree, is_dir=True)


async def test_new_directory_is_watched_by_the_caller(watcher: Watcher, recorder: Recorder,
                                                      tree: bytes) -> None:
    sub = tree + b"/sub"
    os.mkdir(sub)
    await recorder.wait_event(CREATED, sub, is_dir=True, closed=True)
    before = watcher.watched_count
    assert watcher.watch_tree(sub) == []
    assert watcher.watched_count == before + 1
    write(sub + b"/inner")
    await recorder.wait_event(CHANGED, sub + b"/inner", closed=True)
    os.mkdir(sub + b"/deeper")
    await recorder.wait_event(CREATED, sub + b"/deeper", is_dir=True)


async def test_watch_tree_watches_every_directory_below(tree: bytes, recorder: Recorder) -> None:
    for d in (b"/a", b"/a/b", b"/a/b/c", b"/d"):
        os.mkdir(tree + d)
    os.symlink(tree + b"/d", tree + b"/link-to-d")  # never followed
    w = Watcher(asyncio.get_running_loop(), recorder)
    try:
        assert w.watch_tree(tree) == []
        assert w.watched_count == 5
        assert w.watch_tree(tree) == []  # again: same watches, nothing new
        assert w.watched_count == 5
        w.unwatch_tree(tree + b"/a")
        assert w.watched_count == 2
    finally:
        w.close()


# -- moves ------------------------------------------------------------------------------

async def test_file_renamed_inside_the_tree_is_one_move(watcher: Watcher, recorder: Recorder,
                                                        tree: bytes) -> None:
    os.mkdir(tree + b"/sub")
    watcher.watch_tree(tree + b"/sub")
    write(tree + b"/old")
    await recorder.wait_event(CHANGED, tree + b"/old", closed=True)
    os.rename(tree + b"/old", tree + b"/sub/new")
    moved = await recorder.wait_event(MOVED, tree + b"/sub/new")
    assert moved.old_path == tree + b"/old" and not moved.is_dir
    await settle(recorder, watcher, tree)
    assert tree + b"/old" not in recorder.paths(DELETED)


async def test_directory_renamed_carries_the_new_path(watcher: Watcher, recorder: Recorder,
                                                      tree: bytes) -> None:
    os.makedirs(tree + b"/d/inner")
    watcher.watch_tree(tree + b"/d")
    os.rename(tree + b"/d", tree + b"/e")
    moved = await recorder.wait_event(MOVED, tree + b"/e")
    assert moved.old_path == tree + b"/d" and moved.is_dir
    write(tree + b"/e/inner/f")
    await recorder.wait_event(CHANGED, tree + b"/e/inner/f", closed=True)
    assert not any(p.startswith(tree + b"/d/") for p in recorder.paths())


async def test_move_out_of_the_tree_is_a_deletion_after_the_hold(
        watcher: Watcher, recorder: Recorder, tree: bytes, outside: bytes) -> None:
    write(tree + b"/f")
    os.makedirs(tree + b"/d/inner")
    watcher.watch_tree(tree + b"/d")
    await recorder.wait_event(CHANGED, tree + b"/f", closed=True)
    count = watcher.watched_count
    start = time.monotonic()
    os.rename(tree + b"/f", outside + b"/f")
    os.rename(tree + b"/d", outside + b"/d")
    await recorder.wait_event(DELETED, tree + b"/f", is_dir=False)
    await recorder.wait_event(DELETED, tree + b"/d", is_dir=True)
    assert time.monotonic() - start >= HOLD_S * 0.9
    assert watcher.watched_count == count - 2  # d and d/inner: no longer ours
    write(outside + b"/d/inner/later")
    await settle(recorder, watcher, tree)
    assert not any(b"later" in p for p in recorder.paths())


async def test_directory_moved_in_from_outside_is_created(
        watcher: Watcher, recorder: Recorder, tree: bytes, outside: bytes) -> None:
    os.makedirs(outside + b"/d/sub")
    write(outside + b"/d/sub/file")
    os.rename(outside + b"/d", tree + b"/d")
    event = await recorder.wait_event(CREATED, tree + b"/d")
    assert event.is_dir and event.closed
    assert watcher.watch_tree(tree + b"/d") == []
    write(tree + b"/d/sub/file", b"changed")
    await recorder.wait_event(CHANGED, tree + b"/d/sub/file", closed=True)


async def test_move_halves_in_different_reads_still_pair(watcher: Watcher,
                                                         recorder: Recorder,
                                                         tree: bytes) -> None:
    # inotify(7): the two halves need not be adjacent nor in one read(); inject them
    # as two batches with another event between.
    wd = watcher._path_wd[tree]
    watcher._handle_records([(wd, IN_MOVED_FROM | IN_ISDIR, 77, b"a")])
    watcher._handle_records([(wd, IN_CREATE, 0, b"other")])
    assert [e.path for e in recorder.events] == [tree + b"/other"]
    watcher._handle_records([(wd, IN_MOVED_TO | IN_ISDIR, 77, b"b")])
    assert recorder.events[-1] == PathEvent(MOVED, tree + b"/b", True, old_path=tree + b"/a")


async def test_queue_overflow_and_unmount_are_reported(watcher: Watcher, recorder: Recorder,
                                                      tree: bytes) -> None:
    watcher._handle_records([(-1, IN_Q_OVERFLOW, 0, b"")])
    assert recorder.events == [PathEvent(OVERFLOW, b"")]
    watcher._handle_records([(watcher._path_wd[tree], IN_UNMOUNT, 0, b"")])
    assert recorder.events == [PathEvent(OVERFLOW, b"")] * 2


async def test_top_of_a_tree_deleted_is_reported(watcher: Watcher, recorder: Recorder,
                                                 tree: bytes) -> None:
    # No watched parent reports it; the daemon's scan of it then stops the set.
    os.rmdir(tree)
    await recorder.wait_event(DELETED, tree, is_dir=True)
    assert watcher.watched_count == 0


def test_parse_events_splits_padded_records() -> None:
    raw = (struct.pack("iIII", 1, IN_CREATE, 0, 16) + b"caf\xe9".ljust(16, b"\0")
           + struct.pack("iIII", -1, IN_Q_OVERFLOW, 0, 0)
           + struct.pack("iIII", 2, IN_MOVED_TO, 9, 8) + b"b\0\0\0\0\0\0\0")
    assert parse_events(raw) == [(1, IN_CREATE, 0, b"caf\xe9"), (-1, IN_Q_OVERFLOW, 0, b""),
                                 (2, IN_MOVED_TO, 9, b"b")]


# -- names ------------------------------------------------------------------------------

async def test_non_utf8_names(watcher: Watcher, recorder: Recorder, tree: bytes) -> None:
    name = b"caf\xe9"
    write(tree + b"/" + name)
    await recorder.wait_event(CHANGED, tree + b"/" + name, closed=True)
    os.mkdir(tree + b"/dir-" + name)
    await recorder.wait_event(CREATED, tree + b"/dir-" + name, is_dir=True)
    assert watcher.watch_tree(tree + b"/dir-" + name) == []
    write(tree + b"/dir-" + name + b"/" + name)
    await recorder.wait_event(CHANGED, tree + b"/dir-" + name + b"/" + name, closed=True)


async def test_non_utf8_directory_found_by_the_walk(tree: bytes, recorder: Recorder) -> None:
    os.makedirs(tree + b"/\xff\xfe/sub")
    w = Watcher(asyncio.get_running_loop(), recorder)
    try:
        assert w.watch_tree(tree) == [] and w.watched_count == 3
        w.start()
        write(tree + b"/\xff\xfe/sub/x")
        await recorder.wait_event(CHANGED, tree + b"/\xff\xfe/sub/x", closed=True)
    finally:
        w.close()


async def test_daemon_names_are_ignored_and_so_are_its_installs(
        watcher: Watcher, recorder: Recorder, tree: bytes) -> None:
    """A temp file renamed into place is the daemon's own install, recorded as it was
    made: no event. A change made to it afterwards is reported as any other."""
    os.mkdir(tree + b"/.omirror-tmp-dir")
    temp = tree + b"/" + tempnames.issue()
    write(temp, b"content")
    os.rename(temp, tree + b"/real")
    with open(tree + b"/real", "ab") as f:
        f.write(b" changed by a user")
    event = await recorder.wait_event(CHANGED, tree + b"/real", closed=True)
    assert not event.is_dir
    assert not any(e.kind is CREATED and e.path == tree + b"/real"
                   for e in recorder.events), "the install itself was reported"
    write(tree + b"/doomed")
    os.rename(tree + b"/doomed", tree + b"/.omirror-trash")  # renamed to a daemon name
    await recorder.wait_event(DELETED, tree + b"/doomed")
    await settle(recorder, watcher, tree)
    assert not any(b"/.omirror" in p for p in recorder.paths())
    assert watcher.watch_tree(tree + b"/.omirror-tmp-dir") == []
    assert tree + b"/.omirror-tmp-dir" not in watcher._path_wd


async def test_a_users_file_of_a_daemon_name_renamed_into_place_is_reported(
        watcher: Watcher, recorder: Recorder, tree: bytes) -> None:
    """A local user may write ``.omirror-tmp-<hex>`` and rename it over a file of the
    tree: a name the daemon did not give out is a change like any other, reported at
    once (not left to the next scan). The daemon's own install beside it is not."""
    write(tree + b"/index.html", b"old\n")
    ours = tempnames.issue()
    theirs = b".omirror-tmp-" + ours[-16:][::-1]  # the same form, never given out
    await settle(recorder, watcher, tree)
    recorder.events.clear()
    write(tree + b"/" + ours, b"a peer's version\n")
    os.rename(tree + b"/" + ours, tree + b"/installed")
    write(tree + b"/" + theirs, b"a user's version\n")
    os.rename(tree + b"/" + theirs, tree + b"/index.html")
    event = await recorder.wait_event(CREATED, tree + b"/index.html")
    assert not event.is_dir
    await settle(recorder, watcher, tree)
    assert tree + b"/installed" not in recorder.paths()
    assert not tempnames.taken(ours), "the install's name is still remembered"


async def test_the_versions_area_is_neither_watched_nor_reported(
        watcher: Watcher, recorder: Recorder, tree: bytes) -> None:
    """What ``savetargets`` keeps under ``.omirror-versions`` (omirror/versions.py) is
    the daemon's: made, written and pruned there, it is no change of the tree."""
    area = tree + b"/.omirror-versions"
    os.mkdir(area, 0o700)
    os.mkdir(area + b"/d", 0o700)
    write(area + b"/d/a~20240501-093000", b"kept")
    os.rename(area + b"/d/a~20240501-093000", area + b"/d/a~20240501-093000-1")
    os.unlink(area + b"/d/a~20240501-093000-1")
    write(tree + b"/after")
    await recorder.wait_event(CHANGED, tree + b"/after", closed=True)
    await settle(recorder, watcher, tree)
    assert not any(b"/.omirror" in p for p in recorder.paths()), recorder.paths()
    assert watcher.watch_tree(area) == []
    assert area not in watcher._path_wd and area + b"/d" not in watcher._path_wd


async def test_skip_is_remembered_for_later_directories(tree: bytes,
                                                        recorder: Recorder) -> None:
    os.makedirs(tree + b"/cache/deep")
    os.mkdir(tree + b"/keep")
    w = Watcher(asyncio.get_running_loop(), recorder)
    try:
        w.watch_tree(tree, skip=lambda p: p.endswith(b"/cache"))
        assert w.watched_count == 2  # tree and keep
        os.makedirs(tree + b"/keep/cache/x")
        assert w.watch_tree(tree + b"/keep") == []  # default skip: the tree's applies
        assert w.watched_count == 2
    finally:
        w.close()


# -- volume and limits ------------------------------------------------------------------

async def test_burst_of_20000_files_is_reported_or_overflows(
        watcher: Watcher, recorder: Recorder, tree: bytes) -> None:
    count = 20_000
    script = ("import os, sys\nd = os.fsencode(sys.argv[1])\n"
              f"for i in range({count}):\n"
              "    os.close(os.open(d + b'/f%d' % i, os.O_CREAT | os.O_WRONLY, 0o644))\n")
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script,
                                                os.fsdecode(tree))
    assert await proc.wait() == 0
    written_s = time.monotonic() - start
    wanted = {tree + b"/f%d" % i for i in range(count)}

    def done(events: list[PathEvent]) -> bool:
        return bool(recorder.paths(OVERFLOW)) or wanted <= recorder.paths()
    await recorder.wait_for(done, timeout_s=60)
    received_s = time.monotonic() - start
    reported = len(wanted & recorder.paths())
    overflowed = bool(recorder.paths(OVERFLOW))
    print(f"\nburst: {count} files written in {written_s:.2f} s; {reported} reported, "
          f"{len(recorder.events)} events in {received_s:.2f} s "
          f"({len(recorder.events) / received_s:,.0f} events/s), "
          f"{'OVERFLOW' if overflowed else 'no overflow'}")
    assert overflowed or reported == count


def refuse_after(w: Watcher, allowed: int) -> list[bytes]:
    """Make the add_watch binding fail with ENOSPC after ``allowed`` successes."""
    binding = type(w._inotify)._inotify_add_watch.__get__(w._inotify)  # the real one
    tried: list[bytes] = []

    def add_watch(fd: int, path: bytes, mask: int) -> int:
        tried.append(path)
        if len(tried) > allowed:
            ctypes.set_errno(errno.ENOSPC)
            return -1
        return binding(fd, path, mask)  # type: ignore[no-any-return]
    w._inotify._inotify_add_watch = add_watch
    return tried


async def test_watch_limit_leaves_subtrees_polled(tree: bytes, recorder: Recorder,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    for d in (b"/a", b"/a/x", b"/b", b"/b/y", b"/c"):
        os.mkdir(tree + d)
    w = Watcher(asyncio.get_running_loop(), recorder)
    try:
        refuse_after(w, 2)
        caplog.set_level(logging.DEBUG, logger="omirror.watcher")
        unwatched = w.watch_tree(tree)
        assert w.watched_count == 2
        assert len(unwatched) >= 1 and set(unwatched) == w.polled
        # Roots only: a refused directory is not entered, so nothing below it is listed.
        assert not any(p.startswith(q + b"/") for p in unwatched for q in unwatched)
        for d in (b"", b"/a", b"/a/x", b"/b", b"/b/y", b"/c"):  # each watched or polled
            path = tree + d
            assert path in w._path_wd or any(path == q or path.startswith(q + b"/")
                                             for q in w.polled), path
        again = unwatched[0]
        assert w.watch_tree(again) == [again]  # refused again: no second warning
        limit = Path("/proc/sys/fs/inotify/max_user_watches").read_text().strip()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [f"inotify watch limit reached (fs.inotify.max_user_watches="
                            f"{limit}): {os.fsdecode(unwatched[0])} is polled; raise it, "
                            f"see conf/sysctl.d/60-omirror.conf"]
    finally:
        w.close()


async def test_polled_directory_is_dropped_once_watched(tree: bytes,
                                                        recorder: Recorder) -> None:
    os.mkdir(tree + b"/a")
    w = Watcher(asyncio.get_running_loop(), recorder)
    try:
        refuse_after(w, 1)
        assert w.watch_tree(tree) == [tree + b"/a"] and w.polled == {tree + b"/a"}
        refuse_after(w, 10)
        assert w.watch_tree(tree + b"/a") == [] and w.polled == set()
    finally:
        w.close()


# -- lifecycle --------------------------------------------------------------------------

async def test_close_joins_the_reader_and_is_idempotent(tree: bytes,
                                                        recorder: Recorder) -> None:
    w = Watcher(asyncio.get_running_loop(), recorder)
    w.watch_tree(tree)
    w.start()
    assert any(t.name == "omirror-inotify" for t in threading.enumerate())
    w.close()
    w.close()
    assert not any(t.name == "omirror-inotify" for t in threading.enumerate())
    assert w.watched_count == 0


async def test_inotify_descriptor_is_not_inherited(recorder: Recorder) -> None:
    w = Watcher(asyncio.get_running_loop(), recorder)
    try:
        assert not os.get_inheritable(w._fd)
    finally:
        w.close()
