"""What a running daemon says about itself: how far each peer is behind, and the text
``omirrord status`` prints from the daemon's status dict.

"Behind" is counted from the pusher's side, which is the only side that knows: our
last seq minus the seq up to which the peer has settled our log (see
``LinkStats.settled_seq``). The entries the pusher has not read yet include some it
will not send (the peer's own versions, paths of sets the peer does not share), so
while a link is down or catching up the count is an upper bound. The seconds behind are
the age of the oldest entry the peer has not settled, from the commit times this
daemon saw; entries recorded before it started count as old as its start (a lower
bound then).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any

from omirror.link import SKEW_WARN_S, LinkStats
from omirror.paths import show
from omirror.units import human_bytes

log = logging.getLogger(__name__)

#: The file in the state directory that holds the last status, for tools that read files.
STATUS_FILE = "status.json"
#: How often a running daemon rewrites it.
STATUS_EVERY_S = 0.5
#: Commit times are kept for this many commits; older ones collapse into one bound.
_KEEP = 100_000
#: Failing paths listed in status (all are counted): a disk full under a flood of files
#: could fail thousands, and the status is rewritten twice a second.
FAILING_SHOWN = 100


def failing_status(failing: dict[bytes, str]) -> dict[str, Any]:
    """The failing paths as status shows them: the first by path, escaped, and how many
    there are in all."""
    first = sorted(failing)[:FAILING_SHOWN]
    return {"failing": {show(p): failing[p] for p in first}, "failing_count": len(failing)}


def write_status_file(state_dir: str, status: dict[str, Any]) -> None:
    """Replace ``status.json`` at once (a reader never sees half of it); a state
    directory that cannot take it costs a debug line, not the daemon."""
    path = os.path.join(state_dir, STATUS_FILE)
    temp = path + ".tmp"
    try:
        with open(temp, "w") as f:
            json.dump(status, f)
        os.replace(temp, path)
    except OSError as e:
        log.debug("cannot write %s: %s", path, e)


class SeqTimes:
    """When each committed batch of the log was committed here, by its last seq."""

    def __init__(self, last_seq: int, now: float) -> None:
        # everything up to the log's end at start was committed no later than the start
        self._seqs = [last_seq]
        self._times = [now]

    def note(self, seq: int, now: float | None = None) -> None:
        """Called on the loop for each commit (a store listener); a seq not beyond the last
        noted is ignored, so the list stays sorted for :meth:`committed`."""
        if seq <= self._seqs[-1]:
            return
        self._seqs.append(seq)
        self._times.append(time.time() if now is None else now)
        if len(self._seqs) > 2 * _KEEP:
            # the newest dropped time stays as the bound for everything before it
            del self._seqs[:_KEEP - 1], self._times[:_KEEP - 1]

    def committed(self, seq: int) -> float | None:
        """When the entry ``seq`` was committed (or a time no earlier than that); None
        if its commit has not been noted yet (it is that recent)."""
        i = bisect.bisect_left(self._seqs, seq)
        return self._times[i] if i < len(self._times) else None


def behind(stats: LinkStats, last_seq: int, times: SeqTimes,
           now: float | None = None) -> dict[str, Any]:
    """How far a peer is behind our log: entries and seconds."""
    entries = max(0, last_seq - stats.settled_seq)
    seconds = 0.0
    if entries:
        now = time.time() if now is None else now
        committed = times.committed(stats.settled_seq + 1)
        seconds = 0.0 if committed is None else max(0.0, now - committed)
    return {"entries_behind": entries, "seconds_behind": round(seconds, 3)}


def link_status(stats: LinkStats, last_seq: int, times: SeqTimes) -> dict[str, Any]:
    """One peer's part of the status dict."""
    fields = asdict(stats)
    fields["in"] = fields.pop("inbound")
    fields["bwlimit_wait_s"] = round(stats.bwlimit_wait_s, 3)
    fields.update(behind(stats, last_seq, times))
    return fields


# -- the text of ``omirrord status`` --------------------------------------------------------

