"""The unit files under systemd-analyze, and a real daemon under a fake systemd: what it
tells the notify socket, and that it runs with MemoryDenyWriteExecute's restriction."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster import Cluster

UNITS = Path(__file__).resolve().parents[2] / "systemd"
VENV_OMIRRORD = Path(sys.executable).with_name("omirrord")
MakeCluster = Callable[..., Cluster]


# -- the unit files ------------------------------------------------------------------------

def _verify(unit_dir: Path, unit: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", str(unit_dir / unit)],
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
@pytest.mark.parametrize(("source", "unit"), [
    ("omirrord.service", "omirrord.service"),
    ("omirrord@.service", "omirrord@web.service"),  # an instance of the template
])
def test_systemd_analyze_verifies_the_unit(tmp_path: Path, source: str, unit: str) -> None:
    """Clean: exit 0 and not one warning (verify exits 0 after an unknown key or a bad
    value, it only prints them). ExecStart points at this venv's omirrord, because
    verify checks that the binary exists and /usr/bin/omirrord need not."""
    assert VENV_OMIRRORD.exists()
    text = (UNITS / source).read_text()
    assert "ExecStart=/usr/bin/omirrord " in text
    (tmp_path / source).write_text(text.replace("ExecStart=/usr/bin/omirrord ",
                                                f"ExecStart={VENV_OMIRRORD} "))
    result = _verify(tmp_path, unit)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_systemd_analyze_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above is not empty: a typo in the template is reported."""
    text = (UNITS / "omirrord@.service").read_text()
    text = text.replace("ExecStart=/usr/bin/omirrord ", f"ExecStart={VENV_OMIRRORD} ")
    (tmp_path / "omirrord@.service").write_text(text.replace("ProtectSystem=strict",
                                                             "ProtectSystem=strikt"))
    result = _verify(tmp_path, "omirrord@web.service")
    assert "strikt" in result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
@pytest.mark.parametrize(("source", "unit"), [
    ("omirrord.service", "omirrord.service"),
    ("omirrord@.service", "omirrord@web.service"),
])
def test_the_drop_in_the_comments_suggest_verifies(tmp_path: Path, source: str,
                                                   unit: str) -> None:
    """What the resource comments tell an operator to put in a drop-in is valid, and
    verify does read that drop-in (a typo in it is reported)."""
    text = (UNITS / source).read_text()
    (tmp_path / source).write_text(text.replace("ExecStart=/usr/bin/omirrord ",
                                                f"ExecStart={VENV_OMIRRORD} "))
    drop_in = tmp_path / f"{source}.d"
    drop_in.mkdir()
    settings = "[Service]\nNice=0\nIOSchedulingPriority=4\nCPUWeight=100\n" \
               "Environment=OMIRRORD_BWLIMIT=10240\n"
    for line in settings.splitlines()[1:]:
        assert f"#   {line}\n" in text, line
    (drop_in / "resources.conf").write_text(settings)
    result = _verify(tmp_path, unit)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    (drop_in / "resources.conf").write_text(settings.replace("CPUWeight=100",
                                                             "CPUWeight=lots"))
    assert "lots" in (r := _verify(tmp_path, unit)).stdout + r.stderr


