"""The Distfile's ``special`` and ``cmdspecial`` commands, run on the host that received a
peer's version (rdist runs them on the target only).

The resolver reports what it applied once it is committed (``resolve.Applied``); this
runner, in the event loop, turns that into runs. A ``special`` runs once per applied
path, with ``FILE``, ``REMFILE`` and ``BASEFILE`` in its environment; a ``cmdspecial``
gathers paths until none came for a quiet second (at most half a minute under a steady
stream) and runs once with ``FILES``, rdist's ``:``-separated list. File names come
from peers and are hostile: they reach a command through its environment, as bytes,
never through its text.

Each set has one queue, in the order runs became due, and runs one command at a time;
sets run side by side. A command that fails or hangs holds only its set's queue: the
tree worker never waits for it, so replication goes on. A run that passes its timeout
is stopped with its whole process group, SIGTERM then SIGKILL.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from omirror.paths import local_path, show, show_text, split

if TYPE_CHECKING:
    from omirror.resolve import Applied

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
#: A cmdspecial's burst ends once no path came for this long...
QUIET_S = 1.0
#: ... or once it has gathered for this long, under a steady stream.
GATHER_MAX_S = 30.0
#: After SIGTERM at the timeout, the group has this long before SIGKILL.
KILL_GRACE_S = 5.0
#: At shutdown, a running command has this long to finish before it is stopped.
STOP_GRACE_S = 2.0
#: The end of a command's output kept for the log.
OUTPUT_KEEP = 4096
#: Runs one set may have waiting; beyond it, a flood from a peer drops runs (logged,
#: counted) rather than hold memory without bound.
QUEUE_MAX = 100_000
#: Bytes of ``$FILES`` in one run: the kernel takes at most 128 KiB in one variable, so
#: a burst with more names is run as several.
FILES_MAX = 96 << 10
#: How long the output is still read after the command exited: a child it left behind
#: may hold the pipe open for ever.
_OUTPUT_AFTER_EXIT_S = 1.0
_SHELL = b"/bin/sh"
#: The variables a run sets; an inherited one is never passed on as if it were ours.
_OWN_VARS = (b"FILE", b"REMFILE", b"BASEFILE", b"FILES")
#: The service manager's channel to the daemon itself, not to its commands.
_SERVICE_VARS = (b"NOTIFY_SOCKET", b"WATCHDOG_USEC", b"WATCHDOG_PID")


@dataclass(frozen=True)
class Run:
    """One command to run for one set: its paths (logical) and the variables naming them."""

    title: str
    command: str
    paths: tuple[bytes, ...]
    env: dict[bytes, bytes]
    burst: bool = False

    def shown(self) -> str:
        """The paths of the run, for a log line: a burst names its first few."""
        names = [show(p) for p in self.paths[:3]]
        more = len(self.paths) - len(names)
        return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def file_env(root: bytes, path: bytes) -> dict[bytes, bytes]:
    """A ``special``'s variables: the path here (under ``--root``), the path as the
    Distfile names it (the same on every host), and its last component."""
    return {b"FILE": local_path(root, path), b"REMFILE": b"/" + path,
            b"BASEFILE": split(path)[1]}


def files_env(root: bytes, paths: Sequence[bytes]) -> dict[bytes, bytes]:
    """A ``cmdspecial``'s variable: the paths here, separated by ``:`` (rdist's form;
    a name holding ``:`` cannot be told apart in it)."""
    return {b"FILES": b":".join(local_path(root, p) for p in paths)}


@dataclass
class _Burst:
    """A cmdspecial's paths gathered so far; a dict keeps their order, once each."""

    title: str
    command: str
    started: float
    last: float
    paths: dict[bytes, None] = field(default_factory=dict)
    size: int = 0
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Set:
    """One set's queue, its worker, and the process it runs now."""

    queue: collections.deque[Run] = field(default_factory=collections.deque)
    worker: asyncio.Task[None] | None = None
    running: asyncio.subprocess.Process | None = None
    overflowing: bool = False


