"""``omirrord demo``: three peers on this machine, mirroring live, for a first look.

The demo sets up what an operator would (one Distfile, one peers file, a host key and a
state directory per peer), runs three real ``omirrord`` processes on 127.0.0.1 and then
shows each change as it lands in each tree. Nothing here is special to the demo inside
the daemons: what the newcomer sees is what a real deployment does.

The demo directory is kept when the demo stops, keys included, so a second run starts at
once; ports are checked again on every run, because another program may hold them now.
This module prints nothing itself: every line meant for the user goes through the
``echo`` callback the command line passes in, and diagnostics go to the logger.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NamedTuple

from omirror import config, peerkeys
from omirror.errors import ConfigError, OmirrorError
from omirror.paths import is_own_name
from omirror.units import human_bytes

log = logging.getLogger(__name__)

#: The peers, in the order their identities stand in HOSTS (how a re-run finds its ports).
LABELS = ("alpha", "beta", "gamma")
DEFAULT_DIR = "omirror-demo"
#: The one mirrored tree, under each peer's directory (its --root).
TREE = "shared"
WELCOME = "README.txt"
CONF_NAME = "omirrd.conf"
PEERS_NAME = "peers"
LOCK_NAME = ".demo.lock"
#: How often the trees are looked at; a slow walk (a big tree) stretches it up to the cap.
POLL_S = 0.2
POLL_MAX_S = 5.0
START_TIMEOUT_S = 30.0
#: The daemon finishes the job in progress and closes its links within 10 s of SIGTERM.
STOP_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 20

Echo = Callable[[str], None]

_PR_SET_PDEATHSIG = 1  # prctl(2)


class DemoError(OmirrorError):
    """The demo cannot start or a daemon died: the message says what to look at."""


@dataclass(frozen=True, slots=True)
class DemoPeer:
    """One of the three peers: its identity ``127.0.0.1:<port>`` and its directories."""

    label: str
    base: Path
    port: int

    @property
    def name(self) -> str:
        """The identity in HOSTS, the peers file and --name: the port tells the three apart."""
        return f"127.0.0.1:{self.port}"

    @property
    def root(self) -> Path:
        """The daemon's --root: FILES = ( /shared ) puts the tree at ``<base>/shared``."""
        return self.base

    @property
    def tree(self) -> Path:
        """What the user edits and :func:`snapshot` walks; the only path the Distfile mirrors."""
        return self.base / TREE

    @property
    def state(self) -> Path:
        """The peer's --state-dir; also how a leftover daemon is recognised by its command line."""
        return self.base / "state"

    @property
    def log(self) -> Path:
        """The daemon's stdout and stderr, appended run after run; its tail explains a death."""
        return self.base / "omirrord.log"

    @property
    def status_path(self) -> Path:
        """Its pid, once written, tells that the daemon is up (or left over from a killed demo)."""
        return self.state / "status.json"


@dataclass(frozen=True, slots=True)
class Layout:
    """The demo directory as prepared: shared files and the three peers."""

    directory: Path
    conf: Path
    peers_file: Path
    peers: tuple[DemoPeer, ...]


# --------------------------------------------------------------------------- setting up


def prepare(directory: Path) -> Layout:
    """Make (or reuse) the demo directory: trees, keys, Distfile and peers file.

    Existing host keys are kept, so a re-run needs no key generation. The ports of the
    last run are kept when they are all still free; otherwise three new ones are taken.
    The Distfile and peers file are written again either way: that is cheap, and it
    repairs a directory whose files were edited or half deleted.
    """
    directory.mkdir(parents=True, exist_ok=True)
    # the demo directory often sits inside a clone of this repository: keep it out of git
    ignore = directory / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# made by omirrord demo\n*\n")
    conf = directory / CONF_NAME
    ports = _previous_ports(conf)
    if ports is None or not all(_is_free(p) for p in ports):
        if ports is not None:
            log.info("ports of the last run are taken now: picking new ones old=%s", ports)
        ports = free_ports(len(LABELS))
    peers = tuple(DemoPeer(label, directory / label, port)
                  for label, port in zip(LABELS, ports))
    lines = []
    for p in peers:
        p.tree.mkdir(parents=True, exist_ok=True)
        key, created = peerkeys.ensure_host_key(p.state)
        log.info("%s host key peer=%s path=%s", "made" if created else "kept", p.label,
                 peerkeys.host_key_path(p.state))
        lines.append(peerkeys.peer_line(p.name, key) + "\n")
    peers_file = directory / PEERS_NAME
    _write_private(peers_file, "".join(lines))
    hosts = " ".join(p.name for p in peers)
    _write_private(conf,
                   "# Written by 'omirrord demo' on every run: HOSTS are alpha, beta and\n"
                   "# gamma, in this order, each listening on its own port of 127.0.0.1.\n"
                   f"HOSTS = ( {hosts} )\n"
                   f"FILES = ( /{TREE} )\n"
                   "${FILES} -> ${HOSTS}\n"
                   "\tinstall ;\n"
                   "\texcept_pat ( \\.swp$ ~$ ) ;\n")
    return Layout(directory, conf, peers_file, peers)


