"""The owner rule: how an entry's owner and group become ids here, and when set-user-ID
and set-group-ID bits may stay."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from omirror.owners import SETID, OwnerMap, Ownership, can_chown, overflow_id

UNKNOWN = "no-such-user-5b1e"


def fake_stat(uid: int, gid: int, mode: int = 0o100644) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, gid, 0, 0, 0, 0))


def test_a_name_known_here_maps_to_its_id_and_is_exact() -> None:
    owners = OwnerMap()
    got = owners.resolve("root", 4242, "root", 4343, b"data/f", "beta")
    assert got == Ownership(0, 0, True)
    assert got.mode(0o6755, fake_stat(0, 0)) == 0o6755


def test_an_unknown_name_gets_the_senders_number_and_loses_set_id_bits(
        caplog: pytest.LogCaptureFixture) -> None:
    owners = OwnerMap()
    got = owners.resolve(UNKNOWN, 4242, "root", 0, b"data/f", "beta")
    assert got == Ownership(4242, 0, False)
    assert got.mode(0o6755, fake_stat(4242, 0)) == 0o755
    owners.resolve(UNKNOWN, 4242, "root", 0, b"data/g", "beta")
    said = [r.getMessage() for r in caplog.records if UNKNOWN in r.getMessage()]
    assert len(said) == 1 and "does not exist here" in said[0]  # once per name


def test_an_unknown_name_without_a_number_is_nobody_never_root() -> None:
    got = OwnerMap().resolve(UNKNOWN, -1, UNKNOWN, -1, b"data/f", "beta")
    assert got == Ownership(overflow_id("uid"), overflow_id("gid"), False)
    assert got.uid != 0 and got.gid != 0


def test_digits_are_the_senders_number_for_an_owner_it_could_not_name() -> None:
    got = OwnerMap().resolve("12345", -1, "0", -1, b"data/f", "beta")
    assert got == Ownership(12345, 0, False)  # "0" is no name: not exact, even for root


@pytest.mark.parametrize("old", [None, fake_stat(1000, 1000)])
def test_nochkowner_keeps_or_leaves_the_owner_and_set_id_bits_go(
        old: os.stat_result | None) -> None:
    """With nochkowner the entry does not say who owns the file: a new file keeps the
    daemon's owner (root), so a 4755 from a peer must not make it a root set-id file."""
    got = OwnerMap().resolve("root", 0, "root", 0, b"data/f", "beta", keep_owner=old)
    assert got.exact is False
    assert got.uid == (None if old is None else 1000)
    assert got.mode(0o4755, fake_stat(0, 0)) == 0o755


def test_set_id_bits_stay_only_on_the_owner_really_set() -> None:
    """Exact names, but the chown did not happen (a daemon without CAP_CHOWN writes its
    own files): the file is not the named owner's, so it gets no set-id bits."""
    exact = Ownership(0, 0, True)
    assert exact.mode(0o4755, fake_stat(65534, 65534)) == 0o755
    assert exact.mode(0o2775 | 0o1000, fake_stat(0, 0)) == 0o3775


def test_what_the_rule_gave_a_file_is_the_recorded_version() -> None:
    """The scanner must not take the rule's work for a local change (and send the
    dropped set-id bits or the unknown owner's number back as a new version)."""
    owners = OwnerMap()
    applied = fake_stat(4242, 0, stat.S_IFREG | 0o755)
    assert owners.recorded(UNKNOWN, 4242, "root", 0, 0o6755, applied) == (
        UNKNOWN, 4242, "root", 0, 0o6755)
    chmodded = fake_stat(4242, 0, stat.S_IFREG | 0o700)
    assert owners.recorded(UNKNOWN, 4242, "root", 0, 0o6755, chmodded) is None
    # exact names: a file without the recorded set-id bits was chmodded here
    assert owners.recorded("root", 0, "root", 0, 0o4755,
                           fake_stat(0, 0, stat.S_IFREG | 0o755)) is None
    assert SETID == 0o6000


def _can_chown_as(*setpriv: str) -> bool:
    code = "from omirror.owners import can_chown; print(can_chown())"
    out = subprocess.run(["setpriv", *setpriv, sys.executable, "-c", code], check=True,
                         capture_output=True, text=True, timeout=30,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    return out.strip() == "True"


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0,
                    reason="needs root and setpriv (util-linux)")
def test_can_chown_follows_the_effective_capabilities_not_the_uid() -> None:
    """The hardened unit runs omirrord as a user with CAP_CHOWN: it can give files away
    and must. A root whose bounding set lacks CAP_CHOWN cannot, and must not try."""
    assert can_chown() is True  # root, every capability
    user = ["--reuid=65534", "--regid=65534", "--clear-groups"]
    assert _can_chown_as(*user, "--inh-caps=+chown", "--ambient-caps=+chown") is True
    assert _can_chown_as(*user) is False
    assert _can_chown_as("--bounding-set=-chown") is False


@pytest.mark.parametrize("owner, uid, group, gid", [
    (UNKNOWN, 4242, UNKNOWN, 4343),  # a name unknown here, its number carried
    ("12345", -1, "54321", -1),      # digits: a uid the sender could not name
    (UNKNOWN, -1, UNKNOWN, -1),      # nothing carried: nobody
    ("root", 0, "root", 0),          # exact
])
def test_what_resolve_gives_recorded_recognises(owner: str, uid: int, group: str,
                                                 gid: int) -> None:
    """Applying a version and recognising it applied follow the same mapping: a file
    given what ``resolve`` says is that version, not a local change (the two used to
    map digits differently, and a file of owner "12345" came back as a new version)."""
    got = OwnerMap().resolve(owner, uid, group, gid, b"data/f", "beta")
    assert got.uid is not None and got.gid is not None
    st = fake_stat(got.uid, got.gid, stat.S_IFREG | got.mode(0o6755, fake_stat(got.uid,
                                                                                 got.gid)))
    assert OwnerMap.recorded(owner, uid, group, gid, 0o6755, st) == (owner, uid, group, gid,
                                                                      0o6755)
