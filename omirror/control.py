"""The daemon's control socket, ``<state-dir>/control.sock``, and its client.

The protocol is one JSON object per line each way: a request ``{"cmd": "status", ...}``,
a reply ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. Lines are bounded
(64 KiB), so a confused or hostile client costs the daemon nothing.

Who may ask: the socket file is 0660, and each caller is checked again by its kernel
credentials (SO_PEERCRED): root, the daemon's own user, and members of the socket file's
group. The second check is not redundant: the state directory's mode, a bind mount or
a umask can leave the file open wider than intended.

The socket is also the daemon's lock on its state directory: a daemon that answers on
it makes a second one refuse to start, and a socket file nobody answers on is a
leftover of a crash and is replaced. The check and the bind happen under a lock of the
state directory, so two daemons started at once cannot both win.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Any

from omirror.errors import OmirrorError

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
#: The longest request line the daemon reads; a longer one ends the connection.
MAX_LINE = 64 * 1024
#: Replies (status with many failing paths) may be long, but not unbounded.
MAX_REPLY = 64 << 20
#: How long the daemon waits for the next request on an open connection.
IDLE_S = 60.0
#: AF_UNIX paths longer than this do not fit in sockaddr_un (108 bytes with the NUL).
_SUN_PATH_MAX = 107
_CRED = struct.Struct("3i")
#: The socket files bound by this process, by path: (st_dev, st_ino).
_bound: dict[str, tuple[int, int]] = {}
#: The connections being served, by socket path, so that closing ends them too.
_serving: dict[str, set[asyncio.Task[None]]] = {}

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Commands:
    """What a running daemon answers on its socket: ``status``, ``sync`` and ``replay``.

    Each request is checked here, field by field, before the daemon acts on it: the
    socket's callers are trusted users, but a malformed request must get a clear
    error, not a traceback in the daemon's log.
    """

    def __init__(self, status: Callable[[], dict[str, Any]],
                 sync: Callable[[list[str]], Awaitable[dict[str, Any]]],
                 replay: Callable[[str, int], Awaitable[dict[str, Any]]]) -> None:
        self._status = status
        self._sync = sync
        self._replay = replay

    def handlers(self) -> dict[str, Handler]:
        """For :func:`serve_control`, by ``cmd``: a request naming another gets an error that
        lists these."""
        return {"status": self.status, "sync": self.sync, "replay": self.replay}

    async def status(self, request: dict[str, Any]) -> dict[str, Any]:
        """The daemon's status dict (omirror/status.py renders it)."""
        return {"status": self._status()}

    async def sync(self, request: dict[str, Any]) -> dict[str, Any]:
        """Rescan the named paths and their subtrees now; what changed goes out at once.
        Every path is checked before anything is scanned, and all bad ones are named."""
        paths = request.get("paths")
        if not isinstance(paths, list) or not paths \
                or not all(isinstance(p, str) for p in paths):
            raise OmirrorError('sync needs "paths": a list of absolute paths')
        return await self._sync(paths)

    async def replay(self, request: dict[str, Any]) -> dict[str, Any]:
        """Restart the link to a peer with its stream starting at ``from_seq``."""
        peer, from_seq = request.get("peer"), request.get("from_seq")
        if not isinstance(peer, str) or not peer:
            raise OmirrorError('replay needs "peer", the name of a peer')
        if not isinstance(from_seq, int) or isinstance(from_seq, bool) or from_seq < 0:
            raise OmirrorError('replay needs "from_seq", a whole number >= 0')
        return await self._replay(peer, from_seq)


def socket_path(state_dir: str | os.PathLike[str]) -> str:
    """May be longer than sockaddr_un allows: connect and bind through ``_short``."""
    return os.path.join(os.fspath(state_dir), SOCKET_NAME)


