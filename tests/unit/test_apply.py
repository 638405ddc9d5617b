"""The applier on real trees: what it writes, what it records, and what it refuses to touch."""

from __future__ import annotations

import ctypes
import errno
import grp
import logging
import os
import pwd
import select
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import xxhash

from omirror import apply, config, fsio, xattrs
from omirror import intents as intents_module
from omirror.apply import Applier, recover
from omirror.entry import Entry, Kind, Stamp, conflict_name
from omirror.errors import ApplyError, LocalChanged, PathRefused
from omirror.intents import Intent, IntentLog
from omirror.scanner import MARKER, Scanner
from omirror.staging import TempFile
from omirror.store import Record, StatSig, Store
from omirror.watcher import parse_events

MTIME_NS = 1_600_000_000_123_456_789
PEER_STAMP = Stamp(10**18, "beta")
CLOCK_NS = 2 * 10**18
_IN_CLOSE_WRITE = 0x08  # inotify(7)
_IN_MOVED_TO = 0x80


def mirror_set(options: str = "") -> config.MirrorSet:
    text = f"( /data ) -> ( alpha beta ) install {options} ;\n"
    return config.parse(text, "test.conf").sets[0]


def file_entry(path: bytes, data: bytes, *, mode: int = 0o640, owner: str = "root",
               group: str = "root", stamp: Stamp = PEER_STAMP) -> Entry:
    return Entry(path=path, kind=Kind.FILE, stamp=stamp, vector=((stamp.origin, stamp.time_ns),),
                 mode=mode, owner=owner, group=group, mtime_ns=MTIME_NS, size=len(data),
                 digest=xxhash.xxh3_128(data).digest())


def dir_entry(path: bytes, mode: int = 0o750) -> Entry:
    return Entry(path=path, kind=Kind.DIR, stamp=PEER_STAMP, mode=mode, owner="root",
                 group="root")


def link_entry(path: bytes, target: bytes) -> Entry:
    return Entry(path=path, kind=Kind.SYMLINK, stamp=PEER_STAMP, owner="root", group="root",
                 target=target)


def tombstone(path: bytes) -> Entry:
    return Entry(path=path, kind=Kind.TOMBSTONE, stamp=PEER_STAMP)


class Host:
    """One host: a root with a marked /data in it, a real store, an applier."""

    def __init__(self, base: Path, options: str = "") -> None:
        self.root = base / "root"
        self.data = self.root / "data"
        self.data.mkdir(parents=True)
        (self.data / os.fsdecode(MARKER)).write_bytes(b"marker\n")
        self.mset = mirror_set(options)
        self.store = Store.open(base / "state")
        self.applier = Applier(os.fsencode(self.root), self.store, "alpha",
                               clock=lambda: CLOCK_NS)

    def path(self, logical: bytes) -> Path:
        return self.root / os.fsdecode(logical)

    def write(self, logical: bytes, data: bytes, **kw: object) -> Record:
        entry = file_entry(logical, data, **kw)  # type: ignore[arg-type]
        return self.applier.write_file(self.mset, entry, data)

    def leftovers(self) -> list[str]:
        """Temp files anywhere in the tree: there must never be any after a call."""
        return [name for _, dirs, files in os.walk(self.root) for name in dirs + files
                if name.startswith(".omirror-tmp-")]

    def scan(self) -> int:
        """How many new versions a scan records: after an apply, none (the echo test)."""
        stats = Scanner(self.store, "alpha").scan_set(self.mset, os.fsencode(self.root))
        return stats.recorded


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    yield h
    h.store.close()


def lstat_sig(p: Path) -> StatSig:
    return StatSig.of(os.lstat(p))


# -- files ---------------------------------------------------------------------------------


def test_write_file_installs_content_mode_mtime_and_records_the_lstat(host: Host) -> None:
    record = host.write(b"data/a.txt", b"hello", mode=0o640)
    p = host.data / "a.txt"
    st = os.lstat(p)
    assert p.read_bytes() == b"hello"
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == MTIME_NS
    assert record.sig == StatSig.of(st) and record.entry.path == b"data/a.txt"
    assert host.store.get(b"data/a.txt") == record
    assert host.leftovers() == []


def test_write_file_replaces_an_existing_file(host: Host) -> None:
    (host.data / "a").write_bytes(b"old")
    host.scan()  # the applier replaces only what the store knows of
    old_ino = os.lstat(host.data / "a").st_ino
    record = host.write(b"data/a", b"new content", mode=0o600)
    assert (host.data / "a").read_bytes() == b"new content"
    assert record.sig is not None and record.sig.ino != old_ino  # renamed over, not rewritten
    assert stat.S_IMODE(os.lstat(host.data / "a").st_mode) == 0o600


def test_a_write_refuses_to_overwrite_a_change_the_store_has_not_seen(
        host: Host) -> None:
    """The last look before the rename: a file written here while the new version was
    being written (not yet recorded) is left alone, and the caller records it first."""
    record = host.write(b"data/a", b"recorded")
    os.unlink(host.data / "a")
    (host.data / "a").write_bytes(b"written here just now")
    for guarded in (lambda: host.applier.write_file(host.mset, file_entry(b"data/a", b"peer"),
                                                    b"peer"),
                    lambda: host.applier.write_file(host.mset, file_entry(b"data/new", b"x"),
                                                    b"x")
                    if (host.data / "new").write_bytes(b"unrecorded") else None):
        with pytest.raises(LocalChanged, match="changed here while a peer's "
                                                            "version was being applied"):
            guarded()
    assert (host.data / "a").read_bytes() == b"written here just now"
    assert (host.data / "new").read_bytes() == b"unrecorded"
    assert host.store.get(b"data/a") == record and host.leftovers() == []
    # what the store recorded is still replaced, and a path nothing holds is written
    os.unlink(host.data / "new")
    host.applier.write_file(host.mset, file_entry(b"data/new", b"x"), b"x")
    assert (host.data / "new").read_bytes() == b"x"


def test_applied_versions_are_recognised_by_the_scanner(host: Host) -> None:
    """What the applier records is what a scan would see: the echo never bounces back."""
    assert host.scan() == 1  # the first scan records /data itself
    host.applier.make_dir(host.mset, dir_entry(b"data/d", 0o755))
    host.write(b"data/d/f", b"content", mode=0o644)
    host.applier.make_symlink(host.mset, link_entry(b"data/d/l", b"f"))
    host.write(b"data/g", b"g")
    host.applier.delete(host.mset, tombstone(b"data/g"))
    assert host.scan() == 0


def test_streamed_file_in_chunks_and_delta_blocks(host: Host) -> None:
    old = host.data / "old"
    old.write_bytes(b"AAAABBBBCCCC")
    new = b"AAAA" + b"xy" + b"CCCC" + b"z" * 3_000_000
    entry = file_entry(b"data/new", new)
    with host.applier.begin_file(host.mset, entry) as temp:
        assert host.leftovers() == [os.fsdecode(temp.name)]
        fd = os.open(old, os.O_RDONLY)
        try:
            temp.copy_from(fd, 0, 4)
            temp.write(b"xy")
            temp.copy_from(fd, 8, 4)
        finally:
            os.close(fd)
        for _i in range(3):
            temp.write(b"z" * 1_000_000)
        assert temp.size == len(new)
        temp.finish()
        record = host.applier.install_file(host.mset, entry, temp)
    assert (host.data / "new").read_bytes() == new
    assert record.sig == lstat_sig(host.data / "new")
    assert host.leftovers() == []


def test_digest_mismatch_is_refused_and_leaves_the_old_file(host: Host) -> None:
    (host.data / "a").write_bytes(b"old")
    entry = file_entry(b"data/a", b"what the peer announced")
    with pytest.raises(ApplyError, match=r"^cannot write /data/a: content does not match its "
                                         r"digest \(23 bytes received, 23 expected\)$") as e:
        host.applier.write_file(host.mset, entry, b"what the peer sent inst")
    assert e.value.errno is None and e.value.path == b"data/a"
    assert (host.data / "a").read_bytes() == b"old"
    assert host.leftovers() == [] and host.store.get(b"data/a") is None


def test_short_stream_is_refused_at_finish_and_the_temp_removed(host: Host) -> None:
    entry = file_entry(b"data/a", b"0123456789")
    temp = host.applier.begin_file(host.mset, entry)
    temp.write(b"01234")
    with pytest.raises(ApplyError, match=r"\(5 bytes received, 10 expected\)"):
        host.applier.install_file(host.mset, entry, temp)
    assert host.leftovers() == [] and not (host.data / "a").exists()
    temp.abort()  # idempotent
    with pytest.raises(ValueError, match="is closed"):
        temp.write(b"more")


