"""The state database: every path's current version, and the change log in its order.

One SQLite file in WAL mode. Each change to the local state, made here or applied from a
peer, gets the next sequence number of this store, so "everything since seq N" is one
indexed range query: Heimdal's iprop log, compacted to one row per path. A store has a
random epoch made at creation; a peer whose cursor names another epoch, or a seq below
the floor of collected tombstones, must be sent everything.

Only this module speaks SQL. The store is shared by the event loop and the scanner's
worker thread, so every method holds one lock, and a batch holds it for the whole
transaction: SQLite itself would serialise writers, but not without busy-waiting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import stat
import struct
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from omirror import xattrs
from omirror.entry import Entry, Kind, Stamp, Vector, kind_of
from omirror.errors import StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
_ADD_IDS = ("ALTER TABLE entries ADD COLUMN uid INTEGER NOT NULL DEFAULT -1",
            "ALTER TABLE entries ADD COLUMN gid INTEGER NOT NULL DEFAULT -1")
_ADD_3 = ("ALTER TABLE entries ADD COLUMN xattrs BLOB",
          "ALTER TABLE entries ADD COLUMN link BLOB NOT NULL DEFAULT x''")
#: Schema 1 lacked the numeric owner ids (uid, gid), schema 2 the extended attributes
#: (xattrs) and the link hint (link); each is upgraded in place on open.
_UPGRADES = {1: _ADD_IDS + _ADD_3, 2: _ADD_3}
#: The columns an older schema lacks, as a read-only reader (which must not upgrade)
#: adds them to what it reads.
_MISSING = {1: "-1 AS uid, -1 AS gid, NULL AS xattrs, x'' AS link",
            2: "NULL AS xattrs, x'' AS link"}
DB_NAME = "state.db"
#: Deletions are remembered this long, so that a peer returning within it cannot
#: resurrect a deleted file.
TOMBSTONE_RETENTION_NS = 30 * 24 * 3600 * 10**9
_PAGE = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    path BLOB PRIMARY KEY,
    dir BLOB NOT NULL,
    seq INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    stamp_ns INTEGER NOT NULL,
    origin TEXT NOT NULL,
    vector BLOB NOT NULL,
    mode INTEGER NOT NULL,
    owner TEXT NOT NULL,
    grp TEXT NOT NULL,
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    digest BLOB NOT NULL,
    target BLOB NOT NULL,
    moved_from BLOB,
    sig_ino INTEGER,
    fast BLOB NOT NULL,
    uid INTEGER NOT NULL DEFAULT -1,
    gid INTEGER NOT NULL DEFAULT -1,
    xattrs BLOB,
    link BLOB NOT NULL DEFAULT x''
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS entries_seq ON entries (seq);
CREATE INDEX IF NOT EXISTS entries_dir ON entries (dir, path, fast);
CREATE INDEX IF NOT EXISTS entries_ino ON entries (sig_ino) WHERE sig_ino IS NOT NULL;
CREATE TABLE IF NOT EXISTS cursors (
    peer TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS trusts (
    peer TEXT NOT NULL,
    origin TEXT NOT NULL,
    epoch TEXT NOT NULL,
    since INTEGER NOT NULL,
    PRIMARY KEY (peer, origin)
) WITHOUT ROWID;
"""

_COLUMNS = ("path, seq, kind, stamp_ns, origin, vector, mode, owner, grp, mtime_ns, size, "
            "digest, target, moved_from, fast, uid, gid, xattrs, link")

_SLOTS = ",".join("?" * (2 + _COLUMNS.count(",") + 1))

#: The scanner's fast-path signature, ``(kind, ino, size, mtime_ns, ctime_ns)`` packed in
#: one value: a directory's signatures then load with ``dict(cursor)`` in C, and compare
#: with one ``==``. A record without a local stat gets ino -1, which never matches.
FAST = struct.Struct("<Bqqqq")


@dataclass(frozen=True, slots=True)
class StatSig:
    """What the file looked like on this host when its entry was last recorded.

    Equal signatures let a scan skip hashing, and let the watcher recognise the echo of
    a change it applied itself. ctime is in it because chmod, chown and writes that
    restore the old mtime all change ctime.
    """

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> StatSig:
        """The one way to take a signature, so scanner, applier and :func:`matches` compare
        the same fields."""
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class Record:
    """An entry as this store holds it: its version, its place in the log, its local stat."""

    entry: Entry
    seq: int
    sig: StatSig | None