def _previous_ports(conf: Path) -> list[int] | None:
    """The ports of alpha, beta and gamma in a Distfile the demo wrote, None if unusable."""
    if not conf.exists():
        return None
    try:
        hosts = config.load(conf).hosts()
    except ConfigError as e:
        log.info("not reusing %s: %s", conf, e)
        return None
    if len(hosts) != len(LABELS) or any(h.address != "127.0.0.1" for h in hosts):
        return None
    return [h.port for h in hosts]


def _is_free(port: int) -> bool:
    """Whether a daemon could listen on 127.0.0.1:``port`` now.

    SO_REUSEADDR as the daemon's listener has it: a port left in TIME_WAIT by the last
    run is free for the daemon, so it is free here too.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (all held until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read: the daemon refuses a Distfile or peers file
    that others could write, and there is no reason to let them read it either."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
    os.replace(tmp, path)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the demo directory for this run: two demos on one directory would each start
    three daemons on the same trees and keys."""
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise DemoError(f"another omirrord demo is running in {directory}: stop it "
                            "(Ctrl-C in its terminal) or give this one --dir OTHER") from None
        yield
    finally:
        os.close(fd)


def _check_no_leftover_daemon(directory: Path) -> None:
    """Refuse to start beside a daemon of an earlier run that still runs on these trees
    (its demo was killed before it could stop it); two daemons on one tree fight."""
    for label in LABELS:
        p = DemoPeer(label, directory / label, 0)
        pid = _status_pid(p)
        if pid is not None and _runs_omirrord_on(pid, p.state):
            raise DemoError(f"omirrord pid {pid} of an earlier demo still runs on "
                            f"{p.tree}; stop it first: kill {pid}")


def _status_pid(p: DemoPeer) -> int | None:
    try:
        pid = json.loads(p.status_path.read_text()).get("pid")
    except (OSError, ValueError):
        return None
    return pid if isinstance(pid, int) else None


def _runs_omirrord_on(pid: int, state: Path) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
    except OSError:
        return False
    return b"omirror" in b" ".join(cmdline) and os.fsencode(state.resolve()) in cmdline


# --------------------------------------------------------------------------- daemons


