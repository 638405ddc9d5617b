"""Decide one peer's entry against this host's version, and apply the winner: the
receiver's rules, written once.

Everything here runs in the tree worker, one entry at a time, so a decision and the
indexing of the same path never interleave. An entry is first admitted (its path in a
set this host shares with the peer, its fields possible, its inline content its
digest). Then the store's version and the disk are compared: a local change the scanner
has not recorded yet is recorded first (that path is rescanned), so that it takes part
in the decision instead of being overwritten. ``decide()`` (omirror/entry.py) names the
winner; a losing file is kept as a conflict copy; the applier (omirror/apply.py) puts
the winner in place. Content too large to travel with its entry is a :class:`Need`: the
receiver fetches it, and :meth:`Resolver.install` decides again once it is here.
"""

from __future__ import annotations

import enum
import logging
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from omirror import fsio, xattrs
from omirror.apply import Applier
from omirror.config import MirrorSet, set_for
from omirror.entry import Decision, Entry, Kind, Outcome, decide
from omirror.errors import ApplyError, LocalChanged, PathRefused
from omirror.paths import check_form, show, show_text
from omirror.scanner import Scanner
from omirror.staging import Prepared, TempFile
from omirror.store import Record, StatSig, Store, matches

log = logging.getLogger(__name__)

#: Latest stamp accepted from a peer (the year 2116): a stamp near 2**63 could not be
#: followed by a newer local one without overflowing the store's integers.
MAX_STAMP_NS = 1 << 62
#: A host identity as the Distfile spells it (omirror/config.py): what an origin may be.
_HOST_NAME = re.compile(r"[A-Za-z0-9_.:\[\]-]{1,255}\Z")
#: A path that changes here under every attempt is given up (and retried later).
RESCANS = 3
#: Small files of one batch written ahead and made durable together.
PREPARE_MAX = 128


class Purpose(enum.Enum):
    INSTALL = "install"  # the incoming version wins: it becomes the file here
    CONFLICT = "conflict"  # the incoming version lost a concurrent edit: keep it beside


@dataclass
class Need:
    """An entry that waits for its content from the pusher."""

    mset: MirrorSet
    entry: Entry
    purpose: Purpose
    old: Record | None = None  # the local version a delta is built against


#: What one entry came to: done (None), content to fetch, or why it failed.
Result = Need | ApplyError | PathRefused | None


@dataclass(frozen=True, slots=True)
class Applied:
    """A peer's version of a file or symlink, or its deletion, put in place here in a
    set that has specials (omirror/specials.py runs them). Reported only once the
    transaction that recorded it has committed."""

    mset: MirrorSet
    path: bytes


