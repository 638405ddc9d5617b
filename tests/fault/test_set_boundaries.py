"""Set boundaries: what a host may send to a peer, and nested sets kept live.

A Distfile may carve a path out of a set (``except``) and give it to a second set that
only some hosts share::

    pub:  ( /data )         -> ( a b c )  install ; except /data/private ;
    priv: ( /data/private ) -> ( a c )    install ;

``data/private`` is mirrored between a and c, never with b. docs/security.rst promises
that a peer is sent only the entries, and the content, of the sets it shares, and that
the name of a path in a set a peer does not share never reaches it. These tests count
what crosses the wire, not only what lands: b is played by the test (``puller.Puller``,
with b's own key over a real SSH link, on the pull subsystem ``omirror-pull-1``), and
every frame a sends it is kept. A receiver that refuses what it should never have been
sent has already seen its name, size, digest and, for a small file, its content.

The same nesting without a restricted host (``/data`` excluding ``/data/cache``, and a
second set ``/data/cache``) must be mirrored live like any set: the watcher, the
indexer and ``omirrord sync`` must not hand a path to the outer set, which excludes it,
when the inner set holds it.

Nothing here sleeps to synchronise: every wait is on a condition, with a bound.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from cluster import Cluster
from hostile import digest_of
from puller import Puller

from omirror.wire import Data, EntryMsg, NoData, Want

MakeCluster = Callable[..., Cluster]

KIB = 1 << 10
#: How long a handful of small changes may take to reach a peer: far above the ~0.1 s
#: it takes, far below "only the hourly rescan sends it".
LIVE_BOUND_S = 10.0
#: Startup (scan, links up, a first transfer) for a cluster of three.
SETTLE_S = 30.0
A, B, C = 0, 1, 2
SMALL = b"the small secret of data/private\n"
PUB = b"everybody may read this\n"


# ------------------------------------------------------------------------------ helpers

def write_conf(c: Cluster, text: str) -> None:
    c.conf.write_text(text)
    os.chmod(c.conf, 0o600)


def holds(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return False


def private_set(make_cluster: MakeCluster) -> Cluster:
    """Three hosts a, b, c (peers 0, 1, 2): ``pub`` = /data on all three except
    /data/private, ``priv`` = /data/private on a and c only. data/private exists under
    a's and c's roots (b, which does not mirror it, has none). Not started."""
    c = make_cluster(3)
    a, b, cc = c[A].name, c[B].name, c[C].name
    write_conf(c, f"pub: ( /data ) -> ( {a} {b} {cc} )\n"
                  "\tinstall ;\n"
                  "\texcept /data/private ;\n"
                  f"priv: ( /data/private ) -> ( {a} {cc} )\n"
                  "\tinstall ;\n")
    for i in (A, C):
        (c[i].data / "private").mkdir()
    return c


def is_private(path: bytes | None) -> bool:
    return path is not None and (path == b"data/private" or path.startswith(b"data/private/"))


def crossing(p: Puller, secrets: dict[str, bytes]) -> list[str]:
    """Every frame received that names a path of data/private or carries a byte string
    equal to one of the secrets' contents, described."""
    out = []
    for m in p.received:
        if isinstance(m, EntryMsg):
            e = m.entry
            if is_private(e.path) or is_private(e.moved_from) \
                    or (m.data is not None and m.data in secrets.values()):
                inline = "" if m.data is None else f", {len(m.data)} bytes inline"
                moved = "" if e.moved_from is None else f", moved_from {e.moved_from!r}"
                out.append(f"ENTRY seq {m.seq} {e.path!r} ({e.kind.name}, size {e.size},"
                           f" digest {e.digest.hex() or '-'}{inline}{moved})")
        elif isinstance(m, Data) and m.data:
            out.append(f"DATA for request {m.want_id}: {len(m.data)} bytes")
    return out


