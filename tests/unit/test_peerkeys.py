"""The peers file and this host's key: parsing, errors with positions, key files on disk."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import asyncssh
import pytest

from omirror.errors import ConfigError
from omirror.peerkeys import (
    PeerKey,
    ensure_host_key,
    host_key_path,
    load_peers,
    parse_peers,
    peer_line,
)


@pytest.fixture(scope="module")
def keys() -> list[asyncssh.SSHKey]:
    return [asyncssh.generate_private_key("ssh-ed25519") for _ in range(3)]


def public(key: asyncssh.SSHKey) -> str:
    """``ssh-ed25519 AAAA...`` without any comment."""
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


def test_parse_peers(keys: list[asyncssh.SSHKey]) -> None:
    a, b, c = (public(k) for k in keys)
    text = (f"# peers of the www set\n\nbeta:2808 {a} admin@beta\n"
            f"  me@[::1]:2809\t{b}\n"
            f"Gamma {c}\r\n   # indented comment\n")
    peers = parse_peers(text, "peers")
    assert list(peers) == ["beta", "[::1]:2809", "gamma"]
    assert peers["beta"] == PeerKey("beta", keys[0].convert_to_public(), 3)
    assert peers["[::1]:2809"].line == 4
    assert peers["gamma"].key == asyncssh.import_public_key(c)
    assert peers["beta"].openssh == a  # no comment
    assert peers["beta"].openssh.startswith("ssh-ed25519 AAAA")


def test_empty_file_has_no_peers() -> None:
    assert parse_peers("\n# nobody yet\n", "peers") == {}


@pytest.mark.parametrize("line, col, fragment", [
    pytest.param("beta ssh-ed25519 AAAAnotbase64", 6, "bad public key for 'beta'",
                 id="bad-base64"),
    pytest.param("  beta:2808   ssh-ed25519", 15, "bad public key", id="no-blob"),
    pytest.param("beta garbage", 6, "bad public key", id="garbage"),
    pytest.param("beta", 5, "found end of line, expected an OpenSSH public key",
                 id="no-key"),
    pytest.param("beta:0 {key}", 1, "port 0 is out of range", id="bad-port"),
    pytest.param("   b!d {key}", 4, "bad host entry 'b!d'", id="bad-host"),
    pytest.param("beta ssh-rsa {blob}", 6, "algorithm mismatch", id="wrong-algorithm"),
])
def test_bad_lines(keys: list[asyncssh.SSHKey], line: str, col: int, fragment: str) -> None:
    key = public(keys[0])
    text = "# header\n" + line.format(key=key, blob=key.split()[1]) + "\n"
    with pytest.raises(ConfigError) as e:
        parse_peers(text, "peers")
    assert (e.value.filename, e.value.line, e.value.col) == ("peers", 2, col)
    assert fragment in e.value.message


def test_duplicate_identity(keys: list[asyncssh.SSHKey]) -> None:
    text = f"beta {public(keys[0])}\nalpha {public(keys[1])}\n  me@beta:2808 {public(keys[2])}\n"
    with pytest.raises(ConfigError) as e:
        parse_peers(text, "peers")
    assert (e.value.line, e.value.col) == (3, 3)
    assert e.value.message.startswith("peer 'beta' already has a key at line 1")


def test_peer_line_round_trips(keys: list[asyncssh.SSHKey]) -> None:
    lines = [peer_line("beta:2808", keys[0]), peer_line("[::1]:2809", keys[1].convert_to_public())]
    assert lines[0] == f"beta:2808 {public(keys[0])}"
    peers = parse_peers("\n".join(lines), "peers")
    assert peers["beta"].key == keys[0].convert_to_public()
    assert peers["[::1]:2809"].key == keys[1].convert_to_public()
    assert peer_line("beta", peers["beta"].key) == f"beta {peers['beta'].openssh}"


def test_load_peers_checks_the_file(tmp_path: Path, keys: list[asyncssh.SSHKey]) -> None:
    peers = tmp_path / "peers"
    peers.write_text(peer_line("beta", keys[0]) + "\n")
    peers.chmod(0o644)
    assert list(load_peers(peers)) == ["beta"]
    peers.chmod(0o664)
    with pytest.raises(ConfigError, match=r"peers file is group- or world-writable.*chmod go-w"):
        load_peers(peers)
    with pytest.raises(ConfigError, match=r"cannot read peers file: No such file"):
        load_peers(tmp_path / "missing")


# --------------------------------------------------------------------------- host key


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_host_key_path(tmp_path: Path) -> None:
    assert host_key_path(tmp_path) == tmp_path / "host_key"
    assert host_key_path(str(tmp_path)) == tmp_path / "host_key"


def test_ensure_host_key_creates_then_reloads(tmp_path: Path) -> None:
    state = tmp_path / "state" / "omirror"
    key, created = ensure_host_key(state)
    assert created
    assert mode_of(state) == 0o700
    assert mode_of(state / "host_key") == 0o600
    assert key.get_algorithm() == "ssh-ed25519"
    pub = (state / "host_key.pub").read_text()
    assert pub.split()[:2] == public(key).split()

    again, created = ensure_host_key(state)
    assert not created
    assert again == key
    assert sorted(p.name for p in state.iterdir()) == ["host_key", "host_key.pub"]


def test_ensure_host_key_keeps_existing_unless_forced(tmp_path: Path) -> None:
    first, _ = ensure_host_key(tmp_path)
    assert ensure_host_key(tmp_path)[0] == first
    second, created = ensure_host_key(tmp_path, force=True)
    assert created and second != first
    assert ensure_host_key(tmp_path) == (second, False)
    assert (tmp_path / "host_key.pub").read_text().split()[:2] == public(second).split()


def test_missing_public_half_is_rewritten(tmp_path: Path) -> None:
    key, _ = ensure_host_key(tmp_path)
    (tmp_path / "host_key.pub").unlink()
    assert ensure_host_key(tmp_path) == (key, False)
    assert (tmp_path / "host_key.pub").read_text().split()[:2] == public(key).split()


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    ensure_host_key(tmp_path)
    (tmp_path / "host_key").chmod(0o644)
    with pytest.raises(ConfigError, match=r"host key is accessible by others \(mode 0644\).*"
                                          r"chmod 600"):
        ensure_host_key(tmp_path)


def test_unreadable_key_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "host_key"
    path.write_text("not a key\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=r"cannot load host key"):
        ensure_host_key(tmp_path)
    assert path.read_text() == "not a key\n"  # never replaced behind the operator's back


def test_host_key_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "host_key").mkdir(mode=0o700)
    with pytest.raises(ConfigError, match=r"host key is not a regular file"):
        ensure_host_key(tmp_path)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_loads_a_key_made_by_ssh_keygen(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(state / "host_key")], check=True)
    key, created = ensure_host_key(state)
    assert not created
    pub = (state / "host_key.pub").read_text().split()[:2]
    assert peer_line("alpha", key) == "alpha " + " ".join(pub)
    assert parse_peers(peer_line("alpha", key), "peers")["alpha"].key == key.convert_to_public()
    assert os.stat(state / "host_key").st_size > 0
