"""Extended attributes and ACLs: the policy, the checks a peer's attributes meet, the ACL's
text form, reading and setting on real files."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from omirror import xattrs
from omirror.config import InstallOptions
from omirror.xattrs import ACL_ACCESS, ACL_DEFAULT, BadXattrs, Policy

NOBODY = pwd.getpwnam("nobody").pw_uid


def acl(*lines: str) -> bytes:
    return "\n".join(lines).encode()


BASIC = acl("user::rw-", "group::r--", "other::---")
NAMED = acl("user::rw-", f"user:nobody={NOBODY}:r--", "group::r--", "mask::r--",
            "other::---")


def test_the_default_policy_mirrors_user_attributes_and_acls_only() -> None:
    policy = Policy.of(InstallOptions())
    assert policy.manages(b"user.mime_type")
    assert policy.manages(ACL_ACCESS) and policy.manages(ACL_DEFAULT)
    assert not policy.manages(b"security.selinux")
    assert not policy.manages(b"trusted.overlay.opaque")
    assert not policy.manages(b"system.nfs4_acl")
    assert Policy.of(InstallOptions(securityxattrs=True)).manages(b"security.selinux")
    off = Policy.of(InstallOptions(noxattrs=True))
    assert not off.manages(b"user.a") and not off.manages(ACL_ACCESS)


@pytest.mark.parametrize("bad", [
    ((b"trusted.x", b"1"),),
    ((b"system.nfs4_acl", b"1"),),
    ((b"security.", b"1"),),
    ((b"user.b", b"1"), (b"user.a", b"1")),  # out of order
    ((b"user.a", b"1"), (b"user.a", b"2")),  # repeated
    ((b"user.a", b"x" * (xattrs.VALUE_MAX + 1)),),
    ((ACL_ACCESS, b"user::rw-\nsomething"),),
    ((ACL_ACCESS, b"user:alice:r--"),),  # a named entry without its number
    ((ACL_ACCESS, b"user::rwz"),),
])
def test_attributes_no_honest_peer_sends_are_refused(bad: xattrs.Xattrs) -> None:
    with pytest.raises(BadXattrs):
        xattrs.check(bad)


def test_attributes_a_peer_may_send_pass() -> None:
    xattrs.check(((b"security.selinux", b"system_u:object_r:etc_t:s0\0"),
                  (ACL_ACCESS, NAMED), (ACL_DEFAULT, BASIC), (b"user.a", b"\0\xff")))


def test_an_acl_travels_as_text_with_names_and_comes_back_as_the_same_binary(
        tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    binary = xattrs.text_to_acl(NAMED)
    os.setxattr(f, ACL_ACCESS, binary)
    raw = os.getxattr(f, ACL_ACCESS)
    assert xattrs.acl_to_text(raw) == NAMED
    fd = os.open(f, os.O_RDONLY)
    try:
        read = xattrs.read(fd, Policy())
    finally:
        os.close(fd)
    assert read is not None and dict(read)[ACL_ACCESS] == NAMED


def test_a_named_acl_entry_maps_by_name_here_and_by_number_when_the_name_is_unknown() -> None:
    by_name = xattrs.text_to_acl(acl("user::rw-", "user:nobody=1234:r--", "group::r--",
                                     "mask::r--", "other::---"))
    assert f"user:nobody={NOBODY}:r--".encode() in xattrs.acl_to_text(by_name)
    unknown = xattrs.text_to_acl(acl("user::rw-", "user:no-such-user-here=4242:r--",
                                     "group::r--", "mask::r--", "other::---"))
    assert b"=4242:r--" in xattrs.acl_to_text(unknown)


def test_named_entries_are_put_in_the_order_the_kernel_takes(tmp_path: Path) -> None:
    """Ids mapped here may sort otherwise than the sender's: the kernel refuses an ACL
    whose named entries are not in increasing id order."""
    text = acl("user::rw-", "user:no-such-a=5000:r--", "user:nobody=10:r--", "group::r--",
               "mask::r--", "other::---")
    f = tmp_path / "f"
    f.write_bytes(b"x")
    os.setxattr(f, ACL_ACCESS, xattrs.text_to_acl(text))  # would raise EINVAL unsorted
    assert b"=5000" in xattrs.acl_to_text(os.getxattr(f, ACL_ACCESS))


def test_reading_keeps_only_what_the_policy_mirrors(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    os.setxattr(f, b"user.b", b"2")
    os.setxattr(f, b"user.a", b"1")
    os.setxattr(f, b"trusted.t", b"3")
    fd = os.open(f, os.O_RDONLY)
    try:
        assert xattrs.read(fd, Policy()) == ((b"user.a", b"1"), (b"user.b", b"2"))
        assert xattrs.read(fd, Policy(enabled=False)) == ()
    finally:
        os.close(fd)


def test_what_a_host_does_not_mirror_or_cannot_read_is_kept_as_recorded() -> None:
    recorded = ((b"security.selinux", b"label"), (b"user.old", b"1"))
    here = ((b"user.new", b"2"),)
    assert xattrs.merged(here, recorded, Policy()) == (
        (b"security.selinux", b"label"), (b"user.new", b"2"))
    assert xattrs.merged(None, recorded, Policy()) == recorded


def test_the_writer_makes_the_mirrored_attributes_exactly_the_versions(
        tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    os.setxattr(f, b"user.gone", b"1")
    os.setxattr(f, b"user.same", b"1")
    os.setxattr(f, b"trusted.kept", b"1")  # not mirrored: never touched
    fd = os.open(f, os.O_RDONLY)
    try:
        xattrs.Writer().apply(fd, ((ACL_ACCESS, NAMED), (b"user.new", b"\0\xff"),
                                   (b"user.same", b"1")), Policy(), "set t")
    finally:
        os.close(fd)
    assert sorted(os.listxattr(f)) == sorted(
        ["system.posix_acl_access", "trusted.kept", "user.new", "user.same"])
    assert os.getxattr(f, b"user.new") == b"\0\xff"
    assert xattrs.acl_to_text(os.getxattr(f, ACL_ACCESS)) == NAMED


def test_the_writer_says_once_what_it_cannot_set_and_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    writer = xattrs.Writer()
    fd = os.open(f, os.O_RDONLY)
    try:
        with caplog.at_level(logging.WARNING, logger="omirror.xattrs"):
            for _ in range(3):  # an ACL without its group and other entries: EINVAL
                writer.apply(fd, ((ACL_ACCESS, b"user::rw-"), (b"user.small", b"1")),
                             Policy(), "set t")
    finally:
        os.close(fd)
    assert os.getxattr(f, b"user.small") == b"1"
    assert "system.posix_acl_access" not in os.listxattr(f)
    told = [r for r in caplog.records if "posix_acl_access" in r.getMessage()]
    assert len(told) == 1 and "set t" in told[0].getMessage()


_ON_RAMFS = r"""
import logging, os, sys
from omirror import xattrs
logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
path = sys.argv[1] + "/f"
open(path, "w").close()
fd = os.open(path, os.O_RDONLY)
writer = xattrs.Writer()
for _ in range(3):
    writer.apply(fd, ((b"user.a", b"1"), (b"user.b", b"2")), xattrs.Policy(), "set t")
recorded = ((b"user.a", b"1"),)
print("read:", xattrs.read(fd, xattrs.Policy()))
print("merged:", xattrs.merged(xattrs.read(fd, xattrs.Policy()), recorded, xattrs.Policy()))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare to mount a ramfs")
def test_a_file_system_without_attributes_is_told_once_and_never_drops_them(
        tmp_path: Path) -> None:
    """ramfs lists no attributes and refuses to set any: once that is known, what is read
    there is "unknown", so a local edit there never makes a version without them."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "on_ramfs.py"
    script.write_text(_ON_RAMFS)
    out = subprocess.run(
        ["unshare", "--mount", "sh", "-c",
         f'mount -t ramfs none "$1" && exec "{sys.executable}" "$2" "$1"', "sh",
         str(mnt), str(script)], capture_output=True, text=True, timeout=60, check=True,
        cwd=Path(__file__).resolve().parents[2]).stdout
    told = [line for line in out.splitlines() if "keeps no extended attributes" in line]
    assert len(told) == 1 and "set t" in told[0], out
    assert "read: None" in out
    assert "merged: ((b'user.a', b'1'),)" in out
