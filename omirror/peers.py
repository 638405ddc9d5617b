"""SSH transport of the peer links: the listener, the outbound connections, who is who.

Every peer is known by one line of the peers file, which serves as authorized_keys for
the listener and as known_hosts for the outbound links. The listener learns which peer
connected from the key whose signature authenticated the connection, never from what
the client claims, nor from a key it only asked about; every other way into SSH
(passwords, keyboard-interactive, host-based, GSS-API authentication and key exchange)
is off. The client accepts a server only if it presents the key listed for the host it
dialled.

A connection carries one replication direction on one ``omirror-1`` subsystem channel:
the side that connects pushes its log, the side that accepts receives. A link that
fails is retried with capped exponential backoff; it never takes the daemon down, and a
slow or dead peer holds up nobody else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh
import asyncssh.compression

from omirror.config import Host
from omirror.peerkeys import PeerKey
from omirror.wire import SUBSYSTEM, SUBSYSTEMS, AskedAgain

log = logging.getLogger(__name__)

#: AES-GCM first: with AES-NI it is twice as fast as chacha20 here.
CIPHERS = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com",
           "aes256-gcm@openssh.com", "aes128-ctr")
#: A peer that stops answering (frozen, its host hung, a cable pulled: its TCP
#: connections stay open) is dropped after KEEPALIVE_S * (KEEPALIVE_COUNT + 1) = 8 s
#: without a packet from it: status shows it down well within 10 s, and its link is
#: retried. A busy peer still answers: keepalives are handled by its event loop, not
#: by the tree worker that may be busy for minutes.
KEEPALIVE_S, KEEPALIVE_COUNT = 2, 3
#: A big window and big packets: one channel carries a whole tree's content.
CHANNEL_WINDOW = 8 << 20
MAX_PACKET = 256 << 10
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 30.0
CONNECT_TIMEOUT_S = 10.0

#: What a link runs once its channel is open: (peer name, reader, writer).
SessionHandler = Callable[[str, asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]],
                          Awaitable[None]]
#: What the listener runs for an accepted channel: (peer, subsystem, reader, writer).
InboundHandler = Callable[[str, str, asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]],
                          Awaitable[None]]

_LINK_ERRORS = (OSError, asyncssh.Error, asyncio.IncompleteReadError, asyncio.TimeoutError,
                ConnectionError, EOFError)


def _bound_receive_windows() -> None:
    """Make asyncssh grant a peer only the window its channel buffer has room for.

    asyncssh (2.24.1 here) re-opens a channel's whole receive window each time it hands
    data to the reading side, even while more data waits in the channel because the
    reader paused: a reader slower than the link (a disk slower than the network, a
    peer sending faster than entries are applied) then lets the peer send without
    limit, and it all waits in memory: 1.9 GB after 6 s, with a reader taking 13 MB/s
    (tests/fault/test_hostile.py). Here what still waits in the channel is counted as
    unread when the window is re-opened, so no more than a window is ever buffered.
    Left alone if asyncssh no longer looks like this.
    """
    channel = asyncssh.channel.SSHChannel
    deliver = getattr(channel, "_deliver_data", None)
    if deliver is None or getattr(deliver, "_omirror_bounded", False):
        return

    def _deliver_data(self: Any, data: bytes, datatype: Any) -> None:
        waiting = getattr(self, "_recv_buf", None)
        held = sum(len(item[0]) for item in waiting) if waiting else 0
        self._recv_window += held  # the window is re-opened only past what waits here
        try:
            deliver(self, data, datatype)
        finally:
            self._recv_window -= held

    _deliver_data._omirror_bounded = True  # type: ignore[attr-defined]
    channel._deliver_data = _deliver_data  # type: ignore[method-assign]


_bound_receive_windows()


#: Most a compressed SSH packet may inflate to: above the largest packet either side
#: sends (256 KiB of channel data and its header), far below what zlib can make of one.
INFLATE_MAX = 1 << 20


def _compression(compress: bool) -> tuple[str, ...]:
    """Only OpenSSH's delayed zlib: plain ``zlib`` starts inflating right after the key
    exchange, for a client that has not authenticated yet."""
    return ("zlib@openssh.com", "none") if compress else ("none",)


class _BoundedInflate(asyncssh.compression.Decompressor):
    """zlib decompression that never makes more than INFLATE_MAX bytes of one packet:
    asyncssh's own inflates without a limit (64 KiB of zeros make about 64 MB)."""

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj()

    def decompress(self, data: bytes) -> bytes | None:
        """Overrides asyncssh's to bound each packet; None (corrupt or too big) makes asyncssh
        close the connection."""
        try:
            out = self._inflate.decompress(data, INFLATE_MAX)
        except zlib.error:
            return None
        if self._inflate.unconsumed_tail:
            log.warning("a compressed SSH packet inflates beyond %d bytes: connection "
                        "closed", INFLATE_MAX)
            return None  # asyncssh closes the connection: "Decompression failed"
        return out


