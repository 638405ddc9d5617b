"""The specials runner with real /bin/sh commands: what matches, what a command is told,
in which order, bursts, timeouts, failures and the stop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from omirror import config
from omirror.config import MirrorSet, Special
from omirror.resolve import Applied
from omirror.specials import Specials, files_env


def a_set(body: str, files: str = "/srv") -> MirrorSet:
    return config.parse(f"( {files} ) -> ( alpha beta ) install ; {body}\n",
                        "test.conf").sets[0]


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait, bounded, for a condition the runner brings about."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by init counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"Z"
    except FileNotFoundError:
        return True


# -- what matches ----------------------------------------------------------------------------

@pytest.mark.parametrize("special_path, path, expected", [
    (None, b"srv/anything/at/all", True),
    ("/srv/etc", b"srv/etc", True),
    ("/srv/etc", b"srv/etc/nginx/nginx.conf", True),
    ("/srv/etc", b"srv/etcetera", False),
    ("/srv/etc", b"srv/et", False),
    ("/srv/etc/a", b"srv/etc", False),
    ("/", b"srv/x", True),
])
def test_a_special_matches_its_path_and_everything_below_it(
        special_path: str | None, path: bytes, expected: bool) -> None:
    assert Special(special_path, "true").matches(path) is expected


def test_files_are_joined_with_colons_under_the_root() -> None:
    assert files_env(b"/r", [b"srv/a", b"srv/b c"]) == {b"FILES": b"/r/srv/a:/r/srv/b c"}


# -- special: one run per path, told by its environment ----------------------------------

async def test_a_special_is_told_its_path_in_the_environment_whatever_the_name(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    mset = a_set(f'special /srv/www "printf \'%s\\\\0%s\\\\0%s\\\\0%s\\\\0\' '
                 f'\\"$FILE\\" \\"$REMFILE\\" \\"$BASEFILE\\" \\"$(pwd)\\" >> {out}" ;')
    runner = Specials(b"/root-of/peer")
    name = b"a name\nwith \xff and $(exit 7) `false`"
    path = b"srv/www/sub/" + name
    runner.applied([Applied(mset, path), Applied(mset, b"srv/other")])
    await runner.drain()
    assert out.read_bytes().split(b"\0")[:-1] == [
        b"/root-of/peer/" + path, b"/" + path, name, b"/"]
    # a name is never part of the command: nothing in it was expanded, nothing failed
    assert runner.status()["runs"] == 1 and runner.failed == 0


async def test_runs_of_a_set_keep_the_order_they_became_due_one_at_a_time(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    # each run takes a moment and notes start and end: overlapping runs would interleave
    mset = a_set(f'special "echo start $BASEFILE >> {out}; sleep 0.05; '
                 f'echo end $BASEFILE >> {out}" ;')
    runner = Specials(b"/")
    names = [b"f%d" % i for i in range(5)]
    for name in names:
        runner.applied([Applied(mset, b"srv/" + name)])
    await runner.drain()
    expected = [line for n in names for line in (b"start " + n, b"end " + n)]
    assert out.read_bytes().splitlines() == expected


async def test_one_command_runs_once_per_path_even_when_several_of_its_paths_match(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    mset = a_set(f'special ( /srv /srv/www ) "echo $REMFILE >> {out}" ;')
    runner = Specials(b"/")
    runner.applied([Applied(mset, b"srv/www/x")])
    await runner.drain()
    assert out.read_bytes() == b"/srv/www/x\n"


async def test_sets_run_side_by_side(tmp_path: Path) -> None:
    """A set whose command hangs does not hold another set's runs."""
    hung = config.parse(f'( /a ) -> ( x y ) install ; special "sleep 30" ;\n'
                        f'( /b ) -> ( x y ) install ; special "touch {tmp_path}/b" ;\n',
                        "test.conf").sets
    runner = Specials(b"/")
    runner.applied([Applied(hung[0], b"a/f"), Applied(hung[1], b"b/f")])
    # b's command ran to its end (its file exists, and its run left the queue: the
    # file appears before the runner has reaped the command) while a's still hangs
    await until(lambda: (tmp_path / "b").exists() and runner.status()["queued"] <= 1)
    assert runner.status()["queued"] == 1  # the hung one, still running
    await runner.close(grace_s=0.1)


