"""A cluster of real omirrord daemons on 127.0.0.1, set up as an operator would.

Each peer gets its own port, root, state directory, OpenSSH host key (made by
``ssh-keygen``) and log file; all share one Distfile and one peers file, exactly as
an outside contract check does. The daemons are plain subprocesses
(``python -m omirror``), so a test sees what a user sees: trees, exit codes, logs and
``<state-dir>/status.json``.

Tests synchronise only on conditions with a bound (``wait_until``, ``wait_converged``),
never on sleeps. A failed wait names what was awaited and shows the tail of every
peer's log; a daemon that dies while the test expects it running fails the wait at
once instead of letting it run out its clock.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from omirror.demo import free_ports

#: Names the daemon owns inside a tree (temp files, the root marker): never compared.
DAEMON_PREFIX = b".omirror"
TEMP_PREFIX = b".omirror-tmp"
POLL_S = 0.03
LOG_TAIL_LINES = 40
_READ_CHUNK = 1 << 20

Snapshot = dict[bytes, tuple]

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies without teardown
    (pytest killed by a CI timeout), so that no daemon outlives its test run."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(eq=False)
class Peer:
    """One host of the cluster: identity ``127.0.0.1:<port>`` and its own directories."""

    index: int
    port: int
    base: Path
    files: tuple[str, ...]
    trusted: bool = True
    proc: subprocess.Popen[bytes] | None = None
    #: set when the harness itself stopped or killed the process, so its exit is no news
    expected_exit: bool = True
    starts: int = 0
    peers_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.peers_file = self.base / "peers"

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def data(self) -> Path:
        """The first FILES directory under this peer's root (``root/data`` by default)."""
        return self.root / self.files[0].lstrip("/")

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def log(self) -> Path:
        return self.base / "omirrord.log"

    @property
    def status_path(self) -> Path:
        return self.state / "status.json"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __repr__(self) -> str:
        return f"Peer({self.index}, {self.name})"


def file_digest(path: bytes | str | os.PathLike[str]) -> bytes:
    """xxh3-128 of a regular file's content, read without following a final symlink."""
    h = xxhash.xxh3_128()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, _READ_CHUNK):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.digest()


def walk_tree(root: Path, tops: Iterable[str], digests: bool = True) -> Snapshot:
    """What a user would compare: every path under the FILES dirs ``tops`` of ``root``.

    Keys are bytes paths relative to ``root`` (``b"data/x"``); file -> ("file", mode,
    size, digest), dir -> ("dir", mode), symlink -> ("link", target). Symlinks are not
    followed, names beginning with ``.omirror`` (the daemon's own) are skipped with
    everything below them. A path that vanishes during the walk (a daemon is applying
    a change) is left out: the caller polls, and the next walk sees the settled tree.
    With ``digests=False`` the digest is None: a cheap first check while polling.
    """
    broot = os.fsencode(root)
    snap: Snapshot = {}
    pending = [os.fsencode(t.lstrip("/")) for t in tops]
    while pending:
        rel = pending.pop()
        full = os.path.join(broot, rel)
        try:
            st = os.lstat(full)
        except (FileNotFoundError, NotADirectoryError):
            continue
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            snap[rel] = ("dir", mode)
            try:
                names = os.listdir(full)
            except (FileNotFoundError, NotADirectoryError):
                continue
            pending.extend(os.path.join(rel, n) for n in names
                           if not n.startswith(DAEMON_PREFIX))
        elif stat.S_ISLNK(st.st_mode):
            try:
                snap[rel] = ("link", os.readlink(full))
            except OSError:  # vanished or replaced mid-walk
                continue
        elif stat.S_ISREG(st.st_mode):
            digest = None
            if digests:
                try:
                    digest = file_digest(full)
                except OSError:  # vanished or replaced mid-walk
                    continue
            snap[rel] = ("file", mode, st.st_size, digest)
        else:
            snap[rel] = ("special", stat.S_IFMT(st.st_mode))
    return snap