def _bound_decompression() -> None:
    """Make asyncssh inflate ``zlib@openssh.com`` with :class:`_BoundedInflate`. Left
    alone if asyncssh no longer keeps its decompressors where this expects them."""
    table = getattr(asyncssh.compression, "_cmp_decompressors", None)
    if isinstance(table, dict):
        for name in (b"zlib@openssh.com", b"zlib"):  # the second is never negotiated here
            if name in table:
                table[name] = _BoundedInflate


_bound_decompression()

#: The authorized_keys option that names the peer a key belongs to.
_PEER_OPTION = "omirror-peer"


def authorized_keys(keys: dict[str, PeerKey]) -> asyncssh.SSHAuthorizedKeys | None:
    """The peers file as asyncssh's authorized keys, each key tagged with its peer."""
    lines = [f'{_PEER_OPTION}="{name}" {peer.openssh}\n' for name, peer in keys.items()]
    return asyncssh.import_authorized_keys("".join(lines)) if lines else None


class _Server(asyncssh.SSHServer):
    """Authenticates a connecting peer by its key, and remembers which peer it is.

    The peers file is handed to asyncssh as authorized keys, each tagged with its peer's
    name; the name is read back only once authentication has completed, from the key
    whose signature asyncssh verified. A client may ask about any key without signing
    (the public-key query of RFC 4252): that proves nothing, and sets nothing here.
    """

    def __init__(self, keys: Callable[[], dict[str, PeerKey]]) -> None:
        self._keys = keys
        self._addr = "?"
        self._conn: asyncssh.SSHServerConnection | None = None
        self.peer: str | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        """Overridden to keep the connection, which the auth hooks need, and its address."""
        self._conn = conn
        peername = conn.get_extra_info("peername")
        self._addr = f"{peername[0]}:{peername[1]}" if peername else "?"

    def begin_auth(self, username: str) -> bool:
        """Overridden to take the peer keys afresh for each connection (a reloaded peers file
        applies to the next one); the user name is ignored, and auth always required."""
        if self._conn is not None:
            self._conn.set_authorized_keys(authorized_keys(self._keys()))
        return True

    def auth_completed(self) -> None:
        """The one place the peer's identity is set: after a verified signature."""
        names = None if self._conn is None else self._conn.get_key_option(_PEER_OPTION)
        if isinstance(names, list) and len(names) == 1 and names[0] in self._keys():
            self.peer = names[0]
        else:  # not reached: public keys from the peers file are the only way in
            log.warning("a connection from %s authenticated without a key of the peers "
                        "file: closed", self._addr)
            if self._conn is not None:
                self._conn.close()

    def password_auth_supported(self) -> bool:
        """Overridden to say so explicitly: only a key of the peers file names a peer."""
        return False

    def kbdint_auth_supported(self) -> bool:
        """Overridden to say so explicitly: only a key of the peers file names a peer."""
        return False

    def host_based_auth_supported(self) -> bool:
        """Overridden to say so explicitly: only a key of the peers file names a peer."""
        return False

    def public_key_auth_supported(self) -> bool:
        """Overridden: the one way in, and only with a signature (see the class docstring)."""
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Reached only for a key that is not in the peers file (asyncssh accepts the
        listed ones itself, from the authorized keys): refuse it, and say so."""
        log.warning("refused a connection from %s: key %s is not in the peers file",
                    self._addr, key.get_fingerprint())
        return False


async def listen(address: str, port: int, host_key: asyncssh.SSHKey,
                 keys: Callable[[], dict[str, PeerKey]], on_session: InboundHandler,
                 *, compress: bool = False) -> asyncssh.SSHAcceptor:
    """Accept peers on ``address:port``; each authenticated omirror channel runs
    ``on_session``. Shells, exec, SFTP and forwarding are all refused."""

    async def process(proc: asyncssh.SSHServerProcess[bytes]) -> None:
        """Runs only an omirror subsystem of an authenticated peer, and ends the session when
        its channel closes, even if the session stopped reading."""
        server = proc.get_extra_info("connection").get_owner()
        peer = getattr(server, "peer", None)
        if proc.subsystem not in SUBSYSTEMS or peer is None:
            proc.exit(1)
            return
        session = asyncio.ensure_future(on_session(peer, proc.subsystem, proc.stdin,
                                                   proc.stdout))
        gone = asyncio.ensure_future(proc.channel.wait_closed())
        try:
            # the end of the channel ends the session: one that has stopped reading (a
            # peer that floods it, or never answers) would not see its connection go
            await asyncio.wait((session, gone), return_when=asyncio.FIRST_COMPLETED)
            if not session.done():
                session.cancel()
                await asyncio.wait((session,))
            if not session.cancelled() and session.exception() is not None:
                raise session.exception()  # type: ignore[misc]
        finally:
            session.cancel()
            gone.cancel()
            proc.exit(0)

    return await asyncssh.listen(
        address, port, config=None, server_host_keys=[host_key],
        server_factory=lambda: _Server(keys), process_factory=process, encoding=None,
        allow_pty=False, x11_forwarding=False, agent_forwarding=False, allow_scp=False,
        sftp_factory=None, encryption_algs=CIPHERS, compression_algs=_compression(compress),
        keepalive_interval=KEEPALIVE_S, keepalive_count_max=KEEPALIVE_COUNT,
        login_timeout=30, line_editor=False, reuse_address=True,
        # what this side receives, a peer's log: the same big window and packets as a
        # link out asks for (asyncssh's defaults, 2 MiB and 32 KiB, made a 1 GiB file
        # 32,768 packets, each handled in Python on both sides)
        window=CHANNEL_WINDOW, max_pktsize=MAX_PACKET,
        # GSS-API off, whatever python-gssapi and a host keytab would allow: only a key
        # of the peers file says who a peer is
        gss_host=None, gss_kex=False, gss_auth=False, known_client_hosts=None,
        authorized_client_keys=None)


async def open_link(host: Host, host_key: asyncssh.SSHKey, peer_key: PeerKey, *,
                    compress: bool = False, subsystem: str = SUBSYSTEM
                    ) -> tuple[asyncssh.SSHClientConnection, asyncssh.SSHReader[bytes],
                               asyncssh.SSHWriter[bytes]]:
    """Connect to a peer, check its host key against the peers file, open the channel."""
    address, port = dial_address(host)
    conn = await asyncio.wait_for(asyncssh.connect(
        address, port, config=None, username=host.user or "omirror",
        client_keys=[host_key], known_hosts=([peer_key.key], [], []), agent_path=None,
        preferred_auth="publickey", encryption_algs=CIPHERS,
        compression_algs=_compression(compress), keepalive_interval=KEEPALIVE_S,
        keepalive_count_max=KEEPALIVE_COUNT, gss_host=None, gss_kex=False,
        gss_auth=False), CONNECT_TIMEOUT_S)
    try:
        writer, reader, _ = await conn.open_session(subsystem=subsystem, encoding=None,
                                                    window=CHANNEL_WINDOW, max_pktsize=MAX_PACKET)
    except BaseException:
        conn.close()
        raise
    return conn, reader, writer


def dial_address(host: Host) -> tuple[str, int]:
    """Where to dial ``host``: its address and port, unless ``$OMIRROR_TEST_DIAL`` says.

    Test-only (the fault tests route each link through a proxy they can cut):
    ``OMIRROR_TEST_DIAL="<peer name>=<address>:<port> ..."``. Identity, keys and the
    host-key check stay those of ``host``; only the TCP destination changes.
    """
    for item in os.environ.get("OMIRROR_TEST_DIAL", "").split():
        name, _, target = item.partition("=")
        address, _, port = target.rpartition(":")
        if name == host.name and address and port.isdigit():
            return address, int(port)
    return host.address, host.port


class Backoff:
    """Capped exponential backoff with jitter, reset by a link that stayed up."""

    def __init__(self, first_s: float = BACKOFF_FIRST_S, max_s: float = BACKOFF_MAX_S) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.delay_s = first_s

    def next(self) -> float:
        """The wait before this retry, jittered by up to 20% so peers that lost each other do
        not retry in step; the next one doubles, up to ``max_s``."""
        delay = self.delay_s * random.uniform(0.8, 1.2)
        self.delay_s = min(self.delay_s * 2, self.max_s)
        return delay

    def reset(self) -> None:
        """After a link that stayed up, or when the peer proved it is back by connecting in."""
        self.delay_s = self.first_s


async def keep_linked(host: Host, host_key: asyncssh.SSHKey,
                      key_of: Callable[[str], PeerKey | None], run: SessionHandler,
                      on_state: Callable[[str], None], *, compress: bool = False,
                      wake: asyncio.Event | None = None) -> None:
    """Keep one outbound link to ``host`` up for ever: connect, run, back off, retry.

    ``wake`` cuts a backoff short: the daemon sets it when the peer itself connects in,
    which proves it is back, so a returning host gets our changes at once rather than
    after up to ``BACKOFF_MAX_S``.
    """
    backoff = Backoff()
    wake = wake if wake is not None else asyncio.Event()
    while True:
        peer_key = key_of(host.name)
        if peer_key is None:
            on_state("down")
            log.warning("peer=%s has no line in the peers file: not connecting", host.name)
            await _pause(backoff.next(), wake)
            continue
        on_state("connecting")
        conn = None
        started = time.monotonic()
        try:
            conn, reader, writer = await open_link(host, host_key, peer_key,
                                                   compress=compress)
            on_state("up")
            log.info("peer=%s link out up", host.name)
            await run(host.name, reader, writer)
        except asyncio.CancelledError:
            raise
        except AskedAgain as e:  # the peer is there and wants the stream again: now
            log.info("peer=%s link out restarts: %s", host.name, e)
            backoff.reset()
            continue  # past the pause (``finally`` still closes this link)
        except _LINK_ERRORS as e:
            log.info("peer=%s link out down: %s", host.name, _describe(e))
        except Exception as e:  # a protocol error: the link closes, the daemon goes on
            log.warning("peer=%s link out closed: %s", host.name, _describe(e))
        finally:
            on_state("down")
            if conn is not None:
                conn.close()
        if time.monotonic() - started > BACKOFF_MAX_S:
            backoff.reset()
        if await _pause(backoff.next(), wake):
            backoff.reset()


async def _pause(seconds: float, wake: asyncio.Event) -> bool:
    """Sleep, or less if ``wake`` is set; True when woken (the event is cleared)."""
    try:
        await asyncio.wait_for(wake.wait(), seconds)
    except TimeoutError:
        return False
    wake.clear()
    return True


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, asyncssh.PermissionDenied):
        text += " (is this host's key in the peer's peers file?)"
    elif isinstance(error, asyncssh.HostKeyNotVerifiable):
        text += " (the peer's key differs from its line in the peers file)"
    return text
