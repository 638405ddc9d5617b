"""Extended attributes and POSIX ACLs: which are mirrored, how they travel, how they are set.

A version's attributes are a sorted tuple of ``(name, value)`` pairs, part of what the
version is: a change of attributes alone is a new version. Which names a set mirrors is
its :class:`Policy`: ``user.*`` and the two POSIX ACLs by default, ``security.*`` (SELinux
labels, file capabilities) only with ``install -osecurityxattrs``, nothing with
``install -onoxattrs``, and ``trusted.*`` never (it needs privileges on the receiver
that say nothing about the sender).

The kernel keeps an ACL as binary entries of numeric ids, which mean other users on
another host. An ACL therefore travels as text, each named entry with the name and the
number of its user or group (``user:alice=1001:r--``), and is turned back into ids on the
receiver by the owner rule (omirror/owners.py): a name known here maps to its id, an
unknown one to the sender's number.

Every call works on an open descriptor: the file whose attributes are read or set is the
one that was opened and checked, never a path someone could swap.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from omirror.owners import group_name, local_id, user_name

if TYPE_CHECKING:
    from omirror.config import InstallOptions

log = logging.getLogger(__name__)

#: A version's attributes: ``(name, value)`` pairs, sorted by name, names unique.
Xattrs = tuple[tuple[bytes, bytes], ...]

ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
ACLS = (ACL_ACCESS, ACL_DEFAULT)
USER = b"user."
SECURITY = b"security."

#: Limits a peer's entry is held to: Linux's own (XATTR_NAME_MAX, XATTR_SIZE_MAX), and a
#: bound on how many and how much one version may carry.
NAME_MAX = 255
VALUE_MAX = 65536
COUNT_MAX = 1024
TOTAL_MAX = 256 * 1024

# linux/posix_acl_xattr.h
_ACL_VERSION = 2
_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_UNDEFINED_ID = 0xFFFFFFFF
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_TAG_TEXT = {_USER_OBJ: b"user", _USER: b"user", _GROUP_OBJ: b"group", _GROUP: b"group",
             _MASK: b"mask", _OTHER: b"other"}
_NAMED = (_USER, _GROUP)
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP)
#: Devices found to keep no attributes (some list none but refuse to set any, as ramfs
#: does): what is read there says nothing of what a version holds.
_unsupported_devices: set[int] = set()


def _unsupported(fd: int) -> None:
    _unsupported_devices.add(os.fstat(fd).st_dev)


class BadXattrs(ValueError):
    """Attributes no honest peer sends (a name outside the mirrored namespaces, an ACL
    that is not one); the receiver refuses the entry."""


@dataclass(frozen=True, slots=True)
class Policy:
    """Which attribute names a set mirrors (its install options)."""

    enabled: bool = True
    security: bool = False

    @classmethod
    def of(cls, options: InstallOptions) -> Policy:
        return cls(enabled=not options.noxattrs, security=options.securityxattrs)

    def manages(self, name: bytes) -> bool:
        if not self.enabled:
            return False
        if name.startswith(USER) or name in ACLS:
            return True
        return self.security and name.startswith(SECURITY)


def allowed(name: bytes) -> bool:
    """A name any peer may send: one that some policy mirrors."""
    return any(name.startswith(prefix) and len(name) > len(prefix)
               for prefix in (USER, SECURITY)) or name in ACLS


def check(xattrs: Xattrs) -> None:
    """Refuse (:class:`BadXattrs`) attributes that cannot come from an honest peer."""
    if len(xattrs) > COUNT_MAX:
        raise BadXattrs(f"{len(xattrs)} extended attributes (at most {COUNT_MAX})")
    total = 0
    previous = b""
    for name, value in xattrs:
        if not allowed(name) or b"\0" in name or len(name) > NAME_MAX:
            raise BadXattrs(f"extended attribute {name[:NAME_MAX]!r} is not one omirror "
                            "mirrors (user.*, security.*, the POSIX ACLs)")
        if name <= previous:
            raise BadXattrs("extended attributes out of order or repeated")
        if len(value) > VALUE_MAX:
            raise BadXattrs(f"extended attribute {name!r} holds more than {VALUE_MAX} bytes")
        if name in ACLS:
            parse_acl(value)
        previous = name
        total += len(name) + len(value)
    if total > TOTAL_MAX:
        raise BadXattrs(f"extended attributes of {total} bytes (at most {TOTAL_MAX})")


def normal(pairs: Iterable[tuple[bytes, bytes]]) -> Xattrs:
    return tuple(sorted(dict(pairs).items()))


def flat(xattrs: Xattrs) -> list[bytes]:
    """The form attributes travel and are stored in: name, value, name, value."""
    return [item for pair in xattrs for item in pair]


def paired(items: list[bytes]) -> Xattrs:
    """:func:`flat` undone (the order kept: checking it is :func:`check`'s)."""
    return tuple(zip(items[::2], items[1::2]))


# -- reading --------------------------------------------------------------------------------

def read(fd: int, policy: Policy) -> Xattrs | None:
    """The mirrored attributes of an open file or directory; None when its file system
    keeps none (the caller keeps what it recorded). An attribute removed between listing
    and reading is simply not there."""
    if not policy.enabled:
        return ()
    if _unsupported_devices and os.fstat(fd).st_dev in _unsupported_devices:
        return None
    try:
        names = os.listxattr(fd)
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            _unsupported(fd)
            return None
        raise
    pairs = []
    for text in names:
        name = os.fsencode(text)
        if not policy.manages(name):
            continue
        try:
            value = os.getxattr(fd, name)
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue
            raise
        if name in ACLS:
            value = acl_to_text(value)
        pairs.append((name, value))
    return normal(pairs)


def merged(read_here: Xattrs | None, recorded: Xattrs, policy: Policy) -> Xattrs:
    """A version's attributes from what was read here and the record: what this host
    does not mirror (or cannot read) is kept as recorded, so that a host with another
    policy or a file system without attributes never makes a version that drops them."""
    if read_here is None:
        return recorded
    kept = [(n, v) for n, v in recorded if not policy.manages(n)]
    return normal([*read_here, *kept]) if kept else read_here


# -- setting --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Given:
    """The managed attributes :meth:`Writer.apply` left on a file, as the kernel keeps
    them (ACLs in binary, with this host's ids).

    They are read back once the file's stat is taken (:func:`still_given`): a change a
    user makes between the last set and that stat is in the stat, and recorded with it
    it would look like this host's own and never be sent. Names whose state here is
    not the version's (refused by this file system or this process, an ACL the kernel
    folds into the mode) are not checked."""

    policy: Policy
    values: dict[bytes, bytes]
    loose: frozenset[bytes]


@dataclass
class Writer:
    """Sets a version's attributes on open files; says once per set what it cannot do."""

    _told: set[tuple[str, str]]

    def __init__(self) -> None:
        self._told = set()

    def apply(self, fd: int, wanted: Xattrs, policy: Policy, where: str) -> Given | None:
        """Make the managed attributes of ``fd`` exactly ``wanted``'s managed ones; what
        they are then, or None where there is nothing to check (none mirrored, or a file
        system that keeps none).

        ACLs are set before the caller sets the mode (chmod then keeps the ACL's mask
        in step with the group bits, as on the sender). A file system without
        attributes, or a name this process may not set, is logged once per set and the
        rest goes on: the content and the other attributes still arrive.
        """
        if not policy.enabled:
            return None
        want = {n: v for n, v in wanted if policy.manages(n)}
        try:
            have = {os.fsencode(n) for n in os.listxattr(fd)}
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                _unsupported(fd)
                if want:
                    self._no_support(where)
                return None
            raise
        loose = set()
        for name in sorted(have):
            if policy.manages(name) and name not in want \
                    and not self._call(os.removexattr, fd, name, where=where):
                loose.add(name)
        values = {}
        for name, value in want.items():
            raw = text_to_acl(value) if name in ACLS else value
            values[name] = raw
            if name == ACL_ACCESS and _minimal(raw):
                loose.add(name)  # the kernel keeps it as the mode bits alone
            if name in have:
                try:
                    current = os.getxattr(fd, name)
                except OSError:
                    current = None
                if current == raw:
                    continue
            if not self._call(os.setxattr, fd, name, raw, where=where):
                loose.add(name)
        if loose and _unsupported_devices and os.fstat(fd).st_dev in _unsupported_devices:
            return None  # found here to keep none: nothing it holds says anything
        return Given(policy, {n: v for n, v in values.items()
                              if n not in loose and not n.startswith(SECURITY)},
                     frozenset(loose))

    def _no_support(self, where: str) -> None:
        self._tell(where, "nosupport", "the file system here keeps no extended attributes: "
                   "they are not set on it, and the versions keep the ones they carry")

    def _call(self, call: object, fd: int, name: bytes, *args: bytes, where: str) -> bool:
        """Whether the set or removal was done; False for one this host cannot do."""
        try:
            call(fd, name, *args)  # type: ignore[operator]
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                _unsupported(fd)
                self._no_support(where)
                return False
            if e.errno in (errno.EPERM, errno.EACCES, errno.E2BIG,
                           errno.ENOSPC, errno.ERANGE, errno.EINVAL):
                self._tell(where, f"{name!r}:{e.errno}",
                           f"extended attribute {name.decode('utf-8', 'replace')} cannot be "
                           f"set here: {os.strerror(e.errno or 0)}")
                return False
            raise
        return True

    def _tell(self, where: str, what: str, message: str) -> None:
        if (where, what) not in self._told:
            self._told.add((where, what))
            log.warning("set=%s %s", where, message)


# -- ACLs as text ---------------------------------------------------------------------------

def _perm_text(perm: int) -> bytes:
    return b"".join(char if perm & bit else b"-"
                    for char, bit in ((b"r", 4), (b"w", 2), (b"x", 1)))


def acl_to_text(raw: bytes) -> bytes:
    """The kernel's binary ACL as the text that travels: one entry per line, named
    entries with name and number (``group:staff=50:rw-``). A value that is not an ACL
    travels as it is, and :func:`check` on the receiver refuses it."""
    entries = _entries(raw)
    if entries is None:
        return raw
    lines = []
    for tag, perm, ident in entries:
        if tag not in _TAG_TEXT:
            return raw
        who = b""
        if tag in _NAMED:
            name = user_name(ident) if tag == _USER else group_name(ident)
            who = name.encode("utf-8", "surrogateescape") + b"=" + str(ident).encode()
        lines.append(_TAG_TEXT[tag] + b":" + who + b":" + _perm_text(perm))
    return b"\n".join(lines)


def parse_acl(text: bytes) -> list[tuple[int, int, str, int]]:
    """``(tag, perm, name, number)`` per entry of an ACL's text; :class:`BadXattrs` for
    anything else."""
    entries = []
    for line in text.split(b"\n"):
        parts = line.split(b":")
        if len(parts) != 3 or len(parts[2]) != 3:
            raise BadXattrs(f"ACL entry {line[:80]!r} is not TAG:[NAME=ID]:PERM")
        tag_text, who, perm_text = parts
        perm = 0
        for i, (char, bit) in enumerate(((b"r", 4), (b"w", 2), (b"x", 1))):
            if perm_text[i:i + 1] == char:
                perm |= bit
            elif perm_text[i:i + 1] != b"-":
                raise BadXattrs(f"ACL entry {line[:80]!r} has a bad permission")
        named = bool(who)
        table = {(b"user", False): _USER_OBJ, (b"user", True): _USER,
                 (b"group", False): _GROUP_OBJ, (b"group", True): _GROUP,
                 (b"mask", False): _MASK, (b"other", False): _OTHER}
        tag = table.get((tag_text, named))
        if tag is None:
            raise BadXattrs(f"ACL entry {line[:80]!r} has an unknown tag")
        name, number = "", -1
        if named:
            raw_name, eq, raw_id = who.rpartition(b"=")
            if not eq or not raw_id.isdigit() or len(raw_id) > 10 \
                    or int(raw_id) >= _UNDEFINED_ID:
                raise BadXattrs(f"ACL entry {line[:80]!r} names no NAME=ID")
            name = raw_name.decode("utf-8", "surrogateescape")
            if not name.isprintable() or "/" in name:
                raise BadXattrs(f"ACL entry {line[:80]!r} has a bad name")
            number = int(raw_id)
        entries.append((tag, perm, name, number))
    return entries


def text_to_acl(text: bytes) -> bytes:
    """The binary ACL this host's kernel takes for the text, ids by the owner rule."""
    entries = []
    for tag, perm, name, number in parse_acl(text):
        ident = _UNDEFINED_ID
        if tag in _NAMED:
            ident, _ = local_id("user" if tag == _USER else "group", name, number)
        entries.append((tag, ident, perm))
    # the kernel takes entries by tag, named ones by id: the ids here may sort otherwise
    entries.sort()
    return _HEADER.pack(_ACL_VERSION) + b"".join(
        _ACL_ENTRY.pack(tag, perm, ident) for tag, ident, perm in entries)


# -- reading back what was set --------------------------------------------------------------

def still_given(target: int | str, given: Given) -> bool:
    """Whether the file at ``target`` (a descriptor, or a ``/proc/self/fd`` path for one
    opened with ``O_PATH``) holds exactly the managed attributes it was given.

    An ACL's mask is left out: the chmod after it moves the mask with the group bits,
    and a change of the mask alone moves them too, which the caller compares.
    ``security.*`` is left out: only a privileged process changes it, and the kernel
    may keep it otherwise than it was set (SELinux lists a label on every file, and
    may write the one it was given in another form; file capabilities change format
    with the user namespace)."""
    try:
        names = {os.fsencode(n) for n in os.listxattr(target)}
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return True
        raise
    policy = given.policy
    if {n for n in names if policy.manages(n) and n not in given.loose
            and not n.startswith(SECURITY)} != given.values.keys():
        return False
    for name, value in given.values.items():
        try:
            now = os.getxattr(target, name)
        except OSError as e:
            if e.errno == errno.ENODATA:
                return False
            raise
        if (_unmasked(now) != _unmasked(value)) if name in ACLS else now != value:
            return False
    return True


def _entries(raw: bytes) -> list[tuple[int, int, int]] | None:
    """``(tag, perm, id)`` of a binary ACL; None for a value that is not one."""
    if len(raw) < _HEADER.size or (len(raw) - _HEADER.size) % _ACL_ENTRY.size \
            or _HEADER.unpack_from(raw)[0] != _ACL_VERSION:
        return None
    return list(_ACL_ENTRY.iter_unpack(raw[_HEADER.size:]))


def _unmasked(raw: bytes) -> list[tuple[int, int, int]] | bytes:
    """An ACL without its mask; a value that is not an ACL as it is."""
    entries = _entries(raw)
    return raw if entries is None else [entry for entry in entries if entry[0] != _MASK]


def _minimal(raw: bytes) -> bool:
    """An access ACL of the owner, group and other entries alone: the mode says it all."""
    entries = _entries(raw) or []
    return len(entries) == 3 and {tag for tag, _, _ in entries} == {_USER_OBJ, _GROUP_OBJ,
                                                                   _OTHER}