def omirrord(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as an operator runs it; subprocess.run waits for it (and kills it if it
    outlives its timeout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
    return subprocess.run([sys.executable, "-m", "omirror", *args], check=False,
                          capture_output=True, text=True, timeout=60, env=env,
                          stdin=subprocess.DEVNULL)


# ------------------------------------------------------------------------------ excluded paths

def test_a_path_excluded_for_a_peer_never_leaves_for_it(make_cluster: MakeCluster) -> None:
    """Count what crosses, not only what lands: b pulls a's log with b's own key, and no
    frame a sends it names a path of data/private (the directory or anything under it),
    or carries a secret's content; asked by name and exact digest, a answers NODATA.
    Today a pushes data/private's entries to b (name, size, digest, inline content of
    the small one) and serves the big one's content to a WANT: only b's own refusal on
    arrival kept them out of its tree."""
    c = private_set(make_cluster)
    big = os.urandom(200 * KIB)
    secrets = {"secret-small": SMALL, "secret-big": big}
    # written before a starts: its startup scan records them in set priv (the live
    # watching of a nested set is test_nested_sets_are_watched_and_mirrored_live)
    for name, data in secrets.items():
        (c[A].data / "private" / name).write_bytes(data)
    (c[A].data / "pub.txt").write_bytes(PUB)
    c.start(A)
    c.start(C)
    c.wait_until(lambda: all(holds(c[C].data / "private" / n, d) for n, d in secrets.items())
                 and holds(c[C].data / "pub.txt", PUB), SETTLE_S,
                 "c holds both secrets and data/pub.txt (a and c mirror set priv)")

    with Puller(c, me=B, target=A).connect() as p:
        p.greet_as_receiver()
        p.send(Want(1, b"data/private/secret-big", digest_of(big), 0, ()))
        answer = p.answer_to(1)
        p.pull()
        got = p.entry_of(b"data/pub.txt")
        assert got is not None and got[1] == PUB, (
            f"the pull did not carry data/pub.txt with its content: {got}; entries: "
            f"{[m.entry.path for m in p.entry_msgs()]}")
        crossed = crossing(p, secrets)
        assert not crossed, (
            f"a sent peer b, which does not share set priv, {len(crossed)} frames about "
            "data/private:\n  " + "\n  ".join(crossed))
        assert [type(m) for m in answer] == [NoData], (
            "a WANT naming data/private/secret-big by its real digest was answered with "
            + ", ".join(f"{type(m).__name__}({len(m.data)} bytes)" if isinstance(m, Data)
                        else repr(m) for m in answer))


def test_a_path_excluded_for_a_peer_is_never_offered_to_its_daemon(
        make_cluster: MakeCluster) -> None:
    """The same with a real daemon b: once a and c have settled with b everything their
    logs hold, b's log does not mention data/private at all (not even to refuse it: a
    refusal means the name, size, digest and small content crossed the wire), and b's
    tree has no data/private. Today b logs "sent a path that is refused here: ...
    excluded here by set pub" for each of them, from a and from c alike."""
    c = private_set(make_cluster)
    big = os.urandom(200 * KIB)
    secrets = {"secret-small": SMALL, "secret-big": big}
    for name, data in secrets.items():
        (c[A].data / "private" / name).write_bytes(data)
    (c[A].data / "pub.txt").write_bytes(PUB)
    c.start()

    c.wait_until(lambda: all(holds(c[C].data / "private" / n, d) for n, d in secrets.items())
                 and holds(c[B].data / "pub.txt", PUB), SETTLE_S,
                 "c holds both secrets and b holds data/pub.txt")

    def settled_with_b(i: int) -> bool:
        """In a status written from now on (so c's log holds the secrets it applied),
        peer ``i`` says b has settled everything its log holds."""
        status = c.fresh_status(i)
        link = status.get("peers", {}).get(c[B].name)
        return link is not None and link.get("out") == "up" \
            and link.get("entries_behind") == 0 and status.get("last_seq", 0) > 0

    c.wait_until(lambda: settled_with_b(A) and settled_with_b(C), SETTLE_S,
                 "a and c say b has settled everything in their logs")
    mentions = [line for line in c.log_text(B).splitlines() if "private" in line]
    assert not mentions, (f"b's log mentions data/private {len(mentions)} times, so its "
                          "entries were sent to b:\n  " + "\n  ".join(mentions[:10]))
    assert not os.path.lexists(c[B].data / "private"), "b's tree holds data/private"


def test_a_rename_out_of_an_excluded_path_does_not_name_it(make_cluster: MakeCluster) -> None:
    """A file of data/private renamed on a to data/renamed.txt reaches b as a plain new
    file: its ENTRY carries the content and no moved_from naming anything under
    data/private (docs/security.rst: the name of a path in a set a peer does not share
    never reaches it). Today the scanner takes the old name, which the outer set's root
    holds though it excludes it, for the rename's source, and b is told
    "moved_from data/private/old-name". The same for a rename made while a is down and
    found by its startup scan (no watcher event pairs the two names then: only the
    scanner's inode match can mistake it for a rename)."""
    c = private_set(make_cluster)
    live = b"recorded under data/private first, then renamed out\n"
    offline = b"recorded under data/private, renamed out while a was down\n"
    (c[A].data / "private" / "old-name").write_bytes(live)
    (c[A].data / "private" / "old-name-2").write_bytes(offline)
    c.start(A)
    c.start(C)
    c.wait_until(lambda: holds(c[C].data / "private" / "old-name", live)
                 and holds(c[C].data / "private" / "old-name-2", offline), SETTLE_S,
                 "c holds data/private/old-name and old-name-2 (recorded by a in set priv)")
    os.rename(c[A].data / "private" / "old-name", c[A].data / "renamed.txt")
    c.wait_until(lambda: holds(c[C].data / "renamed.txt", live), LIVE_BOUND_S,
                 "c holds data/renamed.txt (a recorded the rename)")
    c.stop(A)
    os.rename(c[A].data / "private" / "old-name-2", c[A].data / "renamed-offline.txt")
    c.start(A)
    c.wait_until(lambda: holds(c[C].data / "renamed-offline.txt", offline), SETTLE_S,
                 "c holds data/renamed-offline.txt (a's startup scan recorded it)")

    with Puller(c, me=B, target=A).connect() as p:
        p.greet_as_receiver()
        p.pull()
        for path, content in ((b"data/renamed.txt", live),
                              (b"data/renamed-offline.txt", offline)):
            got = p.entry_of(path)
            assert got is not None, (f"a did not send {path!r} to b; entries: "
                                     f"{[m.entry.path for m in p.entry_msgs()]}")
            entry, data = got
            assert not is_private(entry.moved_from), (
                f"the ENTRY of {path!r} sent to b names its source in data/private: "
                f"moved_from={entry.moved_from!r}")
            assert data == content, (f"{path!r} reached b without its content "
                                     f"(inline: {data!r}): a plain new file carries it")


# ------------------------------------------------------------------------------ nested sets

def nested_sets(make_cluster: MakeCluster, **kw: object) -> Cluster:
    """Two peers: ``www`` = /data except /data/cache, ``cached`` = /data/cache, both on
    both peers; data/cache exists under both roots. Not started."""
    c = make_cluster(2, **kw)
    p0, p1 = c[0].name, c[1].name
    write_conf(c, f"www: ( /data ) -> ( {p0} {p1} )\n"
                  "\tinstall ;\n"
                  "\texcept /data/cache ;\n"
                  f"cached: ( /data/cache ) -> ( {p0} {p1} )\n"
                  "\tinstall ;\n")
    for p in c.peers:
        (p.data / "cache").mkdir()
    return c


def test_nested_sets_are_watched_and_mirrored_live(make_cluster: MakeCluster) -> None:
    """A file written in data/cache (set ``cached``, nested in ``www``, which excludes
    it) while the daemons run reaches the other peer within LIVE_BOUND_S, as a file
    written in data/ does at the same time. Today the watcher and the indexer give the
    path to the first set whose root holds it, ``www``, which excludes it: it is neither
    watched nor indexed, and only the hourly rescan would send it."""
    c = nested_sets(make_cluster)
    (c[0].data / "cache" / "boot").write_bytes(b"scanned at startup\n")
    c.start()
    c.wait_until(lambda: holds(c[1].data / "cache" / "boot", b"scanned at startup\n"),
                 SETTLE_S, "data/cache/boot, written before the start, reaches peer 1 "
                           "(set cached is mirrored)")
    (c[0].data / "cache" / "x").write_bytes(b"x, written live\n")
    (c[0].data / "outer.txt").write_bytes(b"outer, written live\n")
    c.wait_until(lambda: holds(c[1].data / "outer.txt", b"outer, written live\n"),
                 LIVE_BOUND_S, "data/outer.txt (set www) reaches peer 1 live")
    c.wait_until(lambda: holds(c[1].data / "cache" / "x", b"x, written live\n"),
                 LIVE_BOUND_S, "data/cache/x (set cached), written live at the same time "
                               "as data/outer.txt, reaches peer 1")


def test_sync_of_a_path_in_a_nested_set_sends_it(make_cluster: MakeCluster) -> None:
    """``omirrord sync /data/cache/y`` names a path of set ``cached``: it is scanned in
    that set and sent at once (exit 0), although the enclosing set ``www`` excludes it.
    The coalescing window is 30 s, so y reaching peer 1 within LIVE_BOUND_S is sync's
    doing. Today sync answers "/data/cache/y is excluded from set www" and exits 2."""
    c = nested_sets(make_cluster, delay=30.0)
    c.start()
    c.wait_until(lambda: all(c.status(i).get("peers", {}).get(c[1 - i].name, {})
                             .get("out") == "up" for i in (0, 1)), SETTLE_S,
                 "both links are up")
    (c[0].data / "cache" / "y").write_bytes(b"y, sent by sync\n")
    r = omirrord("sync", "--state-dir", str(c[0].state), "/data/cache/y")
    assert r.returncode == 0, (f"omirrord sync /data/cache/y exited {r.returncode}: "
                               f"{r.stderr.strip()}")
    c.wait_until(lambda: holds(c[1].data / "cache" / "y", b"y, sent by sync\n"),
                 LIVE_BOUND_S, "data/cache/y reaches peer 1 after the sync")
