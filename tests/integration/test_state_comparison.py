"""What no mirror that compares states and replaces files whole can see, shown on
Unison beside omirror: the two classes the randomized model accepts
(tests/fault/chaos.py, ``classify``; docs/architecture.rst, "What the model accepts").

- A change that ends where the record is (a chmod there and back while the daemon did
  not look) is no change: the other side's change wins.
- A write through a descriptor opened before a peer's version was renamed over the file
  goes to a file that is no longer in the tree.

The Unison half is skipped where Unison is not installed (``apt-get install unison``).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cluster import Cluster

MakeCluster = Callable[..., Cluster]
needs_unison = pytest.mark.skipif(shutil.which("unison") is None,
                                  reason="unison is not installed")


def unison(tmp: Path, *roots: Path) -> None:
    subprocess.run(["unison", *map(str, roots), "-batch", "-silent"], check=True,
                   env={**os.environ, "UNISON": str(tmp / "unison-archive")},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@needs_unison
def test_unison_sees_no_change_in_a_chmod_there_and_back(tmp_path: Path) -> None:
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    r1.mkdir()
    r2.mkdir()
    (r1 / "f").write_bytes(b"hi\n")
    os.chmod(r1 / "f", 0o644)
    unison(tmp_path, r1, r2)
    os.chmod(r1 / "f", 0o600)  # and back: the replica ends as the archive has it
    os.chmod(r1 / "f", 0o644)
    os.chmod(r2 / "f", 0o640)  # the other side's change, made before the chmod back
    unison(tmp_path, r1, r2)
    assert mode(r1 / "f") == mode(r2 / "f") == 0o640


def test_omirror_sees_no_change_in_a_chmod_there_and_back_while_stopped(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    a, b = c[0].data, c[1].data
    (a / "f").write_bytes(b"hi\n")
    os.chmod(a / "f", 0o644)
    c.start()
    c.wait_converged(30)
    c.stop(0)
    os.chmod(a / "f", 0o600)
    os.chmod(a / "f", 0o644)
    os.chmod(b / "f", 0o640)
    c.start(0)
    c.wait_until(lambda: mode(a / "f") == 0o640, 30, "B's chmod reaches A")
    c.wait_converged(30)
    assert mode(b / "f") == 0o640


@needs_unison
def test_unison_loses_a_write_through_a_descriptor_of_the_file_it_replaced(
        tmp_path: Path) -> None:
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    r1.mkdir()
    r2.mkdir()
    (r1 / "f").write_bytes(b"old\n")
    unison(tmp_path, r1, r2)
    fd = os.open(r2 / "f", os.O_WRONLY | os.O_APPEND)
    try:
        (r1 / "f").write_bytes(b"new from r1\n")
        unison(tmp_path, r1, r2)
        os.write(fd, b"appended on r2\n")
        assert os.fstat(fd).st_nlink == 0  # written into a file no longer in the tree
    finally:
        os.close(fd)
    unison(tmp_path, r1, r2)
    assert (r1 / "f").read_bytes() == (r2 / "f").read_bytes() == b"new from r1\n"
