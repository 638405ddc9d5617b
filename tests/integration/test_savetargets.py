"""install -osavetargets with real daemons: what a peer's change replaces or deletes on a
host is kept in that host's ``.omirror-versions``, which never travels."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cluster import Cluster, Peer

MakeCluster = Callable[..., Cluster]
CONVERGE_S = 30


def with_savetargets(c: Cluster) -> None:
    text = c.conf.read_text()
    assert "\tinstall ;\n" in text
    c.conf.write_text(text.replace("\tinstall ;\n", "\tinstall -osavetargets ;\n"))


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def kept(p: Peer) -> dict[str, bytes]:
    """The versions kept on peer ``p``: kept name -> content."""
    area = p.data / ".omirror-versions"
    if not area.exists():
        return {}
    return {str(Path(d, n).relative_to(area)): Path(d, n).read_bytes()
            for d, _, names in os.walk(area) for n in names}


def contents(found: dict[str, bytes], name: str) -> list[bytes]:
    return sorted(data for kept_name, data in found.items()
                  if kept_name.startswith(name + "~"))


def versions_of(c: Cluster, p: Peer, *paths: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
    return subprocess.run([sys.executable, "-m", "omirror", "versions", "-C", str(c.conf),
                           "-n", p.name, "--root", str(p.root), "--state-dir", str(p.state),
                           *paths], capture_output=True, text=True, timeout=60, env=env)


def test_a_peers_edit_and_deletion_keep_the_old_version_here_and_only_here(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    with_savetargets(c)
    c.start()
    a, b = c[0], c[1]

    (a.data / "sub").mkdir()
    (a.data / "sub" / "f").write_bytes(b"first")
    c.wait_until(lambda: read(b.data / "sub" / "f") == b"first", CONVERGE_S)
    assert kept(b) == {}  # a new file replaces nothing

    (a.data / "sub" / "f").write_bytes(b"second")
    c.wait_until(lambda: read(b.data / "sub" / "f") == b"second", CONVERGE_S)
    assert contents(kept(b), "sub/f") == [b"first"]

    # a local edit keeps nothing where it is made; the peer that receives it keeps
    (b.data / "g").write_bytes(b"local one")
    c.wait_until(lambda: read(a.data / "g") == b"local one", CONVERGE_S)
    (b.data / "g").write_bytes(b"local two")
    c.wait_until(lambda: read(a.data / "g") == b"local two", CONVERGE_S)
    assert contents(kept(a), "g") == [b"local one"]

    (a.data / "sub" / "f").unlink()
    c.wait_until(lambda: not (b.data / "sub" / "f").exists(), CONVERGE_S)
    assert contents(kept(b), "sub/f") == [b"first", b"second"]
    c.wait_converged(CONVERGE_S)

    # each area stays where it was made: A never received B's, nor B A's
    assert "g" not in " ".join(kept(b)) and "sub" not in " ".join(kept(a))
    assert sorted(kept(a)) == [k for k in kept(a) if k.startswith("g~")]
    for p in (a, b):
        log = c.log_text(p.index)
        assert "refused path" not in log and ".omirror-versions" not in log.replace(
            "is kept as /data/.omirror-versions/", ""), log[-2000:]

    listed = versions_of(c, b)
    assert listed.returncode == 0, listed.stderr
    lines = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [(line[1], line[2]) for line in lines] == [("5", "/data/sub/f"), ("6", "/data/sub/f")]
    assert all(Path(line[3]).read_bytes() in (b"first", b"second") for line in lines)
    assert all(line[0].endswith("Z") for line in lines)
    only = versions_of(c, a, "/data/g")
    assert only.returncode == 0 and [line.split("\t")[2] for line in
                                     only.stdout.splitlines()] == ["/data/g"]
    assert versions_of(c, a, "/data/sub").stdout == ""

    # the areas differ between the hosts, and --check (comparing contents) sees no
    # difference: they are no part of the trees
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
    check = subprocess.run([sys.executable, "-m", "omirror", "--check", "-f", "-C",
                            str(c.conf), "-n", b.name, "--root", str(b.root), "--state-dir",
                            str(b.state), "--peers", str(b.peers_file)],
                           capture_output=True, text=True, timeout=120, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert ".omirror-versions" not in check.stdout


def test_without_savetargets_nothing_is_kept(make_cluster: MakeCluster) -> None:
    c = make_cluster(2)
    c.start()
    a, b = c[0], c[1]
    (a.data / "f").write_bytes(b"first")
    c.wait_until(lambda: read(b.data / "f") == b"first", CONVERGE_S)
    (a.data / "f").write_bytes(b"second")
    c.wait_until(lambda: read(b.data / "f") == b"second", CONVERGE_S)
    (a.data / "f").unlink()
    c.wait_until(lambda: not (b.data / "f").exists(), CONVERGE_S)
    assert not (a.data / ".omirror-versions").exists()
    assert not (b.data / ".omirror-versions").exists()
    assert versions_of(c, b).stdout == ""


def test_the_daemon_prunes_versions_older_than_keep_versions_at_start(
        make_cluster: MakeCluster) -> None:
    c = make_cluster(1, extra_args=("--keep-versions", "2"))
    with_savetargets(c)
    area = c[0].data / ".omirror-versions" / "d"
    area.mkdir(parents=True)
    os.chmod(c[0].data / ".omirror-versions", 0o700)
    (area / "old~20000101-000000").write_bytes(b"from long ago")
    recent = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() - 86400))
    (area / f"new~{recent}").write_bytes(b"from yesterday")
    c.start()
    c.wait_until(lambda: not (area / "old~20000101-000000").exists(), CONVERGE_S)
    assert (area / f"new~{recent}").read_bytes() == b"from yesterday"
