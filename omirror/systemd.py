"""systemd without a package: sd_notify(3), the watchdog, and journald's log priorities.

sd_notify is one datagram per message to the AF_UNIX socket that ``$NOTIFY_SOCKET``
names (a path, or an abstract name written ``@name``). Without that variable every
function here does nothing, so the daemon runs the same under systemd, in a terminal
and in tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from omirror.config import set_label
from omirror.units import human_bytes

log = logging.getLogger(__name__)

#: How long one proof of progress holds off systemd's start or reload timeout.
EXTEND_TIMEOUT_S = 60.0


# -- sd_notify -----------------------------------------------------------------------------

def _address() -> str | None:
    value = os.environ.get("NOTIFY_SOCKET", "")
    if value.startswith("@"):
        return "\0" + value[1:]  # the abstract namespace: unix(7)
    if value.startswith("/"):
        return value
    return None  # unset, or a kind of address this module does not speak (vsock:)


def _clean(value: object) -> str:
    """One field's value: on one line (a newline would start another field), and UTF-8
    (systemd ignores a STATUS= that is not; a path that is not UTF-8 shows escaped)."""
    text = str(value).replace("\n", " ")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def notify(*lines: str, **fields: object) -> bool:
    """Send ``lines`` ("READY=1") and ``fields`` (READY=1, STATUS="...") in one message.

    Returns whether a message was sent: False when not run by systemd (no
    ``$NOTIFY_SOCKET``) or when the socket refused it; a daemon must never stop or slow
    down because its supervisor cannot be told something.
    """
    address = _address()
    if address is None:
        return False
    message = "\n".join([*lines, *(f"{key}={_clean(value)}" for key, value in fields.items())])
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as e:
        log.debug("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """The service is up (after start, and after a reload)."""
    if status is None:
        return notify(READY=1)
    return notify(READY=1, STATUS=status)


def status(text: str) -> bool:
    """The one-line status ``systemctl status`` shows."""
    return notify(STATUS=text)


def stopping() -> bool:
    return notify(STOPPING=1)


def reloading() -> bool:
    """The service reloads its configuration; READY=1 follows when it is done.

    systemd 253 and later want the CLOCK_MONOTONIC time of the request with it, to tell
    this reload from an earlier one; older versions ignore the field.
    """
    return notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)


def watchdog() -> bool:
    """Tell the watchdog the service is alive: send only after proving it."""
    return notify(WATCHDOG=1)


def extend_timeout(seconds: float) -> bool:
    """Hold off the start, reload or stop timeout for ``seconds`` more (systemd 236+):
    sent while a long startup scan makes progress, so that it is not killed for being
    long, while one that hangs still is."""
    return notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))


def watchdog_interval() -> float | None:
    """The watchdog period in seconds, or None when no watchdog watches this process.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for; a child
    that inherited the variables is not it (sd_watchdog_enabled(3)).
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


# -- the watchdog --------------------------------------------------------------------------

class Watchdog:
    """Sends WATCHDOG=1 every half period, but only for a period in which the daemon
    proved that it makes progress.

    A timer that only ticks would prove that the event loop runs, nothing more: a tree
    worker stuck on a hung file system or a store that no longer answers would look
    alive forever. So each period ``probe()`` runs a trivial job through the daemon's
    real machinery (the tree worker and a store read), and WATCHDOG=1 is sent once it
    returns. The worker runs one job at a time, and a scan of a large tree is one long
    job: while the probe waits behind it, ``progress()`` (counters that move while the
    worker works: files scanned, bytes read) having moved since the last period counts
    as the proof instead. Without either, no WATCHDOG=1 is sent and, after the full
    period, systemd restarts the service.
    """

    def __init__(self, interval_s: float, probe: Callable[[], Awaitable[object]],
                 progress: Callable[[], Hashable]) -> None:
        self.period_s = interval_s / 2
        self.probe = probe
        self.progress = progress
        self.pings = 0

    async def run(self) -> None:
        pending: asyncio.Future[object] | None = None
        last = self.progress()
        stuck_since: float | None = None
        try:
            while True:
                started = time.monotonic()
                if pending is None:
                    pending = asyncio.ensure_future(self.probe())
                done, _ = await asyncio.wait({pending}, timeout=self.period_s)
                proved = False
                if done:
                    try:
                        pending.result()
                        proved = True
                    except Exception as e:  # the store or the worker failed: no proof
                        log.error("watchdog: the liveness probe failed: %s", e)
                    pending = None
                now = self.progress()
                if not proved and now != last:
                    proved = True  # the worker is busy with a long job, and the job moves
                last = now
                if proved:
                    if stuck_since is not None:
                        log.warning("watchdog: progress again after %.0f s",
                                    time.monotonic() - stuck_since)
                        stuck_since = None
                    watchdog()
                    self.pings += 1
                elif stuck_since is None:
                    stuck_since = started
                    log.warning("watchdog: no progress of the tree worker or the store "
                                "for %.1f s; systemd restarts omirrord if none comes "
                                "within WatchdogSec", self.period_s)
                await asyncio.sleep(max(0.0, started + self.period_s - time.monotonic()))
        finally:
            if pending is not None:
                pending.cancel()


