"""Stamps, entries and the last-writer-wins decision: pure data and pure functions.

Nothing here touches the disk, the clock or the network, so the rule that decides every
winner can be tested exhaustively, and every peer running it on the same inputs reaches
the same answer.

Two questions are kept apart on purpose:

* *which version wins* is decided by the stamp alone, ``(time_ns, origin)``, a total
  order that every peer evaluates the same way;
* *whether the two versions were concurrent* (made without knowledge of each other, so
  the loser's content must be kept as a conflict copy) is decided by a small version
  vector carried with each entry. A single "base" stamp is not enough for that: the change
  log keeps only the newest version of a path, so a peer that was away while a path was
  written twice would see a base it never held and report a false conflict.
"""

from __future__ import annotations

import enum
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from omirror import fsio
from omirror.paths import NAME_MAX

#: Version vectors are small maps ``origin -> time_ns`` stored as sorted tuples, so that
#: entries stay hashable and compare equal whatever order they were built in.
Vector = tuple[tuple[str, int], ...]

#: Infix of conflict copies: ``NAME.omirror-conflict-<host>-<time_ns>``. These are user
#: data and are mirrored like any other file.
CONFLICT_INFIX = b".omirror-conflict-"


class Kind(enum.IntEnum):
    """What a path is; TOMBSTONE records that it was deleted, and when."""

    TOMBSTONE = 0
    FILE = 1
    DIR = 2
    SYMLINK = 3


_KINDS = {stat.S_IFREG: Kind.FILE, stat.S_IFDIR: Kind.DIR, stat.S_IFLNK: Kind.SYMLINK}


def kind_of(st: os.stat_result) -> Kind | None:
    """The kind of what an lstat shows; None for what is never mirrored (a FIFO, a
    socket, a device)."""
    return _KINDS.get(stat.S_IFMT(st.st_mode))


@dataclass(frozen=True, slots=True, order=True)
class Stamp:
    """When and where a version was made; the larger stamp wins.

    Ordering is by time first, then by origin name, so ties break the same way on every
    peer. Clock skew can change which version wins, never whether peers agree on it.
    """

    time_ns: int
    origin: str

    def __str__(self) -> str:
        return f"{self.time_ns}@{self.origin}"


def next_stamp(change_time_ns: int, previous: Stamp | None, origin: str) -> Stamp:
    """Stamp a local change so that it always beats the version it replaces.

    A clock that went backwards, or a ctime older than the stamp of a version received
    from a fast-clocked peer, must not make a newer local edit lose to its own ancestor.
    """
    time_ns = change_time_ns if previous is None else max(change_time_ns, previous.time_ns + 1)
    return Stamp(time_ns, origin)


def vector_of(items: Mapping[str, int] | Iterable[tuple[str, int]]) -> Vector:
    """Normalise a version vector to its canonical, hashable form."""
    pairs = items.items() if isinstance(items, Mapping) else items
    merged: dict[str, int] = {}
    for origin, time_ns in pairs:
        if time_ns > merged.get(origin, -1):
            merged[origin] = time_ns
    return tuple(sorted(merged.items()))


def merge_vectors(a: Vector, b: Vector) -> Vector:
    """The history that knows both ``a`` and ``b``."""
    return vector_of([*a, *b])


def dominates(a: Vector, b: Vector) -> bool:
    """True when the history ``a`` includes everything in ``b``."""
    have = dict(a)
    return all(have.get(origin, -1) >= time_ns for origin, time_ns in b)


@dataclass(frozen=True, slots=True)
class Entry:
    """One version of one path, as every peer sees it.

    ``path`` is the logical path relative to ``/`` (``b"srv/www/index.html"``), the same
    on every host; each host puts it under its own ``--root``. Paths are bytes end to end
    because Linux file names need not be UTF-8.
    """

    path: bytes
    kind: Kind
    stamp: Stamp
    vector: Vector = ()
    mode: int = 0
    owner: str = ""
    group: str = ""
    #: The numeric ids of ``owner`` and ``group`` where the version was made (-1: not
    #: known): a receiver that has no such name uses them instead (omirror/owners.py).
    uid: int = -1
    gid: int = -1
    mtime_ns: int = 0
    size: int = 0
    digest: bytes = b""
    target: bytes = b""
    #: Extended attributes and POSIX ACLs (omirror/xattrs.py), sorted by name: part of
    #: the version, so that a change of them alone is a new version.
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    #: Set when the version was found to be a rename of another path, so a receiver
    #: holding that path's version can rename locally instead of transferring content.
    moved_from: bytes | None = field(default=None, compare=False)
    #: Another name of the same inode in the same set, as the sender knew it when it
    #: made this version (b"": none): a receiver holding that name's content links the
    #: path to it instead of writing the content again. A hint, not content: it takes
    #: no part in :meth:`same_content` or :func:`decide`.
    link: bytes = field(default=b"", compare=False)

    @property
    def is_tombstone(self) -> bool:
        """A deletion is a version too: its stamp makes an older version arriving later lose."""
        return self.kind is Kind.TOMBSTONE

    def same_content(self, other: Entry) -> bool:
        """True when the two versions would leave the same thing on disk."""
        return (
            self.kind == other.kind
            and self.mode == other.mode
            and self.owner == other.owner
            and self.group == other.group
            and self.digest == other.digest
            and self.target == other.target
            and self.size == other.size
            and self.xattrs == other.xattrs
            and (self.kind is not Kind.FILE or self.mtime_ns == other.mtime_ns)
        )

    def successor(self, stamp: Stamp, **changes: object) -> Entry:
        """A newer local version of this path: new stamp, history extended."""
        vector = merge_vectors(self.vector, ((stamp.origin, stamp.time_ns),))
        fields: dict[str, object] = {"moved_from": None, "link": b"", **changes}
        return replace(self, stamp=stamp, vector=vector, **fields)  # type: ignore[arg-type]


