"""The coalescer on a fake clock: when each scan request becomes due, and what it covers."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from omirror.events import Coalescer, ScanRequest
from omirror.watcher import EventKind, PathEvent

CREATED, CHANGED, DELETED, MOVED, OVERFLOW = (EventKind.CREATED, EventKind.CHANGED,
                                              EventKind.DELETED, EventKind.MOVED,
                                              EventKind.OVERFLOW)
DELAY = 0.2
QUIET = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def co(clock: Clock) -> Coalescer:
    return Coalescer(DELAY, quiet_s=QUIET, clock=clock)


def changed(path: bytes, closed: bool = True) -> PathEvent:
    return PathEvent(CHANGED, path, closed=closed)


def plain(path: bytes) -> ScanRequest:
    return ScanRequest(path, False)


def walk(path: bytes) -> ScanRequest:
    return ScanRequest(path, True)


def test_nothing_pending_has_no_deadline(co: Coalescer) -> None:
    assert co.next_deadline() is None
    assert co.take_due() == ([], False)
    assert co.pending == 0


def test_a_burst_on_one_path_is_one_request_after_its_last_event(co: Coalescer,
                                                                 clock: Clock) -> None:
    for _ in range(50):
        co.add([changed(b"/t/a")])
        clock.now += 0.01
    last = clock.now - 0.01
    assert co.pending == 1
    assert co.next_deadline() == pytest.approx(last + DELAY)
    assert co.take_due(last + DELAY - 0.001) == ([], False)
    assert co.take_due(last + DELAY) == ([plain(b"/t/a")], False)
    assert co.pending == 0 and co.next_deadline() is None


def test_the_window_runs_from_when_the_events_were_read(co: Coalescer, clock: Clock) -> None:
    """Events the loop takes late (it was busy) are due a window after they were read."""
    co.add([changed(b"/t/a")], at=clock.now - 0.15)
    assert co.next_deadline() == pytest.approx(clock.now - 0.15 + DELAY)
    co.add([changed(b"/t/b")], at=clock.now + 5)  # never later than the clock says
    assert co.take_due(clock.now + DELAY - 0.1) == ([plain(b"/t/a")], False)
    assert co.take_due(clock.now + DELAY) == ([plain(b"/t/b")], False)


def test_delay_is_counted_per_path(co: Coalescer, clock: Clock) -> None:
    co.add([changed(b"/t/a")])
    clock.now += 0.15
    co.add([changed(b"/t/b")])
    assert co.next_deadline() == pytest.approx(100.2)
    assert co.take_due(100.2) == ([plain(b"/t/a")], False)
    second = co.next_deadline()
    assert second == pytest.approx(100.35)
    assert co.take_due(second) == ([plain(b"/t/b")], False)


def test_take_due_reads_the_clock_by_default(co: Coalescer, clock: Clock) -> None:
    co.add([changed(b"/t/a")])
    assert co.take_due() == ([], False)
    clock.now += DELAY
    assert co.take_due() == ([plain(b"/t/a")], False)


def test_a_file_being_written_waits_for_its_close(co: Coalescer, clock: Clock) -> None:
    co.add([changed(b"/t/big", closed=False)])
    assert co.next_deadline() == pytest.approx(100 + QUIET)
    clock.now += 0.5
    co.add([changed(b"/t/big", closed=False)])
    assert co.take_due(100.5 + DELAY) == ([], False)  # still open: quiet_s, not delay_s
    clock.now += 0.1
    co.add([changed(b"/t/big")])  # IN_CLOSE_WRITE
    assert co.next_deadline() == pytest.approx(100.6 + DELAY)
    assert co.take_due(100.6 + DELAY) == ([plain(b"/t/big")], False)


def test_a_file_left_open_is_taken_after_quiet(co: Coalescer, clock: Clock) -> None:
    co.add([changed(b"/t/log", closed=False)])
    clock.now += 0.4
    co.add([changed(b"/t/log", closed=False)])
    assert co.take_due(100.4 + QUIET - 0.01) == ([], False)
    assert co.take_due(100.4 + QUIET) == ([plain(b"/t/log")], False)


def test_created_regular_file_waits_but_symlink_and_hard_link_do_not(
        co: Coalescer, tmp_path: Path) -> None:
    regular = tmp_path / "regular"
    regular.write_bytes(b"x")
    target = tmp_path / "target"
    target.write_bytes(b"t")
    os.link(target, tmp_path / "hard")
    os.symlink(b"nowhere", tmp_path / "link")
    for name in ("regular", "hard", "link"):
        co.add([PathEvent(CREATED, os.fsencode(tmp_path / name), closed=False)])
    at = 100 + DELAY
    assert co.take_due(at) == ([plain(os.fsencode(tmp_path / "hard")),
                                plain(os.fsencode(tmp_path / "link"))], False)
    assert co.take_due(100 + QUIET) == ([plain(os.fsencode(regular))], False)


def test_created_file_already_gone_does_not_wait(co: Coalescer, tmp_path: Path) -> None:
    co.add([PathEvent(CREATED, os.fsencode(tmp_path / "gone"), closed=False)])
    assert co.next_deadline() == pytest.approx(100 + DELAY)


def test_new_directory_is_walked(co: Coalescer) -> None:
    co.add([PathEvent(CREATED, b"/t/d", is_dir=True)])
    assert co.take_due(100 + DELAY) == ([walk(b"/t/d")], False)


def test_deleted_directory_is_walked_and_deleted_file_is_not(co: Coalescer) -> None:
    co.add([PathEvent(DELETED, b"/t/d", is_dir=True), PathEvent(DELETED, b"/t/f")])
    assert co.take_due(100 + DELAY) == ([walk(b"/t/d"), plain(b"/t/f")], False)


def test_attribute_change_of_a_directory_examines_it_alone(co: Coalescer) -> None:
    co.add([PathEvent(CHANGED, b"/t/d", is_dir=True)])
    assert co.take_due(100 + DELAY) == ([plain(b"/t/d")], False)


def test_a_move_requests_both_paths(co: Coalescer) -> None:
    co.add([PathEvent(MOVED, b"/t/new", old_path=b"/t/old"),
            PathEvent(MOVED, b"/t/D2", is_dir=True, old_path=b"/t/D1")])
    assert co.take_due(100 + DELAY) == ([walk(b"/t/D1"), walk(b"/t/D2"),
                                         plain(b"/t/new"), plain(b"/t/old")], False)


def test_recursive_request_absorbs_pending_requests_below(co: Coalescer,
                                                          clock: Clock) -> None:
    co.add([changed(b"/t/d/a"), changed(b"/t/d/sub/b", closed=False), changed(b"/t/dd/c"),
            changed(b"/t/d")])
    clock.now += 0.1
    co.add([PathEvent(DELETED, b"/t/d", is_dir=True)])
    assert co.pending == 2
    clock.now += 0.1
    co.add([changed(b"/t/d/late", closed=False)])  # inside it: absorbed too
    assert co.pending == 2
    assert co.take_due(100 + DELAY) == ([plain(b"/t/dd/c")], False)
    assert co.take_due(100.2 + DELAY) == ([walk(b"/t/d")], False)
    assert co.pending == 0


def test_request_inside_a_pending_walk_extends_it_within_the_bound(co: Coalescer,
                                                                   clock: Clock) -> None:
    co.add([PathEvent(CREATED, b"/t/copy", is_dir=True)])
    for i in range(30):  # cp -r still filling it
        clock.now += 0.1
        co.add([PathEvent(CREATED, b"/t/copy/f%d" % i, closed=False)])
    bound = 100 + max(1.0, 10 * DELAY)
    assert co.take_due(bound) == ([walk(b"/t/copy")], False)


def test_walk_of_a_parent_absorbs_a_walk_below(co: Coalescer) -> None:
    co.add([PathEvent(CREATED, b"/t/a/b", is_dir=True)])
    co.add([PathEvent(CREATED, b"/t/a", is_dir=True)])
    co.add([PathEvent(CREATED, b"/t/a/b/c", is_dir=True)])
    assert co.take_due(100 + DELAY) == ([walk(b"/t/a")], False)


def test_continuous_changes_are_still_scanned_at_the_bound(co: Coalescer,
                                                           clock: Clock) -> None:
    bound = max(1.0, 10 * DELAY)
    taken: list[float] = []
    while clock.now < 100 + 3 * bound:
        co.add([changed(b"/t/busy")])
        clock.now = round(clock.now + 0.05, 6)
        if co.take_due()[0]:
            taken.append(clock.now)
    assert len(taken) >= 2
    assert taken[0] - 100 <= bound + 0.05
    assert all(b - a <= bound + 0.1 for a, b in itertools.pairwise(taken))


def test_file_written_without_a_break_is_scanned_at_the_bound(clock: Clock) -> None:
    co = Coalescer(0.0, quiet_s=QUIET, clock=clock)
    for _ in range(40):
        co.add([changed(b"/t/stream", closed=False)])
        clock.now += 0.05
    assert co.next_deadline() == pytest.approx(101.0)  # max(1.0, 10 * 0)


def test_overflow_asks_for_a_rescan_instead_of_requests(co: Coalescer,
                                                        clock: Clock) -> None:
    co.add([changed(b"/t/a"), PathEvent(DELETED, b"/t/d", is_dir=True)])
    clock.now += 0.1
    co.add([PathEvent(OVERFLOW, b"")])
    assert co.pending == 1
    clock.now += 0.05
    co.add([changed(b"/t/b")])  # covered by the rescan
    assert co.pending == 1
    assert co.next_deadline() == pytest.approx(100.15 + DELAY)
    assert co.take_due(100.15 + DELAY - 0.001) == ([], False)
    assert co.take_due(100.15 + DELAY) == ([], True)
    assert co.pending == 0 and co.take_due(200) == ([], False)
    co.add([changed(b"/t/c")])  # after the rescan: back to normal
    assert co.take_due(clock.now + DELAY) == ([plain(b"/t/c")], False)


def test_requests_come_sorted(co: Coalescer) -> None:
    co.add([changed(b"/t/c"), changed(b"/t/a"), PathEvent(CREATED, b"/t/b", is_dir=True)])
    assert co.take_due(100 + DELAY)[0] == [plain(b"/t/a"), walk(b"/t/b"), plain(b"/t/c")]


def test_a_closed_event_brings_the_deadline_forward(co: Coalescer, clock: Clock) -> None:
    co.add([changed(b"/t/a", closed=False)])
    assert co.next_deadline() == pytest.approx(100 + QUIET)
    clock.now += 0.1
    co.add([changed(b"/t/a")])
    assert co.next_deadline() == pytest.approx(100.1 + DELAY)


@pytest.mark.parametrize("delay, quiet", [(-1.0, 1.0), (0.1, -0.5)])
def test_negative_times_are_refused(delay: float, quiet: float) -> None:
    with pytest.raises(ValueError, match=r"^(delay_s|quiet_s) must be >= 0, not -"):
        Coalescer(delay, quiet_s=quiet)


def test_deletions_wait_until_the_deletion_burst_is_over(clock: Clock) -> None:
    """An rm -rf keeps every deletion pending until it has been quiet for hold_s: by
    then it has removed the root's marker, and the scanner stops the set instead."""
    co = Coalescer(DELAY, quiet_s=QUIET, hold_s=0.5, max_hold_s=10.0, clock=clock)
    co.add([PathEvent(DELETED, b"/t/d0/f0")])
    co.add([changed(b"/t/g")])  # other changes are not held
    clock.now += DELAY
    assert co.take_due() == ([plain(b"/t/g")], False)
    for i in range(1, 40):  # the burst goes on: 0.1 s between deletions, for 3.9 s
        clock.now += 0.1
        co.add([PathEvent(DELETED, f"/t/d{i}/f0".encode())])
        assert co.take_due() == ([], False), f"a deletion was handed out {i / 10} s in"
    clock.now += 0.49
    assert co.take_due() == ([], False)
    assert co.next_deadline() == pytest.approx(clock.now + 0.01)
    clock.now += 0.01
    due, rescan = co.take_due()
    assert len(due) == 40 and not rescan and co.pending == 0


def test_deletions_held_no_longer_than_max_hold(clock: Clock) -> None:
    """Deletions that never stop (a busy spool) are still mirrored, max_hold_s late."""
    co = Coalescer(DELAY, quiet_s=QUIET, hold_s=0.5, max_hold_s=3.0, clock=clock)
    co.add([PathEvent(DELETED, b"/t/first")])
    handed: list[ScanRequest] = []
    for i in range(50):
        clock.now += 0.1
        co.add([PathEvent(DELETED, f"/t/f{i}".encode())])
        handed += co.take_due()[0]
    assert plain(b"/t/first") in handed  # due 3 s after its event, burst or not
    assert plain(b"/t/f49") not in handed


def test_a_held_deletion_absorbed_into_a_subtree_keeps_waiting(clock: Clock) -> None:
    co = Coalescer(DELAY, quiet_s=QUIET, hold_s=0.5, clock=clock)
    co.add([PathEvent(DELETED, b"/t/d/f")])
    co.add([PathEvent(DELETED, b"/t/d", True)])  # rm -rf: the directory after its files
    clock.now += 0.3
    assert co.take_due() == ([], False)
    clock.now += 0.2
    assert co.take_due() == ([walk(b"/t/d")], False)
