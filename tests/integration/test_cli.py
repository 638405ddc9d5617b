"""omirrord as an operator runs it: a real process, real files, exit codes and messages."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omirror import __version__

GOOD = "HOSTS = ( alpha beta:2809 )\nFILES = ( /data )\n${FILES} -> ${HOSTS}\n\tinstall ;\n"


def omirrord(*args: str, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "omirror", *args], capture_output=True,
                          text=True, timeout=60, env=full_env, cwd=cwd)


def write_conf(path: Path, text: str = GOOD, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_version_is_printed() -> None:
    r = omirrord("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"omirrord, version {__version__}"
    assert omirrord("-V").stdout == r.stdout


@pytest.mark.parametrize("text, where, what", [
    ("HOSTS = ( alpha beta \nFILES = ( /data )\n", "2:7", "expected ')'"),
    ("FILES = ( data )\n${FILES} -> ( a )\n\tinstall ;\n", "1:11", "absolute"),
    ("${FILES} -> ( a )\n\tinstall ;\n", "1:1", "FILES"),
    ("FILES = ( /d )\n${FILES} -> ( a:99999 )\n\tinstall ;\n", "2:15", "port"),
    ("FILES = ( /d )\n${FILES} -> ( a )\n\tinstall -obogus ;\n", "3:10", "bogus"),
])
def test_broken_config_exits_2_naming_file_line_and_column(tmp_path: Path, text: str,
                                                           where: str, what: str) -> None:
    conf = write_conf(tmp_path / "broken.conf", text)
    r = omirrord("-C", str(conf), "--check")
    assert r.returncode == 2
    assert re.search(rf"broken\.conf:{where}: .*{re.escape(what)}", r.stderr), r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_config_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    conf = write_conf(tmp_path / "omirrd.conf", mode=mode)
    r = omirrord("-C", str(conf), "-n", "alpha", "--check")
    assert r.returncode == 2
    assert "group- or world-writable" in r.stderr and f"chmod go-w {conf}" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_config_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "omirrd.conf")
    os.chown(conf, 12345, 12345)
    r = omirrord("-C", str(conf), "-n", "alpha", "--check")
    assert r.returncode == 2 and "owned by" in r.stderr


def test_missing_config_names_the_file(tmp_path: Path) -> None:
    r = omirrord("-C", str(tmp_path / "nope.conf"), "--check")
    assert r.returncode == 2 and f"{tmp_path / 'nope.conf'}" in r.stderr
    assert "No such file" in r.stderr


def test_host_in_no_set_is_an_error_that_says_so(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "omirrd.conf")
    r = omirrord("-C", str(conf), "-n", "gamma", "check")
    assert r.returncode == 2 and "'gamma' is in no set" in r.stderr
    assert "alpha, beta:2809" in r.stderr


def test_options_come_from_environment_before_or_after_the_subcommand(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "omirrd.conf")
    env = {"OMIRRORD_CONFIG": str(conf), "OMIRRORD_NAME": "gamma"}
    assert "'gamma' is in no set" in omirrord("--check", env=env).stderr
    # the command line beats the environment, before or after the subcommand
    assert "'delta' is in no set" in omirrord("-n", "delta", "check", env=env).stderr
    assert "'omega' is in no set" in omirrord("check", "-n", "omega", env=env).stderr
    assert "'omega' is in no set" in omirrord("-n", "x", "check", "-n", "omega",
                                              env=env).stderr


def test_run_without_a_peers_file_refuses_to_start_naming_it(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "omirrd.conf")
    (tmp_path / "root" / "data").mkdir(parents=True)
    r = omirrord("-C", str(conf), "-n", "alpha", "--root", str(tmp_path / "root"),
                 "--state-dir", str(tmp_path / "state"), "--peers", str(tmp_path / "nopeers"))
    assert r.returncode == 2
    assert f"{tmp_path / 'nopeers'}: cannot read peers file" in r.stderr


def test_run_scans_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "omirrd.conf",
                      GOOD.replace("beta:2809", f"127.0.0.1:{_free_port()}"))
    name = conf.read_text().split()[4]
    state = tmp_path / "state"
    key = omirrord("keygen", "-n", name, "--state-dir", str(state))
    write_conf(tmp_path / "peers", key.stdout)
    (tmp_path / "root" / "data" / "sub").mkdir(parents=True)
    (tmp_path / "root" / "data" / "sub" / "f").write_text("hello")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
    proc = subprocess.Popen([sys.executable, "-m", "omirror", "-C", str(conf), "-n", name,
                             "--root", str(tmp_path / "root"), "--state-dir", str(state),
                             "--peers", str(tmp_path / "peers")], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (state / "status.json").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        assert (state / "status.json").exists(), "the daemon never came up"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err = proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    assert "listening on 127.0.0.1:" in err and "stopped" in err
    dump = omirrord("log", "dump", "--state-dir", str(state))
    lines = [ln.split("\t") for ln in dump.stdout.splitlines() if not ln.startswith("#")]
    assert [(ln[2], ln[3], ln[4]) for ln in lines] == [
        (name, "dir", "/data"), (name, "dir", "/data/sub"), (name, "file", "/data/sub/f")]
    only = omirrord("--state-dir", str(state), "log", "dump", "--path", "/data/sub",
                    "--since", "2")
    assert [ln.split("\t")[4] for ln in only.stdout.splitlines()[1:]] == ["/data/sub/f"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_log_dump_without_a_store_is_an_error(tmp_path: Path) -> None:
    r = omirrord("log", "dump", "--state-dir", str(tmp_path / "none"))
    assert r.returncode == 2 and "no state database" in r.stderr
    assert not (tmp_path / "none").exists()


def test_keygen_makes_a_key_once_and_prints_the_peers_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = omirrord("keygen", "-n", "beta:2808", "--state-dir", str(state))
    assert first.returncode == 0, first.stderr
    line = first.stdout.strip()
    assert re.fullmatch(r"beta ssh-ed25519 [A-Za-z0-9+/=]+", line)
    assert (state / "host_key").stat().st_mode & 0o777 == 0o600
    again = omirrord("keygen", "-n", "beta", "--state-dir", str(state))
    assert again.stdout.strip() == line and "kept existing" in again.stderr
    forced = omirrord("keygen", "-n", "beta", "--state-dir", str(state), "--force")
    assert forced.returncode == 0 and forced.stdout.strip() != line


def test_keygen_finds_its_name_in_the_config(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    conf = write_conf(tmp_path / "omirrd.conf", "HOSTS = ( 127.0.0.1:2900 other )\n"
                      "FILES = ( /d )\n${FILES} -> ${HOSTS}\n\tinstall ;\n")
    r = omirrord("keygen", "-C", str(conf), "-n", "127.0.0.1:2900",
                 "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 0 and r.stdout.startswith("127.0.0.1:2900 ssh-ed25519 ")


def test_unknown_subcommand_is_a_usage_error() -> None:
    r = omirrord("frobnicate")
    assert r.returncode == 2 and "No such command" in r.stderr


def test_log_truncate_collects_old_deletions_and_records_the_floor(tmp_path: Path) -> None:
    from omirror.entry import Kind, Stamp, first_version
    from omirror.store import Store

    state = tmp_path / "state"
    with Store.open(state) as store:
        store.put(first_version(b"data/old", Kind.TOMBSTONE, Stamp(1, "alpha")), None)
        store.put(first_version(b"data/kept", Kind.FILE, Stamp(2, "alpha"),
                                digest=b"\0" * 16), None)
    r = omirrord("log", "truncate", "--state-dir", str(state), "--older-than", "1")
    assert r.returncode == 0 and r.stdout.strip() == "collected 1 deletions; floor is now seq 1"
    dump = omirrord("log", "dump", "--state-dir", str(state)).stdout
    assert "floor 1" in dump.splitlines()[0] and "/data/old" not in dump and "/data/kept" in dump


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_prints_the_script_click_makes(shell: str) -> None:
    """The same text as click's own ``_OMIRRORD_COMPLETE=<shell>_source`` gives."""
    r = omirrord("completion", shell)
    assert r.returncode == 0, r.stderr
    assert "_OMIRRORD_COMPLETE=" + shell + "_complete" in r.stdout
    first = {"bash": "_omirrord_completion() {", "zsh": "#compdef omirrord"}[shell]
    assert r.stdout.lstrip().startswith(first), r.stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
    source = subprocess.run([str(Path(sys.executable).with_name("omirrord"))],
                            env={**env, "_OMIRRORD_COMPLETE": f"{shell}_source"},
                            capture_output=True, text=True, timeout=60)
    assert r.stdout == source.stdout + "\n"


def test_completion_of_another_shell_is_a_usage_error() -> None:
    r = omirrord("completion", "fish")
    assert r.returncode == 2 and "'fish' is not one of 'bash', 'zsh'" in r.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize(("words", "expected"), [
    ("omirrord sta", ["status"]),
    ("omirrord log re", ["replay"]),
    ("omirrord --bw", ["--bwlimit"]),
])
def test_bash_completes_with_the_script_sourced(tmp_path: Path, words: str,
                                                expected: list[str]) -> None:
    """bash itself, with the script sourced and COMP_WORDS set as readline sets them,
    runs omirrord (this venv's, first in PATH) and fills COMPREPLY."""
    script = tmp_path / "omirrord.bash"
    script.write_text(omirrord("completion", "bash").stdout)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    r = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c",
         'source "$1"; COMP_WORDS=($2); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); '
         '_omirrord_completion omirrord; printf "%s\\n" "${COMPREPLY[@]}"',
         "bash", str(script), words],
        env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == expected, r.stdout + r.stderr
