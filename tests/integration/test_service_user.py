"""Owners on real daemons: the hardened setup (a service user with capabilities) mirrors
owners as root does."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
from collections.abc import Callable

import pytest
from cluster import Cluster, Peer

CAPS = "+chown,+dac_override,+dac_read_search,+fowner,+fsetid"


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0,
                    reason="needs root and setpriv (util-linux)")
def test_a_service_user_with_cap_chown_mirrors_owners(
        make_cluster: Callable[..., Cluster]) -> None:
    """docs/operations.rst and the unit show how to run omirrord as a user ``omirror``
    with ambient capabilities. Such a daemon is not root, but holds CAP_CHOWN: it must
    give each file its owner, as root would (it used to decide "not root, cannot chown"
    and leave every file it received owned by itself)."""
    try:
        daemon_uid, daemon_gid = pwd.getpwnam("daemon").pw_uid, grp.getgrnam("daemon").gr_gid
    except KeyError:
        pytest.skip("no user or group 'daemon' here")
    c = make_cluster(2)
    plain = c.command

    def as_service_user(p: Peer) -> list[str]:
        command = plain(p)
        if p.index != 1:
            return command
        return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                f"--inh-caps={CAPS}", f"--ambient-caps={CAPS}", *command]

    c.command = as_service_user  # type: ignore[method-assign]
    c.start()
    f = c[0].data / "owned"
    f.write_bytes(b"belongs to daemon:daemon\n")
    os.chown(f, daemon_uid, daemon_gid)
    os.chmod(f, 0o2750)
    there = c[1].data / "owned"
    c.wait_until(lambda: there.exists() and there.read_bytes() == f.read_bytes(), 30,
                 "the file reaches the peer that runs as a service user")
    st = os.lstat(there)
    assert (st.st_uid, st.st_gid) == (daemon_uid, daemon_gid)
    assert stat.S_IMODE(st.st_mode) == 0o2750  # the names exist on both: kept whole
    assert os.stat(f"/proc/{c[1].proc.pid}").st_uid == 65534  # really not root
    # and back: what the service user's tree holds is read and sent as root would
    g = c[1].data / "from-service-user"
    g.write_bytes(b"x")
    os.chown(g, daemon_uid, daemon_gid)
    c.wait_converged()
    assert os.lstat(c[0].data / "from-service-user").st_uid == daemon_uid
