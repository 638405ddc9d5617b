"""Local attacks: what a user of one host, who may write inside a mirrored tree but is
not root, can make the daemon (which runs as root) do.

Real daemons on 127.0.0.1 (tests/integration/cluster.py); the attack is made on peer 0
("A") the way a local user would make it, and its effect is looked for on peer 1 ("B"):

- a directory of the tree swapped, again and again, with a symlink that points outside
  every tree (``renameat2(RENAME_EXCHANGE)``, one atomic step), while files below the
  directory keep changing: whatever reads those files by path through the directory
  may read, record and ship the files beyond the link instead;
- a recorded file replaced by a FIFO: whatever opens it to send its content may block
  for ever on a FIFO nobody writes to, and stall the link or the daemon's shutdown;
- a file owned by a user that exists on A but not on B, with set-user-ID and
  set-group-ID bits: it must not arrive as a root set-id file on B; nor a new file of a
  set with ``install -onochkowner,nochkgroup``, where the receiver keeps no owner.

docs/security.rst is the threat model these tests check.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import os
import platform
import pwd
import random
import secrets
import shlex
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash
from cluster import Cluster

from omirror.entry import Entry, Kind
from omirror.store import Store

MakeCluster = Callable[..., Cluster]
KIB = 1 << 10
A, B = 0, 1
#: How long the peers may take to mirror something simple: far above the ~0.1 s it takes.
MIRROR_BOUND_S = 20.0


# ------------------------------------------------------------------------------ helpers

def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def recorded(c: Cluster, i: int, rel: str) -> Entry | None:
    """Peer ``i``'s recorded entry of ``data/<rel>`` (None if there is none)."""
    with Store.open_readonly(c[i].state) as store:
        record = store.get(b"data/" + os.fsencode(rel))
    return None if record is None else record.entry


def records_content(c: Cluster, i: int, rel: str, data: bytes) -> bool:
    """Peer ``i`` has recorded ``data/<rel>`` as a file holding ``data``."""
    entry = recorded(c, i, rel)
    return (entry is not None and entry.kind is Kind.FILE
            and entry.digest == xxhash.xxh3_128_digest(data))


# ------------------------------------------- 1. a directory swapped with a symlink

RENAME_EXCHANGE = 2
AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "riscv64": 276, "i686": 353,
                  "i386": 353}


