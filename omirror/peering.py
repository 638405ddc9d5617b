"""This daemon's links: one out to each peer (our log, pushed), the ones peers open in
(their logs, received), and the one-shot sessions of a peer's ``--once`` and ``--check``.

Links out are kept up for ever with backoff (omirror/peers.py); a peer that connects in
cuts that backoff short, since it is plainly back. A link in from a peer replaces that
peer's earlier one. ``omirrord log replay`` restarts a link out from an earlier seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncssh

from omirror import config as config_module
from omirror import peers
from omirror.config import Host
from omirror.errors import OmirrorError
from omirror.hostsets import HostSets
from omirror.link import Context, LinkStats
from omirror.peerkeys import PeerKey
from omirror.push import Pusher
from omirror.receive import Receiver
from omirror.status import SeqTimes, link_status
from omirror.wire import INDEX_SUBSYSTEM, PULL_SUBSYSTEM, SUBSYSTEM

log = logging.getLogger(__name__)

#: How long a stop waits for the links to end their jobs.
STOP_GRACE_S = 10.0


class Peering:
    """Every link of this daemon, and their counters (kept across reconnects)."""

    def __init__(self, sets: HostSets, ctx: Context, host_key: asyncssh.SSHKey,
                 keys: Callable[[], dict[str, PeerKey]], *, compress: bool) -> None:
        self.sets = sets
        self.ctx = ctx
        self.host_key = host_key
        self.keys = keys
        self.compress = compress
        self.stats: dict[str, LinkStats] = {}
        self.stopping = False
        self._out: dict[str, asyncio.Task[None]] = {}
        self._inbound: dict[str, asyncio.Task[None]] = {}
        #: Per peer: set when it connects in, so our link out to it stops backing off.
        self._peer_back: dict[str, asyncio.Event] = {}

    def stats_of(self, peer: str) -> LinkStats:
        stats = self.stats.get(peer)
        if stats is None:
            stats = self.stats[peer] = LinkStats(bwlimit_kib=self.ctx.bwlimit_kib)
        return stats

    def start(self) -> None:
        """A link out to every peer of a running set; links to former peers end."""
        wanted = self.sets.peers()
        for name in list(self._out):
            if name not in wanted:
                self._out.pop(name).cancel()
        for name, host in wanted.items():
            if name not in self._out:
                self._out[name] = asyncio.create_task(self._link_out(host), name=f"out:{name}")

    async def close(self) -> None:
        """End every link, waiting (bounded) for what they are doing."""
        self.stopping = True
        tasks = [*self._out.values(), *self._inbound.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_GRACE_S)

    def status(self, last_seq: int, times: SeqTimes) -> dict[str, Any]:
        """Each peer's links and how far behind it is, for ``omirrord status``."""
        return {name: link_status(s, last_seq, times) for name, s in self.stats.items()}

    def links_out(self) -> dict[str, str]:
        return {name: self.stats_of(name).out for name in self.sets.peers()}

    async def _link_out(self, host: Host, replay_from: int | None = None) -> None:
        stats = self.stats_of(host.name)

        def on_state(state: str) -> None:
            stats.out = state
            stats.out_since = time.time()

        async def run(peer: str, reader: Any, writer: Any) -> None:
            nonlocal replay_from
            conn = writer.get_extra_info("connection")
            stats.compression = conn.get_extra_info("send_compression") or "none"
            pusher = Pusher(self.ctx, peer, reader, writer, stats, replay_from=replay_from)
            try:
                await pusher.run()
            finally:
                if pusher.examined is not None:
                    replay_from = None  # started: the peer's cursor carries it on

        await peers.keep_linked(host, self.host_key, self.keys().get, run, on_state,
                                compress=self.compress,
                                wake=self._peer_back.setdefault(host.name, asyncio.Event()))

    async def inbound(self, peer: str, subsystem: str, reader: Any, writer: Any) -> None:
        """A session a peer opened: its log to receive, or a one-shot request."""
        if not self.sets.shared_with(peer):
            log.warning("peer=%s connected but shares no set with this host", peer)
            return
        if subsystem != SUBSYSTEM:
            await self._serve_once(peer, subsystem, reader, writer)
            return
        previous = self._inbound.get(peer)
        if previous is not None and not previous.done():
            previous.cancel()  # the peer reconnected: its old session is dead
        task = asyncio.current_task()
        assert task is not None
        self._inbound[peer] = task
        stats = self.stats_of(peer)
        stats.inbound, stats.in_since = "up", time.time()
        log.info("peer=%s link in up", peer)
        if stats.out != "up":
            self._peer_back.setdefault(peer, asyncio.Event()).set()
        try:
            await Receiver(self.ctx, peer, reader, writer, stats).run()
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.IncompleteReadError, ConnectionError, asyncssh.Error) as e:
            log.info("peer=%s link in down: %s", peer, e or type(e).__name__)
        except Exception as e:  # a protocol error or a bug in one link: not the daemon's end
            log.warning("peer=%s link in closed: %s", peer, e, exc_info=not isinstance(
                e, OmirrorError))
        finally:
            if self._inbound.get(peer) is task:
                del self._inbound[peer]
                stats.inbound, stats.in_since = "down", time.time()

    async def _serve_once(self, peer: str, subsystem: str, reader: Any, writer: Any) -> None:
        """A peer's ``--once`` pulls our log, or its ``--check`` reads our index."""
        index = subsystem == INDEX_SUBSYSTEM
        log.info("peer=%s asks for our %s", peer, "index (--check)" if index else
                 "log once (--once)")
        try:
            await Pusher(self.ctx, peer, reader, writer, self.stats_of(peer),
                         once=True, index=index).run()
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.IncompleteReadError, ConnectionError, asyncssh.Error,
                OmirrorError) as e:
            log.info("peer=%s %s session ended: %s", peer, subsystem, e or type(e).__name__)

    async def once_with(self, host: Host) -> None:
        """``--once``: push our log to ``host`` and pull its log, both until caught up."""
        key = self.keys().get(host.name)
        if key is None:
            raise OmirrorError("no line in the peers file")
        stats = self.stats_of(host.name)

        async def push() -> None:
            conn, reader, writer = await peers.open_link(host, self.host_key, key,
                                                         compress=self.compress)
            try:
                await Pusher(self.ctx, host.name, reader, writer, stats, once=True).run()
            finally:
                conn.close()

        async def pull() -> None:
            conn, reader, writer = await peers.open_link(host, self.host_key, key,
                                                         compress=self.compress,
                                                         subsystem=PULL_SUBSYSTEM)
            try:
                await Receiver(self.ctx, host.name, reader, writer, stats, once=True).run()
            finally:
                conn.close()

        await asyncio.gather(push(), pull())

    async def replay(self, peer: str, from_seq: int) -> str:
        """``omirrord log replay``: restart the link out to ``peer`` with its stream
        starting at ``from_seq``; returns the peer's name as the Distfile spells it."""
        hosts = self.sets.peers()
        name = peer
        with contextlib.suppress(OmirrorError):
            name = config_module.parse_host(peer, "--peer").name
        if name not in hosts:
            raise OmirrorError(f"{peer} is not a peer of {self.sets.me.name}; its peers are "
                               f"{', '.join(sorted(hosts)) or 'none'}")
        if not self._out or self.stopping:
            raise OmirrorError("omirrord is starting or stopping; its links are not up")
        old = self._out.pop(name, None)
        if old is not None:
            old.cancel()

        async def relink() -> None:
            if old is not None:
                await asyncio.wait([old])  # its last state change comes before ours
            await self._link_out(hosts[name], replay_from=from_seq)

        self._out[name] = asyncio.create_task(relink(), name=f"out:{name}")
        log.info("peer=%s replay of our log from seq %d requested", name, from_seq)
        return name
