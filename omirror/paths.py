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

import os

#: Prefix of the daemon's own files inside a tree (temp files, the root marker).
OWN_PREFIX = b".omirror"


def logical(top: str) -> bytes:
    """The logical path of a FILES entry: ``"/srv/www"`` -> ``b"srv/www"``."""
    return os.fsencode(top.strip("/"))


def local_path(root: bytes, path: bytes) -> bytes:
    """Where a logical path lives on this host, under ``--root``. Only for messages and
    for opening a set's root: everything below a root is reached through descriptors
    (:mod:`omirror.fsio`)."""
    return os.path.join(root, path) if path else root


def is_under(path: bytes, top: bytes) -> bool:
    """``path`` is ``top`` or lies below it, compared by whole components."""
    return path == top or not top or path.startswith(top + b"/")


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
