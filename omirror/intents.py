"""The intent log: what the applier is about to put on disk before the store records it.

A receive batch applies up to 64 entries in one store transaction. A ``kill -9`` (or a
power cut) after some of its renames and before its commit leaves files that came from a
peer with no record of that: the next scan would stamp them as new local versions, made
now, which can beat a newer version a third peer wrote meanwhile. So right before each
rename, unlink, mkdir or chmod, the applier appends the entry and the inode it is about
to put at the path to this log; the commit that records them empties it. A daemon that
starts with a log that is not empty looks at each path: where the disk holds the very
inode the log names (changed since it was noted), or the path is gone for a deletion,
the entry is recorded as the peer's version it is, before the startup scan runs.

One ``write(2)`` per entry on a file opened with ``O_APPEND``: a process killed at any
point leaves whole records and at most one torn one at the end, which is ignored. A
record is written before the change it announces, so a torn record announces a change
that never happened.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

import msgpack

from omirror.entry import Entry
from omirror.wire import MAX_FRAME, ProtocolError, decode_entry, entry_fields

log = logging.getLogger(__name__)

FILE_NAME = "intents"
_LENGTH = struct.Struct(">I")
#: An entry arrived in one frame, so its record is never longer (a long vector of long
#: origins, a 4 KiB path and target); a longer length is a torn or foreign file.
_MAX_RECORD = MAX_FRAME


@dataclass(frozen=True)
class Intent:
    """``entry`` is about to be put at its path as inode ``ino`` (0 for a deletion);
    ``old_ctime_ns`` is the ctime the path had before when that inode stays the same (a
    directory whose mode is set), 0 otherwise."""

    entry: Entry
    ino: int
    old_ctime_ns: int = 0


class IntentLog:
    """The log of one state directory, open for appending while the daemon runs."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = os.path.join(os.fspath(state_dir), FILE_NAME)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o600)
        self._dirty = os.fstat(self._fd).st_size > 0

    def close(self) -> None:
        """Idempotent; the file stays, so what was noted and not cleared is there for
        :func:`read` at the next start."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def note(self, intent: Intent) -> None:
        """Call right before the change it announces, never after :meth:`close`; the record
        is written, not fsynced."""
        body = msgpack.packb([entry_fields(intent.entry), intent.ino, intent.old_ctime_ns],
                             use_bin_type=True)
        os.write(self._fd, _LENGTH.pack(len(body)) + body)
        self._dirty = True

    def clear(self) -> None:
        """Everything noted is recorded in the store (its transaction committed)."""
        if self._dirty and self._fd >= 0:
            os.ftruncate(self._fd, 0)
            self._dirty = False


def read(state_dir: str | os.PathLike[str]) -> list[Intent]:
    """The intents a daemon that stopped left behind; a torn last record is dropped."""
    try:
        with open(os.path.join(os.fspath(state_dir), FILE_NAME), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    found: list[Intent] = []
    at = 0
    while at + _LENGTH.size <= len(data):
        (length,) = _LENGTH.unpack_from(data, at)
        body = data[at + _LENGTH.size:at + _LENGTH.size + length]
        if length > _MAX_RECORD or len(body) < length:
            break
        start, at = at, at + _LENGTH.size + length
        try:
            fields = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
            entry_raw, ino, old_ctime = fields
            found.append(Intent(decode_entry(entry_raw), int(ino), int(old_ctime)))
        except (ValueError, TypeError, msgpack.UnpackException, ProtocolError) as e:
            log.warning("intent log %s: record at byte %d is unreadable (%s); the rest "
                        "is ignored", os.path.join(os.fspath(state_dir), FILE_NAME), start, e)
            break
    return found
