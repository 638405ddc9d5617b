"""The plan --check prints: each path decided as a receiver would decide it."""

from __future__ import annotations

import pytest

from omirror import config
from omirror.entry import Entry, Kind, Stamp, first_version
from omirror.reconcile import (
    CONFLICT,
    DELETE_HERE,
    DELETE_THERE,
    DIFFERS,
    RECEIVE,
    SEND,
    CheckReport,
    compare,
)

SETS = config.parse("HOSTS = ( a b )\nFILES = ( /data )\n${FILES} -> ${HOSTS}\n"
                    "\tinstall ;\n\texcept_pat ( \\.tmp$ ) ;\n", "t.conf").sets


def v(t: int, origin: str = "a", kind: Kind = Kind.FILE, digest: bytes = b"\1" * 16,
      base: Entry | None = None) -> Entry:
    if base is None:
        return first_version(b"data/x", kind, Stamp(t, origin), digest=digest)
    return base.successor(Stamp(t, origin), kind=kind, digest=digest)


BASE = v(10)


@pytest.mark.parametrize("ours, theirs, action", [
    (BASE, None, SEND),
    (None, BASE, RECEIVE),
    (BASE, BASE, None),
    (v(20, digest=b"\2" * 16, base=BASE), BASE, SEND),
    (BASE, v(20, "b", digest=b"\3" * 16, base=BASE), RECEIVE),
    (BASE, v(20, "b", Kind.TOMBSTONE, b"", base=BASE), DELETE_HERE),
    (v(20, "a", Kind.TOMBSTONE, b"", base=BASE), BASE, DELETE_THERE),
    (v(20, "a", digest=b"\2" * 16, base=BASE), v(30, "b", digest=b"\3" * 16, base=BASE),
     CONFLICT),
    (v(20, "a", Kind.TOMBSTONE, b"", base=BASE), None, None),
    (None, v(20, "a", Kind.TOMBSTONE, b"", base=BASE), None),
], ids=["they lack it", "we lack it", "same version", "ours newer", "theirs newer",
        "deleted there", "deleted here", "concurrent edits", "gone here, unknown there",
        "unknown here, gone there"])
def test_each_path_gets_the_action_a_receiver_would_take(ours: Entry | None,
                                                         theirs: Entry | None,
                                                         action: str | None) -> None:
    local = {} if ours is None else {b"data/x": ours}
    remote = {} if theirs is None else {b"data/x": theirs}
    items = compare("b", local, remote, SETS)
    assert [i.action for i in items] == ([] if action is None else [action])
    for item in items:
        assert item.peer == "b" and item.line().startswith(f"{action:<12} /data/x  b: ")


def test_force_finds_the_same_version_with_different_content() -> None:
    damaged = Entry(**{**{f: getattr(BASE, f) for f in BASE.__dataclass_fields__},
                       "digest": b"\x09" * 16})
    assert compare("b", {b"data/x": BASE}, {b"data/x": damaged}, SETS) == []
    (item,) = compare("b", {b"data/x": BASE}, {b"data/x": damaged}, SETS, force=True)
    assert item.action == DIFFERS and "different content" in item.reason


def test_paths_outside_the_shared_sets_or_excluded_here_are_not_compared() -> None:
    other = first_version(b"elsewhere/x", Kind.FILE, Stamp(1, "b"), digest=b"\1" * 16)
    excluded = first_version(b"data/y.tmp", Kind.FILE, Stamp(1, "b"), digest=b"\1" * 16)
    assert compare("b", {}, {other.path: other, excluded.path: excluded}, SETS) == []


def test_exit_codes_and_summary() -> None:
    report = CheckReport()
    assert report.exit_code == 2 and report.summary() == "no peer could be checked"
    report.checked["b"] = 3
    assert report.exit_code == 0 and report.summary() == "in sync with 1 peer (3 paths)"
    report.items = compare("b", {b"data/x": BASE}, {}, SETS)
    report.unreachable["c"] = "Connection refused"
    assert report.exit_code == 1
    assert report.summary() == "1 difference with 1 peer: 1 send; not reached: c"


def test_two_versions_that_leave_the_same_thing_on_disk_are_not_a_difference() -> None:
    root = first_version(b"data", Kind.DIR, Stamp(5, "a"), mode=0o755)
    other = first_version(b"data", Kind.DIR, Stamp(9, "b"), mode=0o755)
    assert compare("b", {b"data": root}, {b"data": other}, SETS) == []
    chmodded = first_version(b"data", Kind.DIR, Stamp(9, "b"), mode=0o700)
    assert [i.action for i in compare("b", {b"data": root}, {b"data": chmodded}, SETS)] \
        == [RECEIVE]