def first_version(path: bytes, kind: Kind, stamp: Stamp, **attrs: object) -> Entry:
    """The entry of a path this store has never held."""
    return Entry(path=path, kind=kind, stamp=stamp,
                 vector=((stamp.origin, stamp.time_ns),), **attrs)  # type: ignore[arg-type]


class Outcome(enum.Enum):
    """What a receiver does with an incoming version."""

    ALREADY = "already"  # the same version: nothing to do (deliveries are idempotent)
    TAKE = "take"  # the incoming version wins: apply it
    KEEP = "keep"  # the local version wins: ignore the incoming one


@dataclass(frozen=True, slots=True)
class Decision:
    """:func:`decide`'s answer; ``vector`` is recorded whatever the outcome, so the history
    held here learns of the other version even when it loses."""

    outcome: Outcome
    #: The versions were made without knowledge of each other.
    concurrent: bool
    #: The losing version whose content must be kept as a conflict copy, if any.
    loser: Entry | None = None
    #: The history the receiver records after this decision.
    vector: Vector = ()


def history(entry: Entry) -> Vector:
    """An entry's version vector, which always includes the entry's own stamp.

    An entry built without a vector (by hand, or by a careless peer) must not make every
    comparison with it look causal and so hide a conflict.
    """
    return merge_vectors(entry.vector, ((entry.stamp.origin, entry.stamp.time_ns),))


def decide(local: Entry | None, incoming: Entry) -> Decision:
    """Decide between the version held here and one received from a peer.

    The winner is the larger stamp, always. The versions are concurrent when neither
    history includes the other; then the loser's content, when it is a file whose content
    differs from the winner's, is returned to be kept as a conflict copy, so that no write
    is lost silently.
    """
    theirs = history(incoming)
    if local is None:
        return Decision(Outcome.TAKE, False, None, theirs)
    ours = history(local)
    merged = merge_vectors(ours, theirs)
    if incoming.stamp == local.stamp:
        return Decision(Outcome.ALREADY, False, None, merged)
    concurrent = not (dominates(theirs, ours) or dominates(ours, theirs))
    if incoming.stamp > local.stamp:
        outcome, winner, loser = Outcome.TAKE, incoming, local
    else:
        outcome, winner, loser = Outcome.KEEP, local, incoming
    keep = concurrent and loser.kind is Kind.FILE and not (
        winner.kind is Kind.FILE and winner.digest == loser.digest)
    return Decision(outcome, concurrent, loser if keep else None, merged)


#: What a host's name may hold in a conflict copy's name; anything else becomes ``_``.
_UNSAFE = re.compile(rb"[^A-Za-z0-9_.:\[\]-]")
#: Longest host name put into a conflict copy's name; a longer one is cut and given a
#: digest of the whole, so that the copy's name always fits NAME_MAX.
_ORIGIN_MAX = 64


def conflict_name(name: bytes, loser: Stamp) -> bytes:
    """The file name of a conflict copy, derived from the losing version's stamp only.

    Every peer that sees the same conflict derives the same name, so the copies made on
    different peers are one path, not several. The origin comes from a peer: it is
    reduced to safe characters and to at most 64 bytes, so that no origin can make a
    name that holds a ``/`` or a NUL, or that is too long for the file system.
    """
    raw = loser.origin.encode("utf-8", "replace")
    origin = _UNSAFE.sub(b"_", raw)
    if len(origin) > _ORIGIN_MAX:
        origin = origin[:_ORIGIN_MAX - 17] + b"~" + fsio.short_hash(raw).encode()
    suffix = CONFLICT_INFIX + origin + b"-" + str(loser.time_ns).encode()
    # NAME_MAX is 255 bytes on every Linux file system omirror serves: shorten the name,
    # never the suffix that makes the copy unique.
    return name[:max(1, NAME_MAX - len(suffix))] + suffix

