"""The few exception types omirror raises, each carrying a message a sysadmin can act on.

Callers catch these by kind (a bad config stops startup, a bad root stops one set, a bad
store stops the daemon); anything else escaping is a bug and is reported as one.
"""

from __future__ import annotations


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
