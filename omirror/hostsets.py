"""This host's sets: which the Distfile gives it, which of them run, and with whom each
is shared.

A set stops when its root is missing or unmounted (the scanner says so); it runs again
at the next reload. Everything that asks "is this path mirrored here, and with whom"
asks here, by the one rule of :func:`config.set_for`.
"""

from __future__ import annotations

import os
import posixpath

from omirror.config import Config, Host, MirrorSet, set_for
from omirror.errors import OmirrorError
from omirror.paths import has_own_name, show, show_text


class HostSets:
    """The sets of host ``me`` in ``config``, and the titles of those stopped here."""

    def __init__(self, config: Config, me: Host) -> None:
        self.config = config
        self.me = me
        self.stopped: set[str] = set()

    def replace(self, config: Config) -> None:
        """A reloaded Distfile: every set runs again (a root still missing stops again
        at the scan that follows)."""
        self.config = config
        self.stopped.clear()

    def all(self) -> tuple[MirrorSet, ...]:
        """Every set of this host, stopped ones included."""
        return tuple(self.config.sets_of(self.me.name))

    def running(self) -> tuple[MirrorSet, ...]:
        """The sets of this host that run."""
        return tuple(m for m in self.all() if m.title not in self.stopped)

    def shared_with(self, peer: str) -> tuple[MirrorSet, ...]:
        """The running sets this host shares with ``peer``: the only ones a link may
        carry."""
        return tuple(m for m in self.running() if m.has_host(peer))

    def set_of(self, path: bytes) -> MirrorSet | None:
        """The running set that holds ``path``, if any."""
        return set_for(path, self.running())

    def stopped_holding(self, peer: str, path: bytes) -> str | None:
        """The stopped set shared with ``peer`` that holds ``path``, if any: what a peer
        sends for it waits (is retried), it is not refused and acknowledged for good."""
        for mset in self.all():
            if mset.title in self.stopped and mset.has_host(peer) \
                    and mset.root_of(path) is not None:
                return mset.title
        return None

    def peers(self) -> dict[str, Host]:
        """Every host this one shares a running set with, by name."""
        out: dict[str, Host] = {}
        for mset in self.running():
            for host in mset.peers_of(self.me.name):
                out.setdefault(host.name, host)
        return out

    def target(self, text: str) -> tuple[MirrorSet, bytes]:
        """The running set and logical path of a path as the Distfile names it
        (``omirrord sync /srv/www/a``); :class:`OmirrorError` that says why not."""
        if not text.startswith("/") or "\0" in text:
            raise OmirrorError(f"'{show_text(text)}' is not an absolute path "
                               "(name it as the Distfile does, e.g. /srv/www/index.html)")
        path = os.fsencode(posixpath.normpath(text).strip("/"))
        shown = show(path)
        sets = self.all()
        mset = None if has_own_name(path) else set_for(path, sets)
        if mset is not None:
            if mset.title in self.stopped:
                raise OmirrorError(f"{shown} is in set {mset.title}, which is stopped on "
                                   "this host (see the log)")
            return mset, path
        holder = next((m for m in sets if m.root_of(path) is not None), None)
        if holder is not None:
            raise OmirrorError(f"{shown} is excluded from set {holder.title}")
        tops = sorted({top for m in sets for top in m.files})
        raise OmirrorError(f"{shown} is in no set of {self.me.name} (its sets hold "
                           f"{', '.join(tops) or 'nothing'})")
