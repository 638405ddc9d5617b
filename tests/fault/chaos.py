"""Randomized convergence: random operations on random peers, random crashes and link
cuts, then heal, quiesce, and hold the cluster to a model of last-writer-wins.

One run (``run_seed``) is fully decided by its seed: the number of peers (3 to 5), and
a sequence of steps, each one of

- a file-system operation on a random peer, running or not (a stopped host's tree can
  change too; its daemon finds the change when it starts): write (in place or through
  a rename from outside the tree), append, truncate, rename (files, symlinks and whole
  directories, onto new names or over existing files), mkdir, rmdir of a whole
  subtree, delete, chmod, symlink;
- a fault: kill -9 of a running daemon, SIGTERM of one, a start of a stopped one, a cut
  of a link between two peers (through the proxies of faults.py), a restore.

Operations land while replication is in flight, so they race with the daemons' own
writes: that is the point. An operation that fails because the tree changed under it
(a directory removed by a peer's deletion, say) is recorded as failed and proves
nothing.

**What each operation records.** Its start time, and what it left behind: for every
path it touched, the state right after it (kind, mode, content digest, link target) and
that path's ctime, both read from the very inode the operation wrote where it can (a
written file is stat'ed through its descriptor), so a peer's write landing a moment
later cannot be mistaken for ours.

**The model, checked after healing.** Every peer runs, every link is up, and the
cluster has quiesced (trees identical, every log names the same stamp for every path,
no temp file: ``assert_sound``). Then, for every path an operation touched, with
``(origin, time)`` the stamp every log records for it:

1. the winner is the newest write: no successful operation on that path, on any peer,
   started clearly after ``time`` (its change was lost if it did);
2. the tree holds the winner's state: what ``origin`` had at that path after its
   operation stamped ``time`` (the ctime that stamp was made from), or else after its
   last operation on that path begun before ``time`` (a deletion is stamped when it is
   seen, not when it happened);
3. a deletion is absent everywhere.

A directory that exists at the end with no operation of its origin to explain it was
re-created as the parent of something that won: that is allowed, for directories only.
"""

from __future__ import annotations

import os
import random
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import xxhash
from cluster import Cluster
from faults import Mesh, assert_sound, links_up, log_stamps

TOP = "data"
FILE_NAMES = ("f0", "f1", "f2", "f3", "f4", "f5")
DIR_NAMES = ("d0", "d1", "d2")
LINK_NAMES = ("l0", "l1")
MAX_DEPTH = 3  # /data/d0/d1/f0
FILE_MODES = (0o644, 0o600, 0o640, 0o664, 0o755)
DIR_MODES = (0o755, 0o700, 0o750, 0o775)
#: A kernel stamps ctime from a coarse clock that can lag the fine one by a tick.
CTIME_SLACK_NS = 20_000_000
#: How long after a change (or a start) a daemon has surely recorded it.
SETTLE_NS = 500_000_000
SIZES = ((0.05, 0, 0), (0.50, 1, 120), (0.28, 1_000, 6_000), (0.14, 65_000, 80_000),
         (0.03, 4_300_000, 4_700_000))

OPS = (("write", 30), ("append", 8), ("truncate", 5), ("rename", 11), ("mkdir", 9),
       ("rmtree", 4), ("delete", 10), ("chmod", 8), ("symlink", 6))
FAULTS = (("kill", 3), ("term", 1), ("start", 4), ("cut", 3), ("restore", 3))


@dataclass(frozen=True)
class State:
    """What a path holds on one peer."""

    kind: str  # "file", "dir", "link" or "absent"
    mode: int = 0
    digest: bytes = b""
    target: bytes = b""

    def __str__(self) -> str:
        if self.kind == "file":
            return f"file {self.mode:o} {self.digest.hex()[:12]}"
        if self.kind == "dir":
            return f"dir {self.mode:o}"
        if self.kind == "link":
            return f"link -> {self.target!r}"
        return "absent"


ABSENT = State("absent")


@dataclass(frozen=True)
class Seen:
    state: State
    ctime_ns: int  # 0 for an absent path


