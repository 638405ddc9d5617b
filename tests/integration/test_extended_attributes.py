"""Extended attributes and POSIX ACLs between real daemons: mirrored by default, a change
of them alone travels, ``trusted.*`` never, and ``install -onoxattrs`` turns them off."""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable
from pathlib import Path

from cluster import Cluster

from omirror import xattrs

MakeCluster = Callable[..., Cluster]
CONVERGE_S = 30
NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = grp.getgrnam("nogroup").gr_gid
ACL = b"user::rw-\nuser:nobody=%d:r--\ngroup::r--\nmask::r--\nother::---" % NOBODY
DEFAULT_ACL = b"user::rwx\ngroup::r-x\ngroup:nogroup=%d:rwx\nmask::rwx\nother::---" % NOGROUP


def attrs(path: Path) -> dict[bytes, bytes]:
    """What a file holds, ACLs in their travelling text form."""
    out = {}
    for name in os.listxattr(path, follow_symlinks=False):
        key = os.fsencode(name)
        value = os.getxattr(path, key, follow_symlinks=False)
        out[key] = xattrs.acl_to_text(value) if key in xattrs.ACLS else value
    return out


def test_attributes_and_acls_travel_and_a_change_of_them_alone_too(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    a = c[0].data
    f = a / "f"
    f.write_bytes(b"content")
    os.setxattr(f, b"user.mime_type", b"text/plain")
    os.setxattr(f, b"system.posix_acl_access", xattrs.text_to_acl(ACL))
    os.setxattr(f, b"trusted.secret", b"never leaves")
    (a / "d").mkdir()
    os.setxattr(a / "d", b"system.posix_acl_default", xattrs.text_to_acl(DEFAULT_ACL))
    c.start()  # B catches up from A's startup scan
    b = c[1].data
    c.wait_until(lambda: (b / "f").exists() and attrs(b / "f").get(b"user.mime_type")
                 == b"text/plain" and (b / "d").exists()
                 and b"system.posix_acl_default" in attrs(b / "d"), CONVERGE_S,
                 "the file and directory arrive with their attributes")
    got = attrs(b / "f")
    assert got[b"system.posix_acl_access"] == ACL
    assert b"trusted.secret" not in got
    assert attrs(b / "d")[b"system.posix_acl_default"] == DEFAULT_ACL
    # a file made in that directory on B inherits the mirrored default ACL
    (b / "d" / "inherits").write_bytes(b"x")
    assert b"system.posix_acl_access" in attrs(b / "d" / "inherits")
    content_ino = os.stat(b / "f").st_ino

    # live: a change of attributes alone, then their removal
    os.setxattr(f, b"user.mime_type", b"text/markdown")
    os.setxattr(f, b"user.added", b"\0\xff")
    c.wait_until(lambda: attrs(b / "f").get(b"user.mime_type") == b"text/markdown"
                 and attrs(b / "f").get(b"user.added") == b"\0\xff", CONVERGE_S,
                 "a change of attributes alone arrives")
    assert os.stat(b / "f").st_ino == content_ino, "attributes alone rewrote the content"
    os.removexattr(f, b"user.added")
    os.removexattr(f, b"system.posix_acl_access")
    c.wait_until(lambda: b"user.added" not in attrs(b / "f")
                 and b"system.posix_acl_access" not in attrs(b / "f"), CONVERGE_S,
                 "removed attributes are removed")
    # and back the other way: B's change reaches A
    os.setxattr(b / "f", b"user.from_b", b"1")
    c.wait_until(lambda: attrs(f).get(b"user.from_b") == b"1", CONVERGE_S,
                 "B's attribute reaches A")
    assert attrs(f)[b"trusted.secret"] == b"never leaves"  # A's own, untouched


def test_noxattrs_mirrors_none(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.conf.write_text(c.conf.read_text().replace("install ;", "install -onoxattrs ;"))
    c.start()
    a, b = c[0].data, c[1].data
    f = a / "f"
    f.write_bytes(b"x")
    os.setxattr(f, b"user.a", b"1")
    (a / "g").write_bytes(b"after")
    c.wait_until(lambda: (b / "g").exists() and (b / "f").exists(), CONVERGE_S,
                 "the files arrive")
    c.assert_stays(lambda: b"user.a" not in attrs(b / "f"), 1, "no attribute arrives")
