"""The names of the daemon's temp files, as it gives them out.

The applier builds each version under a temp name (``.omirror-tmp-*``) and renames it
into place once it has recorded it; the watcher skips such a rename, which would only
find what was just recorded. A local user may rename a file of that form too: that is a
change of the tree like any other. The watcher tells them apart by asking here: only a
name given out by this process, and not yet seen renamed, is the applier's.
"""

from __future__ import annotations

import secrets
import threading

from omirror.paths import TEMP_PREFIX

#: Names remembered at once: far more than the temp files in flight. Beyond it the
#: oldest is forgotten; if its rename still comes, it is examined like a user's (a stat
#: that matches its record, at the cost of one look).
REMEMBERED = 65_536

_lock = threading.Lock()
_issued: dict[bytes, None] = {}  # in the order given out


def issue(*, remember: bool = True) -> bytes:
    """A fresh temp name, remembered as the daemon's unless it is never meant to be
    renamed into place (a rename back is then examined like a user's)."""
    name = TEMP_PREFIX + secrets.token_hex(8).encode()
    if not remember:
        return name
    with _lock:  # the tree worker and the stager issue names, the loop takes them
        _issued[name] = None
        if len(_issued) > REMEMBERED:
            del _issued[next(iter(_issued))]
    return name


def taken(name: bytes) -> bool:
    """True, once, for a name :func:`issue` gave out: a rename from it is the daemon's."""
    with _lock:
        if name not in _issued:
            return False
        del _issued[name]
        return True


def forget(name: bytes) -> None:
    """A name given out whose file is gone without being renamed into place."""
    with _lock:
        _issued.pop(name, None)