class Daemons:
    """The three ``omirrord`` processes: started, watched, stopped."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def command(self, p: DemoPeer) -> list[str]:
        """This interpreter's omirror, every path absolute: the state path must match what
        ``_runs_omirrord_on`` looks for."""
        return [sys.executable, "-m", "omirror", "-C", str(self.layout.conf.resolve()),
                "-n", p.name, "--root", str(p.root.resolve()),
                "--state-dir", str(p.state.resolve()),
                "--peers", str(self.layout.peers_file.resolve())]

    def start(self) -> None:
        """Start the three daemons, each writing its log; none waits for the others.

        Each runs in its own session, so a Ctrl-C on the terminal reaches the demo alone
        and the demo stops them in order; and each is told by the kernel to stop when the
        demo dies, so even a killed demo leaves no daemon behind.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
        parent = os.getpid()
        for p in self.layout.peers:
            with open(p.log, "ab") as out:
                out.write(f"--- omirrord demo: starting {p.label} as {p.name} at "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
                out.flush()
                self.procs[p.label] = subprocess.Popen(
                    self.command(p), stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                    preexec_fn=_die_with(parent))
            log.info("started peer=%s name=%s pid=%d", p.label, p.name,
                     self.procs[p.label].pid)

    def dead(self) -> DemoPeer | None:
        """A peer whose daemon has exited, if any."""
        for p in self.layout.peers:
            proc = self.procs.get(p.label)
            if proc is not None and proc.poll() is not None:
                return p
        return None

    def is_up(self, p: DemoPeer) -> bool:
        """The daemon writes status.json with its pid once its watches and listener are up."""
        return _status_pid(p) == self.procs[p.label].pid

    def died_error(self, p: DemoPeer) -> DemoError:
        """Only for a daemon that has exited (its returncode is set), with its log's tail."""
        rc = self.procs[p.label].returncode
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        return DemoError(f"the omirrord of {p.label} ({p.name}) {how}; the last lines of "
                         f"{p.log}:\n{log_tail(p.log)}")

    def stop(self, hurry: Callable[[], bool] = lambda: False) -> list[str]:
        """SIGTERM all, wait, kill what will not stop; return what went wrong, if anything.

        All are signalled first, so stopping takes one timeout, not three. A daemon
        finishes the job in progress before it exits, which can take a while; when
        ``hurry`` turns true (a second Ctrl-C), the ones still running are killed.
        """
        running = {label: proc for label, proc in self.procs.items() if proc.poll() is None}
        for proc in running.values():
            proc.send_signal(signal.SIGTERM)
        problems = []
        end = time.monotonic() + STOP_TIMEOUT_S
        while any(proc.poll() is None for proc in running.values()):
            if hurry() or time.monotonic() >= end:
                break
            time.sleep(0.05)
        for label, proc in running.items():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                why = "on a second Ctrl-C" if hurry() else \
                    f"after {STOP_TIMEOUT_S:g} s of not stopping on SIGTERM"
                problems.append(f"{label} was killed {why}")
            elif proc.returncode != 0:
                problems.append(f"{label} exited with status {proc.returncode} when stopped")
        return problems


def _die_with(parent: int) -> Callable[[], None]:
    """A preexec_fn asking the kernel to SIGTERM the child when the demo dies (prctl(2)
    PR_SET_PDEATHSIG); libc is loaded here, before the fork, not in the child."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        """Runs in the child before exec; the ppid check covers a demo that died before it."""
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the demo died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a daemon's log, indented, for an error message."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"    (cannot read it: {e.strerror})"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


# --------------------------------------------------------------------------- following


class Seen(NamedTuple):
    """What a user would notice changing about one path of a tree."""

    kind: str  # "file", "dir", "link" or "other"
    ino: int
    size: int = 0
    mtime_ns: int = 0
    target: str = ""


#: path relative to the peer's directory (``shared/notes.txt``) -> what it looks like
Snapshot = dict[str, Seen]


def snapshot(p: DemoPeer) -> Snapshot:
    """Walk a peer's tree without following symlinks, skipping the daemon's own names.

    A path that vanishes during the walk (a daemon is installing a file) is left out:
    the next poll sees the settled tree. The inode is kept because a daemon installs a
    file by renaming a new one over it, which may keep the size and mtime of the file
    it replaces, and because a rename keeps it, which is how renames are told apart
    from a deletion and a creation.
    """
    snap: Snapshot = {}
    pending = [TREE]
    while pending:
        rel = pending.pop()
        full = p.base / rel
        try:
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                names = os.listdir(full)
                snap[rel] = Seen("dir", st.st_ino)
                pending.extend(f"{rel}/{n}" for n in names
                               if not is_own_name(os.fsencode(n)))
            elif stat.S_ISREG(st.st_mode):
                snap[rel] = Seen("file", st.st_ino, st.st_size, st.st_mtime_ns)
            elif stat.S_ISLNK(st.st_mode):
                snap[rel] = Seen("link", st.st_ino, target=os.readlink(full))
            else:
                snap[rel] = Seen("other", st.st_ino)
        except OSError:  # vanished or replaced mid-walk
            continue
    return snap


def changes(label: str, before: Snapshot, after: Snapshot) -> Iterator[str]:
    """One line per path that appeared (+), changed (~), disappeared (-) or was renamed
    (>) between two snapshots of one tree.

    What lies inside a renamed directory went along with it and is not listed again.
    """
    gone = {rel: seen for rel, seen in before.items() if rel not in after}
    new = {rel: seen for rel, seen in after.items() if rel not in before}
    gone_by_object = {(seen.kind, seen.ino): rel for rel, seen in gone.items()}
    renamed: dict[str, str] = {}  # old path -> new path
    for rel, seen in new.items():
        old = gone_by_object.pop((seen.kind, seen.ino), None)
        if old is not None:
            renamed[old] = rel
    moved_dirs = [(old, rel) for old, rel in renamed.items() if before[old].kind == "dir"]

    def carried(old: str, rel: str) -> bool:
        """Moved along with a renamed directory, which is the one line shown for it all."""
        return any(old.startswith(d + "/") and rel == n + old[len(d):] for d, n in moved_dirs)

    lines: list[tuple[str, str]] = []
    for old, rel in renamed.items():
        if not carried(old, rel):
            slash = "/" if after[rel].kind == "dir" else ""
            lines.append((rel, f"> {_shown(old)}{slash} -> {_shown(rel)}{slash}"))
    for rel, seen in gone.items():
        if rel not in renamed:
            lines.append((rel, f"- {_describe(rel, seen)}"))
    targets = set(renamed.values())
    for rel, seen in new.items():
        if rel not in targets:
            lines.append((rel, f"+ {_describe(rel, seen)}"))
    for rel, seen in after.items():
        was = before.get(rel)
        if was is not None and was != seen and not (was.kind == seen.kind == "dir"):
            lines.append((rel, f"~ {_describe(rel, seen)}"))
    for _, text in sorted(lines):
        yield f"  {label:<7} {text}"


def _describe(rel: str, seen: Seen) -> str:
    if seen.kind == "dir":
        return _shown(rel) + "/"
    if seen.kind == "file":
        return f"{_shown(rel)} ({human_bytes(seen.size)})"
    if seen.kind == "link":
        return f"{_shown(rel)} -> {_shown(seen.target)}"
    return _shown(rel)


def _shown(name: str) -> str:
    """A file name as one line of a terminal can show it: a name may hold bytes that are
    not UTF-8 (kept by surrogateescape) or control characters, even a newline."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text if text.isprintable() else repr(text)[1:-1]


def welcome_text(layout: Layout) -> str:
    """Written into alpha's tree once all are up, so the first lines shown are a file arriving."""
    trees = "\n".join(f"  {p.tree.resolve()}" for p in layout.peers)
    return (f"Welcome to omirror.\n\n"
            f"This file was written into alpha's tree at {time.strftime('%H:%M:%S')} by "
            f"'omirrord demo';\nthe daemons copied it to beta and gamma over SSH. Three "
            f"peers mirror each other here:\n{trees}\n\n"
            "Create, edit, rename or delete anything in any of them and watch the others\n"
            "follow. Edit the same file in two trees at nearly the same moment: the last\n"
            "writer wins everywhere, and the losing version is kept beside it as\n"
            "NAME.omirror-conflict-<host>-<time>.\n")


# --------------------------------------------------------------------------- the demo


class _StopRequested:
    """Counts SIGINT, SIGTERM and SIGHUP: the first stops the demo, a second hurries it.

    A flag, not KeyboardInterrupt: an exception could land anywhere, even between
    starting a daemon and recording it, and leave one running.
    """

    def __init__(self) -> None:
        self.signals: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.signals)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    def hurry(self) -> bool:
        """From the second signal on: :meth:`Daemons.stop` then kills instead of waiting."""
        return len(self.signals) > 1