def diff_snapshots(a: Snapshot, b: Snapshot, limit: int = 10) -> str:
    """A short human account of how two snapshots differ (for failure messages)."""
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            lines.append(f"  {key!r}: {a.get(key, 'absent')} != {b.get(key, 'absent')}")
            if len(lines) >= limit:
                lines.append("  ...")
                break
    return "\n".join(lines)


class Cluster:
    """``n`` omirrord peers on 127.0.0.1 under ``base``, configured but not yet started.

    ``untrusted`` extra peers (indices ``n`` .. ``n+untrusted-1``) are listed in the
    Distfile's HOSTS and have keys, but are missing from the shared peers file; each of
    them reads its own peers file, which lists everyone including itself (an intruder
    that believes it belongs).
    """

    def __init__(self, base: Path, n: int = 3, *, distfile_extra: str = "",
                 files: tuple[str, ...] = ("/data",), delay: float = 0.02,
                 extra_args: tuple[str, ...] = (), untrusted: int = 0) -> None:
        self.base = Path(base)
        self.files = tuple(files)
        self.delay = delay
        self.extra_args = tuple(extra_args)
        self.conf = self.base / "omirrd.conf"
        self.peers_file = self.base / "peers"
        self.base.mkdir(parents=True, exist_ok=True)
        ports = free_ports(n + untrusted)
        self.peers = [Peer(i, port, self.base / f"p{i}", self.files, trusted=i < n)
                      for i, port in enumerate(ports)]
        lines = {}
        for p in self.peers:
            for f in self.files:
                (p.root / f.lstrip("/")).mkdir(parents=True)
            p.state.mkdir(mode=0o700, parents=True)
            os.chmod(p.state, 0o700)  # mkdir's mode is filtered by the umask
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", p.name,
                            "-f", str(p.state / "host_key")], check=True,
                           stdin=subprocess.DEVNULL, timeout=30)
            key = " ".join((p.state / "host_key.pub").read_text().split()[:2])
            lines[p.index] = f"{p.name} {key}\n"
        trusted_text = "".join(lines[p.index] for p in self.peers if p.trusted)
        self._write_private(self.peers_file, trusted_text)
        for p in self.peers:
            if p.trusted:
                p.peers_file = self.peers_file
            else:
                p.peers_file = p.base / "peers"
                self._write_private(p.peers_file, "".join(lines.values()))
        hosts = " ".join(p.name for p in self.peers)
        self._write_private(self.conf,
                            f"HOSTS = ( {hosts} )\n"
                            f"FILES = ( {' '.join(self.files)} )\n"
                            "${FILES} -> ${HOSTS}\n"
                            "\tinstall ;\n"
                            + distfile_extra + ("\n" if distfile_extra else ""))

    @staticmethod
    def _write_private(path: Path, text: str) -> None:
        path.write_text(text)
        os.chmod(path, 0o600)

    def __len__(self) -> int:
        return len(self.peers)

    def __getitem__(self, i: int) -> Peer:
        return self.peers[i]

    def _select(self, i: int | None) -> list[Peer]:
        return list(self.peers) if i is None else [self.peers[i]]

    # -------------------------------------------------------------------- processes

    def command(self, p: Peer) -> list[str]:
        """The daemon's command line for peer ``p`` (a test may override this)."""
        return [sys.executable, "-m", "omirror", "-C", str(self.conf), "-n", p.name,
                "--root", str(p.root), "--state-dir", str(p.state),
                "--peers", str(p.peers_file), "-d", str(self.delay), "-v",
                *self.extra_args]

    def start(self, i: int | None = None, *, wait: bool = True,
              timeout: float = 30) -> None:
        """Start peer ``i`` (or every peer not running), output appended to its log.

        With ``wait`` (the default), return once each daemon has written its
        ``status.json`` with its own pid, i.e. it is up and running its loop.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
        started = []
        for p in self._select(i):
            if p.running:
                if i is not None:
                    raise AssertionError(f"{p.name} is already running (pid {p.proc.pid})")
                continue
            if p.proc is not None:
                p.proc.wait()  # reap a process that exited on its own
            p.starts += 1
            with open(p.log, "ab") as log:
                log.write(f"--- harness: start #{p.starts} of {p.name} at "
                          f"{time.strftime('%H:%M:%S')} ---\n".encode())
                log.flush()
                p.proc = subprocess.Popen(self.command(p), stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          cwd=p.base, env=env,
                                          preexec_fn=_die_with_parent)
            p.expected_exit = False
            started.append(p)
        if wait:
            for p in started:
                self.wait_until(lambda p=p: self.status_of(p).get("pid") == p.proc.pid,
                                timeout, f"{p.name} writes status.json with its pid "
                                         f"{p.proc.pid} after starting")

    def stop(self, i: int | None = None, timeout: float = 20) -> None:
        """SIGTERM peer ``i`` (or all running), wait; a clean shutdown exits 0.

        All are signalled first, then awaited, so stopping a cluster takes one timeout.
        One that does not exit in time is killed; either way the test fails.
        """
        targets = [p for p in self._select(i) if p.running]
        for p in targets:
            p.expected_exit = True
            p.proc.send_signal(signal.SIGTERM)
        problems = []
        end = time.monotonic() + timeout
        for p in targets:
            try:
                rc = p.proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
                problems.append(f"{p.name} did not exit within {timeout} s of SIGTERM "
                                "(killed)")
                continue
            if rc != 0:
                problems.append(f"{p.name} exited with status {rc} on SIGTERM, "
                                "expected 0")
        if problems:
            raise AssertionError("; ".join(problems) + "\n" + self.log_tails(targets))

    def kill(self, i: int) -> None:
        """SIGKILL peer ``i`` and reap it (no-op if it is not running)."""
        p = self.peers[i]
        p.expected_exit = True
        if p.proc is None:
            return
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.wait()

    def close(self) -> None:
        """Stop every daemon still running (kill if it will not stop); leave none behind.

        Raises afterwards if a daemon did not exit 0 on SIGTERM, or had exited on its own
        while the test expected it running.
        """
        problems = []
        for p in self.peers:
            if p.proc is not None and not p.expected_exit and p.proc.poll() is not None:
                problems.append(f"{p.name} had exited on its own with status "
                                f"{p.proc.returncode}")
                p.expected_exit = True
        try:
            self.stop(None, timeout=20)
        except AssertionError as e:
            problems.append(str(e))
        finally:
            for p in self.peers:  # belt and braces: stop() already reaped or killed all
                if p.proc is not None and p.proc.poll() is None:
                    p.proc.kill()
                    p.proc.wait()
        if problems:
            raise AssertionError("cluster teardown: " + "\n".join(problems))

    # -------------------------------------------------------------------- waiting

    def check_alive(self) -> None:
        """Fail now if a daemon the test expects running has exited."""
        dead = [p for p in self.peers
                if p.proc is not None and not p.expected_exit and p.proc.poll() is not None]
        if dead:
            for p in dead:
                p.expected_exit = True  # report once
            raise AssertionError(
                "; ".join(f"{p.name} exited with status {p.proc.returncode} while the "
                          "test expected it running" for p in dead)
                + "\n" + self.log_tails(dead))

    def wait_until(self, cond: Callable[[], bool], timeout: float = 30,
                   what: str = "") -> None:
        """Poll ``cond`` until true; fail after ``timeout`` s, naming ``what``, with logs."""
        end = time.monotonic() + timeout
        while True:
            if cond():
                return
            self.check_alive()
            if time.monotonic() >= end:
                raise AssertionError(f"timed out after {timeout} s waiting until "
                                     f"{what or repr(cond)}\n{self.describe()}")
            time.sleep(POLL_S)

    def assert_stays(self, cond: Callable[[], bool], duration: float,
                     what: str = "") -> None:
        """Check that ``cond`` holds throughout ``duration`` s (an invariant over a
        window, for "never" properties); fail at the first poll where it does not."""
        end = time.monotonic() + duration
        while True:
            if not cond():
                raise AssertionError(f"no longer true: {what or repr(cond)}\n{self.describe()}")
            self.check_alive()
            if time.monotonic() >= end:
                return
            time.sleep(POLL_S)

    # -------------------------------------------------------------------- trees

    def snapshot(self, i: int, digests: bool = True) -> Snapshot:
        """Peer ``i``'s FILES trees: bytes path relative to root -> kind and attributes."""
        p = self.peers[i]
        return walk_tree(p.root, self.files, digests)

    def _indices(self, peers: Iterable[int] | None) -> list[int]:
        return [p.index for p in self.peers if p.trusted] if peers is None else list(peers)

    def converged(self, peers: Iterable[int] | None = None, digests: bool = True) -> bool:
        """All snapshots of ``peers`` (default: every trusted peer) are equal."""
        idx = self._indices(peers)
        first = self.snapshot(idx[0], digests)
        return all(self.snapshot(i, digests) == first for i in idx[1:])

    def wait_converged(self, timeout: float = 60, peers: Iterable[int] | None = None) -> None:
        """Wait until the trees of ``peers`` are identical, contents included.

        Polls on names, kinds, modes and sizes first, and hashes contents only when
        those agree, so that waiting on large trees does not starve the daemons.
        """
        idx = self._indices(peers)
        try:
            self.wait_until(lambda: self.converged(idx, digests=False)
                            and self.converged(idx, digests=True), timeout,
                            f"peers {idx} converge")
        except AssertionError as e:
            first = self.snapshot(idx[0])
            diffs = [f"peer {idx[0]} against peer {i}:\n"
                     + diff_snapshots(first, self.snapshot(i)) for i in idx[1:]]
            raise AssertionError(f"{e}\n" + "\n".join(diffs)) from None

    def temp_files(self, i: int) -> list[Path]:
        """Leftover ``.omirror-tmp*`` files anywhere under peer ``i``'s root."""
        found = []
        for top, dirs, names in os.walk(os.fsencode(self.peers[i].root)):
            found += [Path(os.fsdecode(os.path.join(top, n))) for n in names + dirs
                      if n.startswith(TEMP_PREFIX)]
        return found

    def conflict_copies(self, i: int) -> list[bytes]:
        """Paths (relative to root) of ``*.omirror-conflict-*`` copies on peer ``i``."""
        return sorted(k for k in self.snapshot(i, digests=False)
                      if b".omirror-conflict-" in os.path.basename(k))

    # -------------------------------------------------------------------- status, logs

    def status_of(self, p: Peer) -> dict:
        try:
            text = p.status_path.read_bytes()
        except FileNotFoundError:
            return {}
        return json.loads(text)

    def status(self, i: int) -> dict:
        """``<state>/status.json`` of peer ``i`` as a dict; {} if there is none."""
        return self.status_of(self.peers[i])

    def fresh_status(self, i: int, timeout: float = 10) -> dict:
        """The status peer ``i`` writes after this call: counters include all so far."""
        p = self.peers[i]
        since = time.time_ns()

        def rewritten() -> bool:
            try:
                # coarse file times lag the clock, so a later mtime is a later write
                return p.status_path.stat().st_mtime_ns > since
            except FileNotFoundError:
                return False

        self.wait_until(rewritten, timeout, f"{p.name} rewrites its status.json")
        return self.status(i)

    def log_text(self, i: int) -> str:
        try:
            return self.peers[i].log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tails(self, peers: Iterable[Peer] | None = None,
                  lines: int = LOG_TAIL_LINES) -> str:
        out = []
        for p in (self.peers if peers is None else peers):
            tail = self.log_text(p.index).splitlines()[-lines:]
            out.append(f"--- log of peer {p.index} {p.name} "
                       f"({'running' if p.running else 'not running'}), last "
                       f"{len(tail)} lines ---\n" + "\n".join(tail))
        return "\n".join(out)

    def describe(self) -> str:
        """Status summary and log tails of every peer, for failure messages."""
        out = []
        for p in self.peers:
            try:
                st = self.status_of(p)
            except ValueError as e:
                st = {"unreadable": str(e)}
            links = {name: f"out={v.get('out')} in={v.get('in')}"
                     for name, v in st.get("peers", {}).items()}
            out.append(f"peer {p.index} {p.name}: last_seq={st.get('last_seq')} "
                       f"queue={st.get('queue')} failing={st.get('failing')} links={links}")
        return "\n".join(out) + "\n" + self.log_tails()