@dataclass
class Op:
    n: int
    peer: int
    what: str
    detail: str
    start_ns: int
    seen: dict[str, Seen] = field(default_factory=dict)  # logical path -> what it left
    #: Removed paths whose removal the daemon must honour: it had recorded them (it ran
    #: and they were older than a moment). A path made and removed while the daemon was
    #: not looking, or within its coalescing delay, leaves no version: nothing to lose.
    known: set[str] = field(default_factory=set)
    #: What came along with a directory this op renamed: its content is whatever was in
    #: the directory at the moment of the rename, which may be a peer's write landing
    #: there a moment before; the model does not pin it down.
    carried: set[str] = field(default_factory=set)
    #: What a path held on this peer right before the op (ops that change a path in
    #: place), to tell a change that ended where it began (see :func:`classify`).
    before: dict[str, State] = field(default_factory=dict)
    #: The daemon of this peer was running when the op was made, and how many times it
    #: had been started: two ops of one epoch while it was stopped were never seen apart.
    running: bool = False
    epoch: int = 0
    #: The op wrote through a descriptor whose file had left the tree by the time the
    #: write was done (its link count was 0): a peer's version was renamed over it.
    orphaned: bool = False
    error: str = ""

    def __str__(self) -> str:
        result = f" FAILED: {self.error}" if self.error else ""
        return f"#{self.n} p{self.peer} {self.what} {self.detail}{result}"


@dataclass
class Outcome:
    seed: int
    peers: int
    steps: int
    ops_ok: int
    ops_failed: int
    faults: int
    paths: int
    seconds: float
    problems: list[str]
    #: Findings of a class the model accepts (see :func:`classify`), with that class.
    accepted: list[str] = field(default_factory=list)


def digest(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)


def state_of_fd(fd: int, st: os.stat_result) -> Seen:
    """The state of a regular file read through the descriptor that changed it."""
    data = os.pread(fd, st.st_size + 1, 0)
    return Seen(State("file", stat.S_IMODE(st.st_mode), digest(data)), st.st_ctime_ns)


def state_at(where: Path) -> Seen:
    """The state at a path, by name (for what has no descriptor of ours)."""
    try:
        st = os.lstat(where)
    except (FileNotFoundError, NotADirectoryError):
        return Seen(ABSENT, 0)
    if stat.S_ISDIR(st.st_mode):
        return Seen(State("dir", stat.S_IMODE(st.st_mode)), st.st_ctime_ns)
    if stat.S_ISLNK(st.st_mode):
        return Seen(State("link", target=os.readlink(os.fsencode(where))), st.st_ctime_ns)
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return Seen(ABSENT, 0)
    try:
        return state_of_fd(fd, os.fstat(fd))
    finally:
        os.close(fd)


def is_conflict_copy(name: str) -> bool:
    return ".omirror-conflict-" in name


