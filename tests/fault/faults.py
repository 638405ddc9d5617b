"""The fault toolkit: a TCP proxy on every link, kill -9 at a chosen moment, big files.

**Links through proxies.** A daemon dials each peer at the address of its HOSTS entry,
and listens on its own. The test-only variable ``OMIRROR_TEST_DIAL`` (read in
``omirror/peers.py``, ``dial_address``) changes only the TCP destination of the
links a daemon opens: identity, keys and the host-key check stay those of the peer. So
``Mesh`` starts one ``Proxy`` per *directed* link (i dials j: i pushes its log to j)
and gives each daemon the map to its own proxies. A link ``i <-> j`` is two TCP
connections (one per direction of replication), and cutting it cuts both, leaving
every other link alone: that is how a partition A|B with C connected to both is made.

A proxy can

- ``delay`` every byte by a latency (order and throughput kept);
- ``cut``: reset every connection now and every new one at once, until ``restore``;
- ``blackhole``: keep connections open but pass nothing either way (bytes are held, as a
  network that drops packets holds them in the sender's TCP retransmit queue), so only
  the SSH keep-alives can find that the link is dead; ``restore`` lets the held bytes
  through.

Each proxy runs an asyncio loop in a thread of its own, owned by the test (the
``proxies`` fixture stops every mesh at teardown).

**kill -9 at a chosen moment.** ``kill_when`` polls a condition every few milliseconds
and SIGKILLs the daemon the moment it holds: "the receiver has written half the file
into its temp file" (``temp_write_position``, the offset of its descriptor), "the
sender has sent N bytes of content" (``content_sent``, from its status.json).
"""

from __future__ import annotations

import asyncio
import calendar
import errno
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import Cluster

MB = 1 << 20
GIB = 1 << 30
_CHUNK = 64 * 1024
_KILL_POLL_S = 0.005
#: How long a cluster must stay unchanged to count as quiet (twice the deletion hold).
QUIET_S = 1.0


# ----------------------------------------------------------------------------- proxy

#: Proxies listen below the kernel's ephemeral range (32768-60999 by default), where the
#: daemons' ports are chosen (bind to port 0): a proxy started between the choice of a
#: daemon's port and its bind, in this test or in a parallel one, can never take it.
_PROXY_PORTS = (20000, 32000)


async def _listen_outside_ephemeral(accept: Callable[..., Any]) -> asyncio.base_events.Server:
    for _ in range(100):
        try:
            return await asyncio.start_server(accept, "127.0.0.1",
                                              random.randrange(*_PROXY_PORTS))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
    return await asyncio.start_server(accept, "127.0.0.1", 0)