@dataclass(frozen=True, slots=True)
class Cursor:
    """How far this host has received a peer's log: that peer's epoch and last seq."""

    epoch: str
    seq: int


def parent_of(path: bytes) -> bytes:
    """The directory part of a logical path (``b""`` for a top-level name)."""
    return path.rpartition(b"/")[0]


def _pack_vector(vector: Vector) -> bytes:
    packed: bytes = msgpack.packb([list(pair) for pair in vector])
    return packed


def _unpack_vector(blob: bytes) -> Vector:
    return tuple((str(origin), int(t)) for origin, t in msgpack.unpackb(blob))


def _pack_xattrs(attributes: xattrs.Xattrs) -> bytes | None:
    if not attributes:
        return None
    packed: bytes = msgpack.packb(xattrs.flat(attributes))
    return packed


def _unpack_xattrs(blob: bytes | None) -> xattrs.Xattrs:
    return () if blob is None else xattrs.paired(msgpack.unpackb(blob))


def fast_sig(kind: int, sig: StatSig | None) -> bytes:
    """The packed fast-path signature of a record (see :data:`FAST`)."""
    if sig is None:
        return FAST.pack(kind, -1, 0, 0, 0)
    return FAST.pack(kind, sig.ino, sig.size, sig.mtime_ns, sig.ctime_ns)


def _record(row: tuple) -> Record:  # type: ignore[type-arg]
    (path, seq, kind, stamp_ns, origin, vector, mode, owner, grp, mtime_ns, size,
     digest, target, moved_from, fast, uid, gid, xattrs, link) = row
    _, ino, ssize, smtime, sctime = FAST.unpack(fast)
    entry = Entry(path=bytes(path), kind=Kind(kind), stamp=Stamp(stamp_ns, origin),
                  vector=_unpack_vector(vector), mode=mode, owner=owner, group=grp,
                  uid=uid, gid=gid, mtime_ns=mtime_ns, size=size, digest=bytes(digest),
                  target=bytes(target), xattrs=_unpack_xattrs(xattrs),
                  moved_from=None if moved_from is None else bytes(moved_from),
                  link=bytes(link))
    sig = None if ino == -1 else StatSig(ino, ssize, smtime, sctime)
    return Record(entry, seq, sig)


