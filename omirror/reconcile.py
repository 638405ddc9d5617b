"""Reconciliation on demand: ``--check`` prints the plan, ``--once`` carries it out.

``--check`` is dry to the last byte: it reads the local store without writing it (not
even SQLite's side files), scans the trees without recording anything, reads each peer's
index over the ``omirror-index-1`` channel, and decides every path exactly as a receiver
would (``entry.decide``), so its plan is what the daemons would do. It works whether or
not a daemon runs here; the peers' daemons must run to answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from omirror import config as config_module
from omirror import peerkeys, peers
from omirror.clock import now_ns
from omirror.config import Config, Host, MirrorSet, set_for
from omirror.entry import Entry, Kind, Outcome, Stamp, decide
from omirror.errors import OmirrorError, RootError, StoreError
from omirror.link import LinkStats, Stream, check_hello
from omirror.paths import logical, show
from omirror.scanner import Scanner
from omirror.store import Store
from omirror.wire import (
    INDEX_SUBSYSTEM,
    PROTOCOL_VERSION,
    Bye,
    EntryMsg,
    Hello,
    IHave,
    ProtocolError,
    Start,
)

log = logging.getLogger(__name__)

SEND, RECEIVE, DELETE_HERE, DELETE_THERE = "send", "receive", "delete here", "delete there"
CONFLICT, DIFFERS = "conflict", "differs"
ACTIONS = (SEND, RECEIVE, DELETE_HERE, DELETE_THERE, CONFLICT, DIFFERS)


@dataclass(frozen=True)
class PlanItem:
    """What reconciling one path with one peer would do, and why."""

    peer: str
    path: bytes
    action: str
    ours: Entry | None
    theirs: Entry | None
    reason: str

    def line(self) -> str:
        """``ACTION PATH  PEER: REASON``, a form docs/contract.rst promises to scripts."""
        return f"{self.action:<12} {show(self.path)}  {self.peer}: {self.reason}"

    def as_json(self) -> dict[str, Any]:
        """One element of the contract's ``plan``: stamps as ``TIME_NS@ORIGIN``, exact, not
        the rounded :func:`when` of the reasons."""
        return {"peer": self.peer, "path": show(self.path),
                "action": self.action, "reason": self.reason,
                "ours": None if self.ours is None else str(self.ours.stamp),
                "theirs": None if self.theirs is None else str(self.theirs.stamp)}


@dataclass
class CheckReport:
    """The plan with every peer that answered, and who did not."""

    items: list[PlanItem] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)  # peer -> paths compared
    unreachable: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """The contract's status: an unreachable peer counts only when no peer answered."""
        if self.errors or not self.checked:
            return 2
        return 1 if self.items else 0

    def summary(self) -> str:
        """The text output's last line, and ``summary`` in JSON; "paths" is the largest
        count of any one peer, not a sum."""
        peers_text = f"{len(self.checked)} peer{'s' if len(self.checked) != 1 else ''}"
        if not self.checked:
            return "no peer could be checked"
        if not self.items:
            text = f"in sync with {peers_text} ({max(self.checked.values())} paths)"
        else:
            counts = {a: sum(1 for i in self.items if i.action == a) for a in ACTIONS}
            text = (f"{len(self.items)} difference{'s' if len(self.items) != 1 else ''} "
                    f"with {peers_text}: " + ", ".join(f"{n} {a}" for a, n in counts.items()
                                                       if n))
        if self.unreachable:
            text += "; not reached: " + ", ".join(sorted(self.unreachable))
        return text

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` object of docs/contract.rst; ``in_sync`` is exactly exit status 0."""
        return {"plan": [i.as_json() for i in self.items], "checked": self.checked,
                "unreachable": self.unreachable, "errors": self.errors,
                "summary": self.summary(), "in_sync": self.exit_code == 0}


def when(stamp: Stamp) -> str:
    """A stamp as the reasons show it to people: UTC, cut to the millisecond."""
    seconds, ns = divmod(stamp.time_ns, 10**9)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            + f".{ns // 10**6:03d}Z@{stamp.origin}")


def _live(entry: Entry | None) -> bool:
    return entry is not None and not entry.is_tombstone


def compare(peer: str, local: dict[bytes, Entry], remote: dict[bytes, Entry],
            sets: tuple[MirrorSet, ...], *, force: bool = False) -> list[PlanItem]:
    """Decide every path both sides know of, as the receivers would."""
    items: list[PlanItem] = []
    for path in sorted(set(local) | set(remote)):
        if set_for(path, sets) is None:
            continue
        ours, theirs = local.get(path), remote.get(path)
        if not _live(ours) and not _live(theirs):
            continue  # absent or deleted on both sides
        item = _compare_one(peer, path, ours, theirs, force)
        if item is not None:
            items.append(item)
    return items


def _compare_one(peer: str, path: bytes, ours: Entry | None, theirs: Entry | None,
                 force: bool) -> PlanItem | None:
    def item(action: str, reason: str) -> PlanItem:
        return PlanItem(peer, path, action, ours, theirs, reason)

    if theirs is None:
        return item(SEND, f"they do not have it; ours is {when(ours.stamp)}")  # type: ignore[union-attr]
    if ours is None:
        return item(RECEIVE, f"we do not have it; theirs is {when(theirs.stamp)}")
    if ours.stamp == theirs.stamp:
        if force and ours.kind is Kind.FILE and theirs.kind is Kind.FILE \
                and ours.digest != theirs.digest:
            return item(DIFFERS, f"the same version {when(ours.stamp)} has different "
                                 "content on each side (found by -f)")
        return None
    if ours.same_content(theirs):
        return None  # two stamps for what is the same on disk: nothing would change
    decision = decide(ours, theirs)
    if decision.outcome is Outcome.ALREADY:
        return None
    take = decision.outcome is Outcome.TAKE
    newer, older = (theirs, ours) if take else (ours, theirs)
    side = "theirs" if take else "ours"
    reason = f"{side} {when(newer.stamp)} is newer than {when(older.stamp)}"
    if decision.loser is not None:
        return item(CONFLICT, f"both changed it: {reason}; the other is kept as a "
                              "conflict copy")
    if decision.concurrent:
        reason += " (made concurrently)"
    if take:
        return item(DELETE_HERE if theirs.is_tombstone else RECEIVE, reason)
    return item(DELETE_THERE if ours.is_tombstone else SEND, reason)


class Checker:
    """Everything ``--check`` needs, opened without writing anything."""

    def __init__(self, config_path: str, name: str | None, root: str, state_dir: str,
                 peers_path: str, *, force: bool, compress: bool) -> None:
        self.config: Config = config_module.load(config_path)
        self.me: Host = self.config.find_self(name)
        self.keys = peerkeys.load_peers(peers_path)
        self.host_key = peerkeys.load_host_key(state_dir)
        self.root = os.fsencode(os.path.abspath(root))
        self.state_dir = state_dir
        self.force = force
        self.compress = compress

    def local_view(self, report: CheckReport) -> dict[bytes, Entry]:
        """This host's versions: the store, overlaid with what a scan would record now."""
        try:
            store = Store.open_readonly(self.state_dir)
        except StoreError as e:
            log.info("%s: comparing as a host that holds nothing yet", e)
            store = Store.open(":memory:")
        view: dict[bytes, Entry] = {}
        try:
            scanner = Scanner(store, self.me.name)
            for mset in self.config.sets_of(self.me.name):
                try:
                    stats = scanner.scan_set(mset, self.root, dry_run=True, force=self.force)
                except RootError as e:
                    report.errors.append(str(e))
                    continue
                for top in mset.files:
                    for record in store.under(logical(top)):
                        view[record.entry.path] = record.entry
                for entry in stats.changes:
                    view[entry.path] = entry
        finally:
            store.close()
        return view

    async def fetch_index(self, host: Host) -> dict[bytes, Entry]:
        """A peer's whole index of the sets we share, read over the index channel."""
        key = self.keys.get(host.name)
        if key is None:
            raise OmirrorError(f"{host.name} has no line in the peers file")
        conn, reader, writer = await peers.open_link(host, self.host_key, key,
                                                     compress=self.compress,
                                                     subsystem=INDEX_SUBSYSTEM)
        try:
            io = Stream(reader, writer, LinkStats())
            check_hello(await io.expect(Hello), host.name, io.stats)
            await io.send(Hello(PROTOCOL_VERSION, self.me.name, "", now_ns()))
            await io.send(IHave("", 0))
            await io.expect(Start)
            index: dict[bytes, Entry] = {}
            while True:
                msg = await io.recv()
                if isinstance(msg, EntryMsg):
                    index[msg.entry.path] = msg.entry
                elif isinstance(msg, Bye):
                    return index
                else:
                    raise ProtocolError(f"an index does not hold {type(msg).__name__}")
        finally:
            conn.close()

    async def check(self) -> CheckReport:
        """Asks every peer at once; one that fails is reported as unreachable, not raised
        (only cancellation and Ctrl-C are)."""
        report = CheckReport()
        local = await asyncio.to_thread(self.local_view, report)
        hosts: dict[str, Host] = {}
        for mset in self.config.sets_of(self.me.name):
            for host in mset.peers_of(self.me.name):
                hosts.setdefault(host.name, host)
        results = await asyncio.gather(*(self.fetch_index(h) for h in hosts.values()),
                                       return_exceptions=True)
        for host, result in zip(hosts.values(), results):
            if isinstance(result, BaseException):
                if isinstance(result, (asyncio.CancelledError, KeyboardInterrupt)):
                    raise result
                report.unreachable[host.name] = str(result) or type(result).__name__
                continue
            shared = tuple(m for m in self.config.sets_of(self.me.name)
                           if m.has_host(host.name))
            report.items.extend(compare(host.name, local, result, shared, force=self.force))
            report.checked[host.name] = len(set(local) | set(result))
        if not hosts:
            report.errors.append(f"{self.me.name} has no peer in {self.config.path}")
        elif not report.checked:
            report.errors.append("no peer could be reached: " + "; ".join(
                f"{name}: {why}" for name, why in sorted(report.unreachable.items())))
        return report


def render(report: CheckReport, as_json: bool) -> str:
    """The ``--check`` output as docs/contract.rst fixes it: the summary line always last."""
    if as_json:
        return json.dumps(report.as_json(), indent=2)
    lines = [item.line() for item in report.items]
    lines += [f"unreachable  {name}: {why}" for name, why in sorted(report.unreachable.items())]
    lines += [f"error        {error}" for error in report.errors]
    lines.append(report.summary())
    return "\n".join(lines)