class Proxy:
    """A TCP proxy on 127.0.0.1 (a free port) to ``target``, commanded from the test.

    Counters: ``accepted`` connections, ``refused`` (closed at once while cut),
    ``reset`` (cut while open), ``forwarded`` bytes.
    """

    PASS, CUT, BLACKHOLE = "pass", "cut", "blackhole"

    def __init__(self, target: tuple[str, int], name: str = "") -> None:
        self.target = target
        self.name = name or f"proxy to {target[0]}:{target[1]}"
        self.port = 0
        self.mode = self.PASS
        self.delay_s = 0.0
        self.accepted = self.refused = self.reset = self.forwarded = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"omirror-test-{self.name}")
        self._server: asyncio.base_events.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (f"Proxy({self.name}, :{self.port}, {self.mode}, delay={self.delay_s}, "
                f"accepted={self.accepted}, refused={self.refused}, reset={self.reset}, "
                f"forwarded={self.forwarded})")

    # the test's side: each call returns once the proxy's loop has done it
    def _call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def start(self) -> Proxy:
        self._thread.start()

        async def serve() -> None:
            self._flowing = asyncio.Event()
            self._flowing.set()
            self._server = await _listen_outside_ephemeral(self._accept)
            self.port = self._server.sockets[0].getsockname()[1]
        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        return self

    def cut(self) -> None:
        """Reset every open connection, and every new one until ``restore``."""
        def do() -> None:
            self.mode = self.CUT
            assert self._flowing is not None
            self._flowing.set()  # held pumps wake up and find their connection gone
            for client, upstream in list(self._conns):
                self._abort(client, upstream)
                self.reset += 1
            self._conns.clear()
        self._call(do)

    def blackhole(self) -> None:
        """Connections stay open, new ones are accepted, nothing passes either way."""
        def do() -> None:
            self.mode = self.BLACKHOLE
            assert self._flowing is not None
            self._flowing.clear()
        self._call(do)

    def restore(self) -> None:
        """Pass traffic again (what a black hole held goes through)."""
        def do() -> None:
            self.mode = self.PASS
            assert self._flowing is not None
            self._flowing.set()
        self._call(do)

    def delay(self, seconds: float) -> None:
        """Every byte from now on arrives ``seconds`` later (a latency, not a throttle)."""
        def do() -> None:
            self.delay_s = seconds
        self._call(do)

    def open_connections(self) -> int:
        return self._call(lambda: len(self._conns))

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for client, upstream in list(self._conns):
                self._abort(client, upstream)
            self._conns.clear()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    # the loop's side
    @staticmethod
    def _abort(*writers: asyncio.StreamWriter) -> None:
        for w in writers:
            w.transport.abort()  # an RST, as a link that breaks

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        if self.mode == self.CUT:
            self.refused += 1
            self._abort(writer)
            return
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._abort(writer)
            return
        if self.mode == self.CUT:  # cut while we dialled
            self.refused += 1
            self._abort(writer, up_writer)
            return
        pair = (writer, up_writer)
        self._conns.add(pair)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, pair))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        """Carry one direction of one connection. Chunks wait in a bounded queue until
        due (the latency); in a black hole neither reading nor delivering goes on, so
        the sender's buffers fill as they would. The first end or error of either
        direction ends the connection both ways."""
        flowing = self._flowing
        assert flowing is not None
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(64)

        async def receive() -> None:
            while True:
                await flowing.wait()
                data = await src.read(_CHUNK)
                await queue.put((self._loop.time() + self.delay_s, data))
                if not data:
                    return

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await flowing.wait()
                if pair not in self._conns or not data:
                    return
                dst.write(data)
                self.forwarded += len(data)
                await dst.drain()

        receiver, sender = tasks = [asyncio.create_task(receive()),
                                    asyncio.create_task(deliver())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if receiver in done and receiver.exception() is None:
                await asyncio.wait([sender])  # an end: deliver what came before it
        finally:
            error = any(t.done() and not t.cancelled() and t.exception() is not None
                        for t in tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if pair in self._conns:
                self._conns.discard(pair)
                for w in pair:
                    if error:
                        w.transport.abort()
                    else:
                        w.close()


class Mesh:
    """A ``Proxy`` on every directed link of ``cluster``'s trusted peers.

    ``link(i, j)`` is the proxy that carries i's connection to j (i pushes to j).
    Call before ``cluster.start()``: each daemon's command line gets its map.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        idx = [p.index for p in cluster.peers if p.trusted]
        self.links: dict[tuple[int, int], Proxy] = {}
        try:
            for i in idx:
                for j in idx:
                    if i != j:
                        self.links[i, j] = Proxy(("127.0.0.1", cluster[j].port),
                                                 f"link {i}->{j}").start()
        except BaseException:
            self.close()
            raise
        plain = cluster.command

        def command(p: Any) -> list[str]:
            routes = " ".join(f"{cluster[j].name}=127.0.0.1:{proxy.port}"
                              for (i, j), proxy in self.links.items() if i == p.index)
            return ["/usr/bin/env", f"OMIRROR_TEST_DIAL={routes}", *plain(p)]
        cluster.command = command  # type: ignore[method-assign]

    def link(self, i: int, j: int) -> Proxy:
        return self.links[i, j]

    def _both(self, i: int, j: int) -> tuple[Proxy, Proxy]:
        return self.links[i, j], self.links[j, i]

    def cut(self, i: int, j: int) -> None:
        """Cut the link between i and j, both directions of replication."""
        for proxy in self._both(i, j):
            proxy.cut()

    def blackhole(self, i: int, j: int) -> None:
        for proxy in self._both(i, j):
            proxy.blackhole()

    def restore(self, i: int, j: int) -> None:
        for proxy in self._both(i, j):
            proxy.restore()

    def delay(self, i: int, j: int, seconds: float) -> None:
        for proxy in self._both(i, j):
            proxy.delay(seconds)

    def cut_all(self) -> None:
        for proxy in self.links.values():
            proxy.cut()

    def restore_all(self) -> None:
        for proxy in self.links.values():
            proxy.restore()

    def close(self) -> None:
        for proxy in self.links.values():
            proxy.stop()


def link_state(c: Cluster, i: int, j: int) -> tuple[str | None, str | None]:
    """(out, in) of i's links with j as i's status.json reports them."""
    st = c.status(i).get("peers", {}).get(c[j].name, {})
    return st.get("out"), st.get("in")


def links_up(c: Cluster, i: int, j: int) -> bool:
    """Both connections between i and j are up, as both ends report them."""
    return link_state(c, i, j) == ("up", "up") and link_state(c, j, i) == ("up", "up")


def links_down(c: Cluster, i: int, j: int) -> bool:
    """Neither end reports either connection between i and j up."""
    return "up" not in link_state(c, i, j) + link_state(c, j, i)


# ----------------------------------------------------------------------------- kill -9

def kill_when(c: Cluster, i: int, cond: Callable[[], Any], timeout: float,
              what: str) -> Any:
    """SIGKILL peer ``i`` the moment ``cond()`` is true; return what it returned.

    Polls every 5 ms (a condition may return a number: the bytes written when it was
    met, say). Fails, naming ``what``, if the time runs out or a daemon the test expects
    running dies first.
    """
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            c.kill(i)
            return value
        c.check_alive()
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout} s waiting, to kill "
                                 f"{c[i].name}, until {what}\n{c.describe()}")
        time.sleep(_KILL_POLL_S)


def temp_write_position(c: Cluster, i: int) -> int:
    """How far peer ``i``'s daemon has written into its temp files: the largest file
    offset of a descriptor it holds open on a ``.omirror-tmp*`` file (0: none).

    The temp file's size says less: the receiver reserves each range of data before it
    writes it (``posix_fallocate``). The offset is the bytes built so far (a hole moves
    it too).
    """
    p = c[i]
    if not p.running:
        return 0
    fds = f"/proc/{p.proc.pid}/fd"
    best = 0
    try:
        names = os.listdir(fds)
    except FileNotFoundError:
        return 0
    for fd in names:
        try:
            if ".omirror-tmp" not in os.readlink(f"{fds}/{fd}"):
                continue
            with open(f"/proc/{p.proc.pid}/fdinfo/{fd}") as f:
                pos = next(int(line.split()[1]) for line in f if line.startswith("pos:"))
        except (FileNotFoundError, StopIteration):
            continue
        best = max(best, pos)
    return best


def content_sent(c: Cluster, i: int) -> int:
    """Content bytes peer ``i`` has sent to all peers, per its latest status.json."""
    try:
        st = c.status(i)
    except ValueError:  # caught while being replaced? (it is renamed in: unlikely)
        return 0
    return sum(link.get("content_bytes_sent", 0) for link in st.get("peers", {}).values())


# ----------------------------------------------------------------------------- files

def write_big(path: Path, size: int, seed: int = 0) -> None:
    """``size`` bytes where no two 1 MiB blocks are alike, quickly: one random 64 MiB
    buffer, each 1 MiB block stamped with its own number (and ``seed``) at its start.

    Written beside ``path`` and renamed in, so that a watcher sees one finished file.
    """
    base = bytearray(os.urandom(64 * MB))
    staging = path.parent.parent / f".staging-{path.name}"
    with open(staging, "wb") as f:
        block = 0
        left = size
        while left:
            for off in range(0, len(base), MB):
                base[off:off + 16] = b"%08d%08d" % (seed, block)
                block += 1
            n = min(left, len(base))
            f.write(memoryview(base)[:n])
            left -= n
    os.rename(staging, path)


@dataclass(frozen=True, order=True)
class Stamp:
    time_ns: int
    origin: str


_DUMP = re.compile(r"^(\d+)\t(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{9})Z\t(\S+)\t(\w+)\t(.*)$")


def log_stamps(c: Cluster, i: int, prefix: str = "/") -> dict[str, tuple[Stamp, str]]:
    """``omirrord log dump`` of peer ``i``: logical path -> (stamp, kind)."""
    r = subprocess.run([sys.executable, "-m", "omirror", "log", "dump",
                        "--state-dir", str(c[i].state), "--path", prefix],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"log dump of {c[i].name} failed: {r.stderr}"
    found = {}
    for line in r.stdout.splitlines():
        if line.startswith("#"):
            continue
        m = _DUMP.match(line)
        assert m, f"log dump line not understood: {line!r}"
        _, when, ns, origin, kind, path = m.groups()
        secs = calendar.timegm(time.strptime(when, "%Y-%m-%dT%H:%M:%S"))
        found[path.split(" (from ")[0]] = (Stamp(secs * 10**9 + int(ns), origin), kind)
    return found


def conflict_name(path: str, stamp: Stamp) -> str:
    """The name of the conflict copy that keeps the version ``stamp`` of ``path``."""
    return f"{path}.omirror-conflict-{stamp.origin}-{stamp.time_ns}"


def assert_sound(c: Cluster, peers: list[int] | None = None) -> None:
    """What every fault scenario ends with, beyond identical trees: no temp file left
    anywhere, every daemon the test expects running still running, and every peer's
    log naming the same stamp for every path."""
    idx = [p.index for p in c.peers if p.trusted] if peers is None else peers
    c.check_alive()
    for i in idx:
        assert c[i].running, f"{c[i].name} is not running"
    # a transfer of a version already superseded may still be finishing, a deletion
    # held for its quiet period (0.5 s) may still be coming: wait (bounded) until the
    # cluster has been still for QUIET_S, then hold it to the same conditions
    seen: list[Any] = [None, 0.0]

    def quiet() -> bool:
        state = ([c.temp_files(i) for i in idx],
                 [frozenset(log_stamps(c, i).items()) for i in idx])
        now = time.monotonic()
        if state != seen[0]:
            seen[:] = [state, now]
        return (not any(state[0]) and len(set(state[1])) == 1
                and now - seen[1] >= QUIET_S)
    c.wait_until(quiet, 30, f"no transfer in flight, every log agreeing, for {QUIET_S} s")
    for i in idx:
        assert c.temp_files(i) == [], f"{c[i].name} has leftover temp files: " \
                                      f"{c.temp_files(i)}"
    logs = {i: log_stamps(c, i) for i in idx}
    first = logs[idx[0]]
    for i in idx[1:]:
        differ = {p: (first.get(p), logs[i].get(p)) for p in set(first) | set(logs[i])
                  if first.get(p) != logs[i].get(p)}
        assert not differ, (f"peers {idx[0]} and {i} record different versions: "
                            f"{dict(list(differ.items())[:5])}")
