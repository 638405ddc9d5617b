"""systemd.py against a real notify socket; journald's log priorities; --syslog; and the
scanner's refusal of a read-only root (what ProtectSystem=strict leaves without
ReadWritePaths=)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest

from omirror import cli, config, systemd
from omirror.errors import OmirrorError, RootError
from omirror.scanner import Scanner
from omirror.store import Store

Receive = Callable[[], list[bytes]]


def _drain(sock: socket.socket, wait_s: float = 0.2) -> list[bytes]:
    """Every datagram that has arrived, waiting up to ``wait_s`` for the first."""
    out = []
    sock.settimeout(wait_s)
    try:
        while True:
            out.append(sock.recv(65536))
            sock.settimeout(0.0)
    except (BlockingIOError, TimeoutError):
        return out


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receive]:
    """A real AF_UNIX datagram socket as systemd binds it, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield lambda: _drain(sock)


# -- sd_notify -----------------------------------------------------------------------------

def test_notify_sends_lines_and_fields_in_one_datagram(notify_socket: Receive) -> None:
    assert systemd.notify("READY=1", STATUS="mirroring 1 set with 2 peers")
    assert notify_socket() == [b"READY=1\nSTATUS=mirroring 1 set with 2 peers"]


@pytest.mark.parametrize(("call", "expected"), [
    (lambda: systemd.ready("up"), b"READY=1\nSTATUS=up"),
    (lambda: systemd.ready(), b"READY=1"),
    (lambda: systemd.status("scanning set web: 12 files"), b"STATUS=scanning set web: 12 files"),
    (lambda: systemd.stopping(), b"STOPPING=1"),
    (lambda: systemd.watchdog(), b"WATCHDOG=1"),
    (lambda: systemd.extend_timeout(60), b"EXTEND_TIMEOUT_USEC=60000000"),
])
def test_helpers_send_what_sd_notify_documents(notify_socket: Receive,
                                               call: Callable[[], bool],
                                               expected: bytes) -> None:
    assert call()
    assert notify_socket() == [expected]


def test_reloading_carries_the_monotonic_time(notify_socket: Receive) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [message] = notify_socket()
    fields = dict(line.split(b"=", 1) for line in message.split(b"\n"))
    assert fields[b"RELOADING"] == b"1"
    assert before <= int(fields[b"MONOTONIC_USEC"]) <= after


def test_a_value_stays_on_one_line_and_in_utf8(notify_socket: Receive) -> None:
    """A newline would start a field of its own; a path that is not UTF-8 (surrogate
    escapes from os.fsdecode) would make systemd drop the whole STATUS=."""
    systemd.status("scanning\nset " + os.fsdecode(b"caf\xe9"))
    [message] = notify_socket()
    assert message == b"STATUS=scanning set caf\\udce9"
    message.decode("utf-8")


