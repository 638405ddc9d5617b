"""``omirrord demo`` as a newcomer runs it: a real process with three real daemons.

The demo's daemons are its children, so the autouse fixture of conftest.py (which looks
at the test's own children) cannot see them: each test here reads their pids from the
status.json files and checks that none is left once the demo has exited.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PEERS = ("alpha", "beta", "gamma")
#: bound for the demo to start three daemons and mirror a small file among them
START_S = 60
CONVERGE_S = 30
#: the daemons finish the job in progress on SIGTERM; the demo kills them after 15 s
STOP_S = 30
POLL_S = 0.05


@dataclass
class Demo:
    """A running ``omirrord demo`` and where to find what it says and makes."""

    proc: subprocess.Popen[bytes]
    directory: Path
    out: Path
    err: Path

    def tree(self, peer: str) -> Path:
        return self.directory / peer / "shared"

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def pids(self) -> dict[str, int]:
        """The daemons' pids, from the status.json each writes once it is up."""
        found = {}
        for peer in PEERS:
            try:
                status = json.loads((self.directory / peer / "state" / "status.json")
                                    .read_text())
            except (FileNotFoundError, ValueError):
                continue
            found[peer] = status["pid"]
        return found

    def wait_until(self, cond: Callable[[], bool], what: str,
                   timeout: float = CONVERGE_S) -> None:
        """Poll ``cond`` with a bound; fail at once, with the demo's output, if it exits."""
        end = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                pytest.fail(f"the demo exited with status {self.proc.returncode} while "
                            f"waiting until {what}\n{self.describe()}")
            if time.monotonic() > end:
                pytest.fail(f"timed out after {timeout} s waiting until {what}\n"
                            f"{self.describe()}")
            time.sleep(POLL_S)

    def describe(self) -> str:
        logs = []
        for peer in PEERS:
            try:
                tail = (self.directory / peer / "omirrord.log").read_text(
                    errors="replace").splitlines()[-15:]
            except FileNotFoundError:
                tail = ["(no log)"]
            logs.append(f"--- {peer}'s log ---\n" + "\n".join(tail))
        return (f"--- demo stdout ---\n{self.stdout()}\n--- demo stderr ---\n"
                f"{self.stderr()}\n" + "\n".join(logs))


def omirror_processes(pids: dict[str, int]) -> list[tuple[str, int, str]]:
    """Those of ``pids`` that still run omirror (zombies aside): (peer, pid, cmdline)."""
    alive = []
    for peer, pid in pids.items():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                # the command name may hold spaces and parentheses: fields follow the last ')'
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state != b"Z" and "omirror" in cmdline:
            alive.append((peer, pid, cmdline))
    return alive


def kill_all(processes: list[tuple[str, int, str]]) -> None:
    for _, pid, _ in processes:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def assert_no_daemon_left(pids: dict[str, int]) -> None:
    assert len(pids) == len(PEERS), f"not every daemon wrote its pid: {pids}"
    left = omirror_processes(pids)
    kill_all(left)  # so that one failure does not leak into the next tests
    assert not left, "the demo left daemons running (now killed): " + "; ".join(
        f"{peer} pid {pid}: {cmdline}" for peer, pid, cmdline in left)


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[Callable[..., Demo]]:
    """``start_demo(*args)`` runs ``python -m omirror demo --dir <tmp>/demo *args``.

    Whatever the test does, the demo and its daemons are gone after it.
    """
    started: list[Demo] = []

    def start(*args: str, directory: Path | None = None) -> Demo:
        directory = directory or tmp_path / "demo"
        n = len(started)
        out, err = tmp_path / f"demo{n}.out", tmp_path / f"demo{n}.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen([sys.executable, "-m", "omirror", "demo", "--dir",
                                     str(directory), *args], stdin=subprocess.DEVNULL,
                                    stdout=o, stderr=e, env=env, cwd=tmp_path)
        demo = Demo(proc, directory, out, err)
        started.append(demo)
        return demo

    yield start
    for demo in started:
        pids = demo.pids()
        if demo.proc.poll() is None:
            demo.proc.send_signal(signal.SIGINT)
            try:
                demo.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                demo.proc.kill()
                demo.proc.wait()
        kill_all(omirror_processes(pids))


def wait_for_welcome(demo: Demo) -> None:
    demo.wait_until(lambda: all((demo.tree(p) / "README.txt").is_file() for p in PEERS)
                    and len({(demo.tree(p) / "README.txt").read_bytes() for p in PEERS}) == 1,
                    "the welcome file is in all three trees", START_S)


