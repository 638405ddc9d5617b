"""install -osavetargets: what a peer's change takes away here is kept, and only that."""

from __future__ import annotations

import calendar
import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_apply import Host, dir_entry, file_entry, link_entry, tombstone

from omirror import versions
from omirror.entry import Stamp
from omirror.versions import kept_name, parse_kept

KEPT_AT = calendar.timegm((2024, 5, 1, 9, 30, 0, 0, 0, 0))
STAMP = "20240501-093000"
LATER = Stamp(10**18 + 1, "beta")


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path, "-osavetargets")
    h.applier.versions.clock = lambda: KEPT_AT
    yield h
    h.store.close()


def area(host: Host) -> Path:
    return host.data / ".omirror-versions"


def kept_files(host: Host) -> dict[str, bytes]:
    """Every file of the area, by its path below the area."""
    top = area(host)
    return {str(Path(d, n).relative_to(top)): Path(d, n).read_bytes()
            for d, _, names in os.walk(top) for n in names}


def test_a_replaced_file_is_kept_with_its_name_time_and_mode(host: Host) -> None:
    assert host.scan() == 1  # the first scan records /data itself
    host.applier.make_dir(host.mset, dir_entry(b"data/d", 0o755))
    host.write(b"data/d/f", b"first", mode=0o640)
    host.write(b"data/d/f", b"second", mode=0o644, stamp=LATER)
    assert (host.data / "d" / "f").read_bytes() == b"second"
    kept = area(host) / "d" / f"f~{STAMP}"
    assert kept.read_bytes() == b"first"
    assert stat.S_IMODE(os.lstat(kept).st_mode) == 0o640
    assert stat.S_IMODE(os.lstat(area(host)).st_mode) == 0o700
    assert os.lstat(area(host)).st_uid == os.geteuid()
    assert stat.S_IMODE(os.lstat(area(host) / "d").st_mode) == 0o700
    # the same name in the same second: the next one gets -1
    host.write(b"data/d/f", b"third", stamp=Stamp(10**18 + 2, "beta"))
    assert kept_files(host) == {f"d/f~{STAMP}": b"first", f"d/f~{STAMP}-1": b"second"}
    assert host.leftovers() == []
    assert host.scan() == 0  # nothing of the area is recorded, nothing looks changed


def test_a_deleted_file_is_kept(host: Host) -> None:
    host.write(b"data/f", b"content")
    host.applier.delete(host.mset, tombstone(b"data/f"))
    assert not (host.data / "f").exists()
    assert kept_files(host) == {f"f~{STAMP}": b"content"}
    assert host.leftovers() == []


@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_a_file_replaced_by_another_kind_is_kept(host: Host, kind: str) -> None:
    host.write(b"data/f", b"content")
    if kind == "symlink":
        host.applier.make_symlink(host.mset, link_entry(b"data/f", b"elsewhere"))
        assert os.readlink(host.data / "f") == "elsewhere"
    else:
        host.applier.make_dir(host.mset, dir_entry(b"data/f"))
        assert (host.data / "f").is_dir()
    assert kept_files(host) == {f"f~{STAMP}": b"content"}


def test_a_file_with_other_names_is_kept_as_a_copy(host: Host) -> None:
    """Its other names stay: a version linked to them would change with every write
    through them."""
    assert host.scan() == 1
    host.write(b"data/a", b"shared")
    os.link(host.data / "a", host.data / "b")
    host.scan()
    host.write(b"data/a", b"replaced", stamp=LATER)
    kept = area(host) / f"a~{STAMP}"
    assert kept.read_bytes() == b"shared"
    assert os.lstat(kept).st_ino != os.lstat(host.data / "b").st_ino
    with open(host.data / "b", "r+b") as f:
        f.write(b"S")
    assert kept.read_bytes() == b"shared"


def test_a_change_of_attributes_alone_keeps_nothing(host: Host) -> None:
    host.write(b"data/f", b"content", mode=0o640)
    host.write(b"data/f", b"content", mode=0o600, stamp=LATER)
    assert stat.S_IMODE(os.lstat(host.data / "f").st_mode) == 0o600
    assert not area(host).exists()


def test_a_new_file_and_a_symlink_replaced_keep_nothing(host: Host) -> None:
    host.applier.make_symlink(host.mset, link_entry(b"data/l", b"x"))
    host.write(b"data/l", b"a file now", stamp=LATER)
    host.write(b"data/new", b"new")
    host.applier.delete(host.mset, tombstone(b"data/absent"))
    assert not area(host).exists()