@contextlib.contextmanager
def _short(path: str) -> Iterator[str]:
    """A name for ``path`` that fits in sockaddr_un.

    A state directory may lie deep (test runs, containers): then the socket is named
    through ``/proc/self/fd`` of the directory opened with O_PATH, which the kernel
    resolves like the long path.
    """
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    directory, name = os.path.split(path)
    fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def _peer_credentials(sock: socket.socket | Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a UNIX socket."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


def _connect(path: str, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        with _short(path) as name:
            sock.connect(name)
    except BaseException:
        sock.close()
        raise
    return sock


def _answering_pid(path: str) -> int | None:
    """The pid of the daemon listening on ``path``, None if nothing listens there.

    The pid comes from the kernel (SO_PEERCRED of the listener), not from a request, so
    it is known even when this caller may not ask the daemon anything.
    """
    try:
        sock = _connect(path, timeout=2.0)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        return None
    except PermissionError:
        raise OmirrorError(_permission_message(path)) from None
    except OSError as e:
        raise OmirrorError(f"cannot connect to {path}: {e.strerror or e}") from None
    with sock:
        return _peer_credentials(sock)[0]


def _permission_message(path: str) -> str:
    try:
        group = grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError):
        group = "its group"
    return (f"permission denied on {path}: run this as root, as the user omirrord runs "
            f"as, or as a member of group {group}")


# -- who may ask ------------------------------------------------------------------------

def supplementary_groups(uid: int) -> Collection[int]:
    """The groups of user ``uid`` (primary included), as the group database has them."""
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return ()
    return os.getgrouplist(user.pw_name, user.pw_gid)


def is_caller_allowed(uid: int, gid: int, *, daemon_uid: int, socket_gid: int,
                      groups_of: Callable[[int], Collection[int]] = supplementary_groups
                      ) -> bool:
    """Root, the daemon's own user, and members of the socket file's group may ask."""
    if uid in (0, daemon_uid) or gid == socket_gid:
        return True
    return socket_gid in groups_of(uid)


# -- the server -------------------------------------------------------------------------

async def serve_control(path: str | os.PathLike[str],
                        handlers: dict[str, Handler]) -> asyncio.base_events.Server:
    """Listen on ``path`` and answer each request line with its handler's reply.

    Raises OmirrorError when another daemon answers on ``path``. A handler that raises
    produces an error reply; the connection and the daemon go on.
    """
    path = os.fspath(path)
    sock = _bind(path)
    daemon_uid = os.geteuid()
    serving = _serving.setdefault(path, set())

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Registered in ``_serving`` so that :func:`close_control` can cancel it; no error
        of one connection reaches the loop's exception handler."""
        task = asyncio.current_task()
        assert task is not None
        serving.add(task)
        try:
            await _serve_connection(reader, writer, path, handlers, daemon_uid)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        except Exception:  # a bug here must not reach the loop's exception handler
            log.exception("control: connection failed")
        finally:
            serving.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    try:
        return await asyncio.start_unix_server(on_connect, sock=sock, limit=MAX_LINE)
    except BaseException:
        sock.close()
        raise


def _bind(path: str) -> socket.socket:
    """Bind and listen on ``path``, replacing a socket file nobody answers on.

    The state directory is locked (flock) from the check to listen(): without it, a
    daemon starting beside another one still between bind() and listen() would take
    that socket for a stale one, remove it, and both would run.
    """
    directory = os.path.dirname(path) or "."
    try:
        lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise OmirrorError(f"cannot open the state directory {directory}: "
                           f"{e.strerror or e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _bind_locked(path)
    finally:
        os.close(lock)  # releases the lock


def _bind_locked(path: str) -> socket.socket:
    pid = _answering_pid(path)
    if pid is not None:
        raise _another(path, pid)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # left by a daemon that died: nothing answered on it
            log.info("removed a stale control socket %s", path)
        else:
            raise OmirrorError(f"{path} exists and is not a socket: move it away")
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with _short(path) as name:
            sock.bind(name)
        # before listen(): until then a connect is refused, so nobody gets in early
        os.chmod(path, 0o660)
        st = os.lstat(path)
        _bound[path] = (st.st_dev, st.st_ino)
        sock.listen(16)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:  # another daemon bound it since the check
            raise _another(path, _answering_pid(path)) from None
        raise OmirrorError(f"cannot make the control socket {path}: {e.strerror or e}") \
            from None
    sock.setblocking(False)
    return sock


def _another(path: str, pid: int | None) -> OmirrorError:
    state_dir = os.path.dirname(path)
    who = "another omirrord" if pid is None else f"another omirrord (pid {pid})"
    return OmirrorError(f"{who} runs with --state-dir {state_dir}")


async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            path: str, handlers: dict[str, Handler], daemon_uid: int) -> None:
    pid, uid, gid = _peer_credentials(writer.get_extra_info("socket"))
    try:
        socket_gid = os.stat(path).st_gid  # read now: the operator may chgrp the socket
    except OSError:
        socket_gid = os.getegid()
    if not is_caller_allowed(uid, gid, daemon_uid=daemon_uid, socket_gid=socket_gid):
        # the request is read first, so that the client sees the reply, not a broken pipe
        with contextlib.suppress(ValueError, asyncio.TimeoutError):
            await asyncio.wait_for(reader.readline(), 5.0)
        log.warning("control: refused pid %d uid %d gid %d: not root, not uid %d, not in "
                    "group %d", pid, uid, gid, daemon_uid, socket_gid)
        await _reply(writer, {"ok": False, "error": f"uid {uid} may not use {path}: only "
                              f"root, uid {daemon_uid} and group {socket_gid} may"})
        return
    while True:
        try:
            line = await asyncio.wait_for(reader.readline(), IDLE_S)
        except TimeoutError:
            return
        except ValueError:  # asyncio's way of saying the line exceeds the limit
            log.warning("control: pid %d sent a request longer than %d bytes; closed",
                        pid, MAX_LINE)
            await _reply(writer, {"ok": False, "error": f"request longer than {MAX_LINE} "
                                                        "bytes"})
            return
        if not line:
            return
        if not line.strip():
            continue
        await _reply(writer, await _answer(line, handlers, pid))


async def _answer(line: bytes, handlers: dict[str, Handler], pid: int) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except ValueError as e:
        return {"ok": False, "error": f"not a JSON object: {e}"}
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        return {"ok": False, "error": 'a request is a JSON object with a string "cmd"'}
    cmd = request["cmd"]
    handler = handlers.get(cmd)
    if handler is None:
        return {"ok": False, "error": f"unknown command {cmd!r}; this omirrord knows "
                                      f"{', '.join(sorted(handlers))}"}
    try:
        result = await handler(request)
    except asyncio.CancelledError:
        raise
    except OmirrorError as e:  # the request was wrong or cannot be done: the caller's news
        log.info("control: %s from pid %d refused: %s", cmd, pid, e)
        return {"ok": False, "error": str(e)}
    except Exception as e:
        log.warning("control: %s from pid %d failed", cmd, pid, exc_info=True)
        return {"ok": False, "error": f"{cmd} failed in omirrord: {type(e).__name__}: {e}"}
    return {"ok": True, **result}


async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
    try:
        text = json.dumps(reply)
    except (TypeError, ValueError) as e:
        log.warning("control: cannot encode a reply: %s", e)
        text = json.dumps({"ok": False, "error": f"omirrord cannot encode its reply: {e}"})
    writer.write(text.encode() + b"\n")
    await writer.drain()


async def close_control(server: asyncio.base_events.Server, path: str) -> None:
    """Stop answering and remove the socket file, if it still is the one bound here
    (an operator may have started another daemon on a copy of the state directory)."""
    server.close()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 2.0)
    await asyncio.sleep(0)  # a connection accepted just before the close starts its task
    connections = _serving.pop(path, set())
    for task in connections:
        task.cancel()
    if connections:
        await asyncio.wait(connections, timeout=2.0)
    ours = _bound.pop(path, None)
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ours:
            os.unlink(path)


