"""Fixtures for integration tests: clusters of real daemons, and no process left behind."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import Cluster  # pytest puts tests/integration (no __init__.py) on sys.path


def omirror_children() -> list[tuple[int, str]]:
    """(pid, command line) of this process's children that run omirror, zombies aside."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                # the command name may hold spaces and parentheses: fields follow the last ')'
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == me and state != b"Z" and b"omirror" in cmdline:
            found.append((int(entry), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


@pytest.fixture(autouse=True)
def no_daemon_left_behind() -> Iterator[None]:
    """Fail a test that leaves an omirror process running (and end that process)."""
    yield
    left = omirror_children()
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    if left:
        pytest.fail("test left omirror processes running (now killed): "
                    + "; ".join(f"pid {pid}: {cmd}" for pid, cmd in left), pytrace=False)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test item, so teardown knows if the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def make_cluster(tmp_path: Path,
                 request: pytest.FixtureRequest) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(n=3, **kw)`` builds a Cluster (not started) under tmp_path.

    Every cluster made is closed at teardown: daemons still running get SIGTERM and must
    exit 0 (a clean shutdown is part of the contract); none is left behind.
    """
    made: list[Cluster] = []

    def make(n: int = 3, **kw: Any) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}", n, **kw)
        made.append(c)
        return c

    yield make
    problems = []
    for c in made:
        try:
            c.close()
        except AssertionError as e:
            problems.append(str(e))
    if not problems:
        return
    call = getattr(request.node, "report_call", None)
    if call is not None and call.failed:
        # the test has failed already, usually for the same reason: say it, add no error
        print("cluster teardown after the failure:\n" + "\n".join(problems))
    else:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    """Three peers, configured, not started."""
    return make_cluster(3)
