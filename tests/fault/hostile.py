"""A hostile peer for tests: a valid key, a real SSH link, and whatever frames a test wants.

The cluster's peer ``me`` (in HOSTS and in the peers file, so its key is accepted) is not
started; the test plays it instead. :class:`Hostile` opens a link to peer ``target``
with ``me``'s host key through ``omirror.peers.open_link``, exactly as a daemon would,
and then sends what the test says: well-formed messages (``send``), raw bytes
(``send_raw``), or half a frame and an EOF. It reads the daemon's frames in the
background (unless told not to, to play a peer that never reads), so a test can wait for
an ACK, answer a WANT, or see the daemon close the channel.

The link runs in an asyncio loop in a thread of its own, so that the test itself stays
synchronous like the rest of the harness (``Cluster.wait_until`` polls with sleeps).
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import asyncssh
import xxhash
from cluster import Cluster

from omirror import config, peerkeys, peers
from omirror.entry import Entry, Kind, Stamp
from omirror.wire import (
    PROTOCOL_VERSION,
    SUBSYSTEM,
    Ack,
    Bye,
    EntryMsg,
    Hello,
    IHave,
    Message,
    ProtocolError,
    Start,
    decode,
    encode,
)

T = TypeVar("T")
_LENGTH = struct.Struct(">I")
CALL_TIMEOUT_S = 30.0


class Closed(Exception):
    """The daemon closed the channel (or the connection) while the test expected more."""


class Hostile:
    """Peer ``me`` of cluster ``c``, played by the test, linked to peer ``target``."""

    def __init__(self, c: Cluster, me: int = 2, target: int = 0) -> None:
        self.c = c
        self.me = c[me]
        self.target = c[target]
        self.name = self.me.name
        self.seq = 0
        self.received: list[Message] = []
        self.eof = False
        self.error: BaseException | None = None
        self._conn: asyncssh.SSHClientConnection | None = None
        self._reader: Any = None
        self._writer: Any = None
        self._arrived: asyncio.Condition | None = None
        self._pump: asyncio.Task[None] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"omirror-test-hostile-{me}")
        self._thread.start()

    # -- plumbing ---------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT_S) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> Hostile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the link and stop the loop; idempotent."""
        if not self._thread.is_alive():
            return

        async def shut() -> None:
            if self._pump is not None:
                self._pump.cancel()
                await asyncio.gather(self._pump, return_exceptions=True)
            if self._conn is not None:
                self._conn.abort()
                self._conn = None

        try:
            self._call(shut(), 10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    # -- the link ---------------------------------------------------------------------

    def connect(self, subsystem: str = SUBSYSTEM, *, read: bool = True) -> Hostile:
        """Open the SSH link and the channel, as peer ``me`` would; with ``read`` (the
        default) every frame the daemon sends is read and kept in ``received``."""
        cfg = config.load(self.c.conf)
        host = next(h for h in cfg.hosts() if h.name == self.target.name)
        host_key = peerkeys.load_host_key(self.me.state)
        peer_key = peerkeys.load_peers(self.c.peers_file)[self.target.name]

        async def open_() -> None:
            self._arrived = asyncio.Condition()
            self.eof, self.error, self.received = False, None, []
            self._conn, self._reader, self._writer = await peers.open_link(
                host, host_key, peer_key, subsystem=subsystem)
            if read:
                self._pump = asyncio.create_task(self._read_forever())

        self._call(open_())
        return self

    async def _read_forever(self) -> None:
        assert self._arrived is not None
        try:
            while True:
                (length,) = _LENGTH.unpack(await self._reader.readexactly(_LENGTH.size))
                msg = decode(await self._reader.readexactly(length))
                async with self._arrived:
                    self.received.append(msg)
                    self._arrived.notify_all()
        except (asyncio.IncompleteReadError, ConnectionError, asyncssh.Error) as e:
            self.eof = True
            if not isinstance(e, asyncio.IncompleteReadError):
                self.error = e
        except ProtocolError as e:  # the daemon itself spoke wrongly: fail the test
            self.eof, self.error = True, e
        async with self._arrived:
            self._arrived.notify_all()

    def send_raw(self, data: bytes, *, timeout: float = CALL_TIMEOUT_S) -> bool:
        """Write bytes and wait until the channel takes them; False if it is closed or
        stays full (the daemon stopped reading) for ``timeout`` s."""
        async def write() -> bool:
            try:
                self._writer.write(data)
                await asyncio.wait_for(self._writer.drain(), timeout)
            except (TimeoutError, ConnectionError, asyncssh.Error, BrokenPipeError):
                return False
            return True
        return self._call(write(), timeout + 10)

    def send(self, *msgs: Message, timeout: float = CALL_TIMEOUT_S) -> bool:
        return self.send_raw(b"".join(encode(m) for m in msgs), timeout=timeout)

    def send_eof(self) -> None:
        """Close our side of the channel (the daemon reads EOF)."""
        async def eof() -> None:
            if self._writer.can_write_eof():
                self._writer.write_eof()
        self._call(eof())

    def wait_for(self, match: Callable[[Message], bool], timeout: float = 10,
                 what: str = "") -> Message:
        """The first message received that ``match``es, waiting up to ``timeout`` s;
        :class:`Closed` if the daemon closes the channel first."""
        async def wait() -> Message:
            assert self._arrived is not None
            async with self._arrived:
                while True:
                    for msg in self.received:
                        if match(msg):
                            return msg
                    if self.eof:
                        raise Closed(f"the daemon closed the link before {what or match}"
                                     f" (error: {self.error}); got {self.received[-5:]}")
                    await self._arrived.wait()
        try:
            return self._call(asyncio.wait_for(wait(), timeout), timeout + 10)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or match};"
                                 f" got {self.received[-5:]}") from None

    def closed_within(self, timeout: float) -> bool:
        """True once the daemon has closed the channel, waiting up to ``timeout`` s."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.eof:
                return True
            time.sleep(0.02)
        return self.eof

    # -- the protocol, spoken as a pusher -------------------------------------------

    def greet(self, name: str | None = None, epoch: str = "ee" * 16) -> IHave:
        """HELLO (naming ``name``, by default our own), then the daemon's HELLO and
        IHAVE, then START from seq 0: the link is ready for entries."""
        self.send(Hello(PROTOCOL_VERSION, name or self.name, epoch, time.time_ns()))
        self.wait_for(lambda m: isinstance(m, Hello), what="the daemon's HELLO")
        ihave = self.wait_for(lambda m: isinstance(m, IHave), what="IHAVE")
        assert isinstance(ihave, IHave)
        self.send(Start(0, True, 0))
        return ihave

    def greet_as_receiver(self) -> Start:
        """On a pull or index channel the daemon pushes: its HELLO, ours, IHAVE of
        nothing (so it sends everything), then its START."""
        self.wait_for(lambda m: isinstance(m, Hello), what="the daemon's HELLO")
        self.send(Hello(PROTOCOL_VERSION, self.name, "ee" * 16, time.time_ns()),
                  IHave("", 0))
        start = self.wait_for(lambda m: isinstance(m, Start), what="START")
        assert isinstance(start, Start)
        return start

    def entries(self) -> list[Entry]:
        """The entries received so far (from a pull or index channel)."""
        return [m.entry for m in self.received if isinstance(m, EntryMsg)]

    def stop_reading(self) -> None:
        """From now on read nothing: play a peer whose buffers are full."""
        async def stop() -> None:
            if self._pump is not None:
                self._pump.cancel()
                await asyncio.gather(self._pump, return_exceptions=True)
                self._pump = None
        self._call(stop())

    def run_command(self, command: str) -> asyncssh.SSHCompletedProcess | None:
        """Ask for a shell command on the link's connection (an omirrord runs none);
        None when the session itself is refused."""
        assert self._conn is not None
        try:
            return self._call(asyncio.wait_for(self._conn.run(command, check=False), 10),
                              20)
        except asyncssh.ChannelOpenError:
            return None

    def push(self, entry: Entry, data: bytes | None = None) -> int:
        """Send one ENTRY with the next seq; returns the seq."""
        self.seq += 1
        self.send(EntryMsg(self.seq, entry, data))
        return self.seq

    def wait_ack(self, seq: int, timeout: float = 10) -> None:
        """Wait until the daemon acknowledges ``seq``: every entry up to it is settled."""
        self.wait_for(lambda m: isinstance(m, Ack) and m.seq >= seq, timeout,
                      f"ACK of seq {seq}")

    def bye(self) -> None:
        self.send(Bye("test done"))

    # -- entries ------------------------------------------------------------------------

    def file(self, path: bytes, data: bytes, *, size: int | None = None,
             digest: bytes | None = None, time_ns: int | None = None) -> Entry:
        """A file entry made by this peer now; ``size``/``digest`` default to ``data``'s."""
        t = time.time_ns() if time_ns is None else time_ns
        return Entry(path=path, kind=Kind.FILE, stamp=Stamp(t, self.name),
                     vector=((self.name, t),), mode=0o644, mtime_ns=t,
                     size=len(data) if size is None else size,
                     digest=xxhash.xxh3_128_digest(data) if digest is None else digest)

    def directory(self, path: bytes, *, mode: int = 0o755, time_ns: int | None = None) -> Entry:
        t = time.time_ns() if time_ns is None else time_ns
        return Entry(path=path, kind=Kind.DIR, stamp=Stamp(t, self.name),
                     vector=((self.name, t),), mode=mode)


def frame(payload: bytes) -> bytes:
    """A frame around any payload: the length prefix, then the bytes."""
    return _LENGTH.pack(len(payload)) + payload


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory (``VmRSS``) or its peak (``VmHWM``), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def digest_of(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)