def exchanger() -> Callable[[bytes, bytes], None] | None:
    """``exchange(a, b)``: renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE), from libc
    or, where libc lacks it, the raw system call; None where neither is available."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                       ctypes.c_uint]
        fn.restype = ctypes.c_int

        def call(a: bytes, b: bytes) -> int:
            return fn(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
    else:
        nr = _SYS_RENAMEAT2.get(platform.machine())
        if nr is None:
            return None
        syscall = libc.syscall
        syscall.restype = ctypes.c_long

        def call(a: bytes, b: bytes) -> int:
            return syscall(ctypes.c_long(nr), ctypes.c_int(AT_FDCWD), ctypes.c_char_p(a),
                           ctypes.c_int(AT_FDCWD), ctypes.c_char_p(b),
                           ctypes.c_uint(RENAME_EXCHANGE))

    def exchange(a: bytes, b: bytes) -> None:
        if call(a, b) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), a, None, b)

    return exchange


class Loop:
    """``step()`` run over and over in a thread until ``stop()``; an exception in it is
    kept and raised by ``stop()`` (a thread that died would otherwise just do nothing)."""

    def __init__(self, name: str, step: Callable[[], None]) -> None:
        self.step = step
        self.count = 0
        self.error: BaseException | None = None
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            while not self.halt.is_set():
                self.step()
                self.count += 1
        except Exception as e:
            self.error = e

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.halt.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), f"thread {self.thread.name} did not stop"
        if self.error is not None:
            raise AssertionError(f"thread {self.thread.name} failed: {self.error!r}") \
                from self.error


def files_holding(root: Path, needle: bytes) -> list[str]:
    """Every regular file anywhere under ``root`` (names of the daemon's own, temp files
    included) whose content holds ``needle``.

    The walk never follows a symlink, not even one swapped in for a directory while it
    walks: each directory is opened with ``O_NOFOLLOW|O_DIRECTORY`` relative to its
    parent's descriptor, each file with ``O_NOFOLLOW`` and checked to be a regular file,
    so what it reads is in the tree (the tree's own symlinks point outside it).
    """
    found: list[str] = []
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    file_flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

    def walk(fd: int, shown: str) -> None:
        try:
            names = os.listdir(fd)
        except OSError:
            return
        for name in names:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue  # gone meanwhile (a temp file renamed into place, say)
            if stat.S_ISDIR(st.st_mode):
                try:
                    sub = os.open(name, dir_flags, dir_fd=fd)
                except OSError:
                    continue  # replaced by a symlink or a file meanwhile
                try:
                    walk(sub, f"{shown}/{name}")
                finally:
                    os.close(sub)
            elif stat.S_ISREG(st.st_mode):
                try:
                    f = os.open(name, file_flags, dir_fd=fd)
                except OSError:
                    continue
                try:
                    if not stat.S_ISREG(os.fstat(f).st_mode):
                        continue
                    content = b""
                    while chunk := os.read(f, 1 << 20):
                        content += chunk
                finally:
                    os.close(f)
                if needle in content:
                    found.append(f"{shown}/{name}")

    top = os.open(root, dir_flags)
    try:
        walk(top, str(root))
    finally:
        os.close(top)
    return found


#: Files below the swapped directory: f0..f3 small (sent inline), f4..f7 large (> 64 KiB,
#: fetched with a WANT), here and, with other contents, beyond the symlink.
SWAP_FILES = 8
SMALL = 4
RACE_S = 10.0


def _outside_content(k: int, sentinel: bytes) -> bytes:
    """Random bytes, the sentinel at the start and every 4 KiB (a temp file holding only
    the first chunk of a large file holds it too)."""
    size = 3 * KIB + 100 * k if k < SMALL else 96 * KIB + 17 * KIB * k
    block = 4 * KIB
    return b"".join(sentinel + secrets.token_bytes(block - len(sentinel))
                    for _ in range(size // block + 1))[:size]


@pytest.mark.timeout(120)
def test_a_directory_swapped_with_a_symlink_never_sends_what_lies_outside(
        make_cluster: MakeCluster) -> None:
    """A local user who may write in peer A's tree swaps a directory ``data/d`` of it
    with a symlink ``data/s -> <outside>`` (renameat2 RENAME_EXCHANGE: both names always
    exist, each is now the one, now the other), a thousand times a second, while the files
    ``data/d/f0..f7`` keep changing, so that A's daemon keeps reading them: the scanner
    to record them, the pusher to send the small ones inline, the content server to send
    the large ones. ``<outside>`` is a directory beside every tree holding files of the
    same names, each marked with a random sentinel.

    Anything that reads by path through ``d`` can be sent beyond the link between its
    check and its read, and read a file the user could not read (the daemon is root) into
    the mirror. The sentinel appearing in any file of peer B, its temp files included,
    at any time during the race or after it, is exactly such a file having been read
    and shipped; its absence throughout shows that every read stayed inside the tree.
    Afterwards the peers still converge, and nothing beyond the link was changed.
    """
    exchange = exchanger()
    if exchange is None:
        pytest.skip("no renameat2 on this platform")
    c = make_cluster(2)
    a = c[A].data
    sentinel = b"SENTINEL-" + secrets.token_hex(16).encode()
    outside = c.base / "outside"
    outside.mkdir()
    secrets_outside = {}
    for k in range(SWAP_FILES):
        secrets_outside[k] = _outside_content(k, sentinel)
        write(outside / f"f{k}", secrets_outside[k])
    (a / "d").mkdir()
    for k in range(SWAP_FILES):
        write(a / "d" / f"f{k}", b"inside %d\n" % k * (10 if k < SMALL else 10_000))
    os.symlink(outside, a / "s")
    d, s = os.fsencode(a / "d"), os.fsencode(a / "s")
    try:
        exchange(d, s)
        exchange(d, s)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOSYS):
            pytest.skip(f"RENAME_EXCHANGE not supported here: {e}")
        raise
    c.start()
    c.wait_converged(MIRROR_BOUND_S)
    assert not files_holding(c[B].root, sentinel)

    # the writer holds the real directory open: it writes into it wherever it is now,
    # never through the symlink (which would change the files outside)
    real = os.open(a / "d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    rounds = [0]

    def rewrite() -> None:
        r = rounds[0] = rounds[0] + 1
        k = r % SWAP_FILES
        if k < SMALL:
            body = b"inside %d round %d\n" % (k, r) * (1 + r % 50)
        else:
            body = (b"inside %d round %d\n" % (k, r)) * (6_000 + r % 500)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        flags |= os.O_APPEND if k < SMALL and r % 3 else os.O_TRUNC
        fd = os.open(f"f{k}", flags, 0o644, dir_fd=real)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        time.sleep(0.002)

    def swap() -> None:
        exchange(d, s)
        # a pace the daemon's watcher keeps up with: swapping without a pause floods
        # inotify (over 100,000 renames a second) and tests something else
        time.sleep(random.uniform(0, 0.002))

    writer, swapper = Loop("rewrite", rewrite), Loop("swap", swap)
    found: list[str] = []

    def clean() -> bool:
        found[:] = files_holding(c[B].root, sentinel)
        if found:
            raise AssertionError(f"content from beyond the symlink reached peer B: the "
                                 f"sentinel is in {found} ({swapper.count} swaps, "
                                 f"{writer.count} rewrites so far)")
        return True

    try:
        writer.start()
        swapper.start()
        c.assert_stays(clean, RACE_S, "no file of peer B holds the sentinel")
    finally:
        swapper.stop()
        writer.stop()
        os.close(real)
        if os.path.islink(d):  # leave d the directory, s the symlink
            exchange(d, s)
    print(f"{swapper.count} swaps, {writer.count} rewrites")
    assert swapper.count > 1000 and writer.count > 100, "the race hardly ran"
    assert os.path.isdir(a / "d") and not os.path.islink(a / "d")
    c.wait_converged(MIRROR_BOUND_S)
    c.assert_stays(clean, 1.0, "no file of peer B holds the sentinel")
    for k in range(SWAP_FILES):
        assert read(outside / f"f{k}") == secrets_outside[k], \
            f"outside/f{k} beyond the symlink was changed"
    assert sorted(os.listdir(outside)) == sorted(f"f{k}" for k in range(SWAP_FILES))


# ------------------------------------------------ 2. a recorded file swapped for a FIFO

FIFO_SIZES = {"small": 5 * KIB, "large": 256 * KIB}
#: What peer B must receive after the swap, and how long it may take (far above the
#: ~0.1 s it takes; far below "stalled").
AFTER = {f"g{k}": b"g%d, written after data/f became a FIFO\n" % k for k in range(1, 6)}
AFTER_BOUND_S = 15.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("size", "held_open"), [("small", False), ("large", False),
                                                 ("small", True), ("large", True)],
                         ids=["small", "large", "small-held-open", "large-held-open"])
def test_a_recorded_file_swapped_for_a_fifo_does_not_stall_replication(
        make_cluster: MakeCluster, size: str, held_open: bool) -> None:
    """A local user replaces a file of peer A's tree, which A's daemon has recorded and
    peer B does not hold yet, by a FIFO of the same name (renamed over it in one step).
    The scanner sees a special file and records nothing, so A's record still names a
    regular file, and when B comes back A sends it: its pusher reads a small one to
    send it inline, its content server opens and reads it when B asks with a WANT (a
    large one always; a small one that could not be read inline too).

    Nobody writes to the FIFO. Opened without ``O_NONBLOCK`` it blocks ``open()`` for
    ever; held open by the user's process (``-held-open``), ``open()`` returns but a
    blocking ``read()`` waits for ever, and a non-blocking one fails with EAGAIN. Either
    way B's in-order receiver waits on data/f, or the link drops at data/f on every
    reconnect, and nothing A records afterwards reaches B; a thread stuck in the FIFO
    also keeps A's daemon from exiting on SIGTERM.

    B receiving ``g1..g5``, written after the swap, shows the FIFO did not stall the
    link; both daemons exiting 0 on SIGTERM (the test stops them itself, with the
    harness's 20 s) shows no thread is left blocked on it.
    """
    c = make_cluster(2)
    a, b = c[A].data, c[B].data
    write(a / "keep", b"converged before the attack\n")
    c.start()
    c.wait_converged(MIRROR_BOUND_S)

    c.stop(B)  # B will not hold data/f: A must send it when B returns
    line = b"%s file, recorded as a regular file\n" % size.encode()
    content = (line * (FIFO_SIZES[size] // len(line) + 1))[:FIFO_SIZES[size]]
    write(a / "f", content)
    c.wait_until(lambda: records_content(c, A, "f", content), MIRROR_BOUND_S,
                 "peer A records data/f")
    fifo = c.base / "fifo"
    os.mkfifo(fifo, 0o644)
    # O_RDWR opens a FIFO at once, as its reader and its writer; it never writes
    holder = os.open(fifo, os.O_RDWR | os.O_CLOEXEC) if held_open else -1
    try:
        os.rename(fifo, a / "f")
        assert stat.S_ISFIFO(os.lstat(a / "f").st_mode)
        for name, data in AFTER.items():
            write(a / name, data)
        c.wait_until(lambda: all(records_content(c, A, name, data)
                                 for name, data in AFTER.items()),
                     MIRROR_BOUND_S, "peer A records g1..g5")
        assert records_content(c, A, "f", content), \
            "peer A no longer records data/f as the file it was (the attack needs that)"

        c.start(B)
        c.wait_until(lambda: all(read(b / name) == data for name, data in AFTER.items()),
                     AFTER_BOUND_S, "peer B receives g1..g5, written after data/f became "
                                    "a FIFO")
        assert read(b / "keep") == b"converged before the attack\n"
        assert not os.path.lexists(b / "f") or stat.S_ISREG(os.lstat(b / "f").st_mode)
        # a thread blocked in open() or read() of the FIFO would keep its daemon from
        # exiting: both must stop cleanly, while the FIFO is still as the user left it
        c.stop()
    finally:
        if holder >= 0:
            os.close(holder)


# ------------------------------------------ 3. owners unknown on the receiver, set-id bits

MALLORY_ID = 4242


def _id_known_here(uid: int, gid: int, name: str) -> bool:
    for lookup in (lambda: pwd.getpwnam(name), lambda: pwd.getpwuid(uid),
                   lambda: grp.getgrnam(name), lambda: grp.getgrgid(gid)):
        try:
            lookup()
            return True
        except KeyError:
            pass
    return False


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _getent(*args: str) -> bool:
    """``getent ARGS`` in this (the host's) mount namespace: True if it found something."""
    return subprocess.run(["getent", *args], check=False, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=30).returncode == 0


def _set_owner_mode(path: Path, uid: int, gid: int, mode: int) -> None:
    os.chown(path, uid, gid)  # before the mode: a chown clears set-id bits
    os.chmod(path, mode)


def _describe(st: os.stat_result) -> str:
    return f"uid {st.st_uid}, gid {st.st_gid}, mode {stat.S_IMODE(st.st_mode):04o}"


@pytest.mark.timeout(120)
def test_an_owner_unknown_on_the_receiver_never_gives_a_root_setuid_file(
        make_cluster: MakeCluster) -> None:
    """Peer A's user database has a user and a group ``mallory`` (4242) that peer B's
    has not (A's daemon runs in its own mount namespace, where its own /etc/passwd and
    /etc/group are bind-mounted over the host's). A local user of A, who may own files
    as mallory, makes ``data/evil`` owned by mallory:mallory with mode 6755, a set-user-ID
    and set-group-ID executable: harmless on A, where it runs as mallory.

    Owners travel by name. B, which does not know the name and runs as root, must not
    leave the file as it created it (root:root) and then give it the set-id bits: that
    is a root set-user-ID program a user of A chose the content of. The owner policy:
    a name known on B maps to its id there; a name unknown there takes the sender's
    numeric id; set-id bits are kept only when both the owner and the group were mapped
    by a name B knows; and B warns, naming the unknown user. So B's file is owned by
    4242:4242, has mode 0755 with no set-id bit, and B's log has a WARNING naming
    mallory. The control: a file owned by ``nobody:nogroup``, names both peers know,
    keeps its owner, its group and its set-id bits.
    """
    for tool in ("unshare", "mount", "getent"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root (a mount namespace, bind mounts, chown)")
    if _id_known_here(MALLORY_ID, MALLORY_ID, "mallory"):
        pytest.skip("this host already knows mallory or the id 4242")
    c = make_cluster(2)
    a, b = c[A].data, c[B].data

    # A's own user database: the host's, plus mallory
    pw, gr = c.base / "passwd-of-a", c.base / "group-of-a"
    pw.write_bytes(Path("/etc/passwd").read_bytes().rstrip(b"\n")
                   + b"\nmallory:x:%d:%d:mallory:/nonexistent:/usr/sbin/nologin\n"
                   % (MALLORY_ID, MALLORY_ID))
    gr.write_bytes(Path("/etc/group").read_bytes().rstrip(b"\n")
                   + b"\nmallory:x:%d:\n" % MALLORY_ID)
    for f in (pw, gr):
        os.chmod(f, 0o644)
    # in a mount namespace of its own (unshare's default propagation is private: the
    # bind mounts stay in it), A's daemon sees its own user database
    binds = (f"mount --bind {shlex.quote(str(pw))} /etc/passwd && "
             f"mount --bind {shlex.quote(str(gr))} /etc/group")
    probe = subprocess.run(["unshare", "--mount", "sh", "-c",
                            binds + " && getent passwd mallory"], check=False,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot give a process its own /etc/passwd here: {probe.stderr!r}")

    plain = c.command

    def command(p: object) -> list[str]:
        argv = plain(p)  # type: ignore[arg-type]
        if p is not c[A]:
            return argv
        return ["unshare", "--mount", "sh", "-c", binds + ' && exec "$@"', "sh", *argv]

    c.command = command  # type: ignore[method-assign]

    evil = b"#!/bin/sh\necho a program a user of A chose\n"
    write(a / "evil", evil)
    _set_owner_mode(a / "evil", MALLORY_ID, MALLORY_ID, 0o6755)
    nobody = pwd.getpwnam("nobody") if _has_user("nobody") else None
    nogroup = grp.getgrnam("nogroup") if _has_group("nogroup") else None
    control = b"#!/bin/sh\necho owned by names both peers know\n"
    if nobody is not None and nogroup is not None:
        write(a / "control", control)
        _set_owner_mode(a / "control", nobody.pw_uid, nogroup.gr_gid, 0o6755)
    c.start()
    assert not _getent("passwd", "mallory") and not _getent("group", "mallory"), \
        "peer A's user database leaked out of its mount namespace"
    # the setup works: A (in its namespace) names the owner mallory, B (here) cannot
    c.wait_until(lambda: getattr(recorded(c, A, "evil"), "owner", None) == "mallory"
                 and getattr(recorded(c, A, "evil"), "group", None) == "mallory",
                 MIRROR_BOUND_S, "peer A records data/evil as owned by mallory:mallory")

    c.wait_until(lambda: read(b / "evil") == evil, MIRROR_BOUND_S,
                 "peer B holds data/evil")
    if nobody is not None and nogroup is not None:
        c.wait_until(lambda: read(b / "control") == control, MIRROR_BOUND_S,
                     "peer B holds data/control")
        st = os.lstat(b / "control")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
            nobody.pw_uid, nogroup.gr_gid, 0o6755), \
            f"a file owned by nobody:nogroup lost its owner or set-id bits: {_describe(st)}"
    st = os.lstat(b / "evil")
    assert stat.S_IMODE(st.st_mode) & 0o6000 == 0, \
        f"peer B made data/evil, owned by a user it does not know, a set-id file: " \
        f"{_describe(st)}"
    assert stat.S_IMODE(st.st_mode) & 0o777 == 0o755, _describe(st)
    assert (st.st_uid, st.st_gid) == (MALLORY_ID, MALLORY_ID), \
        f"an unknown owner did not get the sender's numeric id: {_describe(st)}"
    c.wait_until(lambda: any(" WARNING " in line and "mallory" in line
                             for line in c.log_text(B).splitlines()), 10,
                 "peer B logs a WARNING naming the unknown user mallory")


@pytest.mark.timeout(120)
def test_a_new_file_under_nochkowner_never_becomes_a_root_setuid_file(
        make_cluster: MakeCluster) -> None:
    """With ``install -onochkowner,nochkgroup``, the receiver keeps the owner and group
    a path has; a new path has none to keep, and the daemon (root) creates it. A local
    user of peer A makes ``data/tool``, owned by that user (``nobody``), mode 6755: on
    B it must not become a set-user-ID file owned by root, which would let that user
    run the content they chose as root on B. B's file carrying no set-id bit proves it.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")
    if not (_has_user("nobody") and _has_group("nogroup")):
        pytest.skip("no user nobody or group nogroup here")
    c = make_cluster(2)
    text = c.conf.read_text()
    assert "\tinstall ;\n" in text
    c.conf.write_text(text.replace("\tinstall ;\n",
                                   "\tinstall -onochkowner,nochkgroup ;\n"))
    os.chmod(c.conf, 0o600)
    a, b = c[A].data, c[B].data
    tool = b"#!/bin/sh\necho a program a user of A chose\n"
    write(a / "tool", tool)
    _set_owner_mode(a / "tool", pwd.getpwnam("nobody").pw_uid,
                    grp.getgrnam("nogroup").gr_gid, 0o6755)
    c.start()
    c.wait_until(lambda: read(b / "tool") == tool, MIRROR_BOUND_S,
                 "peer B holds data/tool")
    st = os.lstat(b / "tool")
    assert stat.S_IMODE(st.st_mode) & 0o6000 == 0, \
        f"under nochkowner a new file became a set-id file on peer B: {_describe(st)}"