def test_a_conflict_copy_is_no_version(host: Host) -> None:
    host.applier.write_conflict_copy(host.mset, file_entry(b"data/f", b"theirs"), b"theirs")
    host.applier.write_conflict_copy(host.mset, file_entry(b"data/f", b"theirs"), b"theirs")
    assert not area(host).exists()


def test_a_set_without_savetargets_keeps_nothing(tmp_path: Path) -> None:
    h = Host(tmp_path)
    try:
        h.write(b"data/f", b"first")
        h.write(b"data/f", b"second", stamp=LATER)
        h.applier.delete(h.mset, tombstone(b"data/f"))
        assert not (h.data / ".omirror-versions").exists()
    finally:
        h.store.close()


def _symlink(host: Host, elsewhere: Path) -> None:
    elsewhere.mkdir()
    os.symlink(elsewhere, area(host))


def _file(host: Host, elsewhere: Path) -> None:
    area(host).write_bytes(b"planted")


def _open_to_others(host: Host, elsewhere: Path) -> None:
    area(host).mkdir()
    os.chmod(area(host), 0o755)


def _foreign(host: Host, elsewhere: Path) -> None:
    area(host).mkdir(mode=0o700)
    uid = os.geteuid() + 1
    host.applier.versions.warned.clear()
    versions._own_uid = lambda: uid  # type: ignore[attr-defined]  # undone by monkeypatch


@pytest.mark.parametrize(("plant", "why"), [
    (_symlink, "is a symbolic link"),
    (_file, "is not a directory"),
    (_open_to_others, "has mode 0755, open to group or others"),
    (_foreign, "is owned by uid"),
], ids=["symlink", "file", "mode 0755", "someone else's"])
def test_a_planted_area_is_not_used_and_replication_goes_on(
        host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, plant: object, why: str) -> None:
    monkeypatch.setattr(versions, "_own_uid", versions._own_uid)
    elsewhere = tmp_path / "elsewhere"
    plant(host, elsewhere)  # type: ignore[operator]
    before = os.lstat(area(host))
    host.write(b"data/f", b"first")
    with caplog.at_level(logging.WARNING, "omirror.versions"):
        host.write(b"data/f", b"second", stamp=LATER)
        host.applier.delete(host.mset, tombstone(b"data/f"))
    assert not (host.data / "f").exists()  # the peer's changes were applied
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once, not for every file
    assert why in warnings[0] and "/data/.omirror-versions" in warnings[0]
    after = os.lstat(area(host))
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    if elsewhere.exists():
        assert list(elsewhere.iterdir()) == []  # nothing written through the link
    if area(host).is_dir() and not area(host).is_symlink():
        assert list(area(host).iterdir()) == []
    assert host.leftovers() == []


