"""Owners and groups: by name between hosts, by id on disk, and the rule that maps them.

An entry names its owner and group as rdist does, by name, and carries the sender's
numeric ids beside them. The rule, in one sentence (docs/security.rst): *a name that
exists here maps to its id here, else the sender's numeric id is used; set-user-ID and
set-group-ID bits stay only when both owner and group were mapped by a name that exists
here, and were really set; with* ``nochkowner`` */* ``nochkgroup`` *an existing file
keeps its owner or group and a new one gets the daemon's, and loses those bits.*

So a file of a local user ``mallory`` on one host, with mode 6755, never becomes a
set-user-ID file of root, nor of whoever holds mallory's uid, on a host that has no
``mallory``: it keeps mallory's number, without the set-id bits, and a WARNING names the
missing user once.
"""

from __future__ import annotations

import functools
import grp
import logging
import os
import pwd
import stat
from dataclasses import dataclass

from omirror.paths import show, show_text

log = logging.getLogger(__name__)

#: Set-user-ID and set-group-ID: kept only when owner and group are mapped exactly.
SETID = stat.S_ISUID | stat.S_ISGID
_CAP_CHOWN = 0
#: The kernel's id for "an owner this host cannot name" (as NFS squashes to it).
_OVERFLOW = 65534
#: Numeric ids are 32 bits; (uid_t) -1 means "no change" to chown(2), never an owner.
_ID_LIMIT = (1 << 32) - 1


@functools.lru_cache(maxsize=4096)
def user_name(uid: int) -> str:
    """The name an owner travels by; a uid without a name travels as its digits."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@functools.lru_cache(maxsize=4096)
def group_name(gid: int) -> str:
    """The name a group travels by; a gid without a name travels as its digits, which
    :func:`gid_named` never takes for a name."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


@functools.lru_cache(maxsize=4096)
def uid_named(name: str) -> int | None:
    """The local uid of a user name; None for a name unknown here (and for digits,
    which name no one: they are the sender's number for a uid it could not name)."""
    if not _nameable(name):
        return None
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


@functools.lru_cache(maxsize=4096)
def gid_named(name: str) -> int | None:
    """None for a group unknown here, and for digits. Cached, None included: a group made
    while the daemon runs is found only after a restart."""
    if not _nameable(name):
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _nameable(name: str) -> bool:
    return bool(name) and not (name.isascii() and name.isdigit()) and "\0" not in name


@functools.cache
def overflow_id(kind: str) -> int:
    """``/proc/sys/kernel/overflowuid`` (or ``gid``): nobody, where no number came."""
    try:
        with open(f"/proc/sys/kernel/overflow{kind}", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _OVERFLOW


def can_chown() -> bool:
    """Whether this process may give files away: ``CAP_CHOWN`` in its effective set.

    Not "is this root": a root whose bounding set lacks it cannot, and the hardened
    setup (a service user with ambient capabilities) can.
    """
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_CHOWN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


@dataclass(frozen=True, slots=True)
class Ownership:
    """What to make a file's owner and group: an id, or None to leave what the file has
    (a new file then has the daemon's); ``exact`` when both came by a name known here."""

    uid: int | None
    gid: int | None
    exact: bool

    def chown_args(self) -> tuple[int, int] | None:
        """``(uid, gid)`` for chown(2), -1 for "leave it"; None when both are left."""
        if self.uid is None and self.gid is None:
            return None
        return (-1 if self.uid is None else self.uid, -1 if self.gid is None else self.gid)

    def allows_setid(self, st: os.stat_result) -> bool:
        """Set-id bits may stay on a file that really got this owner and group."""
        return self.exact and st.st_uid == self.uid and st.st_gid == self.gid

    def mode(self, mode: int, st: os.stat_result) -> int:
        """``mode`` as it may be set on the file ``st`` (after its owner was set)."""
        mode &= 0o7777
        return mode if self.allows_setid(st) else mode & ~SETID


def local_id(kind: str, name: str, number: int) -> tuple[int, bool]:
    """The id an entry's ``user`` or ``group`` gets here, and whether it is exact.

    A name known here maps to its id (exact). Otherwise the sender's ``number`` is used
    (or the digits of a name that is one: a uid the sender could not name), and the
    kernel's overflow id (nobody) where none came. Used both to apply a version and to
    recognise one already applied, so the two can never disagree.
    """
    found = (uid_named if kind == "user" else gid_named)(name)
    if found is not None:
        return found, True
    if number < 0 and name.isascii() and name.isdigit() and len(name) <= 10:
        number = int(name)
    if not 0 <= number < _ID_LIMIT:
        number = overflow_id("uid" if kind == "user" else "gid")
    return number, False


class OwnerMap:
    """Maps the owners of entries from peers to ids here, and says once per name when
    one does not exist here."""

    def __init__(self) -> None:
        self._warned: set[tuple[str, str]] = set()

    def resolve(self, owner: str, uid: int, group: str, gid: int, path: bytes,
                origin: str, *, keep_owner: os.stat_result | bool | None = False,
                keep_group: os.stat_result | bool | None = False) -> Ownership:
        """The ownership to give ``path`` for an entry's owner and group.

        ``keep_owner`` / ``keep_group`` are ``nochkowner`` / ``nochkgroup``: the stat of
        the file being replaced (whose id stays), or None for a new file (which keeps
        the daemon's); False when the option is off.
        """
        ids: list[int | None] = []
        exact = True
        for kind, name, number, keep in (("user", owner, uid, keep_owner),
                                         ("group", group, gid, keep_group)):
            if keep is not False:
                st = keep if isinstance(keep, os.stat_result) else None
                ids.append(None if st is None else st.st_uid if kind == "user" else st.st_gid)
                exact = False
                continue
            found, known = local_id(kind, name, number)
            if not known:
                self._warn_once(kind, name, found, path, origin)
                exact = False
            ids.append(found)
        return Ownership(ids[0], ids[1], exact)

    def _warn_once(self, kind: str, name: str, number: int, path: bytes,
                   origin: str) -> None:
        if (kind, name) in self._warned or not _nameable(name):
            return
        self._warned.add((kind, name))
        log.warning("%s '%s' of %s (from %s) does not exist here: its files get the "
                    "sender's %s %d, without set-user-ID or set-group-ID bits; create the "
                    "%s with the same id to mirror them exactly", kind, show_text(name),
                    show(path), show_text(origin), "uid" if kind == "user" else "gid",
                    number, kind)

    @staticmethod
    def recorded(owner: str, uid: int, group: str, gid: int, mode: int,
                 st: os.stat_result) -> tuple[str, int, str, int, int] | None:
        """``(owner, uid, group, gid, mode)`` of a recorded version when the file ``st``
        is what applying it here gives (its owner mapped, its set-id bits dropped by the
        rule above); None when the file's owner, group or mode changed since.

        The scanner uses this so that the mapping of an owner unknown here is not taken
        for a local change, and sent back to the peers as one.
        """
        want_uid, exact_uid = local_id("user", owner, uid)
        want_gid, exact_gid = local_id("group", group, gid)
        if (st.st_uid, st.st_gid) != (want_uid, want_gid):
            return None
        on_disk = stat.S_IMODE(st.st_mode)
        if on_disk != mode and ((exact_uid and exact_gid) or on_disk != mode & ~SETID):
            return None
        return owner, uid, group, gid, mode