@contextmanager
def _signals_stop(flag: _StopRequested) -> Iterator[None]:
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, flag) for s in handled}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_demo(directory: Path, echo: Echo, duration_s: float | None = None) -> None:
    """Set up and run the three peers until Ctrl-C, SIGTERM or ``duration_s`` seconds.

    The duration counts from the moment the three daemons are up, so a script that asks
    for a few seconds gets them whatever the startup took. Raises :class:`DemoError`
    (after stopping the daemons) when one dies or will not stop cleanly.
    """
    stop = _StopRequested()
    with _signals_stop(stop):
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory):
            _check_no_leftover_daemon(directory)
            layout = prepare(directory)
            daemons = Daemons(layout)
            try:
                daemons.start()
                if _wait_up(daemons, stop):
                    _introduce(layout, daemons, echo)
                    _follow(layout, daemons, echo, stop, duration_s)
                    echo("")
                    echo("Stopping the daemons (Ctrl-C again to kill them)...")
            finally:
                problems = daemons.stop(stop.hurry)
            if problems:
                raise DemoError("; ".join(problems) + "\n" + "\n".join(
                    f"  last lines of {p.log}:\n{log_tail(p.log)}" for p in layout.peers))
    echo(f"Stopped. The demo is kept in {directory}, so the next run starts at once; "
         f"remove it with: rm -rf {shlex.quote(str(directory))}")