class Resolver:
    """Applies peers' entries here, each by the same rules, whichever link brought it.

    One resolver serves every link of a daemon: they all run their entries through the
    one tree worker, so it needs no lock. ``conflicts`` counts the concurrent edits met
    (for status).
    """

    def __init__(self, store: Store, applier: Applier, scanner: Scanner) -> None:
        self.store = store
        self.applier = applier
        self.scanner = scanner
        self.conflicts = 0
        #: Told, in the tree worker, what a batch or an entry applied once it is
        #: committed; it must not block (the daemon hands it to the event loop).
        self.on_applied: Callable[[list[Applied]], None] = _ignore
        self._applied: list[Applied] = []

    # -- a batch, and one entry -----------------------------------------------------------

    def batch(self, peer: str, sets: Sequence[MirrorSet],
              entries: Sequence[tuple[Entry, bytes | None]],
              stopped: Callable[[bytes], str | None],
              staged: Prepared | None = None) -> list[Result]:
        """Apply ``entries`` in order until one needs its content fetched (it ends the
        batch: what follows may depend on it); one outcome per entry applied. The
        batch is one store transaction, its small files are synced together, and the
        set roots are opened once for it. ``staged``: what :meth:`stage` wrote ahead
        for it."""
        applier = self.applier
        outcomes: list[Result] = []
        considered: set[bytes] = set()
        dirs_made = True  # since the last _prepare: a file it skipped may have its parent
        self._applied.clear()
        if staged is not None:
            applier.ahead.adopt(staged, applier.prepared)
        try:
            with applier.dirs.holding_roots():
                with self.store.batch():
                    for i, (entry, data) in enumerate(entries):
                        if data is not None and dirs_made and entry.path not in considered:
                            # the small files from here on whose directory exists now
                            self._prepare(sets, entries[i:], considered)
                            dirs_made = False
                        dirs_made = dirs_made or entry.kind is Kind.DIR
                        outcome = self._one(peer, sets, entry, data, stopped)
                        outcomes.append(outcome)
                        if isinstance(outcome, Need):
                            break
                    self._scan_strays(sets)
        except BaseException:
            self._applied.clear()  # rolled back: nothing of it was applied for good
            raise
        finally:
            applier.prepared.discard()
        self._report_applied()
        return outcomes

    def one(self, peer: str, sets: Sequence[MirrorSet], incoming: Entry, data: bytes | None,
            stopped: Callable[[bytes], str | None]) -> Result:
        """Apply one entry on its own (a retry): each record it makes commits at once."""
        self._applied.clear()
        try:
            return self._one(peer, sets, incoming, data, stopped)
        finally:
            self._report_applied()

    def _one(self, peer: str, sets: Sequence[MirrorSet], incoming: Entry,
             data: bytes | None, stopped: Callable[[bytes], str | None]) -> Result:
        """Apply one entry; whatever goes wrong is this entry's failure, never the
        link's: an error nobody foresaw is logged with its traceback and the entry is
        retried like any failed one, so the other paths and peers go on."""
        try:
            mset = self._admit(peer, incoming, data, sets, stopped)
            if mset is None:
                return None
            # the version held here, history and all (its vector names its own stamp, so
            # the history recorded would not change): in a mesh, each peer relays every
            # version to every other, so most entries a peer receives are this
            own = (incoming.stamp.origin, incoming.stamp.time_ns)
            if data is None and own in incoming.vector and self.store.holds_exactly(
                    incoming.path, incoming.stamp, incoming.vector):
                return None
            return self._resolve(peer, sets, mset, incoming, data, None)
        except (ApplyError, PathRefused) as e:
            return e
        except Exception as e:  # a bug, met on one entry: not the end of the link
            log.error("peer=%s path=%s could not be applied: %s: %s", peer,
                      show(incoming.path), type(e).__name__, e, exc_info=True)
            return ApplyError(incoming.path, None, f"cannot apply {show(incoming.path)}: "
                                                   f"{type(e).__name__}: {e}")

    def install(self, peer: str, sets: Sequence[MirrorSet], need: Need,
                temp: TempFile) -> None:
        """Install content that was fetched, deciding again: the local version may have
        changed while the content travelled. Each record it makes commits at once."""
        self._applied.clear()
        try:
            with self.applier.dirs.holding_roots():
                temp.finish()
                if need.purpose is Purpose.CONFLICT:
                    self.applier.write_conflict_copy(need.mset, need.entry, temp)
                else:
                    self._resolve(peer, sets, need.mset, need.entry, None, temp)
        finally:
            self._scan_strays(sets)
            self._report_applied()

    def _report_applied(self) -> None:
        if self._applied:
            applied, self._applied = self._applied, []
            self.on_applied(applied)

    def _note_applied(self, mset: MirrorSet, path: bytes, kind: Kind | None) -> None:
        """What runs specials: a file or a symlink, or the deletion of one (``kind`` is
        what the path was here before); a directory alone runs nothing."""
        if mset.specials and kind in (Kind.FILE, Kind.SYMLINK):
            self._applied.append(Applied(mset, path))

    # -- the rules ------------------------------------------------------------------------

    def _admit(self, peer: str, incoming: Entry, data: bytes | None, sets: Sequence[MirrorSet],
               stopped: Callable[[bytes], str | None]) -> MirrorSet | None:
        """The set ``incoming`` goes to; None for content that is no version at all.

        A path refused here is :class:`PathRefused` (skipped for good), except in a set
        that is stopped on this host: that is an :class:`ApplyError`, retried, so the
        persisted cursor stays below it and a restart sends it again.
        """
        try:
            mset = check_path(incoming.path, sets)
            check_entry(incoming)
        except PathRefused:
            title = stopped(incoming.path)
            if title is None:
                raise
            raise ApplyError(incoming.path, None,
                             f"cannot apply {show(incoming.path)}: its set ({title}) is "
                             "stopped on this host (see the log)") from None
        if data is not None and fsio.digest_bytes(data) != incoming.digest:
            # what came is no version at all, and it would come the same on a retry
            log.warning("peer=%s path=%s sent content that does not match its digest: "
                        "refused", peer, show(incoming.path))
            return None
        return mset

    def _resolve(self, peer: str, sets: Sequence[MirrorSet], mset: MirrorSet,
                 incoming: Entry, data: bytes | None, temp: TempFile | None) -> Need | None:
        """Decide, and apply the winner, with its content in ``data``, in ``temp``
        (fetched), or to be fetched (the :class:`Need` returned).

        The disk is compared with the store's record before anything is replaced: when
        they differ, the path is rescanned (a local change is recorded) and decided
        again, up to :data:`RESCANS` times.
        """
        force = False
        for _ in range(RESCANS):
            record = self.store.get(incoming.path)
            decision = decide(None if record is None else record.entry, incoming)
            if decision.outcome is not Outcome.TAKE:
                return self._keep_ours(peer, mset, record, decision, incoming, data, temp)
            winner = incoming if incoming.vector == decision.vector else \
                replace(incoming, vector=decision.vector)
            if record is not None and self.applier.moved_away(mset, incoming.path):
                # this host applied a peer's rename of the path: its file is gone, its
                # tombstone may never come (the peer's log holds a newer version of the
                # path now, this one): nothing here to keep or to compare
                record = None
            if self.applier.disk_matches(mset, incoming.path, record):
                try:
                    return self._take(peer, sets, mset, winner, record, decision.loser, data,
                                      temp)
                except LocalChanged as e:  # new content, maybe not yet a new stat: rehash
                    if e.path != incoming.path:  # the source of a move, put back
                        self._rescan(mset, e.path, force=True)
                    if temp is not None:  # used up: record the change; a retry decides
                        self._rescan(mset, incoming.path, force=True)
                        raise
                    force = True
            elif temp is None and (self._settle_without_disk(mset, winner, record)
                                   or self._settled_by_link(sets, mset, winner, record)):
                return None
            # the disk differs from the record: a local change, unless the path lies
            # beyond a symlink, where what the disk shows is outside the tree (refused)
            self.applier.dirs.check_parents(mset, incoming.path)
            self._rescan(mset, incoming.path, force=force)
        if temp is not None:
            temp.abort()
        raise ApplyError(incoming.path, None,
                         f"cannot apply {show(incoming.path)}: it keeps changing here")

    def _keep_ours(self, peer: str, mset: MirrorSet, record: Record | None,
                   decision: Decision, incoming: Entry, data: bytes | None,
                   temp: TempFile | None) -> Need | None:
        """Ours wins, or is the same version: record the merged history; a concurrent
        incoming file is kept beside ours as its conflict copy."""
        if record is not None and record.entry.vector != decision.vector:
            self.store.set_vector(incoming.path, decision.vector)
        if decision.loser is None:
            if temp is not None:
                temp.abort()
            return None
        self.conflicts += 1
        log.warning("peer=%s path=%s concurrent edits: ours (%s) wins, theirs (%s) is kept "
                    "as a conflict copy", peer, show(incoming.path),
                    record.entry.stamp if record else "-", incoming.stamp)
        content = temp if temp is not None else data
        if content is None:
            return Need(mset, incoming, Purpose.CONFLICT)
        self.applier.write_conflict_copy(mset, incoming, content)
        return None

    def _take(self, peer: str, sets: Sequence[MirrorSet], mset: MirrorSet, winner: Entry,
              record: Record | None, loser: Entry | None, data: bytes | None,
              temp: TempFile | None) -> Need | None:
        """Theirs wins: put it in place, and note it for the specials."""
        local = None if record is None else record.entry
        outcome = self._put_in_place(peer, sets, mset, winner, record, local, loser, data,
                                     temp)
        if outcome is None:  # in place (a Need is installed later, and noted then)
            was = None if local is None else local.kind
            self._note_applied(mset, winner.path,
                               was if winner.kind is Kind.TOMBSTONE else winner.kind)
        return outcome

    def _put_in_place(self, peer: str, sets: Sequence[MirrorSet], mset: MirrorSet,
                      winner: Entry, record: Record | None, local: Entry | None,
                      loser: Entry | None, data: bytes | None,
                      temp: TempFile | None) -> Need | None:
        """A concurrent local file is kept as its conflict copy first."""
        applier = self.applier
        if loser is not None and local is not None and local.kind is Kind.FILE:
            self.conflicts += 1
            log.warning("peer=%s path=%s concurrent edits: theirs (%s) wins, ours (%s) is "
                        "kept as a conflict copy", peer, show(winner.path), winner.stamp,
                        local.stamp)
            applier.keep_conflict_copy(mset, winner.path, local.stamp, local.digest)
            record, local = None, None
        if temp is not None:
            applier.install_file(mset, winner, temp)
        elif winner.kind is Kind.DIR:
            # a renamed directory is made anew, and each entry below it moves its own
            # file: renaming the old directory whole would also carry what the peer
            # never moved (children made here since, or the directory made again after
            # the peer's rename), leaving them where no log has them
            applier.make_dir(mset, winner)
        elif winner.kind is Kind.SYMLINK:
            applier.make_symlink(mset, winner)
        elif winner.kind is Kind.TOMBSTONE:
            applier.delete(mset, winner)
            if applier.dirs.lstat(mset, winner.path) is not None:
                # a directory kept for what it holds that the deleting peer never had:
                # record it all now (the directory again, newer than the tombstone),
                # or the peers would not have these files until the next full rescan
                self._rescan(mset, winner.path, recursive=True)
        elif winner.link and self._link_file(sets, mset, winner):
            pass  # another name of the same content here: linked, nothing written
        elif local is not None and local.kind is Kind.FILE and local.digest == winner.digest \
                and record is not None and record.sig is not None:
            applier.adopt(mset, winner, record.sig)
        elif winner.moved_from is not None and self._move_file(sets, mset, winner):
            pass  # a rename stays a rename, even for a file small enough to send
        elif data is not None:
            applier.write_file(mset, winner, data)
        else:
            old = record if local is not None and local.kind is Kind.FILE else None
            return Need(mset, winner, Purpose.INSTALL, old)
        return None

    def _settle_without_disk(self, mset: MirrorSet, winner: Entry,
                             record: Record | None) -> bool:
        """Cases where the disk already is what the incoming version says: record only.

        A deletion of a path that is already gone, or a file that is already in place
        (the new name of a file whose old name was recorded with the same inode).
        """
        applier = self.applier
        if winner.kind is Kind.TOMBSTONE:
            if applier.dirs.lstat(mset, winner.path) is not None:
                return False
            self.store.put(winner, None)
            applier.expected_absent.discard(winner.path)
            log.debug("path=%s recorded tombstone stamp=%s (already absent)",
                      show(winner.path), winner.stamp)
            return True
        if winner.kind is not Kind.FILE or winner.moved_from is None:
            return False
        source = self.store.get(winner.moved_from)
        if source is None or source.sig is None or source.entry.digest != winner.digest:
            return False
        here = applier.dirs.lstat(mset, winner.path)
        if here is None or not stat.S_ISREG(here.st_mode) or (here.st_ino, here.st_size) != (
                source.sig.ino, source.sig.size):
            return False
        applier.adopt(mset, winner, StatSig.of(here))
        return True

    def _settled_by_link(self, sets: Sequence[MirrorSet], mset: MirrorSet, winner: Entry,
                         record: Record | None) -> bool:
        """A file linked here to its hint's name, whose version here holds the incoming
        content and matches the disk: the version applied to that name (a chmod through
        it) changed this one too, as it did where the version was made. Recorded as
        it is; without this, the change would be taken for a local one of this name."""
        source = self._link_source(sets, mset, winner)
        if source is None or record is None or record.entry.kind is not Kind.FILE:
            return False
        dirs = self.applier.dirs
        there, here = dirs.lstat(mset, source.entry.path), dirs.lstat(mset, winner.path)
        if there is None or here is None or not matches(there, source) \
                or not fsio.same_file(there, here) or not stat.S_ISREG(here.st_mode):
            return False
        self.applier.link_file(mset, winner, source.entry.path, source)
        return True

    def _link_source(self, sets: Sequence[MirrorSet], mset: MirrorSet,
                     winner: Entry) -> Record | None:
        """The record of the path ``winner``'s link hint names, when it is one to link
        to: a path of the same set here (a hint outside it, or excluded, is ignored,
        never refused: it is a hint) whose version holds the same content."""
        if not winner.link or winner.kind is not Kind.FILE \
                or set_for(winner.link, sets) is not mset:
            return None
        source = self.store.get(winner.link)
        if source is None or source.sig is None or not source.entry.same_content(winner):
            return None
        return source

    def _link_file(self, sets: Sequence[MirrorSet], mset: MirrorSet, winner: Entry) -> bool:
        """Make the path a hard link to its hint's name, when that holds the same content
        here, as the sender's names are links of one file; False to write the content.

        Linking gives nobody anything new: both paths are in one set, and the content is
        the one this host already holds under the other name (docs/security.rst)."""
        source = self._link_source(sets, mset, winner)
        if source is None or not self.applier.disk_matches(mset, source.entry.path, source):
            return False
        return self.applier.link_file(mset, winner, source.entry.path, source) is not None

    def _move_file(self, sets: Sequence[MirrorSet], mset: MirrorSet, winner: Entry) -> bool:
        """Apply a peer's rename as a rename here, when the source is the same content
        in the same set; False to fetch or write the content instead."""
        moved_from = winner.moved_from
        if moved_from is None or set_for(moved_from, sets) is not mset:
            # a rename is applied within one set only: taking a file out of another
            # set (one the peer may not even share), or out of an excluded path, would
            # move it out of where the peer may write
            return False
        source = self.store.get(moved_from)
        if source is None or source.entry.kind is not Kind.FILE \
                or source.entry.digest != winner.digest \
                or not self.applier.disk_matches(mset, source.entry.path, source):
            return False
        # a source version newer than the rename (a chmod made here since) stays where it
        # is, since it wins over the rename's tombstone there: the content is copied
        move = source.entry.stamp < winner.stamp
        self.applier.copy_local(mset, winner, source.entry.path, move=move)
        if move:  # the source's deletion here: its tombstone will find nothing to remove
            self._note_applied(mset, source.entry.path, Kind.FILE)
        return True

    # -- around the rules -----------------------------------------------------------------

    def stage(self, sets: Sequence[MirrorSet],
              entries: Sequence[tuple[Entry, bytes | None]]) -> Prepared:
        """In the stager, beside the tree worker: write ahead, and sync, the small files
        of a receiver's next batch (staging.Ahead), guessing from the store's committed
        view which will be installed. A file whose directory is not there yet is tried
        once more at the end: the batch the tree worker applies meanwhile may be making
        it."""
        deleted = _deleted(entries)
        with self.applier.ahead.staging(self.applier.root) as prepared:
            late = self._write_ahead(prepared, sets, entries, self.store.committed, set(),
                                     deleted)
            if late:
                self._write_ahead(prepared, sets, late, self.store.committed, set(),
                                  deleted)
            prepared.sync()
        return prepared

    def _write_ahead(self, prepared: Prepared, sets: Sequence[MirrorSet],
                     entries: Sequence[tuple[Entry, bytes | None]],
                     get: Callable[[bytes], Record | None], considered: set[bytes],
                     deleted: set[bytes]) -> list[tuple[Entry, bytes | None]]:
        """Write the files of ``entries`` that will likely be installed into their temp
        files (see :meth:`_prepare`), none below a path in ``deleted``; those whose
        directory is missing are returned."""
        dirs_ahead: set[bytes] = set()  # directories these entries have yet to apply
        late: list[tuple[Entry, bytes | None]] = []
        for entry, data in entries:
            if len(prepared) >= PREPARE_MAX:
                break
            if entry.kind is Kind.DIR:
                dirs_ahead.add(entry.path)
            if entry.path in considered:
                continue
            if entry.path.rpartition(b"/")[0] in dirs_ahead:
                late.append((entry, data))
                continue  # for a later call, once that directory is applied
            considered.add(entry.path)
            if data is None or entry.kind is not Kind.FILE or entry.moved_from \
                    or entry.path in prepared \
                    or any(parent in deleted for parent in _parents(entry.path)):
                continue
            try:
                mset = check_path(entry.path, sets)
            except PathRefused:
                continue
            record = get(entry.path)
            local = None if record is None else record.entry
            if decide(local, entry).outcome is not Outcome.TAKE or (
                    local is not None and local.kind is Kind.FILE
                    and local.digest == entry.digest):
                continue
            if not prepared.prepare(mset, entry, data, self.applier.reserve):
                considered.discard(entry.path)  # its directory is still to be made
                late.append((entry, data))
        return late

    def _prepare(self, sets: Sequence[MirrorSet],
                 entries: Sequence[tuple[Entry, bytes | None]], considered: set[bytes]) -> None:
        """Write the small files of a batch that will be installed, then sync them all at
        once: one journal commit for the batch instead of one per file (a commit costs
        milliseconds on a slow disk: per file, it was most of a receiver's time). Only a
        guess to save time: each entry is decided again when it is applied, so a guess
        must never change an outcome. A file whose directory does not exist yet is
        left for a later call, once the batch has made it (``considered`` holds the
        others). A file below a directory the same batch deletes is not written ahead:
        its temp file would make that directory look not empty to the deletion, which
        then keeps it as this host's own version."""
        self._write_ahead(self.applier.prepared, sets, entries, self.store.get, considered,
                          _deleted(entries))
        self.applier.prepared.sync()

    def _scan_strays(self, sets: Sequence[MirrorSet]) -> None:
        """Record what the applier put into a directory a user renamed meanwhile, where
        it really is (the watcher drops the event of our own rename into place)."""
        for path in self.applier.dirs.take_strays():
            try:
                mset = check_path(path, sets)
            except PathRefused:
                continue  # out of the sets shared with this peer: the rescan has it
            self._rescan(mset, path)

    def _rescan(self, mset: MirrorSet, path: bytes, *, force: bool = False,
                recursive: bool = False) -> None:
        self.scanner.scan_paths(mset, self.applier.root, [(path, recursive)], force=force)


