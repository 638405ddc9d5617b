"""Who a connecting peer is, and what the SSH layer accepts before and after that.

Real asyncssh connections on 127.0.0.1, in this process: the listener of omirror/peers.py
and clients that behave as an attacker would (asking about a peer's key without holding
it, offering pre-authentication compression, sending a packet that inflates a
thousandfold).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from typing import Any

import asyncssh
import pytest

from omirror import peers
from omirror.peerkeys import PeerKey
from omirror.wire import SUBSYSTEM


def key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


class Listener:
    """``peers.listen`` with two listed peers, recording who each session says it is
    and every server connection made."""

    def __init__(self) -> None:
        self.host_key = key()
        self.alpha, self.beta = key(), key()
        self.keys = {"alpha": PeerKey("alpha", self.alpha, 1),
                     "beta": PeerKey("beta", self.beta, 2)}
        self.sessions: list[str] = []
        self.servers: list[peers._Server] = []
        self.conns: list[asyncssh.SSHServerConnection] = []
        self.port = 0
        self.acceptor: asyncssh.SSHAcceptor | None = None

    async def start(self, *, compress: bool = False) -> None:
        async def on_session(peer: str, subsystem: str, reader: Any, writer: Any) -> None:
            self.sessions.append(peer)

        self.acceptor = await peers.listen("127.0.0.1", 0, self.host_key, lambda: self.keys,
                                           on_session, compress=compress)
        self.port = self.acceptor.get_port()

    async def connect(self, client_key: asyncssh.SSHKey, **kw: Any) -> asyncssh.SSHClientConnection:
        options = {"known_hosts": None, "client_keys": [client_key], "username": "x",
                   "agent_path": None, "config": None, "gss_host": None,
                   "preferred_auth": "publickey", **kw}
        return await asyncio.wait_for(asyncssh.connect("127.0.0.1", self.port, **options), 10)

    async def session_of(self, conn: asyncssh.SSHClientConnection) -> str:
        writer, _, _ = await conn.open_session(subsystem=SUBSYSTEM, encoding=None)
        for _ in range(200):
            if self.sessions:
                break
            await asyncio.sleep(0.01)  # the server's session task runs in this loop
        writer.close()
        return self.sessions[-1]


@pytest.fixture
async def listener(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Listener]:
    made = Listener()
    real = peers._Server.connection_made

    def connection_made(self: peers._Server, conn: asyncssh.SSHServerConnection) -> None:
        made.servers.append(self)
        made.conns.append(conn)
        real(self, conn)

    monkeypatch.setattr(peers._Server, "connection_made", connection_made)
    yield made
    if made.acceptor is not None:
        made.acceptor.close()
        await made.acceptor.wait_closed()


class _AnyoneGSS:
    """What asyncssh builds where python-gssapi and a host keytab exist: a GSS acceptor
    (its realm's users could then log in by GSS-API)."""

    mechs: list[bytes] = []
    complete = False

    def __init__(self, host: str, store: object) -> None:
        self.host = host

    def reset(self) -> None:
        pass


async def test_gss_api_is_never_offered_even_where_it_is_available(
        listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncssh turns GSS-API authentication and key exchange on for a server when it can
    build a GSS acceptor (python-gssapi and a host keytab, common on FreeIPA and AD hosts);
    a realm user could then log in without a key of the peers file. The listener turns
    both off explicitly, whatever this host has."""
    monkeypatch.setattr(asyncssh.connection, "GSSServer", _AnyoneGSS)
    await listener.start()
    conn = await listener.connect(listener.alpha)
    try:
        assert await listener.session_of(conn) == "alpha"
        server_conn = listener.conns[-1]
        assert server_conn._gss is None
        assert not server_conn._gss_auth and not server_conn._gss_kex
        assert not server_conn.gss_mic_auth_supported()
    finally:
        conn.close()


async def test_asking_about_a_key_sets_no_identity(listener: Listener) -> None:
    """A client may ask whether a key would do (a public-key query, RFC 4252 7) without
    holding it. That proves nothing: the identity comes only from the key whose
    signature asyncssh verified, once authentication has completed. (Before, the query
    itself set the identity, and any other way in, GSS-API, would have kept it.)"""
    await listener.start()
    server = peers._Server(lambda: listener.keys)
    public_alpha = asyncssh.import_public_key(listener.alpha.export_public_key())
    server.validate_public_key("x", public_alpha)  # what asyncssh calls for a query
    assert server.peer is None
    conn = await listener.connect(listener.beta)
    try:
        assert await listener.session_of(conn) == "beta"
        assert listener.servers[-1].peer == "beta"
    finally:
        conn.close()


async def test_a_key_not_in_the_peers_file_gets_no_session(listener: Listener) -> None:
    await listener.start()
    with pytest.raises(asyncssh.PermissionDenied):
        await listener.connect(key())
    assert listener.sessions == []


async def test_plain_zlib_is_never_negotiated(listener: Listener) -> None:
    """Plain ``zlib`` inflates from the end of key exchange, before the client has
    authenticated; only ``zlib@openssh.com`` (after authentication) is offered."""
    await listener.start(compress=True)
    with pytest.raises(asyncssh.KeyExchangeFailed):
        await listener.connect(listener.alpha, compression_algs=["zlib"])
    conn = await listener.connect(listener.alpha, compression_algs=["zlib@openssh.com"])
    try:
        assert await listener.session_of(conn) == "alpha"
        assert conn.get_extra_info("recv_compression") == "zlib@openssh.com"
    finally:
        conn.close()
    assert "zlib" not in peers._compression(True)


def test_inflating_one_packet_is_bounded() -> None:
    """64 KiB of zeros, deflated, inflate to 64 MiB; one SSH packet never needs more
    than a few hundred KiB. Beyond INFLATE_MAX the packet is refused (asyncssh then
    closes the connection), and nothing close to the bomb's size is ever made."""
    bomb = zlib.compressobj()
    packet = bomb.compress(b"\0" * (64 << 20)) + bomb.flush(zlib.Z_SYNC_FLUSH)
    assert len(packet) < 128 << 10
    inflate = peers._BoundedInflate()
    assert inflate.decompress(packet) is None
    fine = zlib.compressobj()
    small = fine.compress(b"x" * 1000) + fine.flush(zlib.Z_SYNC_FLUSH)
    assert peers._BoundedInflate().decompress(small) == b"x" * 1000
    assert asyncssh.compression.get_decompressor(b"zlib@openssh.com").__class__ \
        is peers._BoundedInflate