# -- the client -------------------------------------------------------------------------

def request(state_dir: str | os.PathLike[str], cmd: str, timeout: float | None = 10,
            **args: Any) -> dict[str, Any]:
    """Ask the daemon of ``state_dir``; return its reply (``ok`` is true).

    Raises OmirrorError when no daemon answers, when it does not answer within
    ``timeout`` seconds (None: wait as long as it takes), and with the daemon's own
    message when it refuses the request.
    """
    path = socket_path(state_dir)
    try:
        sock = _connect(path, timeout)
    except (FileNotFoundError, NotADirectoryError):
        raise OmirrorError(f"no omirrord is running with --state-dir {state_dir} "
                           f"(no control socket at {path})") from None
    except ConnectionRefusedError:
        raise OmirrorError(f"no omirrord is running with --state-dir {state_dir} "
                           f"(nothing answers on {path})") from None
    except PermissionError:
        raise OmirrorError(_permission_message(path)) from None
    except OSError as e:
        raise OmirrorError(f"cannot connect to {path}: {e.strerror or e}") from None
    with sock:
        try:
            try:
                sock.sendall(json.dumps({**args, "cmd": cmd}).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon refused and closed: its reply may still be there
            line = _read_line(sock)
        except TimeoutError:
            raise OmirrorError(f"omirrord did not answer {cmd} within {timeout:g} s "
                               f"(control socket {path})") from None
        except OSError as e:
            raise OmirrorError(f"lost the control connection {path}: "
                               f"{e.strerror or e}") from None
    try:
        reply = json.loads(line)
    except ValueError as e:
        raise OmirrorError(f"omirrord answered {cmd} with something that is not JSON: "
                           f"{e}") from None
    if not isinstance(reply, dict):
        raise OmirrorError(f"omirrord answered {cmd} with a JSON {type(reply).__name__}")
    if not reply.get("ok"):
        raise OmirrorError(str(reply.get("error") or f"omirrord refused {cmd}"))
    return reply


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ConnectionResetError(0, "omirrord closed the connection without a reply")
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_REPLY:
            raise OSError(0, f"reply longer than {MAX_REPLY} bytes")


def daemon_running(state_dir: str | os.PathLike[str]) -> int | None:
    """The pid of the omirrord answering on ``state_dir``'s control socket, or None.

    Raises OmirrorError when the socket exists but this user may not connect to it:
    then nobody can tell, and guessing "none" could let two writers into one store.
    """
    return _answering_pid(socket_path(state_dir))
