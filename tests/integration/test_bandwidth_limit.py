"""``--bwlimit`` measured on a real transfer between two daemons on 127.0.0.1
(tests/integration/cluster.py): a 4 MiB file at 512 KiB/s takes about 7 s to arrive (the
first second's worth goes at once), without a limit far less; status shows the limit
and the time the link waited on it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cluster import Cluster, file_digest

MakeCluster = Callable[..., Cluster]
MiB = 1 << 20
SIZE = 4 * MiB
LIMIT_KIB = 512
CONVERGE_S = 60


def links_up(c: Cluster) -> bool:
    peers = c.status(0).get("peers", {})
    return peers.get(c[1].name, {}).get("out") == "up"


def transfer_seconds(c: Cluster, content: bytes) -> float:
    """From the moment the file appears whole in peer 0's tree until peer 1 holds it."""
    c.wait_until(lambda: links_up(c), CONVERGE_S, "peer 0's link out to peer 1 is up")
    staged = c[0].root / "big.staged"  # under the root, outside the mirrored /data
    staged.write_bytes(content)
    source = c[0].data / "big.bin"
    target = c[1].data / "big.bin"

    def arrived() -> bool:
        try:
            return target.stat().st_size == SIZE and file_digest(target) == digest
        except FileNotFoundError:
            return False

    digest = file_digest(staged)
    start = time.monotonic()
    os.rename(staged, source)
    c.wait_until(arrived, CONVERGE_S, "peer 1 holds big.bin")
    return time.monotonic() - start


def test_bwlimit_paces_a_transfer_and_status_shows_it(make_cluster: MakeCluster) -> None:
    content = os.urandom(SIZE)  # incompressible, and nothing of it on the receiver

    free = make_cluster(2)
    free.start()
    unlimited = transfer_seconds(free, content)
    assert free.fresh_status(0)["peers"][free[1].name]["bwlimit_kib"] == 0
    free.stop()

    paced = make_cluster(2, extra_args=("--bwlimit", str(LIMIT_KIB)))
    paced.start()
    limited = transfer_seconds(paced, content)
    # 4 MiB at 512 KiB/s after a 512 KiB burst: 7 s; generous bounds on a busy machine
    assert limited >= 5.0, f"{SIZE} bytes at {LIMIT_KIB} KiB/s arrived in {limited:.2f} s"
    assert unlimited * 2 <= limited, f"unlimited {unlimited:.2f} s, limited {limited:.2f} s"

    link = paced.fresh_status(0)["peers"][paced[1].name]
    assert link["bwlimit_kib"] == LIMIT_KIB
    assert link["bwlimit_wait_s"] >= 4.0, link
    assert link["content_bytes_sent"] >= SIZE
    text = subprocess.run([sys.executable, "-m", "omirror", "status", "--state-dir",
                           str(paced[0].state)], capture_output=True, text=True, timeout=30,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("OMIRRORD_")})
    assert text.returncode == 0, text.stderr
    assert f"  bwlimit   {LIMIT_KIB} KiB/s per link, waited " in text.stdout
    paced.stop()


def test_bwlimit_must_be_a_whole_number_of_kib_not_negative(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
    for args, extra in [(["--bwlimit", "-1"], {}), (["--bwlimit", "1.5"], {}),
                        ([], {"OMIRRORD_BWLIMIT": "fast"})]:
        r = subprocess.run([sys.executable, "-m", "omirror", "--state-dir", str(tmp_path),
                            *args, "--check"], capture_output=True, text=True, timeout=30,
                           env={**env, **extra})
        assert r.returncode == 2, (args, extra, r.stderr)
        assert "Invalid value for '--bwlimit'" in r.stderr, (args, extra, r.stderr)
