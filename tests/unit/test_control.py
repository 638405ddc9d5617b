"""The control socket over a real UNIX socket: protocol, errors, who may ask, the lock."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest

from omirror import control
from omirror.errors import OmirrorError


async def echo(request: dict[str, Any]) -> dict[str, Any]:
    return {"echo": request}


async def broken(request: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("the handler broke")


async def refusing(request: dict[str, Any]) -> dict[str, Any]:
    raise OmirrorError("/etc/x is in no set of alpha")


HANDLERS = {"echo": echo, "broken": broken, "refusing": refusing}


async def ask(state: Path, cmd: str, **args: Any) -> dict[str, Any]:
    """The synchronous client, run beside the loop that serves it."""
    return await asyncio.to_thread(control.request, state, cmd, 5, **args)


async def raw(state: Path, data: bytes) -> bytes:
    """Send raw bytes, return everything the daemon answers until it closes or a line."""
    def talk() -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(control.socket_path(state))
            s.sendall(data)
            out = b""
            while not out.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
            return out
    return await asyncio.to_thread(talk)


async def test_round_trip(tmp_path: Path) -> None:
    server = await control.serve_control(control.socket_path(tmp_path), HANDLERS)
    try:
        reply = await ask(tmp_path, "echo", paths=["/data/x"], n=3)
        assert reply == {"ok": True, "echo": {"cmd": "echo", "paths": ["/data/x"], "n": 3}}
        st = os.stat(control.socket_path(tmp_path))
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    finally:
        await control.close_control(server, control.socket_path(tmp_path))
    assert not os.path.exists(control.socket_path(tmp_path))


async def test_several_requests_on_one_connection(tmp_path: Path) -> None:
    server = await control.serve_control(control.socket_path(tmp_path), HANDLERS)
    try:
        out = await raw(tmp_path, b'{"cmd": "echo", "a": 1}\n')
        assert json.loads(out)["echo"]["a"] == 1

        def two() -> list[dict[str, Any]]:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(control.socket_path(tmp_path))
                s.sendall(b'{"cmd": "echo", "a": 1}\n\n{"cmd": "echo", "a": 2}\n')
                f = s.makefile("rb")
                return [json.loads(f.readline()), json.loads(f.readline())]

        first, second = await asyncio.to_thread(two)
        assert (first["echo"]["a"], second["echo"]["a"]) == (1, 2)
    finally:
        await control.close_control(server, control.socket_path(tmp_path))


async def test_unknown_command_is_an_error_reply(tmp_path: Path) -> None:
    server = await control.serve_control(control.socket_path(tmp_path), HANDLERS)
    try:
        with pytest.raises(OmirrorError, match=r"^unknown command 'frob'; this omirrord "
                                               r"knows broken, echo, refusing$"):
            await ask(tmp_path, "frob")
        for bad in (b"not json\n", b"[1, 2]\n", b'{"cmd": 3}\n'):
            reply = json.loads(await raw(tmp_path, bad))
            assert reply["ok"] is False and reply["error"]
    finally:
        await control.close_control(server, control.socket_path(tmp_path))


async def test_handler_error_is_replied_and_logged_and_serving_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = await control.serve_control(control.socket_path(tmp_path), HANDLERS)
    try:
        with caplog.at_level(logging.INFO, logger="omirror.control"):
            with pytest.raises(OmirrorError, match=r"^broken failed in omirrord: "
                                                   r"RuntimeError: the handler broke$"):
                await ask(tmp_path, "broken")
            with pytest.raises(OmirrorError, match=r"^/etc/x is in no set of alpha$"):
                await ask(tmp_path, "refusing")
        assert "broken from pid" in caplog.text and "the handler broke" in caplog.text
        assert (await ask(tmp_path, "echo"))["ok"] is True
    finally:
        await control.close_control(server, control.socket_path(tmp_path))


async def test_oversized_line_is_refused_and_the_connection_closed(tmp_path: Path) -> None:
    server = await control.serve_control(control.socket_path(tmp_path), HANDLERS)
    try:
        huge = b'{"cmd": "echo", "pad": "' + b"x" * (control.MAX_LINE + 10) + b'"}\n'
        reply = json.loads(await raw(tmp_path, huge))
        assert reply == {"ok": False, "error": f"request longer than {control.MAX_LINE} bytes"}
        assert (await ask(tmp_path, "echo"))["ok"] is True
    finally:
        await control.close_control(server, control.socket_path(tmp_path))


async def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OmirrorError, match=rf"^no omirrord is running with --state-dir "
                                           rf"{tmp_path} \(no control socket at "
                                           rf"{tmp_path}/control.sock\)$"):
        control.request(tmp_path, "status")
    assert control.daemon_running(tmp_path) is None
    # a socket file that nobody answers on, as a crash leaves it
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(control.socket_path(tmp_path))
    with pytest.raises(OmirrorError, match=r"^no omirrord is running with --state-dir .* "
                                           r"\(nothing answers on .*control.sock\)$"):
        control.request(tmp_path, "status")
    assert control.daemon_running(tmp_path) is None


async def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(control.socket_path(tmp_path))
    server = await control.serve_control(control.socket_path(tmp_path), HANDLERS)
    try:
        assert (await ask(tmp_path, "echo"))["ok"] is True
    finally:
        await control.close_control(server, control.socket_path(tmp_path))


async def test_a_second_server_on_the_same_state_dir_refuses(tmp_path: Path) -> None:
    path = control.socket_path(tmp_path)
    server = await control.serve_control(path, HANDLERS)
    try:
        assert await asyncio.to_thread(control.daemon_running, tmp_path) == os.getpid()
        with pytest.raises(OmirrorError, match=rf"^another omirrord \(pid {os.getpid()}\) "
                                               rf"runs with --state-dir {tmp_path}$"):
            await control.serve_control(path, HANDLERS)
        assert (await ask(tmp_path, "echo"))["ok"] is True  # the first one is untouched
    finally:
        await control.close_control(server, path)


async def test_a_file_in_the_way_is_not_removed(tmp_path: Path) -> None:
    path = control.socket_path(tmp_path)
    Path(path).write_text("mine")
    with pytest.raises(OmirrorError, match=r"control.sock exists and is not a socket"):
        await control.serve_control(path, HANDLERS)
    assert Path(path).read_text() == "mine"


async def test_close_leaves_a_socket_that_is_not_ours(tmp_path: Path) -> None:
    path = control.socket_path(tmp_path)
    server = await control.serve_control(path, HANDLERS)
    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(path)  # someone else's now
        await control.close_control(server, path)
        assert os.path.exists(path)


async def test_a_deep_state_directory_works(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert len(control.socket_path(deep)) > 108
    server = await control.serve_control(control.socket_path(deep), HANDLERS)
    try:
        assert await asyncio.to_thread(control.daemon_running, deep) == os.getpid()
        assert (await ask(deep, "echo"))["ok"] is True
    finally:
        await control.close_control(server, control.socket_path(deep))
    assert not os.path.exists(control.socket_path(deep))


# -- who may ask ------------------------------------------------------------------------

def no_groups(uid: int) -> list[int]:
    return []


@pytest.mark.parametrize("uid, gid, groups, allowed", [
    (0, 0, [], True),            # root
    (1000, 1000, [], True),      # the daemon's own user
    (2000, 500, [], True),       # primary group is the socket's group
    (2000, 2000, [7, 500], True),  # a supplementary member of the socket's group
    (2000, 2000, [7], False),    # anyone else
])
def test_who_may_ask(uid: int, gid: int, groups: list[int], allowed: bool) -> None:
    assert control.is_caller_allowed(uid, gid, daemon_uid=1000, socket_gid=500,
                                     groups_of=lambda _: groups) is allowed


def test_supplementary_groups_of_an_unknown_uid_are_none() -> None:
    assert list(control.supplementary_groups(2**31 - 7)) == []
    assert 0 in control.supplementary_groups(0)


async def test_a_caller_not_allowed_is_refused_and_logged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(control, "is_caller_allowed", lambda *a, **k: False)
    server = await control.serve_control(control.socket_path(tmp_path), HANDLERS)
    try:
        with caplog.at_level(logging.WARNING, logger="omirror.control"):
            with pytest.raises(OmirrorError, match=r"^uid \d+ may not use .*control.sock"):
                await ask(tmp_path, "echo")
        assert "control: refused pid" in caplog.text
    finally:
        await control.close_control(server, control.socket_path(tmp_path))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
async def test_another_uid_is_refused_by_its_kernel_credentials() -> None:
    """A child that drops to an unprivileged uid outside the socket's group is refused
    by SO_PEERCRED even though the file's mode would let it connect."""
    # pytest's own tmp_path is 0700: the child could not even reach the socket there
    with tempfile.TemporaryDirectory(prefix="omirror-control-") as where:
        os.chmod(where, 0o755)
        await _refused_as_nobody(Path(where))