def test_more_content_than_announced_is_refused_at_once(host: Host) -> None:
    temp = host.applier.begin_file(host.mset, file_entry(b"data/a", b"0123"))
    temp.write(b"012")
    with pytest.raises(ApplyError, match=r"^cannot write /data/a: more content than the 4 "
                                         r"bytes its entry announced$"):
        temp.write(b"34")
    assert host.leftovers() == []


def test_a_big_file_is_handed_to_writeback_as_it_arrives(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(fsio, "start_writeback",
                        lambda fd, offset, length: started.append((offset, length)))
    data = os.urandom(20 << 20)
    entry = file_entry(b"data/big", data)
    with host.applier.begin_file(host.mset, entry) as temp:
        for at in range(0, len(data), 1 << 20):
            temp.write(data[at:at + (1 << 20)])
        host.applier.install_file(host.mset, entry, temp)
    assert started == [(0, 8 << 20), (8 << 20, 8 << 20)]
    assert (host.data / "big").read_bytes() == data


def test_the_temp_file_is_closed_before_its_rename(host: Host) -> None:
    """Its close is then reported under the temp name, not as a write to the new one
    (which the watcher would pass on to be examined again)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0
    try:
        assert libc.inotify_add_watch(fd, os.fsencode(host.data),
                                      _IN_CLOSE_WRITE | _IN_MOVED_TO) >= 0
        host.applier.write_file(host.mset, file_entry(b"data/a", b"content"), b"content")
        assert select.select([fd], [], [], 5)[0]
        events = [(mask, name) for _, mask, _, name in parse_events(os.read(fd, 65536))]
    finally:
        os.close(fd)
    assert (_IN_MOVED_TO, b"a") in events
    closed = [name for mask, name in events if mask & _IN_CLOSE_WRITE]
    assert closed and b"a" not in closed, events


def test_a_temp_file_swapped_before_its_rename_is_refused(host: Host) -> None:
    entry = file_entry(b"data/a", b"content")
    with host.applier.begin_file(host.mset, entry) as temp:
        temp.write(b"content")
        temp.finish()
        temp_path = host.data / os.fsdecode(temp.name)
        temp_path.unlink()
        temp_path.write_bytes(b"someone else's")
        with pytest.raises(ApplyError, match="was replaced by someone else"):
            host.applier.install_file(host.mset, entry, temp)
    assert not (host.data / "a").exists() and host.store.get(b"data/a") is None


def test_a_file_whose_directory_is_renamed_while_it_goes_in_is_reported_where_it_is(
        host: Host) -> None:
    """The applier writes through a descriptor of the directory opened before; a user's
    rename of that directory in between puts the file below the new name, where the
    watcher will not report it (it drops the applier's own renames into place)."""
    (host.data / "d").mkdir()
    host.scan()
    entry = file_entry(b"data/d/f", b"content")
    with host.applier.begin_file(host.mset, entry) as temp:
        temp.write(b"content")
        (host.data / "d").rename(host.data / "e")
        host.applier.install_file(host.mset, entry, temp)
    assert (host.data / "e" / "f").read_bytes() == b"content"
    assert host.applier.dirs.take_strays() == [b"data/e/f"]
    assert host.applier.dirs.take_strays() == []
    host.applier.write_file(host.mset, file_entry(b"data/e/g", b"g"), b"g")
    assert host.applier.dirs.take_strays() == []  # in place: nothing to report


def test_abort_removes_the_temp_file(host: Host) -> None:
    temp = host.applier.begin_file(host.mset, file_entry(b"data/a", b"x"))
    temp.write(b"x")
    temp.abort()
    temp.abort()
    assert host.leftovers() == [] and not (host.data / "a").exists()


def test_missing_parent_directories_are_made(host: Host) -> None:
    host.write(b"data/x/y/z", b"deep")
    assert (host.data / "x" / "y" / "z").read_bytes() == b"deep"
    assert stat.S_ISDIR(os.lstat(host.data / "x" / "y").st_mode)


def test_owner_and_group_by_name(host: Host) -> None:
    try:
        nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    except KeyError:
        pytest.skip("no user nobody or group nogroup here")
    if os.geteuid() != 0:
        pytest.skip("only root can give files away")
    host.write(b"data/a", b"x", owner="nobody", group="nogroup", mode=0o4750)
    st = os.lstat(host.data / "a")
    assert (st.st_uid, st.st_gid) == (nobody, nogroup)
    assert stat.S_IMODE(st.st_mode) == 0o4750  # mode set after chown, so set-id survives


def test_numeric_owner_and_unknown_names(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    """An owner unknown here never leaves the file as the daemon made it (root): the
    sender's numeric id is used, nobody when none came, and set-id bits are dropped,
    so a user's 6755 file from a host that knows them is no root set-id file here."""
    if os.geteuid() != 0:
        pytest.skip("only root can give files away")
    host.scan()  # the root's own entry
    host.write(b"data/a", b"x", owner="12345", group="54321", mode=0o6755)
    st = os.lstat(host.data / "a")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (12345, 54321, 0o755)
    with caplog.at_level(logging.WARNING, logger="omirror.owners"):
        entry = file_entry(b"data/b", b"x", owner="no-such-user-7e3f",
                           group="no-such-group-7e3f", mode=0o6755)
        host.applier.write_file(host.mset, replace(entry, uid=4242, gid=4343), b"x")
        host.write(b"data/c", b"x", owner="no-such-user-7e3f", group="no-such-group-7e3f")
    st = os.lstat(host.data / "b")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4242, 4343, 0o755)
    st = os.lstat(host.data / "c")  # no number came with it (an older peer): nobody
    assert (st.st_uid, st.st_gid) == (65534, 65534) and st.st_uid != 0
    warnings = [r for r in caplog.records if "no-such-user-7e3f" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "does not exist here" in warnings[0].getMessage()
    assert host.scan() == 0  # what the rule gave the files is no local change


def test_without_chown_owner_is_left_alone(host: Host) -> None:
    host.applier.can_chown = False
    host.write(b"data/a", b"x", owner="12345", group="12345")
    st = os.lstat(host.data / "a")
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())


def test_nochkmode_keeps_the_local_mode_of_an_existing_file(tmp_path: Path) -> None:
    h = Host(tmp_path, "-onochkmode")
    (h.data / "a").write_bytes(b"old")
    os.chmod(h.data / "a", 0o600)
    h.scan()
    h.write(b"data/a", b"new", mode=0o755)
    assert stat.S_IMODE(os.lstat(h.data / "a").st_mode) == 0o600
    h.write(b"data/b", b"new file", mode=0o751)  # a new file gets the entry's mode
    assert stat.S_IMODE(os.lstat(h.data / "b").st_mode) == 0o751
    h.store.close()


def test_nochkowner_keeps_the_local_owner_across_the_replacement(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give files away")
    h = Host(tmp_path, "-onochkowner,nochkgroup")
    (h.data / "a").write_bytes(b"old")
    os.chown(h.data / "a", 4321, 4322)
    h.scan()
    h.write(b"data/a", b"new", owner="root", group="root")
    st = os.lstat(h.data / "a")
    assert (st.st_uid, st.st_gid) == (4321, 4322)
    h.store.close()


def test_failed_rename_is_an_apply_error_and_cleans_up(host: Host,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (host.data / "a").write_bytes(b"old")
    host.scan()

    def refuse(*args: object, **kw: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)
    monkeypatch.setattr(fsio, "rename_exchange", refuse)
    with pytest.raises(ApplyError, match=r"^cannot write /data/a: Permission denied$") as e:
        host.write(b"data/a", b"new")
    monkeypatch.undo()
    assert e.value.errno == errno.EACCES and e.value.path == b"data/a"
    assert (host.data / "a").read_bytes() == b"old" and host.leftovers() == []


def test_disk_full_while_writing_keeps_the_old_file(host: Host,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (host.data / "a").write_bytes(b"old")
    before = lstat_sig(host.data / "a")

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "write", full)
        with pytest.raises(ApplyError, match=r"^cannot write /data/a: No space left on device$"):
            host.write(b"data/a", b"new content")
    assert (host.data / "a").read_bytes() == b"old" and lstat_sig(host.data / "a") == before
    assert host.leftovers() == [] and host.store.get(b"data/a") is None


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs, so that ENOSPC comes from the kernel; skipped where mounting
    is not allowed."""
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.mark.parametrize("size", [200_000, 3_000_000], ids=["written", "reserved"])
def test_real_disk_full_keeps_the_old_file(small_fs: Path, tmp_path: Path, size: int) -> None:
    """200 kB fails in write(); 3 MB fails at once, when its space is reserved."""
    data = small_fs / "data"
    data.mkdir()
    (data / os.fsdecode(MARKER)).write_bytes(b"m")
    (data / "a").write_bytes(b"old")
    with Store.open(tmp_path / "state") as store:
        applier = Applier(os.fsencode(small_fs), store, "alpha")
        content = b"\x01" * size
        with pytest.raises(ApplyError, match="No space left on device") as e:
            applier.write_file(mirror_set(), file_entry(b"data/a", content), content)
    assert e.value.errno == errno.ENOSPC
    assert (data / "a").read_bytes() == b"old"
    assert sorted(os.listdir(data)) == [".omirror-root", "a"]


def test_a_sparse_file_needs_room_for_its_data_and_a_dense_one_for_its_size(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reserve of 1 MiB, 10 MiB free (less what temp files hold). A sparse 64 MiB
    file of 8 KiB of data arrives; a dense 16 MiB one stops at the reserve, and its
    next attempt is refused before a byte crosses, until there is room for all of it."""
    MiB = 1 << 20
    free = {"total": 10 * MiB}

    def room(dir_fd: int, reserve: object) -> tuple[int, int]:
        held = sum(os.stat(host.data / n).st_blocks * 512 for n in os.listdir(host.data)
                   if n.startswith(".omirror-tmp-"))
        return free["total"] - held, MiB

    monkeypatch.setattr(apply.diskspace, "room", room)
    host.applier.reserve = apply.diskspace.Reserve(size=MiB)

    sparse = b"s" * 8192 + bytes(64 * MiB - 8192)
    entry = file_entry(b"data/sparse", sparse)
    with host.applier.begin_file(host.mset, entry) as temp:
        temp.write(b"s" * 8192)
        temp.hole(64 * MiB - 8192)
        host.applier.install_file(host.mset, entry, temp)
    st = os.stat(host.data / "sparse")
    assert st.st_size == 64 * MiB and st.st_blocks * 512 < MiB
    assert host.applier.short == {}

    dense = b"d" * (16 * MiB)
    entry = file_entry(b"data/dense", dense)
    temp = host.applier.begin_file(host.mset, entry)
    with pytest.raises(apply.diskspace.LowDisk, match="low disk space"):
        for i in range(16):
            temp.write(dense[i * MiB:(i + 1) * MiB])
    assert 8 <= i < 10  # stopped at the reserve, not at the end of the disk
    assert host.leftovers() == []
    assert host.applier.short[host.mset.title].needed == 16 * MiB
    with pytest.raises(apply.diskspace.LowDisk, match="low disk space"):
        host.applier.begin_file(host.mset, entry)  # known dense: refused at once
    assert host.leftovers() == []

    free["total"] = 20 * MiB
    with host.applier.begin_file(host.mset, entry) as temp:
        for i in range(16):
            temp.write(dense[i * MiB:(i + 1) * MiB])
        host.applier.install_file(host.mset, entry, temp)
    assert (host.data / "dense").read_bytes() == dense
    assert host.applier.short == {} and host.applier.data_needed == {}


# -- type changes --------------------------------------------------------------------------


def test_type_changes_file_dir_symlink_file(host: Host) -> None:
    p = host.data / "x"
    host.write(b"data/x", b"a file")
    host.applier.make_dir(host.mset, dir_entry(b"data/x", 0o711))
    assert stat.S_ISDIR(os.lstat(p).st_mode) and stat.S_IMODE(os.lstat(p).st_mode) == 0o711
    record = host.applier.make_symlink(host.mset, link_entry(b"data/x", b"../elsewhere"))
    assert os.readlink(p) == "../elsewhere" and record.sig == lstat_sig(p)
    host.write(b"data/x", b"a file again")
    assert p.read_bytes() == b"a file again" and not p.is_symlink()
    host.applier.make_symlink(host.mset, link_entry(b"data/x", b"t"))
    host.applier.make_dir(host.mset, dir_entry(b"data/x"))  # a symlink is replaced too
    assert stat.S_ISDIR(os.lstat(p).st_mode)
    host.applier.make_symlink(host.mset, link_entry(b"data/x", b"t2"))
    assert os.readlink(p) == "t2"
    assert host.leftovers() == []


def test_a_file_never_replaces_a_non_empty_directory(host: Host) -> None:
    (host.data / "d").mkdir()
    (host.data / "d" / "newer").write_bytes(b"local")
    host.scan()
    with pytest.raises(ApplyError, match=r"^cannot replace directory /data/d by a file: it "
                                         r"is not empty here$") as e:
        host.write(b"data/d", b"x")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(ApplyError, match="by a symlink"):
        host.applier.make_symlink(host.mset, link_entry(b"data/d", b"t"))
    assert (host.data / "d" / "newer").read_bytes() == b"local" and host.leftovers() == []


def test_make_dir_sets_mode_on_an_existing_directory(host: Host) -> None:
    (host.data / "d").mkdir(mode=0o700)
    host.scan()
    before = os.lstat(host.data / "d").st_ino
    record = host.applier.make_dir(host.mset, dir_entry(b"data/d", 0o2775))
    st = os.lstat(host.data / "d")
    assert st.st_ino == before and stat.S_IMODE(st.st_mode) == 0o2775
    assert record.sig == StatSig.of(st)


def test_the_root_gets_attributes_but_is_never_replaced(host: Host) -> None:
    host.applier.make_dir(host.mset, dir_entry(b"data", 0o751))
    assert stat.S_IMODE(os.lstat(host.data).st_mode) == 0o751
    with pytest.raises(PathRefused, match="is a root of set"):
        host.write(b"data", b"x")
    with pytest.raises(PathRefused, match="a root is never deleted by a peer"):
        host.applier.delete(host.mset, tombstone(b"data"))
    assert host.data.is_dir()


def test_symlink_with_a_bad_target_is_refused(host: Host) -> None:
    for target in (b"", b"a\0b"):
        with pytest.raises(PathRefused, match="symlink target"):
            host.applier.make_symlink(host.mset, link_entry(b"data/l", target))


# -- deletions -----------------------------------------------------------------------------


def test_delete_file_symlink_directory_and_absent(host: Host) -> None:
    (host.data / "f").write_bytes(b"x")
    (host.data / "l").symlink_to(host.data / "f")
    (host.data / "d").mkdir()
    host.scan()
    for name in (b"l", b"f", b"d", b"never-was", b"gone/below/x"):
        record = host.applier.delete(host.mset, tombstone(b"data/" + name))
        assert record.sig is None and record.entry.is_tombstone
        assert host.store.get(b"data/" + name) == record
    assert sorted(os.listdir(host.data)) == [".omirror-root"]


def test_deleting_a_symlink_does_not_touch_its_target(host: Host, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"k")
    (host.data / "l").symlink_to(outside)
    host.scan()
    host.applier.delete(host.mset, tombstone(b"data/l"))
    assert not (host.data / "l").exists() and (outside / "keep").read_bytes() == b"k"


def test_delete_of_a_non_empty_directory_keeps_it(host: Host,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    (host.data / "d").mkdir()
    (host.data / "d" / "newer").write_bytes(b"local")
    host.scan()
    with caplog.at_level(logging.INFO, logger="omirror.apply"):
        record = host.applier.delete(host.mset, tombstone(b"data/d"))
    assert (host.data / "d" / "newer").read_bytes() == b"local"
    assert host.store.get(b"data/d") == record and record.entry.is_tombstone
    assert "path=/data/d deleted by a peer but not empty here" in caplog.text


# -- local copies and renames --------------------------------------------------------------


def test_copy_local_move_renames_without_reading(host: Host,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    source = host.write(b"data/old", b"payload")
    (host.data / "sub").mkdir()

    def no_reading(fd: int) -> tuple[bytes, int]:
        raise AssertionError("the store vouches for the source: it must not be read")

    monkeypatch.setattr(fsio, "digest_fd", no_reading)
    entry = file_entry(b"data/sub/new", b"payload", mode=0o604)
    ino = source.sig.ino if source.sig else -1
    record = host.applier.copy_local(host.mset, entry, b"data/old", move=True)
    st = os.lstat(host.data / "sub" / "new")
    assert not (host.data / "old").exists() and st.st_ino == ino
    assert stat.S_IMODE(st.st_mode) == 0o604 and record.sig == StatSig.of(st)


def test_a_moved_source_is_expected_absent_until_its_tombstone(host: Host) -> None:
    host.write(b"data/old", b"payload")
    host.applier.copy_local(host.mset, file_entry(b"data/new", b"payload"), b"data/old",
                            move=True)
    assert host.applier.expected_absent == {b"data/old"}
    host.applier.delete(host.mset, tombstone(b"data/old"))
    assert host.applier.expected_absent == set()


def _append_to_old(data: Path) -> None:
    with open(data / "old", "ab") as f:
        f.write(b" and a local write")


def _rename_a_new_file_onto_old(data: Path) -> None:
    (data / "user-tmp").write_bytes(b"the user's new file")
    os.rename(data / "user-tmp", data / "old")


@pytest.mark.parametrize("meanwhile, left", [
    (_append_to_old, b"payload and a local write"),
    (_rename_a_new_file_onto_old, b"the user's new file"),
], ids=["written to", "replaced at its name"])
def test_copy_local_move_refuses_a_source_changed_after_it_was_verified(
        host: Host, monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[Path], None],
        left: bytes) -> None:
    """A write landing between the check of the source and the rename, or another file
    renamed onto the source's name (the rename goes by name), would be moved and
    recorded as the peer's version, whose digest it does not have: the peers asking for
    that content would be told it changed, and wait for ever for a newer entry."""
    host.write(b"data/old", b"payload")
    guard = host.applier._guard_target

    def change_meanwhile(path: bytes, st: os.stat_result | None) -> None:
        guard(path, st)
        meanwhile(host.data)

    monkeypatch.setattr(host.applier, "_guard_target", change_meanwhile)
    with pytest.raises(LocalChanged, match="changed here while it was being moved"):
        host.applier.copy_local(host.mset, file_entry(b"data/new", b"payload"), b"data/old",
                                move=True)
    assert (host.data / "old").read_bytes() == left
    assert not (host.data / "new").exists() and host.store.get(b"data/new") is None


@pytest.mark.parametrize("meanwhile, left", [
    (_append_to_old, b"payload and a local write"),
    (_rename_a_new_file_onto_old, b"the user's new file"),
], ids=["written to", "replaced at its name"])
def test_a_source_changed_as_the_move_renames_it_is_put_back_at_its_name(
        host: Host, monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[Path], None],
        left: bytes) -> None:
    """A user appending to the file in the instant of the rename (found by chaos seed
    1300056): the written file went to the peer's new name, the user's name was then
    deleted by the peer's tombstone, and the write counted for nothing there. What went
    is put back under the user's name, and recorded first."""
    host.write(b"data/old", b"payload")
    rename_over = apply._rename_over

    def change_meanwhile(src_dir: int, src: bytes, *args: object, **kwargs: object) -> None:
        meanwhile(host.data)
        rename_over(src_dir, src, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(apply, "_rename_over", change_meanwhile)
    with pytest.raises(LocalChanged, match="put back"):
        host.applier.copy_local(host.mset, file_entry(b"data/new", b"payload"), b"data/old",
                                move=True)
    assert (host.data / "old").read_bytes() == left
    assert not (host.data / "new").exists() and host.store.get(b"data/new") is None
    assert b"data/old" not in host.applier.expected_absent


def test_copy_local_move_hashes_a_source_the_store_does_not_vouch_for(host: Host) -> None:
    (host.data / "old").write_bytes(b"payload")  # never recorded
    record = host.applier.copy_local(host.mset, file_entry(b"data/new", b"payload"),
                                     b"data/old", move=True)
    assert (host.data / "new").read_bytes() == b"payload" and not (host.data / "old").exists()
    assert record.entry.path == b"data/new"


def test_copy_local_move_refuses_a_changed_source(host: Host) -> None:
    host.write(b"data/old", b"payload")
    (host.data / "old").write_bytes(b"changed")  # after the record: the store no longer vouches
    with pytest.raises(ApplyError, match=r"^cannot move /data/old to /data/new: its content "
                                         r"does not match the digest of the entry$"):
        host.applier.copy_local(host.mset, file_entry(b"data/new", b"payload"), b"data/old",
                                move=True)
    assert (host.data / "old").read_bytes() == b"changed" and not (host.data / "new").exists()


def test_copy_local_copy_keeps_the_source(host: Host) -> None:
    host.write(b"data/src", b"same bytes")
    entry = file_entry(b"data/dup/copy", b"same bytes", mode=0o444)
    record = host.applier.copy_local(host.mset, entry, b"data/src", move=False)
    dst = host.data / "dup" / "copy"
    assert dst.read_bytes() == b"same bytes" and (host.data / "src").read_bytes() == b"same bytes"
    assert os.lstat(dst).st_ino != os.lstat(host.data / "src").st_ino
    assert stat.S_IMODE(os.lstat(dst).st_mode) == 0o444 and os.lstat(dst).st_mtime_ns == MTIME_NS
    assert record.sig == lstat_sig(dst) and host.leftovers() == []


def test_copy_local_copy_refuses_other_content(host: Host) -> None:
    (host.data / "src").write_bytes(b"other bytes")
    with pytest.raises(ApplyError, match=r"^cannot copy /data/src to /data/copy: its content "
                                         r"does not match the digest of the entry$"):
        host.applier.copy_local(host.mset, file_entry(b"data/copy", b"same bytes"),
                                b"data/src", move=False)
    (host.data / "src").write_bytes(b"samE bytes")  # same size, other bytes
    with pytest.raises(ApplyError, match="content does not match its digest"):
        host.applier.copy_local(host.mset, file_entry(b"data/copy", b"same bytes"),
                                b"data/src", move=False)
    assert not (host.data / "copy").exists() and host.leftovers() == []


def test_copy_local_from_a_missing_or_outside_source(host: Host) -> None:
    with pytest.raises(ApplyError, match=r"^cannot copy /data/nope to /data/a: it is gone$"):
        host.applier.copy_local(host.mset, file_entry(b"data/a", b"x"), b"data/nope",
                                move=False)
    with pytest.raises(PathRefused, match="is not inside set"):
        host.applier.copy_local(host.mset, file_entry(b"data/a", b"x"), b"etc/passwd",
                                move=True)


def test_adopt_records_content_in_place_with_its_attributes(host: Host) -> None:
    (host.data / "f").write_bytes(b"already here")
    os.chmod(host.data / "f", 0o600)
    looked_at = lstat_sig(host.data / "f")
    record = host.applier.adopt(host.mset, file_entry(b"data/f", b"already here", mode=0o644),
                                looked_at)
    st = os.lstat(host.data / "f")
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_mtime_ns == MTIME_NS
    assert record.sig == StatSig.of(st) and host.store.get(b"data/f") == record
    with pytest.raises(ApplyError, match=r"^cannot adopt /data/f: it is not a regular file "
                                         r"of 3 bytes here$"):
        host.applier.adopt(host.mset, file_entry(b"data/f", b"abc"), record.sig)
    with pytest.raises(ApplyError, match=r"^cannot adopt /data/none: No such file"):
        host.applier.adopt(host.mset, file_entry(b"data/none", b"abc"), record.sig)


def test_adopt_never_gives_attributes_to_a_file_swapped_in(host: Host) -> None:
    """The caller vouched for the file it looked at. A user who puts another file of
    the same size at the name in between (their own, mode 0644) must not get the
    entry's owner and mode (root, 4755) for it: that would be a set-user-ID root file
    with the user's content."""
    (host.data / "f").write_bytes(b"vouched")
    looked_at = lstat_sig(host.data / "f")
    swapped = host.data / "g"
    swapped.write_bytes(b"evil!!!")  # same size
    os.chown(swapped, 65534, 65534)
    os.rename(swapped, host.data / "f")
    with pytest.raises(LocalChanged):
        host.applier.adopt(host.mset, file_entry(b"data/f", b"vouched", mode=0o4755),
                           looked_at)
    st = os.lstat(host.data / "f")
    assert (st.st_uid, stat.S_IMODE(st.st_mode) & 0o7000) == (65534, 0)
    assert host.store.get(b"data/f") is None


# -- conflicts -----------------------------------------------------------------------------


def test_keep_conflict_copy_keeps_the_local_loser_as_a_new_local_version(host: Host) -> None:
    host.write(b"data/doc", b"local words", stamp=Stamp(5, "alpha"))
    assert host.scan() == 1  # /data itself
    loser = Stamp(5, "alpha")
    record = host.applier.keep_conflict_copy(host.mset, b"data/doc", loser)
    name = conflict_name(b"doc", loser)
    assert record is not None and record.entry.path == b"data/" + name
    assert name == b"doc.omirror-conflict-alpha-5"
    copy = host.data / os.fsdecode(name)
    assert copy.read_bytes() == b"local words"
    assert (host.data / "doc").read_bytes() == b"local words"  # until the winner is installed
    entry = record.entry
    assert entry.stamp == Stamp(CLOCK_NS, "alpha") and entry.vector == (("alpha", CLOCK_NS),)
    assert entry.digest == xxhash.xxh3_128(b"local words").digest()
    assert (entry.mode, entry.owner, entry.size, entry.mtime_ns) == (0o640, "root", 11, MTIME_NS)
    assert record.sig == lstat_sig(copy) and host.store.get(entry.path) == record
    host.write(b"data/doc", b"the winner's words")
    assert copy.read_bytes() == b"local words"
    assert host.scan() == 0


def test_keep_conflict_copy_of_nothing(host: Host) -> None:
    assert host.applier.keep_conflict_copy(host.mset, b"data/none", Stamp(1, "a")) is None
    assert host.applier.keep_conflict_copy(host.mset, b"data/no/dir", Stamp(1, "a")) is None
    (host.data / "d").mkdir()
    assert host.applier.keep_conflict_copy(host.mset, b"data/d", Stamp(1, "a")) is None


def test_keep_conflict_copy_copies_where_links_are_refused(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    host.write(b"data/doc", b"local words")

    def no_links(*args: object, **kw: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    record = host.applier.keep_conflict_copy(host.mset, b"data/doc", Stamp(7, "alpha"))
    assert record is not None
    copy = host.data / "doc.omirror-conflict-alpha-7"
    assert copy.read_bytes() == b"local words"
    assert os.lstat(copy).st_ino != os.lstat(host.data / "doc").st_ino
    assert os.lstat(copy).st_mtime_ns == MTIME_NS and host.leftovers() == []


def test_keep_conflict_copy_succeeds_a_held_version_of_the_copy(host: Host) -> None:
    loser = Stamp(5, "alpha")
    name = b"data/" + conflict_name(b"doc", loser)
    host.write(name, b"a peer made this copy first", stamp=Stamp(CLOCK_NS + 10, "beta"))
    host.write(b"data/doc", b"local words")
    record = host.applier.keep_conflict_copy(host.mset, b"data/doc", loser)
    assert record is not None and record.entry.stamp == Stamp(CLOCK_NS + 11, "alpha")
    assert dict(record.entry.vector) == {"beta": CLOCK_NS + 10, "alpha": CLOCK_NS + 11}


@pytest.mark.parametrize("streamed", [False, True], ids=["inline", "streamed"])
def test_write_conflict_copy_keeps_the_incoming_loser(host: Host, streamed: bool) -> None:
    (host.data / "doc").write_bytes(b"local winner")
    stamp = Stamp(3, "gamma")
    entry = file_entry(b"data/doc", b"their words", stamp=stamp, mode=0o600)
    if streamed:
        temp = host.applier.begin_file(host.mset, entry)
        temp.write(b"their words")
        record = host.applier.write_conflict_copy(host.mset, entry, temp)
    else:
        record = host.applier.write_conflict_copy(host.mset, entry, b"their words")
    copy = host.data / "doc.omirror-conflict-gamma-3"
    assert copy.read_bytes() == b"their words"
    assert (host.data / "doc").read_bytes() == b"local winner"
    assert record.entry.path == b"data/doc.omirror-conflict-gamma-3"
    assert record.entry.stamp == Stamp(CLOCK_NS, "alpha")
    assert record.entry.digest == entry.digest and record.entry.mode == 0o600
    assert os.lstat(copy).st_mtime_ns == MTIME_NS and record.sig == lstat_sig(copy)
    assert host.leftovers() == []
    host.store.put(file_entry(b"data/doc", b"local winner"), lstat_sig(host.data / "doc"))
    assert host.scan() == 1  # /data itself; the copy is known


# -- disk_matches --------------------------------------------------------------------------


def test_disk_matches_what_was_recorded(host: Host) -> None:
    record = host.write(b"data/a", b"x")
    assert host.applier.disk_matches(host.mset, b"data/a", record)
    assert not host.applier.disk_matches(host.mset, b"data/a", None)
    os.utime(host.data / "a", ns=(1, 1))  # a local change the scanner has not seen yet
    assert not host.applier.disk_matches(host.mset, b"data/a", record)


def test_disk_matches_absence(host: Host) -> None:
    assert host.applier.disk_matches(host.mset, b"data/none", None)
    tomb = host.applier.delete(host.mset, tombstone(b"data/none"))
    assert host.applier.disk_matches(host.mset, b"data/none", tomb)
    assert host.applier.disk_matches(host.mset, b"data/none/below", None)
    record = host.write(b"data/a", b"x")
    (host.data / "a").unlink()
    assert not host.applier.disk_matches(host.mset, b"data/a", record)
    (host.data / "a").write_bytes(b"new here")
    assert not host.applier.disk_matches(host.mset, b"data/a", tomb)


def test_disk_matches_kind_and_directories(host: Host) -> None:
    record = host.applier.make_dir(host.mset, dir_entry(b"data/d"))
    host.write(b"data/d/child", b"x")  # moves the directory's mtime and ctime
    assert host.applier.disk_matches(host.mset, b"data/d", record)
    (host.data / "d" / "child").unlink()
    (host.data / "d").rmdir()
    (host.data / "d").write_bytes(b"now a file")
    assert not host.applier.disk_matches(host.mset, b"data/d", record)


# -- hostile trees -------------------------------------------------------------------------


@pytest.fixture
def planted(host: Host, tmp_path: Path) -> Path:
    """A symlink in the tree (data/evil -> outside), as a user or an earlier entry made it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (host.data / "evil").symlink_to(outside)
    return outside


def test_planted_symlink_never_leads_a_write_outside(host: Host, planted: Path) -> None:
    mset = host.mset
    attempts = [
        lambda: host.write(b"data/evil/x", b"pwned"),
        lambda: host.write(b"data/evil/deeper/x", b"pwned"),
        lambda: host.applier.begin_file(mset, file_entry(b"data/evil/x", b"p")),
        lambda: host.applier.make_dir(mset, dir_entry(b"data/evil/d")),
        lambda: host.applier.make_symlink(mset, link_entry(b"data/evil/l", b"/etc/passwd")),
        lambda: host.applier.delete(mset, tombstone(b"data/evil/x")),
        lambda: host.applier.keep_conflict_copy(mset, b"data/evil/x", Stamp(1, "a")),
        lambda: host.applier.write_conflict_copy(mset, file_entry(b"data/evil/x", b"p"), b"p"),
    ]
    for attempt in attempts:
        with pytest.raises(PathRefused, match=r"^refused path '?/?data/evil/.*': component "
                                              r"'evil' is a symbolic link here"):
            attempt()
    assert list(planted.iterdir()) == []
    assert host.store.count() == 0


def test_planted_symlink_as_the_final_name_is_replaced_not_followed(host: Host,
                                                                    planted: Path) -> None:
    host.scan()  # recorded as the symlink it is, never followed
    host.write(b"data/evil", b"a file now")
    assert (host.data / "evil").read_bytes() == b"a file now"
    assert not (host.data / "evil").is_symlink() and list(planted.iterdir()) == []


def test_a_file_where_a_directory_is_expected_is_refused(host: Host) -> None:
    (host.data / "f").write_bytes(b"x")
    with pytest.raises(PathRefused, match="component 'f' is not a directory here"):
        host.write(b"data/f/x", b"y")


def test_paths_outside_the_set_and_malformed_ones_are_refused(host: Host,
                                                              tmp_path: Path) -> None:
    for path in (b"etc/x", b"data/../x", b"/data/x", b"data/.omirror-root"):
        with pytest.raises(PathRefused):
            host.write(path, b"x")
    assert not (host.root / "etc").exists() and not (host.root / "x").exists()


def test_a_root_without_its_marker_is_never_written(host: Host) -> None:
    """An unmounted disk leaves an empty mount point: writing there would hide files."""
    (host.data / os.fsdecode(MARKER)).unlink()
    with pytest.raises(ApplyError, match=r"root /data \(.*\) has no \.omirror-root marker: it "
                                         r"looks unmounted") as e:
        host.write(b"data/a", b"x")
    assert e.value.errno == errno.ENOENT and os.listdir(host.data) == []
    host.data.rmdir()
    with pytest.raises(ApplyError, match=r"root /data \(.*\) is not usable: No such file"):
        host.applier.make_dir(host.mset, dir_entry(b"data/d"))
    assert not host.data.exists()


def test_wrong_kind_is_a_programming_error(host: Host) -> None:
    with pytest.raises(ValueError, match="a dir entry given where a file is applied"):
        host.applier.write_file(host.mset, dir_entry(b"data/a"), b"")
    temp = host.applier.begin_file(host.mset, file_entry(b"data/a", b""))
    with pytest.raises(ValueError, match="temp file of /data/a given for another version or "
                                         "path: /data/b"):
        host.applier.install_file(host.mset, file_entry(b"data/b", b""), temp)
    with pytest.raises(ValueError, match="given for another version"):
        host.applier.install_file(host.mset, file_entry(b"data/a", b"other"), temp)
    temp.abort()
    assert host.leftovers() == []


def test_non_utf8_names_are_written_as_bytes(host: Host) -> None:
    record = host.write(b"data/caf\xe9/\xff", b"latin")
    assert os.lstat(os.path.join(os.fsencode(host.data), b"caf\xe9", b"\xff")).st_size == 5
    assert record.entry.path == b"data/caf\xe9/\xff"


def test_temp_file_is_private_while_it_is_written(host: Host) -> None:
    with host.applier.begin_file(host.mset, file_entry(b"data/a", b"x")) as temp:
        assert isinstance(temp, TempFile)
        [name] = host.leftovers()
        assert stat.S_IMODE(os.lstat(host.data / name).st_mode) == 0o600
    assert host.leftovers() == []


# -- pyfakefs --------------------------------------------------------------------------------


def fake_tree(fs) -> tuple[Applier, Store]:  # type: ignore[no-untyped-def]
    fs.create_file("/r/data/.omirror-root")
    store = Store.open(":memory:")  # sqlite cannot be faked; :memory: touches no file
    return Applier(b"/r", store, "alpha"), store


def test_fake_fs_refuses_before_touching_anything(fs) -> None:  # type: ignore[no-untyped-def]
    applier, store = fake_tree(fs)
    with pytest.raises(PathRefused):
        applier.write_file(mirror_set(), file_entry(b"data/../x", b"x"), b"x")
    with pytest.raises(PathRefused):
        applier.disk_matches(mirror_set(), b"data/\0", None)
    assert os.listdir("/r") == ["data"]
    store.close()


@pytest.mark.xfail(raises=TypeError, strict=True,
                   reason="pyfakefs 6.3 joins the str path of a dir_fd with a bytes name; "
                          "ENOSPC is tested with a real tmpfs and a failing os.write instead")
def test_fake_fs_disk_full(fs) -> None:  # type: ignore[no-untyped-def]
    applier, store = fake_tree(fs)
    fs.create_file("/r/data/a", contents=b"old")
    fs.set_disk_usage(100, "/r")
    try:
        with pytest.raises(ApplyError, match="No space left on device"):
            applier.write_file(mirror_set(), file_entry(b"data/a", b"x" * 1000), b"x" * 1000)
        assert open("/r/data/a", "rb").read() == b"old"
    finally:
        store.close()


# -- attributes in directories users write -------------------------------------------------


def test_a_temp_symlink_swapped_before_its_chown_is_never_chowned(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temp symlink sits in a directory users may write: a user who replaces it by
    their own file between its creation and the chown would have that file given to
    the entry's owner (root). The chown goes through a descriptor of the link itself,
    which must be ours."""
    real_symlink = os.symlink
    swapped: list[Path] = []

    def symlink_then_swap(src: object, dst: object, *args: object, **kw: object) -> None:
        real_symlink(src, dst, *args, **kw)  # type: ignore[arg-type]
        if isinstance(dst, bytes) and dst.startswith(b".omirror-tmp-"):
            mine = host.data / os.fsdecode(dst)
            mine.unlink()
            mine.write_bytes(b"a user's file")
            os.chown(mine, 65534, 65534)
            swapped.append(mine)

    monkeypatch.setattr(os, "symlink", symlink_then_swap)
    with pytest.raises(ApplyError, match="replaced by someone else"):
        host.applier.make_symlink(host.mset, link_entry(b"data/l", b"target"))
    assert swapped and not swapped[0].exists()  # removed as our temp name, not chowned
    assert not os.path.lexists(host.data / "l")


def test_a_directory_swapped_in_after_mkdir_gets_no_owner_or_mode(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the applier's mkdir of its temp directory and its open, a user who can
    write the parent may put their own directory at that name: it must not be given the
    entry's owner and mode, nor be renamed into place."""
    real_mkdir = os.mkdir
    swapped: list[os.stat_result] = []

    def mkdir_then_swap(path: object, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)  # type: ignore[arg-type]
        if isinstance(path, bytes) and path.startswith(b".omirror-tmp-"):
            theirs = host.data / os.fsdecode(path)
            os.rmdir(theirs)
            real_mkdir(theirs, 0o777)
            os.chmod(theirs, 0o777)
            os.chown(theirs, 65534, 65534)
            swapped.append(os.lstat(theirs))

    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    with pytest.raises(ApplyError, match="replaced by someone else"):
        host.applier.make_dir(host.mset, replace(dir_entry(b"data/d", mode=0o2755)))
    assert swapped and (swapped[0].st_uid, stat.S_IMODE(swapped[0].st_mode)) == (65534, 0o777)
    assert not os.path.lexists(host.data / "d")
    assert host.store.get(b"data/d") is None


def test_a_new_directory_appears_under_its_name_only_complete(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory is made under a temp name and renamed into place with its owner
    and final mode: under its own name it is never 0700 (a crash in between used to
    leave it so, and the next scan made that a new local version), and a directory a
    user makes at the name meanwhile is theirs, never replaced."""
    real_rename = fsio.rename_noreplace
    seen_under_name: list[int] = []

    def watch(dir_fd: int, src: bytes, dst: bytes, *rest: int | None) -> None:
        seen_under_name.append(int(os.path.lexists(host.data / os.fsdecode(dst))))
        tmp = os.stat(src, dir_fd=dir_fd)
        assert stat.S_IMODE(tmp.st_mode) == 0o750  # complete before it gets its name
        real_rename(dir_fd, src, dst, *rest)

    monkeypatch.setattr(fsio, "rename_noreplace", watch)
    host.applier.make_dir(host.mset, dir_entry(b"data/d", mode=0o750))
    assert seen_under_name == [0]
    assert stat.S_IMODE(os.lstat(host.data / "d").st_mode) == 0o750
    assert [n for n in os.listdir(host.data) if n.startswith(".omirror-tmp")] == []

    def user_first(dir_fd: int, src: bytes, dst: bytes, *rest: int | None) -> None:
        os.mkdir(host.data / os.fsdecode(dst), 0o705)
        real_rename(dir_fd, src, dst, *rest)

    monkeypatch.setattr(fsio, "rename_noreplace", user_first)
    with pytest.raises(LocalChanged):
        host.applier.make_dir(host.mset, dir_entry(b"data/e", mode=0o750))
    assert stat.S_IMODE(os.lstat(host.data / "e").st_mode) == 0o705
    assert [n for n in os.listdir(host.data) if n.startswith(".omirror-tmp")] == []


def test_a_conflict_copy_never_replaces_a_file_at_its_name(host: Host) -> None:
    """A conflict copy's name is predictable; a file a user put there first is theirs
    (not recorded by omirror): it is never renamed over. The path's change is recorded
    first, as for any target that is not what the store knows."""
    host.write(b"data/doc", b"local words")
    loser = Stamp(5, "alpha")
    name = host.data / os.fsdecode(conflict_name(b"doc", loser))
    name.write_bytes(b"a user's own file")
    with pytest.raises(LocalChanged):
        host.applier.keep_conflict_copy(host.mset, b"data/doc", loser)
    assert name.read_bytes() == b"a user's own file" and host.leftovers() == []


# -- a crash inside a receive batch ---------------------------------------------------------


class _Killed(Exception):
    """Stands for kill -9: the batch's transaction never commits."""


def test_versions_applied_by_a_batch_that_never_committed_are_recorded_as_the_peers(
        host: Host, tmp_path: Path) -> None:
    """A receive batch renames files into place one by one and records them all in one
    transaction. Killed before the commit, the files are on disk and the store knows
    nothing of them: the next scan stamped them as local versions made at restart, which
    beat a newer version a third peer wrote meanwhile. The intent log says what each
    change was; what is on disk as announced is recorded as the peer's version."""
    state = tmp_path / "state"
    host.applier.intents = IntentLog(state)
    host.store.add_commit_hook(host.applier.intents.clear)
    (host.data / "d").mkdir(mode=0o755)
    (host.data / "gone").write_bytes(b"to be deleted")
    (host.data / "kept").write_bytes(b"deletion announced, not done")
    assert host.scan() == 4  # the root too
    with pytest.raises(_Killed), host.store.batch():
        host.write(b"data/new", b"from beta")
        host.applier.make_dir(host.mset, dir_entry(b"data/d", mode=0o700))
        host.applier.make_dir(host.mset, dir_entry(b"data/sub", mode=0o750))
        host.applier.make_symlink(host.mset, link_entry(b"data/l", b"new"))
        host.applier.delete(host.mset, tombstone(b"data/gone"))
        host.applier._intend(tombstone(b"data/kept"), 0)  # killed before the unlink
        raise _Killed
    host.applier.intents.close()
    for path in (b"data/new", b"data/sub", b"data/l"):
        assert host.store.get(path) is None, "the batch never committed"
    assert host.store.get(b"data/d").entry.mode == 0o755
    assert host.store.get(b"data/gone").entry.kind is Kind.FILE

    left = intents_module.read(state)
    assert len(left) == 6
    with host.store.batch():
        assert recover(left, [host.mset], host.applier.dirs, host.store) == 5
    for path in (b"data/new", b"data/d", b"data/sub", b"data/l", b"data/gone"):
        assert host.store.get(path).entry.stamp == PEER_STAMP, path
    assert host.store.get(b"data/kept").entry.stamp.origin == "alpha"
    assert host.scan() == 0, "the scan takes what was recorded as what is on disk"


def test_recovery_records_nothing_that_did_not_reach_the_disk_as_announced(
        host: Host, tmp_path: Path) -> None:
    """An intent is written before its change: killed in between, the disk still holds
    what was there, or a user changed it since. Neither is the peer's version."""
    (host.data / "d").mkdir(mode=0o755)
    (host.data / "f").write_bytes(b"local")
    assert host.scan() == 3  # the root too
    before = {p: host.store.get(p) for p in (b"data/d", b"data/f")}
    log_ = IntentLog(tmp_path / "state")
    d = os.lstat(host.data / "d")
    log_.note(Intent(dir_entry(b"data/d", mode=0o700), d.st_ino, d.st_ctime_ns))  # no chmod
    log_.note(Intent(file_entry(b"data/f", b"theirs"), os.lstat(host.data / "f").st_ino + 1))
    log_.note(Intent(file_entry(b"data/never", b"x"), 12345))
    log_.close()
    with open(tmp_path / "state" / intents_module.FILE_NAME, "ab") as f:
        f.write(b"\x00\x00\x01\x00torn")  # the record a kill cut short
    left = intents_module.read(tmp_path / "state")
    assert len(left) == 3
    with host.store.batch():
        assert recover(left, [host.mset], host.applier.dirs, host.store) == 0
    assert {p: host.store.get(p) for p in (b"data/d", b"data/f")} == before
    assert host.store.get(b"data/never") is None


def test_the_intent_log_is_emptied_by_each_commit(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "state")
    log_ = IntentLog(tmp_path / "state")
    store.add_commit_hook(log_.clear)
    log_.note(Intent(tombstone(b"data/x"), 0))
    with store.batch():
        log_.note(Intent(tombstone(b"data/y"), 0))
        assert len(intents_module.read(tmp_path / "state")) == 2
    assert intents_module.read(tmp_path / "state") == []
    log_.close()
    store.close()


def test_a_write_landing_as_a_peers_version_replaces_the_file_is_put_back(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the last check of the target and the rename over it, a writer appends to
    the file (through a descriptor it opened before), or renames another file over it.
    The rename would drop that write with the old file: the names are swapped at once,
    what came out is examined, and the user's file is swapped back and recorded as the
    local change it is."""
    (host.data / "f").write_bytes(b"old\n")
    assert host.scan() == 2
    real_exchange = fsio.rename_exchange
    writer = os.open(host.data / "f", os.O_WRONLY | os.O_APPEND)

    def write_then_swap(src_dir: int, src: bytes, dst: bytes, *rest: int | None) -> bool:
        if src.startswith(b".omirror-tmp-") and dst == b"f":
            os.write(writer, b"appended by a user\n")
        return real_exchange(src_dir, src, dst, *rest)

    monkeypatch.setattr(fsio, "rename_exchange", write_then_swap)
    try:
        with pytest.raises(LocalChanged, match="changed here"):
            host.write(b"data/f", b"the peer's version\n")
    finally:
        os.close(writer)
    assert (host.data / "f").read_bytes() == b"old\nappended by a user\n"
    assert host.leftovers() == []
    assert host.scan() == 1, "the write kept is a new local version"
    assert host.store.get(b"data/f").entry.stamp.origin == "alpha"

    def rename_over_then_swap(src_dir: int, src: bytes, dst: bytes,
                              *rest: int | None) -> bool:
        if src.startswith(b".omirror-tmp-") and dst == b"f":
            (host.root / "staged").write_bytes(b"renamed into place by a user\n")
            os.rename(host.root / "staged", host.data / "f")
        return real_exchange(src_dir, src, dst, *rest)

    monkeypatch.setattr(fsio, "rename_exchange", rename_over_then_swap)
    with pytest.raises(LocalChanged, match="changed here"):
        host.write(b"data/f", b"the peer's version, again\n")
    assert (host.data / "f").read_bytes() == b"renamed into place by a user\n"
    assert host.leftovers() == []


def test_a_file_replaced_untouched_is_not_put_back(host: Host) -> None:
    (host.data / "f").write_bytes(b"old\n")
    host.scan()
    host.write(b"data/f", b"the peer's version\n")
    assert (host.data / "f").read_bytes() == b"the peer's version\n"
    assert host.leftovers() == []


def test_a_symlink_or_file_a_user_makes_where_a_peers_version_goes_is_never_replaced(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path was checked absent; a user makes a symlink (or a file) there before the
    applier's rename. Renaming over it would drop the user's: the rename refuses to
    replace, and the user's is recorded first."""
    real = fsio.rename_noreplace

    def user_first(src_dir: int, src: bytes, dst: bytes, *rest: int | None) -> None:
        os.symlink(b"theirs", host.data / os.fsdecode(dst))
        real(src_dir, src, dst, *rest)

    monkeypatch.setattr(fsio, "rename_noreplace", user_first)
    with pytest.raises(LocalChanged):
        host.applier.make_symlink(host.mset, link_entry(b"data/l", b"ours"))
    assert os.readlink(host.data / "l") == "theirs"
    with pytest.raises(LocalChanged):
        host.write(b"data/f", b"the peer's\n")
    assert os.readlink(host.data / "f") == "theirs"
    assert host.leftovers() == []
    assert host.store.get(b"data/l") is None and host.store.get(b"data/f") is None


def test_a_write_landing_as_a_peers_deletion_takes_the_file_away_is_put_back(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the check of the target and its removal a writer rewrites the file: the
    deletion would drop that write. The file is taken away under a temp name, found
    written, put back, and recorded as the local change it is."""
    (host.data / "f").write_bytes(b"old\n")
    assert host.scan() == 2
    real_rename = os.rename

    def write_then_rename(src: object, dst: object, **kw: object) -> None:
        if src == b"f" and isinstance(dst, bytes) and dst.startswith(b".omirror-tmp-"):
            (host.data / "f").write_bytes(b"rewritten by a user\n")
        real_rename(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", write_then_rename)
    with pytest.raises(LocalChanged, match="put back"):
        host.applier.delete(host.mset, tombstone(b"data/f"))
    monkeypatch.undo()
    assert (host.data / "f").read_bytes() == b"rewritten by a user\n"
    assert host.leftovers() == []
    assert not host.store.get(b"data/f").entry.is_tombstone
    assert host.scan() == 1
    host.applier.delete(host.mset, tombstone(b"data/f"))  # untouched: it goes
    assert not (host.data / "f").exists() and host.leftovers() == []


# -- extended attributes and ACLs -----------------------------------------------------------

NOBODY_UID = pwd.getpwnam("nobody").pw_uid
ACL_TEXT = b"user::rw-\nuser:nobody=%d:r--\ngroup::r--\nmask::r--\nother::---" % (
    pwd.getpwnam("nobody").pw_uid)
DEFAULT_ACL = b"user::rwx\ngroup::r-x\ngroup:nogroup=%d:rwx\nmask::rwx\nother::---" % (
    grp.getgrnam("nogroup").gr_gid)


def test_a_peers_file_and_directory_arrive_with_their_attributes_and_acls(host: Host) -> None:
    assert host.scan() == 1  # the first scan records /data itself
    attrs = ((b"system.posix_acl_access", ACL_TEXT), (b"user.a", b"\0\xff"))
    entry = replace(file_entry(b"data/f", b"x", mode=0o640), xattrs=attrs)
    host.applier.write_file(host.mset, entry, b"x")
    f = host.path(b"data/f")
    assert os.getxattr(f, b"user.a") == b"\0\xff"
    assert xattrs.acl_to_text(os.getxattr(f, b"system.posix_acl_access")) == ACL_TEXT
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640  # the mask is the group bits
    d_entry = replace(dir_entry(b"data/d", 0o770),
                      xattrs=((b"system.posix_acl_default", DEFAULT_ACL),))
    host.applier.make_dir(host.mset, d_entry)
    assert xattrs.acl_to_text(
        os.getxattr(host.path(b"data/d"), b"system.posix_acl_default")) == DEFAULT_ACL
    assert host.scan() == 0  # what was applied is what the scanner reads back: no echo
    assert host.store.get(b"data/f").entry.xattrs == attrs  # type: ignore[union-attr]


def test_a_change_of_attributes_alone_is_applied_without_content(host: Host) -> None:
    record = host.write(b"data/f", b"same")
    os.setxattr(host.path(b"data/f"), b"user.old", b"1")
    host.scan()
    record = host.store.get(b"data/f")
    assert record is not None and record.sig is not None
    newer = replace(record.entry, stamp=Stamp(record.entry.stamp.time_ns + 1, "beta"),
                    xattrs=((b"user.new", b"2"),))
    host.applier.adopt(host.mset, newer, record.sig)
    f = host.path(b"data/f")
    assert os.listxattr(f) == ["user.new"] and f.read_bytes() == b"same"
    assert host.scan() == 0


def _lands_after(monkeypatch: pytest.MonkeyPatch, host: Host,
                 change: Callable[[], None]) -> None:
    """A user's change that lands right after the applier's own attributes are set,
    before the stat it records is taken."""
    apply_attrs = host.applier.xattrs.apply

    def then_the_user(*args: object, **kw: object) -> object:
        given = apply_attrs(*args, **kw)  # type: ignore[arg-type]
        change()
        return given
    monkeypatch.setattr(host.applier.xattrs, "apply", then_the_user)


def _attribute_change_to_adopt(host: Host) -> tuple[Entry, StatSig]:
    record = host.write(b"data/f", b"same")
    assert record.sig is not None
    return replace(record.entry, stamp=Stamp(record.entry.stamp.time_ns + 1, "beta"),
                   xattrs=((b"user.new", b"2"),)), record.sig


@pytest.mark.parametrize("change", ["setxattr", "chown"])
def test_a_users_change_landing_as_a_peers_attributes_are_set_is_not_taken_for_ours(
        host: Host, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    """Recorded with the stat taken after it, the user's change would look like the
    applier's own: no scan and no watcher event would ever send it."""
    host.scan()
    newer, sig = _attribute_change_to_adopt(host)
    f = host.path(b"data/f")
    if change == "setxattr":
        _lands_after(monkeypatch, host, lambda: os.setxattr(f, b"user.local", b"mine"))
    else:
        _lands_after(monkeypatch, host, lambda: os.chown(f, NOBODY_UID, -1))
    with pytest.raises(LocalChanged, match="changed here as a peer's version was applied"):
        host.applier.adopt(host.mset, newer, sig)
    monkeypatch.undo()
    assert host.scan() == 1  # the user's change is a new local version
    held = host.store.get(b"data/f")
    assert held is not None and held.entry.stamp.origin == "alpha"
    if change == "setxattr":
        assert dict(held.entry.xattrs)[b"user.local"] == b"mine"
    else:
        assert held.entry.uid == NOBODY_UID


def test_an_attribute_set_on_a_file_just_installed_is_not_taken_for_ours(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    host.scan()
    f = host.path(b"data/f")
    rename_over = apply._rename_over

    def then_the_user(*args: object, **kw: object) -> None:
        rename_over(*args, **kw)  # type: ignore[arg-type]
        os.setxattr(f, b"user.local", b"mine")
    monkeypatch.setattr(apply, "_rename_over", then_the_user)
    with pytest.raises(LocalChanged):
        host.write(b"data/f", b"new content")
    monkeypatch.undo()
    assert f.read_bytes() == b"new content" and host.leftovers() == []
    assert host.scan() == 1
    held = host.store.get(b"data/f")
    assert held is not None and held.entry.stamp.origin == "alpha"
    assert dict(held.entry.xattrs)[b"user.local"] == b"mine"


def test_an_attribute_set_on_a_directory_as_its_mode_is_set_is_not_taken_for_ours(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    host.scan()
    host.applier.make_dir(host.mset, dir_entry(b"data/d", 0o755))
    d = host.path(b"data/d")
    _lands_after(monkeypatch, host, lambda: os.setxattr(d, b"user.local", b"mine"))
    with pytest.raises(LocalChanged):
        host.applier.make_dir(host.mset, dir_entry(b"data/d", 0o700))
    monkeypatch.undo()
    assert host.scan() == 1
    held = host.store.get(b"data/d")
    assert held is not None and dict(held.entry.xattrs)[b"user.local"] == b"mine"


@pytest.mark.parametrize("acl", [
    # the mode's group bits (rwx) are not the mask sent (r--): the chmod moves the mask
    b"user::rw-\nuser:nobody=%d:r--\ngroup::r--\nmask::r--\nother::---" % NOBODY_UID,
    # owner, group and other alone: the kernel keeps it as the mode bits, no attribute
    b"user::rw-\ngroup::r--\nother::---",
])
def test_an_acl_the_kernel_keeps_otherwise_than_it_was_set_is_no_local_change(
        host: Host, acl: bytes) -> None:
    host.scan()
    entry = replace(file_entry(b"data/f", b"x", mode=0o670),
                    xattrs=((b"system.posix_acl_access", acl), (b"user.a", b"1")))
    record = host.applier.write_file(host.mset, entry, b"x")
    assert record.sig == lstat_sig(host.path(b"data/f"))


def test_a_security_attribute_the_kernel_keeps_otherwise_is_no_local_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may keep a ``security.*`` value in another form than it was given (an
    SELinux label, a file capability); only privileged processes change them, so they
    are not read back, or every such file would be taken for a local change."""
    h = Host(tmp_path, "-osecurityxattrs")
    setxattr = os.setxattr

    def as_the_kernel_keeps_it(target: Any, name: Any, value: bytes, *args: Any) -> None:
        if os.fsencode(name).startswith(b"security."):
            value = value + b"\0"
        setxattr(target, name, value, *args)
    monkeypatch.setattr(os, "setxattr", as_the_kernel_keeps_it)
    try:
        entry = replace(file_entry(b"data/f", b"x"), xattrs=((b"security.omirror_test", b"v"),
                                                              (b"user.a", b"1")))
        record = h.applier.write_file(h.mset, entry, b"x")
        assert os.getxattr(h.path(b"data/f"), b"security.omirror_test") == b"v\0"
        assert record.sig == lstat_sig(h.path(b"data/f"))
    finally:
        h.store.close()


def test_a_set_with_noxattrs_leaves_the_attributes_here_alone(tmp_path: Path) -> None:
    h = Host(tmp_path, "-onoxattrs")
    try:
        h.write(b"data/f", b"x")
        os.setxattr(h.path(b"data/f"), b"user.local", b"1")
        record = h.store.get(b"data/f")
        assert record is not None
        st = os.lstat(h.path(b"data/f"))
        newer = replace(record.entry, stamp=Stamp(record.entry.stamp.time_ns + 1, "beta"),
                        xattrs=((b"user.peer", b"2"),))
        h.applier.adopt(h.mset, newer, StatSig.of(st))
        assert os.listxattr(h.path(b"data/f")) == ["user.local"]
    finally:
        h.store.close()


# -- hard links ----------------------------------------------------------------------------


def test_link_file_links_to_the_source_and_records_the_new_name(host: Host) -> None:
    source = host.write(b"data/a", b"shared")
    entry = replace(file_entry(b"data/b", b"shared"), link=b"data/a")
    record = host.applier.link_file(host.mset, entry, b"data/a", source)
    a, b = os.lstat(host.data / "a"), os.lstat(host.data / "b")
    assert record is not None and (a.st_ino, a.st_nlink) == (b.st_ino, 2)
    assert record.sig == StatSig.of(b) and host.store.get(b"data/a").sig == StatSig.of(a)
    assert host.leftovers() == [] and host.scan() == 1  # /data itself: no echo


def test_link_file_refuses_a_source_changed_since_its_record(host: Host) -> None:
    source = host.write(b"data/a", b"shared")
    host.write(b"data/b", b"before", stamp=Stamp(1, "beta"))
    entry = file_entry(b"data/b", b"shared")
    with open(host.data / "a", "r+b") as f:
        f.write(b"S")
    with pytest.raises(LocalChanged):
        host.applier.link_file(host.mset, entry, b"data/a", source)
    os.unlink(host.data / "a")
    os.symlink("/etc/passwd", host.data / "a")  # a name swapped for a symlink: never linked
    with pytest.raises(LocalChanged):
        host.applier.link_file(host.mset, entry, b"data/a", source)
    assert (host.data / "b").read_bytes() == b"before" and host.leftovers() == []


def test_link_file_never_replaces_a_local_change_of_the_target(host: Host) -> None:
    source = host.write(b"data/a", b"shared")
    host.write(b"data/b", b"before", stamp=Stamp(1, "beta"))
    (host.data / "b").write_bytes(b"edited here")
    with pytest.raises(LocalChanged):
        host.applier.link_file(host.mset, file_entry(b"data/b", b"shared"), b"data/a", source)
    assert (host.data / "b").read_bytes() == b"edited here" and host.leftovers() == []


def test_link_file_says_none_where_the_file_system_will_not_link(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    source = host.write(b"data/a", b"shared")

    def no_link(*_: object, **__: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    entry = file_entry(b"data/b", b"shared")
    assert host.applier.link_file(host.mset, entry, b"data/a", source) is None
    assert not (host.data / "b").exists() and host.leftovers() == []
    assert host.store.get(b"data/b") is None