class Chaos:
    """One randomized run against a started cluster whose links run through ``mesh``."""

    def __init__(self, cluster: Cluster, mesh: Mesh, seed: int, steps: int, *,
                 faults: bool = True, log: Callable[[str], None] | None = None) -> None:
        self.c = cluster
        self.mesh = mesh
        self.seed = seed
        self.rng = random.Random(seed)
        self.steps = steps
        self.faults = faults
        self.ops: list[Op] = []
        self.fault_log: list[str] = []
        self.cut: set[tuple[int, int]] = set()
        self.log = log or (lambda _msg: None)
        self.n = 0
        #: When each daemon was last started, None while it is stopped.
        self.up_since: dict[int, int | None] = {p.index: None for p in cluster.peers}
        self.epochs: dict[int, int] = {p.index: 0 for p in cluster.peers}
        #: Findings of an accepted class (see :func:`classify`), reported apart.
        self.accepted: list[str] = []

    def started(self, i: int) -> None:
        self.up_since[i] = time.time_ns()
        self.epochs[i] += 1

    def removing(self, op: Op, paths: list[str]) -> None:
        """Note which of the paths about to be removed the daemon has surely recorded."""
        up = self.up_since[op.peer]
        now = time.time_ns()
        for path in paths:
            try:
                ctime = os.lstat(self.local(op.peer, path)).st_ctime_ns
            except OSError:
                continue
            if up is not None and up + SETTLE_NS < now and ctime + SETTLE_NS < now:
                op.known.add(path)

    # ------------------------------------------------------------------------ helpers

    def local(self, i: int, path: str) -> Path:
        return self.c[i].root / path

    def subtree(self, i: int, top: str) -> list[str]:
        """Every path below ``top`` on peer i (conflict copies included)."""
        return list(self.listing(i, top, everything=True))

    def listing(self, i: int, top: str = TOP, everything: bool = False) -> dict[str, str]:
        """Relative path ("data/d0/f1") -> kind, for what ops may pick on peer i."""
        found: dict[str, str] = {}
        pending = [top]
        while pending:
            rel = pending.pop()
            try:
                names = os.listdir(self.local(i, rel))
            except OSError:
                continue
            for name in names:
                if name.startswith(".omirror") or (is_conflict_copy(name) and not everything):
                    continue
                path = f"{rel}/{name}"
                try:
                    st = os.lstat(self.local(i, path))
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    found[path] = "dir"
                    pending.append(path)
                elif stat.S_ISLNK(st.st_mode):
                    found[path] = "link"
                elif stat.S_ISREG(st.st_mode):
                    found[path] = "file"
        return found

    def pick(self, items: list[str]) -> str | None:
        return self.rng.choice(sorted(items)) if items else None

    def new_name(self, tree: dict[str, str], names: tuple[str, ...],
                 dirs_only_shallow: bool = False) -> str | None:
        """A path that does not exist yet, in an existing directory."""
        parents = [TOP] + [p for p, k in tree.items() if k == "dir"]
        if dirs_only_shallow:
            parents = [p for p in parents if p.count("/") < MAX_DEPTH - 1]
        for _ in range(8):
            parent = self.pick(parents)
            if parent is None:
                return None
            path = f"{parent}/{self.rng.choice(names)}"
            if path not in tree:
                return path
        return None

    def content(self, op: Op) -> bytes:
        r = self.rng.random()
        for weight, low, high in SIZES:  # noqa: B007 (the chosen bounds are used below)
            if r < weight:
                break
            r -= weight
        size = self.rng.randint(low, high)
        head = f"seed {self.seed} op {op.n} peer {op.peer}\n".encode()
        return head + self.rng.randbytes(size)

    # ------------------------------------------------------------------------- driving

    def run(self) -> None:
        for _ in range(self.steps):
            self.n += 1
            if self.faults and self.rng.random() < 0.12:
                self.fault()
            else:
                self.operation()
            if self.rng.random() < 0.35:
                time.sleep(self.rng.uniform(0, 0.06))  # think time, not synchronisation

    def operation(self) -> None:
        i = self.rng.randrange(len(self.c))
        what = self.rng.choices([o for o, _ in OPS], [w for _, w in OPS])[0]
        op = Op(self.n, i, what, "", 0, running=self.up_since[i] is not None,
                epoch=self.epochs[i])
        tree = self.listing(i)
        try:
            getattr(self, f"op_{what}")(op, tree)
        except OSError as e:
            op.error = f"{type(e).__name__}: {e.strerror or e}"
        if op.start_ns:
            self.ops.append(op)
            self.log(str(op))

    def begin(self, op: Op, detail: str) -> None:
        op.detail = detail
        op.start_ns = time.time_ns()

    def op_write(self, op: Op, tree: dict[str, str]) -> None:
        files = [p for p, k in tree.items() if k == "file"]
        path = self.pick(files) if files and self.rng.random() < 0.6 else None
        path = path or self.new_name(tree, FILE_NAMES)
        if path is None:
            return
        data = self.content(op)
        where = self.local(op.peer, path)
        if self.rng.random() < 0.3:
            staging = self.c[op.peer].base / f"chaos-staging-{op.n}"
            fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
                self.begin(op, f"{path} ({len(data)} B, renamed into place)")
                try:
                    os.rename(staging, where)
                except OSError:
                    os.unlink(staging)
                    raise
                op.seen[path] = state_of_fd(fd, os.fstat(fd))
            finally:
                os.close(fd)
            return
        self.begin(op, f"{path} ({len(data)} B)")
        fd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, data)
            self.wrote(op, path, fd)
        finally:
            os.close(fd)

    @staticmethod
    def wrote(op: Op, path: str, fd: int) -> None:
        st = os.fstat(fd)
        op.seen[path] = state_of_fd(fd, st)
        op.orphaned = st.st_nlink == 0

    def op_append(self, op: Op, tree: dict[str, str]) -> None:
        path = self.pick([p for p, k in tree.items() if k == "file"])
        if path is None:
            return
        data = self.content(op)[: self.rng.randint(1, 3000)]
        self.begin(op, f"{path} (+{len(data)} B)")
        fd = os.open(self.local(op.peer, path), os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW)
        try:
            os.write(fd, data)
            self.wrote(op, path, fd)
        finally:
            os.close(fd)

    def op_truncate(self, op: Op, tree: dict[str, str]) -> None:
        path = self.pick([p for p, k in tree.items() if k == "file"])
        if path is None:
            return
        fd = os.open(self.local(op.peer, path), os.O_RDWR | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return
            keep = self.rng.randrange(size)
            self.begin(op, f"{path} ({size} -> {keep} B)")
            os.ftruncate(fd, keep)
            self.wrote(op, path, fd)
        finally:
            os.close(fd)

    def op_chmod(self, op: Op, tree: dict[str, str]) -> None:
        path = self.pick([p for p, k in tree.items() if k in ("file", "dir")])
        if path is None:
            return
        is_dir = tree[path] == "dir"
        flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if is_dir else 0)
        fd = os.open(self.local(op.peer, path), flags)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode) != is_dir:
                return
            modes = [m for m in (DIR_MODES if is_dir else FILE_MODES)
                     if m != stat.S_IMODE(st.st_mode)]
            mode = self.rng.choice(modes)
            op.before[path] = (State("dir", stat.S_IMODE(st.st_mode)) if is_dir
                               else state_of_fd(fd, st).state)
            self.begin(op, f"{path} {mode:o}")
            os.fchmod(fd, mode)
            st = os.fstat(fd)
            op.seen[path] = (Seen(State("dir", stat.S_IMODE(st.st_mode)), st.st_ctime_ns)
                             if is_dir else state_of_fd(fd, st))
        finally:
            os.close(fd)

    def op_mkdir(self, op: Op, tree: dict[str, str]) -> None:
        path = self.new_name(tree, DIR_NAMES, dirs_only_shallow=True)
        if path is None:
            return
        op.before[path] = ABSENT
        self.begin(op, path)
        os.mkdir(self.local(op.peer, path), 0o755)
        op.seen[path] = state_at(self.local(op.peer, path))

    def op_symlink(self, op: Op, tree: dict[str, str]) -> None:
        path = self.new_name(tree, LINK_NAMES)
        if path is None:
            return
        target = self.rng.choice(["f0", "../d0/f1", "/nonexistent", f"t{op.n}"])
        op.before[path] = ABSENT
        self.begin(op, f"{path} -> {target}")
        os.symlink(target, self.local(op.peer, path))
        op.seen[path] = state_at(self.local(op.peer, path))

    def op_delete(self, op: Op, tree: dict[str, str]) -> None:
        path = self.pick([p for p, k in tree.items() if k in ("file", "link")])
        if path is None:
            return
        self.removing(op, [path])
        op.before[path] = state_at(self.local(op.peer, path)).state
        self.begin(op, path)
        os.unlink(self.local(op.peer, path))
        op.seen[path] = Seen(ABSENT, 0)

    def below(self, tree: dict[str, str], path: str) -> list[str]:
        return [p for p in tree if p.startswith(path + "/")]

    def op_rmtree(self, op: Op, tree: dict[str, str]) -> None:
        path = self.pick([p for p, k in tree.items() if k == "dir"])
        if path is None:
            return
        doomed = [path, *self.below(tree, path)]
        self.removing(op, doomed)
        for p in doomed:
            op.before[p] = state_at(self.local(op.peer, p)).state
        self.begin(op, f"{path} ({len(doomed)} paths)")
        errors: list[str] = []
        for p in sorted(doomed, key=lambda p: p.count("/"), reverse=True):
            where = self.local(op.peer, p)
            try:
                if tree[p] == "dir":
                    os.rmdir(where)
                else:
                    os.unlink(where)
            except OSError as e:  # a peer's write landed in it meanwhile
                errors.append(f"{p}: {e.strerror}")
        for p in doomed:
            if (after := state_at(self.local(op.peer, p))).state == ABSENT:
                op.seen[p] = after  # what survived (not empty) was not changed
        if errors:
            op.error = "; ".join(errors[:2])

    def op_rename(self, op: Op, tree: dict[str, str]) -> None:
        source = self.pick(list(tree))
        if source is None:
            return
        kind = tree[source]
        names = {"file": FILE_NAMES, "dir": DIR_NAMES, "link": LINK_NAMES}[kind]
        files = [p for p, k in tree.items() if k == "file" and p != source]
        if kind == "file" and files and self.rng.random() < 0.3:
            dest = self.pick(files)
        else:
            dest = self.new_name(tree, names, dirs_only_shallow=kind == "dir")
        if dest is None or dest == source or dest.startswith(source + "/"):
            return
        if kind == "dir" and dest.count("/") + max(
                (p.count("/") - source.count("/") for p in self.below(tree, source)),
                default=0) > MAX_DEPTH:
            return
        moved = [source, *self.below(tree, source)]
        self.removing(op, moved)
        for p in (*moved, dest):
            op.before[p] = state_at(self.local(op.peer, p)).state
        self.begin(op, f"{source} -> {dest}")
        os.rename(self.local(op.peer, source), self.local(op.peer, dest))
        if kind == "dir":  # what it held when renamed, also what came in since the listing
            moved = [source, *(source + p[len(dest):] for p in self.subtree(op.peer, dest))]
        for p in moved:
            op.seen[p] = Seen(ABSENT, 0)
        op.seen[dest] = state_at(self.local(op.peer, dest))
        op.carried.update(dest + p[len(source):] for p in moved[1:])

    # -------------------------------------------------------------------------- faults

    def fault(self) -> None:
        what = self.rng.choices([f for f, _ in FAULTS], [w for _, w in FAULTS])[0]
        running = [p.index for p in self.c.peers if p.running]
        stopped = [p.index for p in self.c.peers if not p.running]
        pairs = [(i, j) for i in range(len(self.c)) for j in range(i + 1, len(self.c))]
        done = ""
        if what == "term":
            # a daemon killed by SIGTERM before it set up its handlers exits by the
            # signal, as any process does: stop only one that is up
            running = [i for i in running if self.c.status(i).get("pid") == self.c[i].proc.pid]
        if what in ("kill", "term") and len(running) > 1:
            i = self.rng.choice(running)
            if what == "kill":
                self.c.kill(i)
            else:
                self.c.stop(i)
            self.up_since[i] = None
            done = f"{what} p{i}"
        elif what == "start" and stopped:
            i = self.rng.choice(stopped)
            self.c.start(i, wait=False)
            self.started(i)
            done = f"start p{i}"
        elif what == "cut":
            up = [p for p in pairs if p not in self.cut]
            if up:
                pair = self.rng.choice(up)
                self.mesh.cut(*pair)
                self.cut.add(pair)
                done = f"cut p{pair[0]}-p{pair[1]}"
        elif what == "restore" and self.cut:
            pair = self.rng.choice(sorted(self.cut))
            self.mesh.restore(*pair)
            self.cut.discard(pair)
            done = f"restore p{pair[0]}-p{pair[1]}"
        if done:
            self.fault_log.append(f"#{self.n} {done}")
            self.log(f"#{self.n} {done}")

    # -------------------------------------------------------------------------- ending

    def heal(self, timeout: float) -> None:
        """Every link restored, every daemon running and linked, trees identical."""
        self.mesh.restore_all()
        self.cut.clear()
        for p in self.c.peers:
            if not p.running:
                self.c.start(p.index, wait=False)
                self.started(p.index)
        n = len(self.c)
        self.c.wait_until(lambda: all(links_up(self.c, i, j) for i in range(n)
                                      for j in range(i + 1, n)), timeout,
                          "every link up after healing")
        self.c.wait_converged(timeout)
        assert_sound(self.c)

    def check(self) -> list[str]:
        """The model of last-writer-wins against what the cluster settled on."""
        problems: list[str] = []
        stamps = log_stamps(self.c, 0)
        names = {p.name: p.index for p in self.c.peers}
        touched: dict[str, list[Op]] = {}
        for op in self.ops:
            for path in op.seen:
                touched.setdefault(path, []).append(op)
        logged = [versions_logged(self.c.log_text(i)) for i in range(len(self.c))]

        def looked(peer: int, path: str, from_ns: int, to_ns: int) -> bool:
            return any(from_ns - LOG_SLACK_NS <= t <= to_ns + LOG_SLACK_NS
                       for t in logged[peer].get(path, ()))

        for path, ops in sorted(touched.items()):
            final = state_at(self.local(0, path)).state
            recorded = stamps.get("/" + path)
            done = ops  # an op records only what it did: a partial rmtree, its part
            if recorded is None:
                if final != ABSENT:
                    problems.append(f"/{path}: {final} in the tree but in no log")
                continue
            stamp, kind = recorded
            origin = names.get(stamp.origin)
            if origin is None:
                problems.append(f"/{path}: stamped by unknown origin {stamp.origin}")
                continue
            if kind == "tombstone" and final != ABSENT:
                problems.append(f"/{path}: deleted at {stamp} but holds {final}")
                continue
            alive = final.kind == "dir" and bool(os.listdir(self.local(0, path)))
            parent = final.kind == "dir" and (alive or any(  # may be made again as a parent
                q.startswith(path + "/") and seen.state != ABSENT
                for op in self.ops for q, seen in op.seen.items()) or any(
                q.startswith(path + "/") for op in self.ops for q in op.carried))
            last = {op.peer: op for op in done}  # each peer's own last word on the path
            lost = [op for op in last.values()
                    if op.start_ns > stamp.time_ns + CTIME_SLACK_NS
                    and not same(op, op.seen[path].state, final)
                    and (op.seen[path].state != ABSENT or (path in op.known and not alive))]
            if lost:
                finding = (f"/{path}: winner {stamp.origin}@{stamp.time_ns} is older "
                           f"than {lost[-1]} (start {lost[-1].start_ns}), whose "
                           f"{lost[-1].seen[path].state} was lost; final {final}")
                why = classify(lost[-1], path, [op for op in done if op.peer == lost[-1].peer],
                               looked)
                if why:
                    self.accepted.append(f"{why}: {finding}")
                else:
                    problems.append(finding)
                continue
            if kind == "tombstone":
                continue  # absent, as it must be; who deleted it does not matter
            mine = [op for op in done if op.peer == origin]
            exact = [op for op in mine if op.seen[path].ctime_ns == stamp.time_ns]
            before = [op for op in mine if op.start_ns <= stamp.time_ns + CTIME_SLACK_NS]
            chosen = exact[-1] if exact else (before[-1] if before else None)
            if parent and (chosen is None or chosen.seen[path].state == ABSENT):
                continue  # re-created as the parent of a winner
            carriers = [op for op in self.ops if op.peer == origin and path in op.carried
                        and op.start_ns <= stamp.time_ns + CTIME_SLACK_NS]
            if carriers and (chosen is None or carriers[-1].n > chosen.n):
                continue  # came with a directory renamed there, whatever it then held
            if chosen is None and final == ABSENT and any(
                    op.peer == origin and op.start_ns <= stamp.time_ns + CTIME_SLACK_NS
                    and any(path.startswith(q + "/") and seen.state == ABSENT
                            for q, seen in op.seen.items()) for op in self.ops):
                continue  # written into a directory as it was renamed away: went with it
            if chosen is None and is_conflict_copy(path.rpartition("/")[2]):
                continue  # every peer that sees the conflict records its own copy
            if chosen is None:
                problems.append(f"/{path}: winner {stamp.origin}@{stamp.time_ns} but "
                                f"{stamp.origin} did nothing to it before; final {final}")
                continue
            expected = chosen.seen[path].state
            if parent and expected.kind == "dir" and any(
                    op.seen[path].state == ABSENT for op in done):
                continue  # removed somewhere, then re-created (any mode) as a parent
            if not same(chosen, expected, final):
                problems.append(f"/{path}: winner {stamp.origin}@{stamp.time_ns} left "
                                f"{expected} ({chosen}) but the trees hold {final}")
        return problems