async def _refused_as_nobody(tmp_path: Path) -> None:
    server = await control.serve_control(control.socket_path(tmp_path), HANDLERS)
    os.chmod(control.socket_path(tmp_path), 0o666)  # the file check alone would let it in

    def child() -> int:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 3
            try:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                control.request(tmp_path, "echo", 5)
                code = 0
            except OmirrorError as e:
                code = 1 if "may not use" in str(e) else 2
            finally:
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    try:
        assert await asyncio.to_thread(child) == 1
        assert (await ask(tmp_path, "echo"))["ok"] is True  # root still may
    finally:
        await control.close_control(server, control.socket_path(tmp_path))


@pytest.mark.parametrize("cmd, request_, error", [
    ("sync", {}, 'sync needs "paths"'),
    ("sync", {"paths": "/srv/www"}, 'sync needs "paths"'),
    ("sync", {"paths": ["/srv", 3]}, 'sync needs "paths"'),
    ("replay", {"from_seq": 3}, 'replay needs "peer"'),
    ("replay", {"peer": "b", "from_seq": -1}, 'replay needs "from_seq"'),
    ("replay", {"peer": "b", "from_seq": True}, 'replay needs "from_seq"'),
])
def test_a_malformed_command_is_refused_before_the_daemon_acts(
        cmd: str, request_: dict[str, object], error: str) -> None:
    """The daemon's rescans and relinks are reached only with well-formed requests."""
    acted: list[object] = []

    async def sync(paths: list[str]) -> dict[str, object]:
        acted.append(paths)
        return {}

    async def replay(peer: str, from_seq: int) -> dict[str, object]:
        acted.append((peer, from_seq))
        return {}

    handlers = control.Commands(lambda: {}, sync, replay).handlers()
    with pytest.raises(OmirrorError, match=error):
        asyncio.run(handlers[cmd](dict(request_)))
    assert acted == []
    assert asyncio.run(handlers["replay"]({"peer": "b", "from_seq": 0})) == {}
    assert acted == [("b", 0)]
