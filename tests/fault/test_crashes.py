"""kill -9 in the middle of a 1 GiB transfer, of the receiver and of the sender.

Each test ends as every fault scenario does: trees identical on every peer (contents
compared by digest), the winner the one the stamps name (every peer's log records the
same stamp, made by the writer), no temp file left, no entry lost (the small files
written around the crash are all there), daemons still running.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster import Cluster, file_digest
from faults import (
    GIB,
    MB,
    assert_sound,
    content_sent,
    kill_when,
    log_stamps,
    temp_write_position,
    write_big,
)

MakeCluster = Callable[..., Cluster]
BIG = GIB


@pytest.fixture
def reclaim(tmp_path: Path) -> Iterator[None]:
    """Requested before make_cluster, so it runs after the daemons are stopped: frees the
    gigabytes (pytest keeps the temporary directories of the last three runs)."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def small_files(where: Path, tag: str, n: int = 20) -> dict[str, bytes]:
    made = {}
    for k in range(n):
        data = f"{tag} {k}\n".encode() * (k + 1)
        write(where / f"{tag}-{k:02d}.txt", data)
        made[f"{tag}-{k:02d}.txt"] = data
    return made


def at_half(c: Cluster, receiver: int) -> int:
    """The receiver's write position in its temp file once past half the file, else 0."""
    pos = temp_write_position(c, receiver)
    return pos if pos > BIG // 2 else 0


def check_outcome(c: Cluster, sender: int, expected: dict[str, bytes], digest: bytes,
                  timing: dict[str, float], t0: float) -> None:
    receiver = 1 - sender
    big = c[receiver].data / "big.bin"
    c.wait_until(lambda: big.exists() and big.stat().st_size == BIG, 180,
                 "the 1 GiB file is installed whole on the receiver")
    timing["installed"] = time.monotonic() - t0
    c.wait_converged(120)
    assert file_digest(big) == digest, "the installed file is not the one sent"
    for name, data in expected.items():
        for p in c.peers:
            assert (p.data / name).read_bytes() == data, f"{p.name}: {name} lost or wrong"
    assert_sound(c)
    stamps = log_stamps(c, receiver, "/data/big.bin")["/data/big.bin"]
    assert stamps[0].origin == c[sender].name and stamps[1] == "file", stamps
    assert c.conflict_copies(0) == c.conflict_copies(1) == []


@pytest.mark.timeout(240)
def test_receiver_killed_mid_transfer_of_1_gib_gets_it_whole_after_restart(
        reclaim: None, make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start()
    src, dst = c[0], c[1]
    expected = small_files(src.data, "before")
    c.wait_converged(30)

    t0 = time.monotonic()
    write_big(src.data / "big.bin", BIG)
    digest = file_digest(src.data / "big.bin")
    timing = {"written": time.monotonic() - t0}
    size = kill_when(c, 1, lambda: at_half(c, 1), 120,
                     "it has written half of the 1 GiB into its temp file")
    timing["killed"] = time.monotonic() - t0
    assert c.temp_files(1), "the receiver's temp file should outlive its kill -9"
    # the other side goes on while the receiver is down
    expected |= small_files(src.data, "while-down")
    c.start(1)
    expected |= small_files(dst.data, "after-restart")
    check_outcome(c, 0, expected, digest, timing, t0)
    print(f"receiver killed at {size / MB:.0f} MiB; times {timing}")


@pytest.mark.timeout(240)
def test_sender_killed_mid_transfer_of_1_gib_resends_it_after_restart(
        reclaim: None, make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start()
    src, dst = c[0], c[1]
    expected = small_files(dst.data, "before")
    c.wait_converged(30)

    t0 = time.monotonic()
    write_big(src.data / "big.bin", BIG)
    digest = file_digest(src.data / "big.bin")
    timing = {"written": time.monotonic() - t0}
    size = kill_when(c, 0, lambda: at_half(c, 1), 120,
                     "the receiver has written half of the 1 GiB into its temp file")
    timing["killed"] = time.monotonic() - t0
    sent = content_sent(c, 0)
    # the receiver sees its link drop and abandons the transfer: no half file stays
    c.wait_until(lambda: c.temp_files(1) == [], 30,
                 "the receiver removes the temp file of the abandoned transfer")
    assert not (dst.data / "big.bin").exists(), "half a file was installed"
    expected |= small_files(dst.data, "while-down")
    c.start(0)
    check_outcome(c, 0, expected, digest, timing, t0)
    print(f"sender killed at {size / MB:.0f} MiB received ({sent / MB:.0f} MiB sent as of "
          f"its last status); times {timing}")


@pytest.mark.timeout(240)
def test_receiver_killed_inside_a_receive_batch_keeps_the_senders_stamps(
        make_cluster: MakeCluster) -> None:
    """A receive batch renames its files into place one by one and records them in one
    transaction. B is killed -9 while a batch has applied files it has not committed
    (its intent log is not empty). After the restart every file carries A's stamp in
    every log: none became a version of B's, made at restart (which would beat a newer
    version a third peer wrote meanwhile)."""
    c = make_cluster(2)
    c.start()
    a, b = c[0].data, c[1].data
    (a / "burst").mkdir()
    c.wait_converged(30)
    intents = c[1].state / "intents"
    expected: dict[str, bytes] = {}
    for n in range(3000):
        data = b"file %d\n" % n
        write(a / "burst" / f"f{n:04d}", data)
        expected[f"burst/f{n:04d}"] = data

    def mid_batch() -> bool:
        try:
            return intents.stat().st_size > 0 and len(os.listdir(b / "burst")) > 100
        except FileNotFoundError:
            return False

    kill_when(c, 1, mid_batch, 60, "B has applied part of a batch it has not committed")
    on_disk = len(os.listdir(b / "burst"))
    c.start(1)
    c.wait_converged(120)
    for rel, data in expected.items():
        assert (b / rel).read_bytes() == data, f"{rel} lost or wrong"
    assert_sound(c)
    for i in (0, 1):
        stamps = log_stamps(c, i)
        restamped = sorted(rel for rel in expected
                           if stamps[f"/data/{rel}"][0].origin != c[0].name)
        assert not restamped, (f"{c[i].name}: {len(restamped)} files stamped as another "
                               f"host's versions, e.g. {restamped[:3]}")
    log = c.log_text(1)
    assert "an interrupted receive batch had" in log, "the kill landed outside a batch"
    print(f"killed with {on_disk} files on B's disk; "
          + log.split("an interrupted receive batch had", 1)[1].split("\n", 1)[0])