# -- what systemctl status shows ------------------------------------------------------------

#: STATUS= lines are sent at most this often.
REPORT_EVERY_S = 1.0
#: A long scan logs a progress line this often.
SCAN_LOG_EVERY_S = 60.0


class Reporter:
    """Keeps systemd told: READY=1 once the daemon serves, RELOADING=1 during a reload,
    and a STATUS= line every second (a scan's progress while one runs, else
    ``summary()``). A scan that moves also holds off systemd's start or reload timeout:
    a first scan of a large tree may take longer than any fixed timeout; one that hangs
    does not move, and times out.

    ``scan()`` is the scan in progress (omirror/scanner.py's counters) or None;
    ``progress()`` is what moves while the tree worker works, for the watchdog, whose
    ``probe()`` is a job through the tree worker and the store.
    """

    def __init__(self, summary: Callable[[], str], scan: Callable[[], Any],
                 progress: Callable[[], Hashable],
                 probe: Callable[[], Awaitable[object]]) -> None:
        self.summary = summary
        self.scan = scan
        self.progress = progress
        self.probe = probe
        self.ready = False  # whether systemd has been told READY=1 (and no reload since)
        self._shown = ""

    def start(self) -> list[asyncio.Task[None]]:
        """The tasks that keep systemd informed, from before the startup scan: STATUS=
        lines, and the watchdog when the unit sets WatchdogSec=. Outside systemd both
        cost a check a second and send nothing."""
        tasks = [asyncio.create_task(self._run(), name="systemd-status")]
        interval = watchdog_interval()
        if interval is not None:
            dog = Watchdog(interval, self.probe, self.progress)
            tasks.append(asyncio.create_task(dog.run(), name="watchdog"))
        return tasks

    def tell_ready(self) -> None:
        self._shown = self.summary()
        ready(self._shown)
        self.ready = True

    def tell_reloading(self) -> None:
        reloading()
        self.ready = False

    def show(self, text: str) -> None:
        """STATUS= for systemd, sent when it changes."""
        if text != self._shown:
            self._shown = text
            status(text)

    async def _run(self) -> None:
        progress = self.progress()
        scan = None
        scan_started = logged = time.monotonic()
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            previous, progress = progress, self.progress()
            now = time.monotonic()
            current = self.scan()
            if current is not scan:
                scan, scan_started, logged = current, now, now
            if scan is None:
                if not self.ready:
                    continue  # starting or reloading: the scans say what happens
                text = self.summary()
            else:
                text = (f"scanning {set_label(scan.set_title)}: {scan.files} files in "
                        f"{scan.dirs} directories, {scan.hashed} hashed "
                        f"({human_bytes(scan.hashed_bytes)})")
                if not self.ready and progress != previous:
                    extend_timeout(EXTEND_TIMEOUT_S)
                if now - logged >= SCAN_LOG_EVERY_S:
                    logged = now
                    log.info("scanning set=%s files=%d dirs=%d hashed=%d hashed_bytes=%d "
                             "for %.0fs", scan.set_title, scan.files, scan.dirs, scan.hashed,
                             scan.hashed_bytes, now - scan_started)
            self.show(text)


def thread_io(native_id: int | None) -> tuple[int, int]:
    """Bytes one thread of this process has read and written so far (proc(5):
    /proc/PID/task/TID/io rchar and wchar), or (0, 0) when unknown."""
    if native_id is None:
        return 0, 0
    try:
        with open(f"/proc/self/task/{native_id}/io", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        return int(fields[b"rchar"]), int(fields[b"wchar"])
    except (OSError, KeyError, ValueError):
        return 0, 0


# -- the journal ---------------------------------------------------------------------------

def stderr_is_journal() -> bool:
    """Whether stderr is connected to journald: ``$JOURNAL_STREAM`` ("dev:ino", set by
    systemd for StandardError=journal) names the very file descriptor 2 we hold, not
    one that a parent had and passed on only in the environment (systemd.exec(5))."""
    dev, sep, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (sep and dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def syslog_priority(levelno: int) -> int:
    """The syslog(3) priority of a logging level: <3> error, <4> warning, <6> info, <7>
    debug (a level between two takes the lower priority's number)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """Lines for journald on stderr: each starts with its priority, sd-daemon(3) style
    ("<4>"), which journald strips and files, so ``journalctl -p warning`` selects them.
    Every line of a multi-line record (a traceback) gets the prefix, or journald would
    file the continuation lines as info. No time stamp: the journal has its own."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))