def _wait_up(daemons: Daemons, stop: _StopRequested) -> bool:
    """Wait until every daemon is up; False if told to stop first. Raises if one dies."""
    end = time.monotonic() + START_TIMEOUT_S
    waiting = list(daemons.layout.peers)
    while waiting:
        if stop:
            return False
        dead = daemons.dead()
        if dead is not None:
            raise daemons.died_error(dead)
        waiting = [p for p in waiting if not daemons.is_up(p)]
        if waiting and time.monotonic() > end:
            names = ", ".join(p.label for p in waiting)
            raise DemoError(f"{names} not up within {START_TIMEOUT_S:g} s; the last lines "
                            f"of {waiting[0].log}:\n{log_tail(waiting[0].log)}")
        time.sleep(0.05)
    return True


def _introduce(layout: Layout, daemons: Daemons, echo: Echo) -> None:
    peers = layout.peers
    echo("omirror demo: three omirrord peers on this machine, mirroring each other live "
         "over SSH.")
    for p in peers:
        echo(f"  {p.label:<7} {p.name:<16} pid {daemons.procs[p.label].pid}")
    echo("")
    echo("Write into any of these and watch the others:")
    for p in peers:
        echo(f"  {p.tree}")
    echo(f"  for example:  echo hello > {shlex.quote(str(peers[1].tree / 'hello.txt'))}")
    echo(f"Logs in {layout.directory / '<peer>' / 'omirrord.log'}. Ctrl-C to stop.")
    echo("")
    echo(f"Writing {WELCOME} into alpha's tree. Each change, as each tree shows it:")


def _follow(layout: Layout, daemons: Daemons, echo: Echo, stop: _StopRequested,
            duration_s: float | None) -> None:
    """Print each change as each tree shows it, until told to stop or the time is up."""
    snaps = {p.label: snapshot(p) for p in layout.peers}
    alpha = layout.peers[0]
    (alpha.tree / WELCOME).write_text(welcome_text(layout))
    end = None if duration_s is None else time.monotonic() + duration_s
    interval = POLL_S
    while not stop and (end is None or time.monotonic() < end):
        started = time.monotonic()
        dead = daemons.dead()
        if dead is not None:
            raise daemons.died_error(dead)
        for p in layout.peers:
            new = snapshot(p)
            for line in changes(p.label, snaps[p.label], new):
                echo(line)
            snaps[p.label] = new
        # a big tree takes long to walk: poll less often rather than starve the daemons
        interval = min(POLL_MAX_S, max(POLL_S, 2 * (time.monotonic() - started)))
        wake = time.monotonic() + interval
        if end is not None:
            wake = min(wake, end)
        while not stop and time.monotonic() < wake:
            time.sleep(min(0.05, max(0.0, wake - time.monotonic())))
    if stop:
        log.info("stopping on signal %s", signal.Signals(stop.signals[0]).name)


__all__ = [
    "DEFAULT_DIR",
    "LABELS",
    "TREE",
    "WELCOME",
    "DemoError",
    "DemoPeer",
    "Layout",
    "changes",
    "prepare",
    "run_demo",
    "snapshot",
]