def render(status: dict[str, Any], now: float | None = None) -> str:
    """The daemon's status dict as an operator reads it: one block per peer, then the
    daemon's own state."""
    now = time.time() if now is None else now
    lines = [f"omirrord {status.get('name')} (pid {status.get('pid')}), up "
             f"{_age(now - status.get('started', now))}, {status.get('phase', 'running')}; "
             f"log at seq {status.get('last_seq')}"]
    for name, peer in sorted(status.get("peers", {}).items()):
        lines.append("")
        lines.append(f"peer {name}")
        lines.append(f"  link out  {_link(peer.get('out'), peer.get('out_since'), now)}")
        lines.append(f"  link in   {_link(peer.get('in'), peer.get('in_since'), now)}")
        entries = peer.get("entries_behind", 0)
        lag = "in step" if not entries else \
            f"{plural(entries, 'entry')}, {_age(peer.get('seconds_behind', 0.0))}"
        lines.append(f"  behind    {lag} (settled up to seq {peer.get('settled_seq', 0)})")
        skew = peer.get("skew_s", 0.0)
        warn = "  <- decides winners: run NTP" if abs(skew) > SKEW_WARN_S else ""
        lines.append(f"  skew      {skew:+.3f} s{warn}")
        lines.append(f"  sent      {human_bytes(peer.get('bytes_sent', 0))} "
                     f"({plural(peer.get('entries_sent', 0), 'entry')}, "
                     f"{human_bytes(peer.get('content_bytes_sent', 0))} content)")
        lines.append(f"  received  {human_bytes(peer.get('bytes_received', 0))} "
                     f"({plural(peer.get('entries_received', 0), 'entry')}, "
                     f"{human_bytes(peer.get('content_bytes_received', 0))} content)")
        if peer.get("compression", "none") != "none":
            lines.append(f"  compression {peer['compression']}")
        if peer.get("bwlimit_kib"):
            lines.append(f"  bwlimit   {peer['bwlimit_kib']} KiB/s per link, waited "
                         f"{_age(peer.get('bwlimit_wait_s', 0.0))} on it in all")
        if peer.get("last_error"):
            lines.append(f"  last error {peer['last_error']}")
    lines.append("")
    lines.append(f"queue         {status.get('queue', 0)} paths waiting to be indexed")
    scan = status.get("last_scan") or {}
    if scan:
        lines.append(f"last scan     {scan.get('why')} of {scan.get('set')}, "
                     f"{_age(now - scan.get('at', now))} ago, took "
                     f"{scan.get('seconds', 0.0):.3f} s, {scan.get('recorded', 0)} recorded")
    else:
        lines.append("last scan     none yet")
    lines.append(f"watched       {plural(status.get('watched_dirs', 0), 'directory')}")
    polled = status.get("polled") or []
    lines.append("polled        " + (", ".join(polled) if polled else "none")
                 + (" (inotify watch limit reached: raise fs.inotify.max_user_watches)"
                    if polled else ""))
    if status.get("stopped_sets"):
        lines.append(f"stopped sets  {', '.join(status['stopped_sets'])} (see the log)")
    low = status.get("low_disk") or {}
    lines.append("low disk      " + ("none" if not low else
                                    f"{len(low)} set(s), files from peers wait"))
    for title, text in sorted(low.items()):
        lines.append(f"  {title}: {text}")
    lines.append(f"conflicts     {status.get('conflicts', 0)}")
    specials = status.get("specials") or {}
    if specials:
        lines.append(f"specials      {plural(specials.get('runs', 0), 'run')}, "
                     f"{specials.get('failed', 0)} failed, "
                     f"{specials.get('queued', 0)} queued or running, "
                     f"{specials.get('gathering', 0)} bursts gathering, "
                     f"{specials.get('dropped', 0)} dropped")
    failing = status.get("failing") or {}
    count = status.get("failing_count", len(failing))
    lines.append(f"failing       {count or 'none'}")
    for path, error in sorted(failing.items()):
        lines.append(f"  {path}: {error}")
    if count > len(failing):
        lines.append(f"  ... and {count - len(failing)} more")
    return "\n".join(lines)


def plural(n: int, noun: str) -> str:
    """Enough English for the nouns shown here: ``entry`` makes ``entries``, but a noun
    like ``day`` would come out wrong."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun[:-1]}ies" if noun.endswith("y") else f"{n} {noun}s"


def _link(state: str | None, since: float | None, now: float) -> str:
    if not since:
        return f"{state or 'down'}"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    return f"{state or 'down'} since {when} ({_age(now - since)})"


def _age(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    if days:
        return f"{days}d{h:02d}h{m:02d}m"
    if hours:
        return f"{hours}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s"


