"""Where a real daemon's log lines go: plain on stderr, with priorities when stderr is
the journal, or to syslog with --syslog."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cluster import Cluster

MakeCluster = Callable[..., Cluster]
HARNESS_LINE = "--- harness: "


def _daemon_lines(c: Cluster, i: int) -> list[str]:
    return [line for line in c.log_text(i).splitlines() if not line.startswith(HARNESS_LINE)]


def test_journal_stream_lines_carry_priorities(make_cluster: MakeCluster,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr is "the journal" when $JOURNAL_STREAM names its device and inode, as
    systemd sets it: every line then starts with its priority and has no time stamp."""
    c = make_cluster(1)
    p = c[0]
    (p.state / "host_key").unlink()  # a key made at start is logged as a warning
    p.log.touch()
    st = p.log.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    c.start()
    c.stop()
    lines = _daemon_lines(c, 0)
    assert lines
    for line in lines:
        assert re.match(r"<[2-7]>(CRITICAL|ERROR|WARNING|INFO|DEBUG) omirror\.\S+: ", line), line
    assert any(line.startswith("<4>WARNING omirror.daemon: made a new host key ")
               for line in lines)
    assert any(re.match(r"<6>INFO omirror\.daemon: omirrord \S+ listening on ", line)
               for line in lines)


def test_plain_lines_elsewhere(make_cluster: MakeCluster,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A JOURNAL_STREAM inherited from a parent whose stderr was the journal, while ours
    is a file, changes nothing: plain lines with a time stamp."""
    c = make_cluster(1)
    c[0].log.touch()
    st = c[0].log.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    c.start()
    c.stop()
    lines = _daemon_lines(c, 0)
    assert lines
    for line in lines:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) omirror\.", line)


@pytest.mark.parametrize("args, env", [
    (["--syslog", "nosuch"], {}),
    (["run", "--syslog", "nosuch"], {}),
    ([], {"OMIRRORD_SYSLOG": "nosuch"}),
])
def test_unknown_syslog_facility_is_a_usage_error(tmp_path: Path, args: list[str],
                                                  env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, "-m", "omirror", *args, "-C", "/nonexistent",
                             "--state-dir", str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert "Invalid value for '--syslog': unknown syslog facility 'nosuch'; one of: " \
           in result.stderr
    assert not list(tmp_path.iterdir())  # nothing started


#: omirrord with the syslog socket moved where the test listens (argv[1] is the path).
_SYSLOG_BOOT = """
import runpy, sys
import omirror.cli
omirror.cli.SYSLOG_SOCKET = sys.argv.pop(1)
sys.argv[0] = "omirrord"
runpy.run_module("omirror", run_name="__main__", alter_sys=True)
"""


def test_syslog_gets_the_lines_instead_of_stderr(make_cluster: MakeCluster,
                                                 tmp_path: Path) -> None:
    c = make_cluster(1)
    address = tmp_path / "log"
    plain = c.command  # [python, -m, omirror, args...]
    c.command = lambda p: [sys.executable, "-c", _SYSLOG_BOOT,  # type: ignore[method-assign]
                           str(address), *plain(p)[3:], "--syslog", "LOG_LOCAL7"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(address))
        syslog.settimeout(0.5)
        c.start()
        received: list[bytes] = []
        listening = re.compile(rb"^<190>omirrord\[%d\]: INFO omirror\.daemon: omirrord \S+ "
                               rb"listening on " % c[0].proc.pid)
        end = time.monotonic() + 30
        while not any(listening.match(m) for m in received):
            assert time.monotonic() < end, f"no 'listening' line in {received!r}"
            try:
                received.append(syslog.recv(65536))
            except TimeoutError:
                c.check_alive()
        c.stop()
    assert all(m.startswith(b"<") and m.endswith(b"\0") for m in received)
    assert _daemon_lines(c, 0) == []  # nothing on stderr


def test_syslog_without_a_syslog_daemon_exits_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", _SYSLOG_BOOT, str(tmp_path / "log"),
                             "--syslog", "daemon", "-C", "/nonexistent",
                             "--state-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr == ("omirrord: error: --syslog daemon: no syslog daemon listens on "
                             f"{tmp_path / 'log'}: No such file or directory\n")


EVIL = b"evil\nWARNING omirror.daemon: forged \x1b[31mred\xff"
SHOWN = "/data/evil\\x0aWARNING omirror.daemon: forged \\x1b[31mred\\xff"


def test_file_names_cannot_forge_what_people_read(make_cluster: MakeCluster) -> None:
    """A file name is a local user's (or a peer's) choice: it may hold a newline, an
    escape sequence, bytes that are not UTF-8. Wherever a path reaches a person (the
    log, ``log dump``, ``--check``), it is shown in one escaped form, on one line: it can
    neither forge a log line nor colour a terminal."""
    c = make_cluster(2)
    data0 = os.fsencode(c[0].data)
    with open(os.path.join(data0, EVIL), "wb") as f:
        f.write(b"x")
    os.mkfifo(os.path.join(data0, EVIL + b".fifo"))  # the startup scan logs it
    c.start()
    c.wait_until(lambda: os.path.exists(os.path.join(os.fsencode(c[1].data), EVIL)), 30,
                 "the oddly named file reaches peer 1")
    c.stop(1)
    with open(os.path.join(data0, EVIL), "ab") as f:
        f.write(b"changed while peer 1 was away")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
    common = ["-C", str(c.conf), "--peers", str(c.peers_file)]
    dump = subprocess.run([sys.executable, "-m", "omirror", "log", "dump",
                           "--state-dir", str(c[0].state)], capture_output=True,
                          timeout=60, env=env)
    check = subprocess.run([sys.executable, "-m", "omirror", "--check", "-n", c[1].name,
                            "--root", str(c[1].root), "--state-dir", str(c[1].state),
                            *common], capture_output=True, timeout=60, env=env)
    c.stop()
    outputs = {"the log of peer 0": c.log_text(0).encode(),
               "log dump": dump.stdout, "--check": check.stdout}
    for what, text in outputs.items():
        lines = text.decode("utf-8", "strict").splitlines()  # no stray byte either
        assert not any(line.startswith("WARNING omirror.daemon: forged") for line in lines), what
        assert b"\x1b" not in text, what
        assert any(SHOWN in line for line in lines), (what, text[-2000:])
    assert dump.returncode == 0 and check.returncode == 1, check.stderr