class Specials:
    """Queues and runs the specials of every set; lives in the event loop."""

    def __init__(self, root: bytes, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 quiet_s: float = QUIET_S, gather_max_s: float = GATHER_MAX_S,
                 kill_grace_s: float = KILL_GRACE_S, queue_max: int = QUEUE_MAX,
                 files_max: int = FILES_MAX) -> None:
        self.root = root
        self.timeout_s = timeout_s
        self.quiet_s = quiet_s
        self.gather_max_s = gather_max_s
        self.kill_grace_s = kill_grace_s
        self.queue_max = queue_max
        self.files_max = files_max
        self.runs = 0
        self.failed = 0
        self.dropped = 0
        self._sets: dict[str, _Set] = {}
        self._bursts: dict[tuple[str, str], _Burst] = {}
        self._closed = False
        self._base_env = {k: v for k, v in os.environb.items()
                          if k not in _OWN_VARS and k not in _SERVICE_VARS}

    # -- what became due -----------------------------------------------------------------

    def applied(self, items: Sequence[Applied]) -> None:
        """Paths a peer's versions were applied at, committed, in the order applied:
        each special of its set that matches runs (a command once per path, even when
        several of its paths match)."""
        if self._closed:
            log.debug("%d applied paths after the stop: no specials run for them",
                      len(items))
            return
        for item in items:
            done: set[tuple[str, bool]] = set()
            title = item.mset.title
            for special in item.mset.specials:
                key = (special.command, special.burst)
                if key in done or not special.matches(item.path):
                    continue
                done.add(key)
                if special.burst:
                    self._gather(title, special.command, item.path)
                else:
                    self._due(Run(title, special.command, (item.path,),
                                  file_env(self.root, item.path)))

    def _gather(self, title: str, command: str, path: bytes) -> None:
        now = time.monotonic()
        burst = self._bursts.get((title, command))
        grows = len(local_path(self.root, path)) + 1
        if burst is not None and burst.size + grows > self.files_max \
                and path not in burst.paths:
            self._end_burst(burst)  # full: what it holds runs now, a new burst begins
            burst = None
        if burst is None:
            burst = self._bursts[(title, command)] = _Burst(title, command, now, now)
            burst.timer = asyncio.get_running_loop().call_later(
                min(self.quiet_s, self.gather_max_s), self._burst_timer, burst)
        burst.last = now
        if path not in burst.paths:
            burst.paths[path] = None
            burst.size += grows

    def _burst_timer(self, burst: _Burst) -> None:
        """Due once quiet for ``quiet_s``, or ``gather_max_s`` after it began; else
        look again when that may be (one timer per burst, not one per path)."""
        due = min(burst.last + self.quiet_s, burst.started + self.gather_max_s)
        wait = due - time.monotonic()
        if wait > 0:
            burst.timer = asyncio.get_running_loop().call_later(wait, self._burst_timer,
                                                                burst)
        else:
            self._end_burst(burst)

    def _end_burst(self, burst: _Burst) -> None:
        if burst.timer is not None:
            burst.timer.cancel()
        if self._bursts.get((burst.title, burst.command)) is burst:
            del self._bursts[(burst.title, burst.command)]
        paths = tuple(burst.paths)
        self._due(Run(burst.title, burst.command, paths, files_env(self.root, paths),
                      burst=True))

    def _due(self, run: Run) -> None:
        one = self._sets.setdefault(run.title, _Set())
        if len(one.queue) >= self.queue_max:
            self.dropped += 1
            if not one.overflowing:
                one.overflowing = True
                log.warning("set=%s %d special runs wait already: further ones are "
                            "dropped until the queue empties (the command may be too slow "
                            "for the files that arrive)", run.title, len(one.queue))
            return
        one.queue.append(run)
        if one.worker is None or one.worker.done():
            one.worker = asyncio.create_task(self._work(one), name=f"specials:{run.title}")

    async def _work(self, one: _Set) -> None:
        """Run a set's queue, one command at a time, until it is empty."""
        while one.queue:
            await self._execute(one, one.queue.popleft())
        one.overflowing = False

    # -- one run -------------------------------------------------------------------------

    async def _execute(self, one: _Set, run: Run) -> None:
        env = {**self._base_env, **run.env}
        what = "cmdspecial" if run.burst else "special"
        started = time.monotonic()
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            proc = await asyncio.create_subprocess_exec(
                _SHELL, b"-c", run.command.encode(), stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd, stderr=write_fd, cwd="/", env=env,
                start_new_session=True)
        except (OSError, ValueError) as e:
            os.close(read_fd)
            self.runs += 1
            self.failed += 1
            log.warning("set=%s %s %s for %s could not be started: %s", run.title, what,
                        show_text(run.command), run.shown(), e)
            return
        finally:
            os.close(write_fd)
        one.running = proc
        output = _Tail()
        # the file object owns the descriptor, so it is closed even if the task that
        # reads it is cancelled before it starts
        reading = asyncio.ensure_future(output.read(os.fdopen(read_fd, "rb", buffering=0)))
        timed_out = False
        try:
            try:
                await asyncio.wait_for(proc.wait(), self.timeout_s)
            except TimeoutError:
                timed_out = True
                await stop_group(proc, self.kill_grace_s)
        except asyncio.CancelledError:  # the daemon stops: so does the command
            await asyncio.shield(stop_group(proc, self.kill_grace_s))
            reading.cancel()
            raise
        finally:
            one.running = None
        await asyncio.wait([reading], timeout=_OUTPUT_AFTER_EXIT_S)
        reading.cancel()
        self.runs += 1
        seconds = time.monotonic() - started
        said = output.text()
        said = f"; output: {said}" if said else "; no output"
        status = proc.returncode
        if not timed_out and status == 0:
            log.info("set=%s %s %s for %s exited 0 after %.1f s%s", run.title, what,
                     show_text(run.command), run.shown(), seconds, said)
            return
        self.failed += 1
        if timed_out:
            how = f"timed out after {self.timeout_s:g} s and was stopped (--special-timeout)"
        elif status is not None and status < 0:
            how = f"was killed by signal {-status}"
        else:
            how = f"failed with exit status {status}"
        log.warning("set=%s %s %s for %s %s%s", run.title, what, show_text(run.command),
                    run.shown(), how, said)

    # -- the end -------------------------------------------------------------------------

    async def drain(self) -> None:
        """Run everything due or gathering, and return once every queue is empty
        (``--once``: nothing more will arrive). Each run is bounded by the timeout."""
        for burst in list(self._bursts.values()):
            self._end_burst(burst)
        while workers := [s.worker for s in self._sets.values()
                          if s.worker is not None and not s.worker.done()]:
            await asyncio.wait(workers)

    async def close(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop: what is gathering or queued is dropped (logged); a running command has
        ``grace_s`` to finish, then its group is stopped."""
        self._closed = True
        dropped = 0
        for burst in list(self._bursts.values()):
            if burst.timer is not None:
                burst.timer.cancel()
            dropped += 1
        self._bursts.clear()
        for one in self._sets.values():
            dropped += len(one.queue)
            one.queue.clear()
        if dropped:
            self.dropped += dropped
            log.warning("stopping: %d special runs that were due or gathering are dropped",
                        dropped)
        workers = [s.worker for s in self._sets.values()
                   if s.worker is not None and not s.worker.done()]
        if not workers:
            return
        _, late = await asyncio.wait(workers, timeout=grace_s)
        for task in late:
            task.cancel()
        if late:
            log.warning("stopping: %d special commands still running are stopped",
                        len(late))
            await asyncio.wait(late)

    def status(self) -> dict[str, int]:
        """Counts since the start, for ``omirrord status``."""
        return {"runs": self.runs, "failed": self.failed, "dropped": self.dropped,
                "queued": sum(len(s.queue) for s in self._sets.values())
                + sum(1 for s in self._sets.values() if s.running is not None),
                "gathering": len(self._bursts)}


async def stop_group(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM to the command's process group, SIGKILL to what is left of it after
    ``grace_s``; returns once the shell itself is reaped."""
    pgid = proc.pid  # start_new_session: the shell leads its own group
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        pass
    # members that outlive the shell (children that handle SIGTERM) get the rest of
    # the grace; the group is looked at again every tenth of a second
    while _group_alive(pgid) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
    await proc.wait()


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
    except PermissionError as e:  # not ours any more: nothing of it to stop
        log.debug("process group %d: %s", pgid, e)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class _Tail:
    """The last :data:`OUTPUT_KEEP` bytes a command wrote (stdout and stderr)."""

    def __init__(self) -> None:
        self.data = b""

    async def read(self, pipe: IO[bytes]) -> None:
        """Read ``pipe`` to its end, or until cancelled; closes it either way."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe)
        try:
            while chunk := await reader.read(1 << 16):
                self.data = (self.data + chunk)[-OUTPUT_KEEP:]
        finally:
            transport.close()

    def text(self) -> str:
        """One line for the log: trailing white space dropped, the rest escaped."""
        return show_text(self.data.rstrip().decode("utf-8", "replace"))