def test_an_area_that_is_fixed_is_used_again(host: Host, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    area(host).mkdir(mode=0o755)
    os.chmod(area(host), 0o755)
    host.write(b"data/f", b"first")
    host.write(b"data/f", b"second", stamp=LATER)
    os.chmod(area(host), 0o700)
    host.write(b"data/f", b"third", stamp=Stamp(10**18 + 2, "beta"))
    assert kept_files(host) == {f"f~{STAMP}": b"second"}


def test_a_file_that_cannot_be_linked_is_copied(host: Host,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Across a mount point below the root (EXDEV), or where the kernel refuses a link
    of another user's file (fs.protected_hardlinks), the old version is copied."""
    host.write(b"data/f", b"first", mode=0o604)

    def no_link(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(versions.os, "link", no_link)
    host.write(b"data/f", b"second", stamp=LATER)
    kept = area(host) / f"f~{STAMP}"
    assert kept.read_bytes() == b"first"
    st = os.lstat(kept)
    assert stat.S_IMODE(st.st_mode) == 0o604 and st.st_nlink == 1
    assert (host.data / "f").read_bytes() == b"second"


def test_a_name_too_long_to_keep_is_logged_and_applied(
        host: Host, caplog: pytest.LogCaptureFixture) -> None:
    name = b"n" * 250
    host.write(b"data/" + name, b"first")
    with caplog.at_level(logging.WARNING, "omirror.versions"):
        host.write(b"data/" + name, b"second", stamp=LATER)
    assert (host.data / os.fsdecode(name)).read_bytes() == b"second"
    assert "not kept" in caplog.text and "too long" in caplog.text


# -- names, pruning, listing --------------------------------------------------------------

def test_kept_names_read_back() -> None:
    assert kept_name(b"a.txt", KEPT_AT) == b"a.txt~" + STAMP.encode()
    assert kept_name(b"a~b", KEPT_AT, 3) == b"a~b~" + STAMP.encode() + b"-3"
    assert parse_kept(b"a~b~" + STAMP.encode() + b"-3") == (b"a~b", STAMP + "-3", KEPT_AT)
    for name in (b"a.txt", b"~" + STAMP.encode(), b"a~20241301-000000", b"a~" + STAMP.encode()
                 + b"-0", b"a~2024050-093000"):
        assert parse_kept(name) is None, name


def _keep_at(host: Host, when: float, path: bytes, n: int) -> None:
    host.applier.versions.clock = lambda: when
    host.write(path, b"v%d" % n, stamp=Stamp(10**18 + n, "beta"))


def test_pruning_removes_old_versions_and_empty_directories(host: Host) -> None:
    day = 86400
    now = KEPT_AT + 100 * day
    _keep_at(host, now, b"data/old/deep/f", 1)
    _keep_at(host, now - 40 * day, b"data/old/deep/f", 2)  # keeps v1, 40 days old
    _keep_at(host, now, b"data/mixed/g", 3)
    _keep_at(host, now - 40 * day, b"data/mixed/g", 4)  # keeps v3, 40 days old
    _keep_at(host, now - 1 * day, b"data/mixed/g", 5)  # keeps v4, 1 day old
    (area(host) / "mixed" / "not-a-version").write_bytes(b"left alone")
    assert len(kept_files(host)) == 4
    v = host.applier.versions
    v.clock = lambda: now
    assert v.prune([host.mset], 0) == 0  # 0: kept for ever
    assert len(kept_files(host)) == 4
    assert v.prune([host.mset], 30) == 2
    assert sorted(kept_files(host).values()) == [b"left alone", b"v4"]
    assert not (area(host) / "old").exists()  # emptied: removed
    assert area(host).is_dir()  # the area itself stays
    assert v.prune([host.mset], 0.5) == 1
    assert kept_files(host) == {"mixed/not-a-version": b"left alone"}


def test_pruning_an_area_that_is_a_symlink_touches_nothing(host: Host,
                                                            tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / f"f~{STAMP}").write_bytes(b"not ours")
    os.symlink(elsewhere, area(host))
    host.applier.versions.clock = lambda: KEPT_AT + 10**8
    assert host.applier.versions.prune([host.mset], 1) == 0
    assert (elsewhere / f"f~{STAMP}").read_bytes() == b"not ours"


def test_listing_names_each_version_with_its_path_time_and_size(host: Host) -> None:
    _keep_at(host, KEPT_AT, b"data/d/f", 1)
    _keep_at(host, KEPT_AT, b"data/d/f", 2)
    _keep_at(host, KEPT_AT, b"data/g", 33)
    host.applier.delete(host.mset, tombstone(b"data/g"))
    found = list(host.applier.versions.listing([host.mset]))
    assert [(k.path, k.version, k.size) for k in found] == [
        (b"data/d/f", STAMP, 2), (b"data/g", STAMP, 3)]
    assert found[0].where == os.fsencode(area(host) / "d" / f"f~{STAMP}")
    only = list(host.applier.versions.listing([host.mset], [b"data/d"]))
    assert [k.path for k in only] == [b"data/d/f"]
    assert list(host.applier.versions.listing([host.mset], [b"elsewhere"])) == []


@pytest.mark.parametrize("step", ["_swap_in", "_take_away_checked"])
def test_a_local_write_met_at_the_swap_keeps_nothing(
        host: Host, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """The version is linked into the area just before the swap; a write landing in
    between makes the applier put the user's file back: the link would be that live
    file under a version's name, so it goes again."""
    from omirror import apply
    from omirror.errors import LocalChanged

    host.write(b"data/f", b"first")
    original = getattr(apply, step)

    def written_meanwhile(*args: object) -> None:
        with open(host.data / "f", "ab") as f:
            f.write(b" and a local write")
        original(*args)

    monkeypatch.setattr(apply, step, written_meanwhile)
    with pytest.raises(LocalChanged):
        if step == "_swap_in":
            host.write(b"data/f", b"second", stamp=LATER)
        else:
            host.applier.delete(host.mset, tombstone(b"data/f"))
    assert (host.data / "f").read_bytes() == b"first and a local write"
    assert kept_files(host) == {}
    assert host.leftovers() == []
