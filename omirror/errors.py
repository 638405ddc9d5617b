"""The few exception types omirror raises, each carrying a message a sysadmin can act on.

Callers catch these by kind (a bad config stops startup, a bad root stops one set, a bad
store stops the daemon); anything else escaping is a bug and is reported as one.
"""

from __future__ import annotations

import contextlib
import errno as errnos
from collections.abc import Iterator


class OmirrorError(Exception):
    """Base of every error omirror reports to its operator."""


class ConfigError(OmirrorError):
    """The Distfile or the peers file cannot be used as written.

    When the error has a place in a file, ``str()`` starts with ``file:line:col:`` so that
    editors and humans can jump to it.
    """

    def __init__(self, message: str, filename: str | None = None,
                 line: int | None = None, col: int | None = None) -> None:
        self.message = message
        self.filename = filename
        self.line = line
        self.col = col
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.filename is None:
            return self.message
        if self.line is None:
            return f"{self.filename}: {self.message}"
        return f"{self.filename}:{self.line}:{self.col}: {self.message}"


class RootError(OmirrorError):
    """A mirrored root is missing, unmounted or lost its marker: its set must stop.

    Raised instead of recording deletions, so that an unmounted disk never turns into a
    mass delete on every peer.
    """


class StoreError(OmirrorError):
    """The state database cannot be opened or is not one of ours."""


class NotImplementedYet(OmirrorError):
    """A command of the contract whose machinery this version does not have."""


class PathRefused(OmirrorError):
    """A path from a peer fails the safety checks: the entry is dropped and logged.

    The link goes on: one hostile or mistaken path must not cut a peer off, and retrying
    it could never succeed, so unlike :class:`ApplyError` it is not retried. The one
    refusal a later version can lift (``beyond``: a component that is a symlink or a
    file here, which the peer's next version may make a directory) waits for it
    (omirror/receive.py).
    """

    def __init__(self, path: object, reason: str, *, beyond: bytes | None = None) -> None:
        self.path = path
        self.reason = reason
        #: The path of the component that is a symlink or a file here, where that is
        #: why: a later version can make it a directory, and the path can be applied then.
        self.beyond = beyond
        super().__init__(f"refused path {_show_refused(path)}: {reason}")


class ApplyError(OmirrorError):
    """A path could not be applied here (permission denied, disk full, read-only fs...).

    The cause is local and may go away, so the path is retried later with backoff while
    the other paths and peers go on. ``errno`` is None when no system call failed (content
    that does not match its digest).
    """

    def __init__(self, path: bytes, errno: int | None, message: str) -> None:
        self.path = path
        self.errno = errno
        super().__init__(message)


def _show_refused(path: object) -> str:
    """A refused path as a log can show it: quoted, in the one escaped form of paths
    (it came from a peer and may hold control characters or no valid UTF-8), and cut
    short if huge."""
    from omirror.paths import show_name  # errors is imported by every module: no cycle

    text = f"'{show_name(path)}'" if isinstance(path, bytes) else repr(path)
    return text if len(text) <= 300 else text[:300] + f"... ({len(text)} characters)"


class LocalChanged(ApplyError):
    """The local file changed since the store recorded it (a write the scanner has not
    seen yet): the change is recorded first, then the peer's version is decided again."""


@contextlib.contextmanager
def os_errors(path: bytes, action: str) -> Iterator[None]:
    """Turn a failed system call into an :class:`ApplyError` that says what failed."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or errnos.errorcode.get(e.errno or 0, str(e))
        from omirror.paths import show  # errors is imported by every module: no cycle

        raise ApplyError(path, e.errno, f"cannot {action} {show(path)}: {reason}") from e