def _ignore(_applied: list[Applied]) -> None:
    """The default :attr:`Resolver.on_applied`: nothing runs specials."""


def _deleted(entries: Sequence[tuple[Entry, bytes | None]]) -> set[bytes]:
    return {entry.path for entry, _ in entries if entry.kind is Kind.TOMBSTONE}


def _parents(path: bytes) -> Iterator[bytes]:
    """``b"a/b/c"`` -> ``b"a/b"``, ``b"a"``."""
    while b"/" in path:
        path = path.rpartition(b"/")[0]
        yield path


# -- what a peer's entry must be before anything acts on it --------------------------------

def check_path(path: bytes, sets: Sequence[MirrorSet]) -> MirrorSet:
    """The set that a path from a peer belongs to, or :class:`PathRefused`.

    ``sets`` are the sets this host shares with that peer: a peer may only write where
    both hosts mirror. The set is chosen by the one rule (:func:`config.set_for`), so
    an exclusion in one set does not hide the path from a nested set that mirrors it.
    """
    check_form(path)
    mset = set_for(path, sets)
    if mset is not None:
        return mset
    excluded_by = next((m for m in sets if m.root_of(path) is not None), None)
    if excluded_by is not None:
        raise PathRefused(path, f"excluded here by set {excluded_by.title}")
    raise PathRefused(path, "is in no set this host shares with the peer")