def test_abstract_socket_names_start_with_at(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"omirror-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.watchdog()
        assert _drain(sock) == [b"WATCHDOG=1"]


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.ready("up")
    assert not systemd.notify("READY=1")


def test_a_socket_that_is_gone_is_not_an_error(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-here"))
    assert not systemd.stopping()


def test_an_address_of_another_kind_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert not systemd.ready()


# -- the watchdog's interval ---------------------------------------------------------------

@pytest.mark.parametrize(("usec", "pid", "expected"), [
    ("2000000", None, 2.0),
    ("30000000", "self", 30.0),
    ("2000000", "1", None),  # meant for another process (we inherited it)
    (None, None, None),
    ("0", None, None),
    ("soon", None, None),
])
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                           expected: float | None) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert systemd.watchdog_interval() == expected


# -- the watchdog's proof ------------------------------------------------------------------

async def _run_watchdog(dog: systemd.Watchdog, seconds: float) -> None:
    task = asyncio.create_task(dog.run())
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watchdog_pings_after_each_probe_that_returns(notify_socket: Receive) -> None:
    probes = 0

    async def probe() -> None:
        nonlocal probes
        probes += 1

    dog = systemd.Watchdog(0.2, probe, lambda: 0)  # a ping every 0.1 s
    await _run_watchdog(dog, 0.45)
    assert 3 <= dog.pings <= 5
    assert probes == dog.pings
    assert set(notify_socket()) == {b"WATCHDOG=1"}


async def test_watchdog_is_silent_while_nothing_moves(notify_socket: Receive,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A probe stuck behind a job that does not move (a hung file system): no ping, so
    systemd restarts the daemon; the log says why, once."""
    stuck = asyncio.Event()
    dog = systemd.Watchdog(0.2, stuck.wait, lambda: (7, 7))
    await _run_watchdog(dog, 0.45)
    assert dog.pings == 0
    assert notify_socket() == []
    assert [r.getMessage() for r in caplog.records].count(
        "watchdog: no progress of the tree worker or the store for 0.1 s; systemd "
        "restarts omirrord if none comes within WatchdogSec") == 1


async def test_watchdog_counts_a_long_job_that_moves(notify_socket: Receive) -> None:
    """The worker is busy with a long scan, so the probe waits; the scan's counters
    move, and that is proof enough."""
    stuck = asyncio.Event()
    counter = iter(range(1000))
    dog = systemd.Watchdog(0.2, stuck.wait, lambda: next(counter))
    await _run_watchdog(dog, 0.45)
    assert dog.pings >= 4


async def test_watchdog_does_not_count_a_failed_probe(notify_socket: Receive,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    async def probe() -> None:
        raise OSError("disk I/O error")

    dog = systemd.Watchdog(0.2, probe, lambda: 0)
    await _run_watchdog(dog, 0.25)
    assert dog.pings == 0
    assert "watchdog: the liveness probe failed: disk I/O error" in caplog.messages


def test_thread_io_reads_this_thread() -> None:
    import threading

    read, _written = systemd.thread_io(threading.get_native_id())
    with open(__file__, "rb") as f:
        size = len(f.read())
    assert systemd.thread_io(threading.get_native_id())[0] >= read + size
    assert systemd.thread_io(None) == (0, 0)
    assert systemd.thread_io(2**31 - 1) == (0, 0)


# -- journald and syslog -------------------------------------------------------------------

def _record(level: int, message: str, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("omirror.daemon", level, __file__, 1, message, (),
                             exc_info)  # type: ignore[arg-type]


def test_stderr_is_journal_when_journal_stream_names_fd_2(
        monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert systemd.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not systemd.stderr_is_journal()  # a parent's journal, not our stderr
    monkeypatch.setenv("JOURNAL_STREAM", "journal")
    assert not systemd.stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not systemd.stderr_is_journal()


@pytest.mark.parametrize(("level", "prefix"), [
    (logging.CRITICAL, "<2>"), (logging.ERROR, "<3>"), (logging.WARNING, "<4>"),
    (logging.INFO, "<6>"), (logging.DEBUG, "<7>"), (logging.INFO + 5, "<6>"),
])
def test_journal_lines_start_with_their_priority(level: int, prefix: str) -> None:
    line = systemd.JournalFormatter().format(_record(level, "peer=beta link out up"))
    assert line == f"{prefix}{logging.getLevelName(level)} omirror.daemon: peer=beta link out up"


def test_every_line_of_a_traceback_keeps_the_priority() -> None:
    try:
        raise ValueError("bad frame")
    except ValueError:
        import sys

        text = systemd.JournalFormatter().format(
            _record(logging.ERROR, "link in closed", sys.exc_info()))
    lines = text.split("\n")
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: bad frame"


def test_syslog_facility_names() -> None:
    assert cli.syslog_facility("local7") == "local7"
    assert cli.syslog_facility("LOG_LOCAL7") == "local7"  # as omirr spelled it
    assert cli.syslog_facility("Daemon") == "daemon"
    assert cli.syslog_facility(None) is None
    with pytest.raises(click.BadParameter, match=r"^unknown syslog facility 'nosuch'; one "
                                                 r"of: auth, .*local7.*"):
        cli.syslog_facility("nosuch")


def test_syslog_handler_sends_to_the_syslog_socket(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "log"
    monkeypatch.setattr(cli, "SYSLOG_SOCKET", str(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        handler = cli.syslog_handler("local7")
        try:
            handler.handle(_record(logging.WARNING, "clock skew 3 s"))
            handler.handle(_record(logging.INFO, "listening"))
        finally:
            handler.close()
        received = _drain(sock)
    pid = os.getpid()
    # local7 is facility 23: 23 * 8 + 4 (warning), 23 * 8 + 6 (info)
    assert received == [
        f"<188>omirrord[{pid}]: WARNING omirror.daemon: clock skew 3 s\0".encode(),
        f"<190>omirrord[{pid}]: INFO omirror.daemon: listening\0".encode()]


def test_syslog_without_a_syslog_daemon_is_an_error(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "SYSLOG_SOCKET", str(tmp_path / "log"))
    with pytest.raises(OmirrorError, match=r"^--syslog daemon: no syslog daemon listens on "
                                           r".*/log: No such file or directory$"):
        cli.syslog_handler("daemon")


# -- a read-only root (ProtectSystem=strict without ReadWritePaths=) -------------------------

def test_a_read_only_root_stops_its_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    mset = config.parse("HOSTS = ( alpha beta )\nFILES = ( /data )\n"
                        "${FILES} -> ${HOSTS}\n    install ;\n", "test.conf").sets[0]
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, st: os.statvfs_result) -> None:
            self.f_flag = st.f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly(real_statvfs(p)))
    with Store.open(tmp_path / "state") as store:
        scanner = Scanner(store, "alpha")
        with pytest.raises(RootError, match=r"is on a read-only mount here.*ReadWritePaths="):
            scanner.scan_set(mset, os.fsencode(tmp_path))
        assert store.count() == 0
        assert not (tmp_path / "data" / ".omirror-root").exists()
        scanner.scan_set(mset, os.fsencode(tmp_path), dry_run=True)  # --check only reads