# -- cmdspecial: one run per burst ------------------------------------------------------------

async def test_a_burst_of_files_runs_one_cmdspecial_with_all_of_them(tmp_path: Path) -> None:
    out = tmp_path / "out"
    mset = a_set(f'cmdspecial /srv/www "printf %s \\"$FILES\\" >> {out}; echo >> {out}" ;')
    runner = Specials(b"/r", quiet_s=0.3)
    paths = [b"srv/www/f%03d" % i for i in range(200)]
    for i in range(0, 200, 20):  # as batches come from the tree worker
        runner.applied([Applied(mset, p) for p in paths[i:i + 20]])
        await asyncio.sleep(0)
    assert not out.exists()  # gathering: the quiet period has not passed
    await until(lambda: runner.runs == 1)
    assert out.read_bytes().splitlines() == [b":".join(b"/r/" + p for p in paths)]
    assert runner.status()["gathering"] == 0 and runner.status()["queued"] == 0


async def test_a_steady_stream_ends_its_burst_after_the_longest_gathering(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    mset = a_set(f'cmdspecial "echo \\"$FILES\\" >> {out}" ;')
    runner = Specials(b"/", quiet_s=5.0, gather_max_s=0.3)
    started = time.monotonic()
    i = 0
    while not out.exists():  # a path every 20 ms: never quiet for 5 s
        assert time.monotonic() - started < 10
        runner.applied([Applied(mset, b"srv/f%d" % i)])
        i += 1
        await asyncio.sleep(0.02)
    await until(lambda: runner.runs == 1)
    assert time.monotonic() - started < 4.0
    assert out.read_bytes().startswith(b"/srv/f0:/srv/f1:")
    await runner.close()


async def test_a_burst_too_long_for_one_variable_is_run_in_parts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    mset = a_set(f'cmdspecial "echo \\"$FILES\\" >> {out}" ;')
    runner = Specials(b"/", files_max=100)
    paths = [b"srv/%s" % (b"x%02d" % i * 5) for i in range(10)]  # 20 bytes each, ':' too
    runner.applied([Applied(mset, p) for p in paths])
    await runner.drain()
    runs = out.read_bytes().splitlines()
    assert len(runs) == 3 and all(len(r) <= 100 for r in runs)
    assert b":".join(runs) == b":".join(b"/" + p for p in paths)


async def test_special_and_cmdspecial_share_their_sets_queue_in_the_order_they_were_due(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    mset = a_set(f'cmdspecial "echo burst $FILES >> {out}" ; '
                 f'special "echo one $REMFILE >> {out}" ;')
    runner = Specials(b"/", quiet_s=0.2)
    runner.applied([Applied(mset, b"srv/a")])
    await until(lambda: runner.runs == 1)  # the special, due at once
    await until(lambda: runner.runs == 2)  # the burst, due once quiet
    runner.applied([Applied(mset, b"srv/b")])
    await runner.drain()
    assert out.read_bytes().splitlines() == [b"one /srv/a", b"burst /srv/a", b"one /srv/b",
                                             b"burst /srv/b"]


# -- failures, timeouts, the stop --------------------------------------------------------------

async def test_a_failing_command_is_logged_with_its_status_and_output(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mset = a_set('special "echo to stdout; echo to stderr >&2; exit 3" ;')
    runner = Specials(b"/")
    with caplog.at_level(logging.INFO, logger="omirror.specials"):
        runner.applied([Applied(mset, b"srv/bad\nname")])
        await runner.drain()
    [record] = [r for r in caplog.records if r.name == "omirror.specials"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "set=set at line 1" in message and "echo to stdout" in message
    assert "/srv/bad\\x0aname" in message  # the name escaped: one log line
    assert "failed with exit status 3" in message
    assert "output: to stdout\\x0ato stderr" in message
    assert runner.status() == {"runs": 1, "failed": 1, "dropped": 0, "queued": 0,
                               "gathering": 0}


async def test_a_successful_command_is_logged_at_info_with_the_end_of_its_output(
        caplog: pytest.LogCaptureFixture) -> None:
    mset = a_set('special "head -c 10000 /dev/zero | tr \'\\\\0\' a; echo; echo done" ;')
    runner = Specials(b"/")
    with caplog.at_level(logging.INFO, logger="omirror.specials"):
        runner.applied([Applied(mset, b"srv/x")])
        await runner.drain()
    [record] = [r for r in caplog.records if r.name == "omirror.specials"]
    assert record.levelno == logging.INFO and "exited 0" in record.getMessage()
    said = record.getMessage().partition("output: ")[2]
    assert said.endswith("a\\x0adone") and said.count("a") <= 4096
    assert runner.failed == 0


async def test_a_command_past_its_timeout_is_stopped_with_its_process_group(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pidfile = tmp_path / "pid"
    # the shell waits for a child that sleeps: both belong to the group that is stopped
    mset = a_set(f'special "sleep 300 & echo $! > {pidfile}; wait" ;')
    runner = Specials(b"/", timeout_s=0.5, kill_grace_s=2.0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="omirror.specials"):
        runner.applied([Applied(mset, b"srv/x")])
        await runner.drain()
    assert time.monotonic() - started < 5.0
    child = int(pidfile.read_text())
    await until(lambda: gone(child))
    assert "timed out after 0.5 s" in caplog.text and runner.failed == 1


async def test_a_group_member_that_ignores_sigterm_is_killed_after_the_grace(
        tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    mset = a_set(f'special "sh -c \'trap \\"\\" TERM; echo $$ > {pidfile}; '
                 f'while :; do sleep 0.1; done\' & wait" ;')
    runner = Specials(b"/", timeout_s=1.0, kill_grace_s=0.5)
    runner.applied([Applied(mset, b"srv/x")])
    await runner.drain()
    child = int(pidfile.read_text())
    await until(lambda: gone(child))


async def test_a_flood_beyond_the_queue_is_dropped_and_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mset = a_set('special "true" ;')
    runner = Specials(b"/", queue_max=3)
    with caplog.at_level(logging.WARNING, logger="omirror.specials"):
        runner.applied([Applied(mset, b"srv/f%d" % i) for i in range(10)])
    await runner.drain()
    # the worker starts only after that call: 3 runs waited, 7 were dropped
    assert runner.runs + runner.dropped == 10 and runner.dropped == 7
    assert caplog.text.count("further ones are dropped") == 1


async def test_the_stop_drops_what_waits_and_stops_what_runs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pidfile = tmp_path / "pid"
    mset = a_set(f'special "echo $$ > {pidfile}; exec sleep 300" ; '
                 f'cmdspecial "touch {tmp_path}/burst" ;')
    runner = Specials(b"/")
    runner.applied([Applied(mset, b"srv/a"), Applied(mset, b"srv/b")])
    await until(pidfile.exists)
    await until(lambda: pidfile.read_text().strip() != "")
    with caplog.at_level(logging.WARNING, logger="omirror.specials"):
        await asyncio.wait_for(runner.close(grace_s=0.2), 10)
    assert gone(int(pidfile.read_text()))
    assert "2 special runs that were due or gathering are dropped" in caplog.text
    assert "1 special commands still running are stopped" in caplog.text
    runner.applied([Applied(mset, b"srv/c")])  # after the stop: nothing runs
    assert runner.status()["queued"] == 0 and not (tmp_path / "burst").exists()
