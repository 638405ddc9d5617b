"""The low-disk guard: what a peer sends is never written into the last free space.

A file system filled to the last block breaks more than the mirror (logs, databases,
the services whose trees are mirrored). So before a file's content is written, the free
space (what an unprivileged user may still use: ``f_bavail``) is compared with the
file's size plus a reserve the operator sets with ``--min-free`` (a size, or a percentage
of the file system). A file that would cut into the reserve is not written: it fails
like any path that cannot be applied, is retried every few seconds, and status names
the set whose file system is low. Deletions, renames and attribute changes go on: they
free space or take none. When space returns, the retries apply what waited.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

from omirror.errors import ApplyError
from omirror.units import human_bytes

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
#: How soon a file refused for lack of space is tried again.
RETRY_S = 2.0


class LowDisk(ApplyError):
    """Writing a file would cut into the reserve of free space."""


@dataclass(frozen=True)
class Reserve:
    """Free space never written into: ``size`` bytes, or ``percent`` of the file system
    (whichever the operator gave)."""

    size: int = 0
    percent: float = 0.0

    def __bool__(self) -> bool:
        return self.size > 0 or self.percent > 0

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent else human_bytes(self.size)

    def bytes_of(self, st: os.statvfs_result) -> int:
        """A percentage is of the file system's whole size, taken at each check, so it
        follows a resize; :func:`room` compares it with what a user may still use."""
        if self.percent:
            return int(st.f_blocks * st.f_frsize * self.percent / 100)
        return self.size


#: Syncthing's default (minDiskFree 1%): room for logs and services on a full tree.
DEFAULT_MIN_FREE = Reserve(percent=1.0)


def parse_reserve(text: str) -> Reserve:
    """``"1%"``, ``"512M"``, ``"2GiB"``, ``"0"`` (no reserve). ValueError for others."""
    if m := _PERCENT.match(text):
        percent = float(m.group(1))
        if percent >= 100:
            raise ValueError(f"{text!r}: a reserve of 100% or more would stop every write")
        return Reserve(percent=percent)
    if m := _SIZE.match(text):
        return Reserve(size=int(float(m.group(1)) * _SUFFIXES[m.group(2).upper()]))
    raise ValueError(f"{text!r} is not a size (512M, 2G, 1048576) or a percentage (1%)")


@dataclass(frozen=True)
class Shortage:
    """A file refused on a set's file system: what status shows until there is room."""

    free: int
    reserve: int
    needed: int

    def text(self) -> str:
        """The same words in the log, in status (``low_disk``) and in the refusal."""
        return (f"{human_bytes(self.free)} free, a file of {human_bytes(self.needed)} "
                f"waits, reserve {human_bytes(self.reserve)}")


def room(dir_fd: int, reserve: Reserve) -> tuple[int, int]:
    """(free bytes, bytes to keep free) on the file system of the open directory."""
    st = os.fstatvfs(dir_fd)
    return st.f_bavail * st.f_frsize, reserve.bytes_of(st)


def refuse(path: bytes, shown: str, shortage: Shortage) -> LowDisk:
    """Returned for the caller to raise; being a LowDisk, it is retried every
    :data:`RETRY_S` instead of with the usual backoff."""
    return LowDisk(path, errno.ENOSPC, f"cannot write {shown}: low disk space "
                                       f"({shortage.text()}); it is applied when space "
                                       "returns")
