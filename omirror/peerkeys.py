"""The peer keys file (who may connect, and whom we connect to) and this host's own key.

One file serves as both authorized_keys and known_hosts: a line ``beta:2808 ssh-ed25519
AAAA...`` says that the peer whose identity is ``beta`` holds that key, whichever side
opens the connection. Keeping a single list means a peer can never be trusted in one
direction and unknown in the other.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from omirror.config import parse_host, read_checked_file
from omirror.errors import ConfigError

log = logging.getLogger(__name__)

HOST_KEY_NAME = "host_key"

#: A peers-file line: indent, host entry, white space, the key and its comment.
_LINE = re.compile(r"(\s*)(\S+)(\s*)(.*)")


@dataclass(frozen=True, slots=True)
class PeerKey:
    """One line of the peers file: a peer's identity and its public key."""

    name: str
    key: asyncssh.SSHKey
    line: int

    @property
    def openssh(self) -> str:
        """The key as ``ssh-ed25519 AAAA...``, without its comment."""
        return openssh_public(self.key)


def openssh_public(key: asyncssh.SSHKey) -> str:
    """A public (or private) key's public half in OpenSSH form, without the comment."""
    return " ".join(key.export_public_key("openssh").decode("ascii").split()[:2])


def peer_line(name: str, key: asyncssh.SSHKey) -> str:
    """The line to put in every peer's peers file for the host ``name`` holding ``key``."""
    return f"{name} {openssh_public(key)}"


# --------------------------------------------------------------------------- peers file


def load_peers(path: str | os.PathLike[str]) -> dict[str, PeerKey]:
    """Read and parse the peers file, refusing one that others could write.

    Whoever can add a line to this file can connect as a peer and write into every
    mirrored tree, so it gets the same ownership and mode checks as the Distfile.
    """
    name = os.fspath(path)
    return parse_peers(read_checked_file(name, "peers file"), name)


def parse_peers(text: str, filename: str) -> dict[str, PeerKey]:
    """Parse peers-file text into ``identity -> PeerKey``; errors carry line and column."""
    peers: dict[str, PeerKey] = {}
    for lineno, raw in enumerate(text.split("\n"), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        peer = _parse_line(raw, lineno, filename)
        if peer.name in peers:
            first = peers[peer.name].line
            raise ConfigError(f"peer {peer.name!r} already has a key at line {first}; "
                              "keep one line per peer", filename, lineno,
                              _indent(raw) + 1)
        peers[peer.name] = peer
    return peers


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _parse_line(raw: str, lineno: int, filename: str) -> PeerKey:
    match = _LINE.match(raw)
    assert match is not None  # the pattern matches any line that is not blank
    indent, host_word, gap, key_text = match.groups()
    host = parse_host(host_word, filename, lineno, len(indent) + 1)
    key_text = key_text.rstrip()
    key_col = len(indent) + len(host_word) + len(gap) + 1
    if not key_text:
        raise ConfigError("found end of line, expected an OpenSSH public key after the "
                          "host entry, like 'beta:2808 ssh-ed25519 AAAA...'",
                          filename, lineno, key_col)
    try:
        key = asyncssh.import_public_key(key_text)
    except (asyncssh.KeyImportError, ValueError) as e:
        raise ConfigError(f"bad public key for {host.name!r}: {e}; expected an OpenSSH "
                          "public key like 'ssh-ed25519 AAAA...'",
                          filename, lineno, key_col) from None
    return PeerKey(name=host.name, key=key, line=lineno)


# --------------------------------------------------------------------------- host key


def host_key_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where this host's private key lives; ``.pub`` beside it holds the public half."""
    return Path(state_dir) / HOST_KEY_NAME


def ensure_host_key(state_dir: str | os.PathLike[str],
                    force: bool = False) -> tuple[asyncssh.SSHKey, bool]:
    """Load this host's key, or make one (ed25519) if there is none; return (key, created).

    With ``force`` an existing key is replaced: every peer then has to be given the new
    line. A key made by ``ssh-keygen -t ed25519 -N ""`` loads as well.
    """
    path = host_key_path(state_dir)
    if not force:
        key = _load_host_key(path)
        if key is not None:
            _ensure_public_file(path, key)
            return key, False
    _make_state_dir(Path(state_dir))
    key = asyncssh.generate_private_key("ssh-ed25519", comment=f"omirror@{socket.gethostname()}")
    _write_atomic(path, key.export_private_key("openssh"), 0o600)
    _write_atomic(_public_path(path), key.export_public_key("openssh"), 0o644)
    log.info("made a new host key path=%s fingerprint=%s", path, key.get_fingerprint())
    return key, True


def load_host_key(state_dir: str | os.PathLike[str]) -> asyncssh.SSHKey:
    """This host's key, without making one: for commands that must change nothing."""
    path = host_key_path(state_dir)
    key = _load_host_key(path)
    if key is None:
        raise ConfigError("no host key here; run 'omirrord keygen' (or start the daemon "
                          "once) and give its line to the peers", str(path))
    return key


def _public_path(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def _load_host_key(path: Path) -> asyncssh.SSHKey | None:
    """The key in ``path``, None if there is no such file; refuse one others can read.

    Like OpenSSH, a private key readable by group or others is refused: anyone who can
    read it can pose as this host to every peer.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read host key: {e.strerror}", str(path)) from None
    try:
        _check_private(os.fstat(fd), path)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    finally:
        os.close(fd)
    try:
        return asyncssh.import_private_key(data)
    except (asyncssh.KeyImportError, ValueError) as e:
        raise ConfigError(f"cannot load host key: {e}; it must be an unencrypted OpenSSH "
                          "private key (remove it to have a new one made)", str(path)) from None


def _check_private(st: os.stat_result, path: Path) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError("host key is not a regular file", str(path))
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(f"host key is accessible by others (mode {mode:04o}): anyone who "
                          f"reads it can pose as this host; run: chmod 600 {path}", str(path))


def _ensure_public_file(path: Path, key: asyncssh.SSHKey) -> None:
    """Rewrite ``host_key.pub`` if missing: a crash between the two writes leaves none."""
    public = _public_path(path)
    if not public.exists():
        try:
            _write_atomic(public, key.export_public_key("openssh"), 0o644)
        except OSError as e:  # only a convenience for the operator: not worth stopping for
            log.warning("cannot write path=%s: %s", public, e.strerror)


def _make_state_dir(state: Path) -> None:
    if not state.is_dir():
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(state, 0o700)  # mkdir's mode is filtered by the umask


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename, so a crash leaves the
    old file or the new one, never half a key."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # left by a crash of an earlier process with this pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
