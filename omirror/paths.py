"""Logical paths, where they live on this host, and the one form in which people read them.

A *logical path* names a file the same way on every host: relative to ``/`` and without
the ``--root`` prefix (``b"srv/www/index.html"``). It is bytes end to end, because a
Linux file name need not be UTF-8.

File names come from local users and from peers, so a name may hold a newline, an
escape sequence or a right-to-left override. Every path that reaches a log line, the
output of ``--check`` or ``log dump``, or ``omirrord status`` goes through :func:`show`,
which escapes whatever is not printable: a file name can neither forge a log line nor
hide what it is.
"""

from __future__ import annotations

import functools
import os

from omirror.errors import PathRefused

#: Prefix of the daemon's own files inside a tree (temp files, the root marker).
OWN_PREFIX = b".omirror"
#: Prefix of the temp files a transfer writes; what a crash leaves is swept at startup.
TEMP_PREFIX = b".omirror-tmp-"
#: What is kept of a transfer that was cut, to resume from (omirror/staging.py).
PARTIAL_PREFIX = b".omirror-part-"
#: Where ``install -osavetargets`` keeps what a peer's change replaced, under each FILES
#: root (omirror/versions.py).
VERSIONS_AREA = b".omirror-versions"
#: Longest name and longest logical path accepted from a peer (Linux NAME_MAX, PATH_MAX).
NAME_MAX = 255
PATH_MAX = 4096


def logical(top: str) -> bytes:
    """The logical path of a FILES entry: ``"/srv/www"`` -> ``b"srv/www"``."""
    return os.fsencode(top.strip("/"))


def local_path(root: bytes, path: bytes) -> bytes:
    """Where a logical path lives on this host, under ``--root``. Only for messages and
    for opening a set's root: everything below a root is reached through descriptors
    (:mod:`omirror.fsio`)."""
    return os.path.join(root, path) if path else root


def is_under(path: bytes, top: bytes) -> bool:
    """``path`` is ``top`` or lies below it, compared by whole components; for logical
    paths (``b""`` is the top of everything) and local ones (``b"/"`` too)."""
    return path == top or not top or path.startswith(top if top.endswith(b"/") else top + b"/")


def split(path: bytes) -> tuple[bytes, bytes]:
    """``b"a/b/c"`` -> ``(b"a/b", b"c")``; the parent of a top-level name is ``b""``."""
    parent, _, name = path.rpartition(b"/")
    return parent, name


def join(parent: bytes, name: bytes) -> bytes:
    """The path of ``name`` in the directory ``parent`` (``b""``: the top)."""
    return parent + b"/" + name if parent else name


def is_own_name(name: bytes) -> bool:
    """True for the daemon's own files, which are never mirrored nor shown as differences."""
    return name.startswith(OWN_PREFIX)


def has_own_name(path: bytes) -> bool:
    """True when any component of ``path`` is one of the daemon's own names."""
    return any(is_own_name(part) for part in path.split(b"/"))


def show(path: bytes) -> str:
    """A logical path as people read it: ``/srv/www/a``, escaped where it must be.

    Bytes that are not UTF-8 become ``\\xNN``, characters that are not printable (control
    characters, line and paragraph separators, bidirectional overrides) become ``\\xNN``,
    ``\\uNNNN`` or ``\\UNNNNNNNN``, and a backslash is doubled, so that the shown form
    is unambiguous and always one line.
    """
    return "/" + show_name(path)


def show_name(name: bytes) -> str:
    """One name, or a path as it is (a local absolute path), escaped as :func:`show`
    escapes."""
    text = name.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def show_text(text: str) -> str:
    """A string from a peer or a file (a host name, an owner) escaped as :func:`show`
    escapes, for messages."""
    return show_name(text.encode("utf-8", "surrogateescape"))


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def check_form(path: object) -> None:
    """Refuse a path that is not a plain relative path of real names.

    Every component is checked, not the joined string: ``b"a//b"``, ``b"a/./b"`` and a
    trailing ``/`` all name a path some other way than the scanner would, and ``..``
    climbs out. Names of the daemon's own files (``.omirror*``: temp files, the root
    marker) are refused so a peer cannot overwrite or forge them; conflict copies are
    ``NAME.omirror-conflict-...`` and pass.
    """
    if not isinstance(path, bytes):
        raise PathRefused(path, f"is a {type(path).__name__}, not bytes")
    _check_bytes(path)


@functools.lru_cache(maxsize=8192)
def _check_bytes(path: bytes) -> None:
    """:func:`check_form` of bytes; remembered for the paths that pass, since one entry
    is checked at every layer it crosses (wire, resolver, set directories), and a
    burst of entries meets the same paths again. A refusal raises: never remembered."""
    if not path:
        raise PathRefused(path, "is empty")
    if len(path) > PATH_MAX:
        raise PathRefused(path, f"is {len(path)} bytes long, longer than {PATH_MAX}")
    if path.startswith(b"/"):
        raise PathRefused(path, "is absolute; logical paths are relative to /")
    if b"\0" in path:
        raise PathRefused(path, "contains a NUL byte")
    for part in path.split(b"/"):
        if not part:
            raise PathRefused(path, "has an empty component (a doubled or trailing '/')")
        if part in (b".", b".."):
            raise PathRefused(path, f"has a '{show_name(part)}' component")
        if len(part) > NAME_MAX:
            raise PathRefused(path, f"has a component of {len(part)} bytes, longer "
                                    f"than {NAME_MAX}")
        if is_own_name(part):
            raise PathRefused(path, f"names the daemon's own file '{show_name(part)}'; "
                                    "names starting with .omirror are never mirrored")