#: A log line's time is cut to the millisecond.
LOG_SLACK_NS = 1_000_000
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) DEBUG omirror\.\w+: "
                       r"path=/(\S+) (?:recorded|applied) ", re.MULTILINE)


def versions_logged(text: str) -> dict[str, list[int]]:
    """When a daemon recorded or applied a version of each path, from its debug log."""
    found: dict[str, list[int]] = {}
    for m in _LOG_LINE.finditer(text):
        at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
        found.setdefault(m.group(3), []).append(int(at) * 1_000_000_000
                                                + int(m.group(2)) * 1_000_000)
    return found


def classify(lost: Op, path: str, mine: list[Op],
             looked: Callable[[int, str, int, int], bool] = lambda *_: False) -> str:
    """The accepted class of a lost operation, or "" for a real loss.

    Both classes are inherent to a mirror that detects changes by comparing states and
    replaces files by renaming a complete copy over them (docs/architecture.rst, "What
    the model accepts"); anything else is reported as a failure:

    - ``ended where it began``: the op brought the path back to what it held before an
      earlier op of the same peer, and the daemon never recorded anything at that path
      in between (``looked(peer, path, from_ns, to_ns)`` is false: its log has no
      version of the path recorded or applied then; or it was stopped across both): to
      a daemon that compares the tree with its record there was no change at all;
    - ``written into a replaced file``: the op wrote through a descriptor whose file a
      peer's version had already replaced (its link count was 0 after the write): the
      write went to a file no longer in any tree.
    """
    if lost.orphaned:
        return "written into a replaced file"
    end = lost.seen[path].state
    for first in reversed([op for op in mine if op.n <= lost.n]):
        began = first.before.get(path)
        if began is None:
            break  # an op that does not say what it found: nothing to compare with
        unseen = (not first.running and not lost.running and first.epoch == lost.epoch) \
            or not looked(lost.peer, path, first.start_ns, lost.start_ns)
        if not unseen:
            break
        if began == end:
            return "ended where it began"
    return ""