class Store:
    """The SQLite index of one host. Open with :meth:`open`; close when done."""

    def __init__(self, conn: sqlite3.Connection, where: str) -> None:
        self._conn = conn
        self._where = where
        self._lock = threading.RLock()
        #: A second connection for readers of what is committed (the pushers, on the
        #: event loop): WAL lets them read while the tree worker holds a transaction
        #: open, which would otherwise stall the loop, and with it every link, for the
        #: length of a batch. None for a store in memory: the one connection serves all.
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        #: Records read during the outermost transaction (only its thread can hold the
        #: lock meanwhile): a receiver's batch reads each path several times (to guess,
        #: to decide, to guard the replacement). Every write of a path drops it; the end
        #: of the transaction drops all.
        self._cache: dict[bytes, Record | None] | None = None
        self._depth = 0
        self._listeners: list[Callable[[int], None]] = []
        self._on_commit: list[Callable[[], None]] = []
        self._pending_seq = 0
        self.epoch: str = self._meta("epoch") or ""
        self.floor: int = int(self._meta("floor") or 0)
        top = conn.execute("SELECT max(seq) FROM entries").fetchone()[0] or 0
        #: Nothing was ever recorded here (a first start, or a store deleted and made
        #: again): what the first scan finds has no history (see the scanner). The
        #: daemon clears it once that scan is done.
        self.new = top == 0
        self._last_seq = max(top, int(self._meta("last_seq") or 0), self.floor)

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str]) -> Store:
        """Open or create the store in ``state_dir`` (made 0700 if missing).

        ``":memory:"`` gives a private in-memory store, for tests.
        """
        where = str(state_dir)
        if where != ":memory:":
            directory = Path(where)
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create state directory {directory}: "
                                 f"{e.strerror}") from e
            where = str(directory / DB_NAME)
            try:  # the database lists every path: readable by the daemon's user only
                os.close(os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600))
            except FileExistsError:
                pass
            except OSError as e:
                raise StoreError(f"cannot create state database {where}: {e.strerror}") from e
        try:
            conn = sqlite3.connect(where, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.executescript(_SCHEMA)
            cls._initialise(conn, where)
            reader = None
            if where != ":memory:":
                reader = sqlite3.connect(where, isolation_level=None,
                                         check_same_thread=False)
                reader.execute("PRAGMA query_only=ON")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open state database {where}: {e}; "
                             "move it aside to rebuild it from a scan") from e
        store = cls(conn, where)
        store._reader = reader
        return store

    @classmethod
    def open_readonly(cls, state_dir: str | os.PathLike[str]) -> Store:
        """Open an existing store without writing anything, not even SQLite's side files.

        With no daemon writing (no WAL file), the database is opened immutable: no lock
        file, no shared-memory file. With a daemon running, a read-only connection reads
        a consistent snapshot beside it. A missing store is a StoreError; ``--check``
        then compares as a host that holds nothing.
        """
        where = Path(state_dir) / DB_NAME
        if not where.exists():
            raise StoreError(f"no state database at {where}")
        mode = "ro" if Path(f"{where}-wal").exists() else "ro&immutable=1"
        try:
            conn = sqlite3.connect(f"file:{where}?mode={mode}", uri=True,
                                   isolation_level=None, check_same_thread=False)
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot read state database {where}: {e}") from e
        if row is None or int(row[0]) not in (SCHEMA_VERSION, *_UPGRADES):
            raise StoreError(f"state database {where} is not one this omirrord reads")
        if int(row[0]) != SCHEMA_VERSION:  # read as it is: upgrading it would write
            conn.execute(f"CREATE TEMP VIEW entries AS SELECT *, {_MISSING[int(row[0])]} "
                         "FROM main.entries")
        return cls(conn, str(where))

    @staticmethod
    def _initialise(conn: sqlite3.Connection, where: str) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (secrets.token_hex(16),))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('floor', 0)")
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('last_seq', 0)")
            conn.execute("COMMIT")
            log.info("created state database %s", where)
        elif int(row[0]) in _UPGRADES:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _UPGRADES[int(row[0])]:
                conn.execute(statement)
            conn.execute("UPDATE meta SET value=? WHERE key='schema'", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
            log.info("upgraded state database %s to schema %d", where, SCHEMA_VERSION)
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"state database {where} has schema {row[0]}, this omirrord "
                             f"speaks {SCHEMA_VERSION}")

    def close(self) -> None:
        """Idempotent; takes the lock, so it waits for another thread's batch to end."""
        with self._lock:
            self._conn.close()
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # -- transactions --------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[Store]:
        """One transaction for a burst of changes: all of it is committed, or none.

        Batches nest; only the outermost commits. Listeners hear of the new seqs after
        the commit, never of a change that could still roll back.
        """
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._conn.execute("BEGIN IMMEDIATE")
                self._pending_seq = 0
                self._cache = {}
            self._depth += 1
            try:
                yield self
            except BaseException:
                self._depth -= 1
                if outer:
                    self._cache = None
                    self._conn.execute("ROLLBACK")
                    self._last_seq = max(
                        self._conn.execute("SELECT max(seq) FROM entries").fetchone()[0] or 0,
                        int(self._meta("last_seq") or 0), self.floor)
                raise
            self._depth -= 1
            if outer:
                self._cache = None
                if self._pending_seq:
                    self._conn.execute("UPDATE meta SET value=? WHERE key='last_seq'",
                                       (self._last_seq,))
                self._conn.execute("COMMIT")
                seq, self._pending_seq = self._pending_seq, 0
                for hook in self._on_commit:
                    hook()
        if outer and seq:
            for listener in list(self._listeners):
                listener(seq)

    def add_commit_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` right after each commit, under the store's lock: before any
        other writer can begin (the intent log is emptied there, omirror/intents.py)."""
        self._on_commit.append(hook)

    def add_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(last_seq)`` after each commit that logged changes."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[int], None]) -> None:
        """ValueError for one never added; removed during a notification, it still hears that
        commit."""
        self._listeners.remove(listener)

    # -- entries -------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest change in this store."""
        return self._last_seq

    def _committed(self, sql: str, args: tuple[object, ...]) -> list[Any]:
        """Rows as last committed, read beside an open transaction (see ``_reader``)."""
        if self._reader is None:
            with self._lock:
                return self._conn.execute(sql, args).fetchall()
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    def committed(self, path: bytes) -> Record | None:
        """:meth:`get` as last committed, for readers outside the tree worker: never
        waits for a transaction in progress, never sees one that could roll back."""
        rows = self._committed(f"SELECT {_COLUMNS} FROM entries WHERE path=?", (path,))
        return _record(rows[0]) if rows else None

    def get(self, path: bytes) -> Record | None:
        """None when the path was never recorded or its tombstone was collected; a deletion
        still held is a tombstone record, not None."""
        with self._lock:
            cache = self._cache
            if cache is not None and path in cache:
                return cache[path]
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM entries WHERE path=?",
                                     (path,)).fetchone()
            record = None if row is None else _record(row)
            if cache is not None:
                cache[path] = record
        return record

    def _written(self, path: bytes | None) -> None:
        """Drop what the transaction's cache holds of ``path`` (None: of every path)."""
        if self._cache is not None:
            if path is None:
                self._cache.clear()
            else:
                self._cache.pop(path, None)

    def put(self, entry: Entry, sig: StatSig | None) -> int:
        """Record a new version of a path and log it under the next sequence number."""
        with self.batch():
            self._written(entry.path)
            self._last_seq += 1
            seq = self._last_seq
            self._conn.execute(
                f"INSERT OR REPLACE INTO entries (dir, sig_ino, {_COLUMNS}) VALUES ({_SLOTS})",
                (parent_of(entry.path), None if sig is None else sig.ino, entry.path, seq,
                 int(entry.kind), entry.stamp.time_ns, entry.stamp.origin,
                 _pack_vector(entry.vector), entry.mode, entry.owner, entry.group,
                 entry.mtime_ns, entry.size, entry.digest, entry.target, entry.moved_from,
                 fast_sig(entry.kind, sig), entry.uid, entry.gid,
                 _pack_xattrs(entry.xattrs), entry.link))
            self._pending_seq = seq
        return seq

    def holds_exactly(self, path: bytes, stamp: Stamp, vector: Vector) -> bool:
        """Whether the version recorded for ``path`` is the one stamped ``stamp``, with
        exactly the history ``vector``: a delivery of it again has nothing to decide or
        record. Reads three columns, not a record."""
        with self._lock:
            cache = self._cache
            if cache is not None and path in cache:
                record = cache[path]
                return record is not None and record.entry.stamp == stamp \
                    and record.entry.vector == vector
            row = self._conn.execute("SELECT stamp_ns, origin, vector FROM entries "
                                     "WHERE path=?", (path,)).fetchone()
        return row is not None and row[0] == stamp.time_ns and row[1] == stamp.origin \
            and row[2] == _pack_vector(vector)

    def set_sig(self, path: bytes, kind: Kind, sig: StatSig | None) -> None:
        """Remember a new local stat for an unchanged version; not a change, no seq."""
        with self.batch():
            self._written(path)
            self._conn.execute("UPDATE entries SET sig_ino=?, fast=? WHERE path=?",
                               (None if sig is None else sig.ino, fast_sig(kind, sig), path))

    def set_vector(self, path: bytes, vector: Vector) -> None:
        """Record that this version's history now includes another; not a change, no seq."""
        with self.batch():
            self._written(path)
            self._conn.execute("UPDATE entries SET vector=? WHERE path=?",
                               (_pack_vector(vector), path))

    def signatures(self, directory: bytes) -> dict[bytes, bytes]:
        """The children of a directory as ``name -> packed fast signature``.

        This is the scanner's fast path: the index on ``dir`` covers every column read,
        and the dict is built by ``dict()`` from the cursor without a Python-level loop,
        because decoding rows for every file of a large tree would cost as much as the
        stat calls the fast path exists to save. The first byte of a signature is the
        record's kind (0 for a tombstone).
        """
        start = len(directory) + 2 if directory else 1
        with self._lock:
            return dict(self._conn.execute(
                "SELECT substr(path, ?), fast FROM entries WHERE dir=?", (start, directory)))

    def children(self, directory: bytes) -> Iterator[Record]:
        """Every record whose parent is ``directory``, tombstones included."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM entries WHERE dir=?",
                                      (directory,)).fetchall()
        return map(_record, rows)

    def by_inode(self, ino: int) -> list[Record]:
        """Live records last seen with this inode: candidates for a rename's source."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE sig_ino=? AND kind != 0",
                (ino,)).fetchall()
        return [_record(r) for r in rows]

    def under(self, prefix: bytes) -> Iterator[Record]:
        """Every record at or below a logical path, in path order, a page at a time."""
        low, high = prefix + b"/", prefix + b"0"  # b"0" is the byte after b"/"
        first = self.get(prefix)
        if first is not None:
            yield first
        last = low
        while True:
            with self._lock:
                rows = self._conn.execute(
                    f"SELECT {_COLUMNS} FROM entries WHERE path > ? AND path < ? "
                    "ORDER BY path LIMIT ?", (last, high, _PAGE)).fetchall()
            if not rows:
                return
            for row in rows:
                yield _record(row)
            last = bytes(rows[-1][0])

    def since(self, seq: int) -> Iterator[Record]:
        """Every record changed after ``seq`` and committed, oldest change first, a page
        at a time.

        Pages are read beside the writer (``_reader``), without a lock held in between,
        so a long catch-up of a returning peer and the tree worker's batches never wait
        for each other.
        """
        while True:
            rows = self._committed(
                f"SELECT {_COLUMNS} FROM entries WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, _PAGE))
            if not rows:
                return
            for row in rows:
                yield _record(row)
            seq = rows[-1][1]

    def page(self, seq: int, limit: int, *, skip_origins: Collection[str] = ()
             ) -> list[Record]:
        """Up to ``limit`` records changed after ``seq``, oldest change first, as last
        committed (:meth:`since`, one page).

        The versions made by the hosts of ``skip_origins`` are left out by SQLite, not
        decoded to be dropped: a pusher's peer made some of them, and it gets others
        from their makers (a burst from one peer is otherwise read back, row by row, to
        be skipped). The log's last record is always in, whoever made it, so that a page
        read to the end says where the log ended when it was read, in the same
        snapshot: the caller's position passes what was skipped and nothing that came
        after.
        """
        if not skip_origins:
            rows = self._committed(
                f"SELECT {_COLUMNS} FROM entries WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit))
        else:
            skip = tuple(skip_origins)
            marks = ",".join("?" * len(skip))
            rows = self._committed(
                f"SELECT {_COLUMNS} FROM entries WHERE seq > ? AND (origin NOT IN ({marks})"
                " OR seq = (SELECT max(seq) FROM entries)) ORDER BY seq LIMIT ?",
                (seq, *skip, limit))
        return [_record(row) for row in rows]

    def count_since(self, seq: int) -> int:
        """START's ``total``: one per path, including those the pusher will skip for that
        peer, so an upper bound."""
        return int(self._committed("SELECT count(*) FROM entries WHERE seq > ?",
                                   (seq,))[0][0])

    def count(self, *, live_only: bool = False) -> int:
        """Tombstones count unless ``live_only``; the scanner's test for an empty store
        counts them."""
        query = "SELECT count(*) FROM entries" + (" WHERE kind != 0" if live_only else "")
        with self._lock:
            return int(self._conn.execute(query).fetchone()[0])

    # -- tombstones ----------------------------------------------------------------------

    def collect_tombstones(self, older_than_ns: int) -> int:
        """Forget deletions stamped before the bound; return how many were collected.

        The floor records the highest seq forgotten: a peer whose cursor is below it may
        have missed a deletion and must be sent everything.
        """
        with self.batch():
            top = self._conn.execute(
                "SELECT count(*), max(seq) FROM entries WHERE kind = 0 AND stamp_ns < ?",
                (older_than_ns,)).fetchone()
            if not top[0]:
                return 0
            self._written(None)
            self._conn.execute("DELETE FROM entries WHERE kind = 0 AND stamp_ns < ?",
                               (older_than_ns,))
            self.floor = max(self.floor, int(top[1]))
            self._conn.execute("UPDATE meta SET value=? WHERE key='floor'", (self.floor,))
        log.info("collected %d tombstones older than %d; floor=%d", top[0], older_than_ns,
                 self.floor)
        return int(top[0])

    # -- peers ---------------------------------------------------------------------------

    def cursor(self, peer: str) -> Cursor | None:
        """None for a peer never received from: the receiver then asks for everything."""
        with self._lock:
            row = self._conn.execute("SELECT epoch, seq FROM cursors WHERE peer=?",
                                     (peer,)).fetchone()
        return None if row is None else Cursor(row[0], int(row[1]))

    def set_cursor(self, peer: str, cursor: Cursor) -> None:
        """The receiver keeps it below any entry still to retry, so a restart retries that
        entry too."""
        with self.batch():
            self._conn.execute("INSERT OR REPLACE INTO cursors VALUES (?,?,?)",
                               (peer, cursor.epoch, cursor.seq))

    def trust(self, peer: str, epoch: str, origins: Iterable[str], since: int) -> None:
        """Record that ``peer``'s pusher may leave out, after its seq ``since`` (of its
        log of ``epoch``), the versions ``origins`` made (wire.Direct: this host gets
        them from their makers). Recorded before the pusher is told; an origin already
        trusted in that epoch keeps the lower of the two seqs."""
        with self.batch():
            self._conn.executemany(
                "INSERT INTO trusts VALUES (?,?,?,?) ON CONFLICT (peer, origin) DO UPDATE "
                "SET since=CASE WHEN epoch=excluded.epoch THEN min(since, excluded.since) "
                "ELSE excluded.since END, epoch=excluded.epoch",
                [(peer, origin, epoch, since) for origin in origins])

    def untrust(self, peer: str, origins: Iterable[str]) -> None:
        """What ``peer``'s pusher left out of these hosts' versions has been sent again
        and is applied here."""
        with self.batch():
            self._conn.executemany("DELETE FROM trusts WHERE peer=? AND origin=?",
                                   [(peer, origin) for origin in origins])

    def advance_trust(self, origin: str, reached: dict[str, tuple[str, int]]) -> None:
        """This host holds every version ``origin`` had made when it read a MARK (its
        CAUGHTUP said so), and each peer's log (of the epoch given) had reached the seq
        given before that MARK was sent: those peers need no longer be asked for
        ``origin``'s versions up to there."""
        with self.batch():
            self._conn.executemany(
                "UPDATE trusts SET since=max(since, ?) WHERE peer=? AND origin=? AND epoch=?",
                [(seq, peer, origin, epoch) for peer, (epoch, seq) in reached.items()])

    def trusts(self, peer: str) -> dict[str, int]:
        """The origins ``peer``'s pusher may have left out, and since which of its seqs."""
        with self._lock:
            rows = self._conn.execute("SELECT origin, since FROM trusts WHERE peer=?",
                                      (peer,)).fetchall()
        return {origin: int(since) for origin, since in rows}

    def begin_receiving(self, peer: str, epoch: str, direct: Sequence[str]) -> Resume:
        """Where a new link from ``peer`` (its log now of ``epoch``) starts, and what it
        is to send again, in one transaction.

        ``peer``'s pusher left out the versions of the hosts this host trusted to send
        them, each since some seq. Those still linked here (``direct``) are trusted on.
        For the others, what it left out is asked for again: the stream starts at the
        oldest of their seqs, and up to the cursor carries only their versions. Their
        records stay until that is applied (:meth:`untrust`), so a crash asks again.
        """
        with self.batch():
            cursor = self.cursor(peer)
            self._conn.execute("DELETE FROM trusts WHERE peer=? AND epoch!=?", (peer, epoch))
            held = 0 if cursor is None or cursor.epoch != epoch else cursor.seq
            gone = {origin: int(since) for origin, since in self._conn.execute(
                "SELECT origin, since FROM trusts WHERE peer=?", (peer,))
                if origin not in direct}
            # a host trusted only beyond the cursor left nothing out that is not to come
            self.untrust(peer, [o for o, since in gone.items() if since >= held])
            again = {o: since for o, since in gone.items() if since < held}
            seq = min(again.values(), default=held)
            self.trust(peer, epoch, direct, seq)
        return Resume(cursor, seq, held, tuple(sorted(again)))

    def cursors(self) -> dict[str, Cursor]:
        """Every peer's, for tests and inspection; the daemon asks :meth:`cursor` per peer."""
        with self._lock:
            rows = self._conn.execute("SELECT peer, epoch, seq FROM cursors").fetchall()
        return {peer: Cursor(epoch, int(seq)) for peer, epoch, seq in rows}


@dataclass(frozen=True)
class Resume:
    """Where a new link from a peer starts (Store.begin_receiving): at ``seq``; up to
    ``held`` (the cursor) it sends only the versions of ``again``."""

    cursor: Cursor | None
    seq: int
    held: int
    again: tuple[str, ...]


def matches(st: os.stat_result | None, record: Record | None) -> bool:
    """Whether a path's lstat (None: nothing there) is what ``record`` says is there."""
    if st is None:
        return record is None or record.entry.is_tombstone
    if record is None or record.entry.is_tombstone or record.sig is None:
        return False
    if kind_of(st) is not record.entry.kind:
        return False
    if record.entry.kind is Kind.DIR:
        # not by times (each file written into it moves them), but a chmod is a change
        return st.st_ino == record.sig.ino and stat.S_IMODE(st.st_mode) == record.entry.mode
    return StatSig.of(st) == record.sig