def check_entry(entry: Entry) -> None:
    """Refuse an entry whose fields, well-typed as the wire checked them, still cannot be
    a version any honest peer made: :class:`PathRefused`, so the entry is skipped and
    the link goes on (retrying could not help, and closing the link would meet it again
    on every reconnect).

    Origins are host names (they become part of conflict copies' names and of log
    lines), owners and groups are names without NUL or control characters (they are
    looked up in the password database), and stamps stay far below the store's integer
    limit (a later local version is always one more).
    """
    check_form(entry.path)
    if entry.moved_from is not None:
        check_form(entry.moved_from)
    if entry.link:
        check_form(entry.link)
    origins = [entry.stamp.origin, *(origin for origin, _ in entry.vector)]
    for origin in origins:
        if not _HOST_NAME.match(origin):
            raise PathRefused(entry.path, f"its origin {show_text(repr(origin))} is not a "
                                          "host name")
    for what, name in (("owner", entry.owner), ("group", entry.group)):
        if not name.isprintable() or "/" in name or ":" in name:
            raise PathRefused(entry.path, f"its {what} {show_text(repr(name))} is not a "
                                          "user or group name")
    if entry.xattrs:
        if entry.kind not in (Kind.FILE, Kind.DIR):
            raise PathRefused(entry.path, f"a {entry.kind.name.lower()} entry with extended "
                                          "attributes")
        try:
            xattrs.check(entry.xattrs)
        except xattrs.BadXattrs as e:
            raise PathRefused(entry.path, str(e)) from None
    times = [entry.stamp.time_ns, *(t for _, t in entry.vector)]
    if max(times) >= MAX_STAMP_NS:
        raise PathRefused(entry.path, f"its stamp {max(times)} lies beyond the year 2116")