def same(op: Op, left: State, final: State) -> bool:
    """Whether what ``op`` left is what the trees hold. A directory made by mkdir is
    the same as any directory: it may make again what the daemon had recorded (mode
    0755 both), which is no change and so no version, while a peer's chmod is."""
    if op.what == "mkdir" and left.kind == "dir":
        return final.kind == "dir"
    return left == final


def run_seed(base: Path, seed: int, *, steps: int | None = None, timeout: float = 90,
             log: Callable[[str], None] | None = None) -> Outcome:
    """Build a cluster under ``base``, run one seed, heal, check; stop everything."""
    rng = random.Random(f"shape {seed}")
    peers = rng.randint(3, 5)
    steps = steps if steps is not None else rng.randint(40, 90)
    started = time.monotonic()
    # the daemons log at debug level: the model reads from their logs when each one
    # recorded or applied a version of a path (see ``classify``)
    c = Cluster(base, peers, delay=0.005, extra_args=("-v",))
    mesh = Mesh(c)
    chaos = Chaos(c, mesh, seed, steps, log=log)
    problems: list[str] = []
    try:
        c.start()
        for p in c.peers:
            chaos.started(p.index)
        chaos.run()
        try:
            chaos.heal(timeout)
            problems = chaos.check()
        except AssertionError as e:
            problems = [f"did not settle: {e}"]
    finally:
        try:
            c.close()
        except AssertionError as e:
            problems.append(f"shutdown: {e}")
        mesh.close()
    failed = sum(1 for op in chaos.ops if op.error)
    return Outcome(seed, peers, steps, len(chaos.ops) - failed, failed,
                   len(chaos.fault_log), len({p for op in chaos.ops for p in op.seen}),
                   time.monotonic() - started, problems, chaos.accepted)
