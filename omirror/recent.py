"""The content of small files the watcher's scans just read, kept for the pushers.

A live change is read once: the scanner reads a small file whole to hash it, and the
pushers send those same bytes inline with its entry instead of opening and reading the
file again in another thread (a thread hop and a second walk from the root, per file,
on the path of every live change).

Keyed by path and digest: bytes are only ever sent for a version with that very digest,
so a file changed since is simply not found here (its new version has another digest)
and is read as before. Bounded in bytes, oldest out first: a pusher that falls behind a
burst by more than the bound reads the files itself, as it always did. Only the scans
of live events fill it (not the full scans, which would hold a tree's worth of small
files for no pusher in particular). The scanner writes from the tree worker, the
pushers read from the event loop: one lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

#: Bytes held at most, and the largest file kept (larger ones are read in chunks to be
#: hashed, never held whole).
MAX_BYTES = 16 << 20
MAX_FILE = 256 << 10


class RecentContent:
    """A bounded map ``(path, digest) -> content``, oldest out first."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._items: OrderedDict[tuple[bytes, bytes], bytes] = OrderedDict()
        self._lock = threading.Lock()
        #: Content sent from here, and asked for in vain (status and tests).
        self.hits = 0
        self.misses = 0

    def put(self, path: bytes, digest: bytes, data: bytes) -> None:
        if len(data) > min(MAX_FILE, self.max_bytes):
            return
        key = (path, digest)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.size -= len(old)
            self._items[key] = data
            self.size += len(data)
            while self.size > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.size -= len(dropped)

    def get(self, path: bytes, digest: bytes) -> bytes | None:
        """The content of that version, if it was read lately; kept for the other
        pushers, which send the same version."""
        with self._lock:
            data = self._items.get((path, digest))
            if data is None:
                self.misses += 1
            else:
                self.hits += 1
            return data