def stop_with_ctrl_c(demo: Demo) -> int:
    """SIGINT, as Ctrl-C sends it, and the exit status within the bound."""
    demo.proc.send_signal(signal.SIGINT)
    try:
        return demo.proc.wait(STOP_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the demo did not exit within {STOP_S} s of SIGINT\n{demo.describe()}")


def test_demo_mirrors_a_file_written_into_beta_and_stops_cleanly_on_ctrl_c(
        start_demo: Callable[..., Demo]) -> None:
    demo = start_demo("--duration", "60")
    wait_for_welcome(demo)
    out = demo.stdout()
    for peer in PEERS:
        assert str(demo.tree(peer)) in out, f"the demo does not say where {peer}'s tree is"
    assert "Ctrl-C" in out

    (demo.tree("beta") / "from-beta.txt").write_bytes(b"written into beta\n")
    demo.wait_until(lambda: all((demo.tree(p) / "from-beta.txt").exists()
                                and (demo.tree(p) / "from-beta.txt").read_bytes()
                                == b"written into beta\n" for p in ("alpha", "gamma")),
                    "a file written into beta's tree is in alpha's and gamma's")
    demo.wait_until(lambda: all(f"  {p:<7} + shared/from-beta.txt (18 B)" in demo.stdout()
                                for p in PEERS),
                    "the demo shows the file arriving in each tree")

    pids = demo.pids()
    rc = stop_with_ctrl_c(demo)
    assert rc == 0, demo.describe()
    assert_no_daemon_left(pids)
    assert f"rm -rf {demo.directory}" in demo.stdout()
    assert demo.directory.is_dir(), "the demo directory is kept for the next run"


def test_demo_stops_by_itself_after_its_duration(start_demo: Callable[..., Demo]) -> None:
    demo = start_demo("--duration", "1")
    try:
        rc = demo.proc.wait(START_S + STOP_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"--duration 1 did not end the demo\n{demo.describe()}")
    assert rc == 0, demo.describe()
    assert_no_daemon_left(demo.pids())


def test_a_second_run_keeps_the_keys_and_moves_off_a_port_now_taken(
        start_demo: Callable[..., Demo], tmp_path: Path) -> None:
    first = start_demo("--duration", "60")
    wait_for_welcome(first)
    assert stop_with_ctrl_c(first) == 0, first.describe()
    keys = {p: (first.directory / p / "state" / "host_key").read_bytes() for p in PEERS}
    conf = (first.directory / "omirrd.conf").read_text()
    beta_port = int(conf.split("HOSTS = (")[1].split()[1].split(":")[1])

    with socket.socket() as squatter:  # another program holds beta's port now
        # as servers do: the first run's closed links may leave the port in TIME_WAIT
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", beta_port))
        squatter.listen()
        second = start_demo("--duration", "60", directory=first.directory)
        second.wait_until(lambda: "Write into any of these" in second.stdout(),
                          "the second run is up", START_S)
        assert f"127.0.0.1:{beta_port}" not in (first.directory / "omirrd.conf").read_text()
        (second.tree("gamma") / "second.txt").write_bytes(b"second run\n")
        second.wait_until(lambda: all((second.tree(p) / "second.txt").is_file()
                                      for p in PEERS),
                          "a file written in the second run reaches every tree")
        pids = second.pids()
        assert stop_with_ctrl_c(second) == 0, second.describe()
    assert_no_daemon_left(pids)
    assert keys == {p: (first.directory / p / "state" / "host_key").read_bytes()
                    for p in PEERS}, "a second run made new host keys"
    for name in ("omirrd.conf", "peers"):
        assert (first.directory / name).stat().st_mode & 0o777 == 0o600


def test_a_daemon_that_dies_ends_the_demo_with_its_log_and_status_2(
        start_demo: Callable[..., Demo]) -> None:
    demo = start_demo("--duration", "60")
    wait_for_welcome(demo)
    pids = demo.pids()
    os.kill(pids["beta"], signal.SIGKILL)
    try:
        rc = demo.proc.wait(STOP_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the demo went on without beta\n{demo.describe()}")
    assert rc == 2, demo.describe()
    err = demo.stderr()
    assert "beta" in err and "killed by signal 9" in err
    assert str(demo.directory / "beta" / "omirrord.log") in err
    assert "INFO omirror." in err, "the tail of beta's log is shown"
    assert_no_daemon_left(pids)


def test_a_second_demo_on_the_same_directory_is_refused(
        start_demo: Callable[..., Demo]) -> None:
    first = start_demo("--duration", "60")
    wait_for_welcome(first)
    second = start_demo("--duration", "60", directory=first.directory)
    try:
        rc = second.proc.wait(START_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a second demo on the same directory ran\n{second.describe()}")
    assert rc == 2 and "another omirrord demo is running" in second.stderr()
    pids = first.pids()
    assert stop_with_ctrl_c(first) == 0, first.describe()
    assert_no_daemon_left(pids)