def _settings(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("unit", ["omirrord.service", "omirrord@.service"])
def test_unit_settings(unit: str) -> None:
    s = _settings(unit)
    for key, value in [("Type", "notify"), ("NotifyAccess", "main"),
                       ("ExecReload", "/bin/kill -HUP $MAINPID"), ("Restart", "on-failure"),
                       ("WatchdogSec", "30"), ("TimeoutStopSec", "30"),
                       ("LimitNOFILE", "65536"), ("StateDirectoryMode", "0710"),
                       ("ProtectSystem", "strict"), ("ProtectHome", "read-only"),
                       ("NoNewPrivileges", "yes"), ("MemoryDenyWriteExecute", "yes"),
                       ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6")]:
        assert s.get(key) == [value], key
    # a first scan of a big tree yields to the services it mirrors
    for key, value in [("Nice", "10"), ("IOSchedulingClass", "best-effort"),
                       ("IOSchedulingPriority", "7"), ("CPUWeight", "20")]:
        assert s.get(key) == [value], key
    assert "SystemCallFilter" not in s  # ~@privileged would block chown(2)
    assert "RestrictSUIDSGID" not in s  # setuid bits are mirrored
    caps = s["CapabilityBoundingSet"][0].split()
    assert {"CAP_CHOWN", "CAP_FOWNER", "CAP_FSETID", "CAP_DAC_OVERRIDE",
            "CAP_DAC_READ_SEARCH"} == set(caps)
    if unit == "omirrord@.service":
        assert s["ExecStart"] == ["/usr/bin/omirrord -C /etc/omirror/%i.conf --state-dir "
                                  "/var/lib/omirror/%i --peers /etc/omirror/%i.peers"]
        assert s["StateDirectory"] == ["omirror/%i"]
    else:
        assert s["ExecStart"] == ["/usr/bin/omirrord -C /etc/omirrd.conf --state-dir "
                                  "/var/lib/omirror --peers /etc/omirror/peers"]
        assert s["StateDirectory"] == ["omirror"]


@pytest.mark.parametrize("unit", ["omirrord.service", "omirrord@.service"])
def test_each_resource_setting_says_what_it_does(unit: str) -> None:
    """Nice=, IOSchedulingClass= and CPUWeight= each follow a comment on that setting:
    an operator tunes them from the unit file alone."""
    lines = (UNITS / unit).read_text().splitlines()
    for key in ("Nice", "IOSchedulingClass", "CPUWeight"):
        [at] = [i for i, line in enumerate(lines) if line.startswith(f"{key}=")]
        comment = []
        for line in reversed(lines[:at]):
            if not line.startswith("#"):
                break
            comment.append(line)
        assert any(f"# {key}=" in line for line in comment), (key, comment)


# -- a daemon under a fake systemd ---------------------------------------------------------

class NotifySocket:
    """What systemd's notify socket would receive, in order, with arrival times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def _read(self) -> None:
        try:
            while True:
                data = self.sock.recv(65536)
                fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
                self.messages.append((time.monotonic(), fields))
                self.sock.settimeout(0.0)
        except (BlockingIOError, TimeoutError):
            self.sock.settimeout(0.05)

    def wait_for(self, cluster: Cluster, what: str,
                 cond: Callable[[dict[str, str]], bool], after: int = 0,
                 timeout: float = 30) -> int:
        """Index of the first message from index ``after`` on that satisfies ``cond``."""
        end = time.monotonic() + timeout
        while True:
            self._read()
            for i in range(after, len(self.messages)):
                if cond(self.messages[i][1]):
                    return i
            if time.monotonic() > end:
                raise AssertionError(f"no {what} in {len(self.messages) - after} messages:\n"
                                     + "\n".join(repr(m) for _, m in self.messages[after:])
                                     + "\n" + cluster.log_tails())
            cluster.check_alive()

    def fields(self, key: str) -> list[str]:
        self._read()
        return [m[key] for _, m in self.messages if key in m]


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(ns.path))
    try:
        yield ns
    finally:
        ns.sock.close()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def test_daemon_tells_systemd_what_it_does(make_cluster: MakeCluster,
                                           notify_socket: NotifySocket,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    c = make_cluster(2)
    (c[0].data / "a.txt").write_text("a")
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # a ping every second
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    c.start(0, wait=False)
    ns = notify_socket

    ready = ns.wait_for(c, "READY=1", lambda m: m.get("READY") == "1")
    assert _listening(c[0].port), "READY=1 came before the listener was up"
    assert ns.messages[ready][1]["STATUS"].startswith("mirroring 1 set with 1 peer; ")
    scanning = ns.wait_for(c, "STATUS=scanning", lambda m: m.get("STATUS", "").startswith(
        "scanning set "))
    assert scanning < ready, "the startup scan is reported before READY=1"

    # the other peer, without the notify socket: the summary counts its links
    monkeypatch.delenv("NOTIFY_SOCKET")
    c.start(1)
    ns.wait_for(c, "a summary with both links up", lambda m: m.get("STATUS", "").startswith(
        "mirroring 1 set with 1 peer; links up: 1 out, 1 in; queue "), after=ready)

    first = ns.wait_for(c, "WATCHDOG=1", lambda m: m.get("WATCHDOG") == "1")
    second = ns.wait_for(c, "a second WATCHDOG=1", lambda m: m.get("WATCHDOG") == "1",
                         after=first + 1, timeout=5)
    assert ns.messages[second][0] - ns.messages[first][0] < 1.8

    os.kill(c[0].proc.pid, signal.SIGHUP)
    reloading = ns.wait_for(c, "RELOADING=1", lambda m: m.get("RELOADING") == "1",
                            after=second)
    usec = int(ns.messages[reloading][1]["MONOTONIC_USEC"])
    assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 30_000_000
    ns.wait_for(c, "READY=1 after the reload", lambda m: m.get("READY") == "1",
                after=reloading)

    stop_from = len(ns.messages)
    c.stop(0)  # asserts exit status 0
    ns.wait_for(c, "STOPPING=1", lambda m: m.get("STOPPING") == "1", after=stop_from,
                timeout=5)


# -- MemoryDenyWriteExecute ----------------------------------------------------------------

_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN = 65, 1

#: Runs omirrord in a process that can never map memory writable and executable, which
#: is what MemoryDenyWriteExecute=yes enforces (PR_SET_MDWE, Linux 6.3+).
_MDWE_BOOT = """
import ctypes, runpy, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE failed")
sys.argv[0] = "omirrord"
runpy.run_module("omirror", run_name="__main__", alter_sys=True)
"""


def _mdwe_supported() -> bool:
    """Try it in a throwaway child: once set, the flag cannot be cleared."""
    code = ("import ctypes, sys; sys.exit(ctypes.CDLL(None, use_errno=True)"
            f".prctl({_PR_SET_MDWE}, {_PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0)")
    return subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


def test_daemon_runs_under_memory_deny_write_execute(make_cluster: MakeCluster) -> None:
    """MemoryDenyWriteExecute=yes in the unit is safe: two daemons whose every page can
    never be both writable and executable start, link over SSH and mirror a file."""
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    c = make_cluster(2)
    plain = c.command  # [python, -m, omirror, args...]
    c.command = lambda p: [sys.executable, "-c", _MDWE_BOOT,  # type: ignore[method-assign]
                           *plain(p)[3:]]
    c.start()
    (c[0].data / "hello.txt").write_text("written under MDWE\n")
    c.wait_converged()
    assert (c[1].data / "hello.txt").read_text() == "written under MDWE\n"
    for i in range(2):
        assert "PR_SET_MDWE failed" not in c.log_text(i)
        assert re.search(r"Traceback|ERROR", c.log_text(i)) is None, c.log_text(i)
