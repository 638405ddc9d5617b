"""What the benchmark scripts share: processes started in their own process group and
stopped by it, bounded polling, a private ``sshd`` on 127.0.0.1, two (or more)
``omirrord`` peers set up as an operator would, installing the compared tools with
apt-get, and a description of the machine.

Not a benchmark itself; ``latency.py`` and ``compare.py`` import it (they run as scripts
from ``bench/``, so it is found next to them).
"""

from __future__ import annotations

import compileall
import contextlib
import getpass
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import omirror  # noqa: E402
from omirror import control  # noqa: E402
from omirror.demo import free_ports  # noqa: E402
from omirror.errors import OmirrorError  # noqa: E402

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
#: The cipher the ssh clients of rsync, unison and lsyncd are given when the CPU has
#: AES instructions; omirror's asyncssh puts it first already.
AES_CIPHER = "aes128-gcm@openssh.com"

_T0 = time.perf_counter()


def compile_bytecode() -> None:
    """Write the package's bytecode beside its sources before anything is timed.

    An installed omirrord has it (pip compiles a wheel's modules as it installs them),
    but an editable install run with ``PYTHONDONTWRITEBYTECODE`` set never gets it, and
    each daemon start would then compile some forty modules: about 0.2 s of CPU that
    no installed omirrord spends."""
    compileall.compile_dir(Path(omirror.__file__).parent, quiet=1)



def note(msg: str) -> None:
    """A progress line on stderr, with the seconds since the script started."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# -- processes ---------------------------------------------------------------------------


class Proc:
    """A process started in its own process group, output to a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, **kw: object) -> None:
        self.name = name
        self.log = log
        self._logf: IO[bytes] = open(log, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._logf,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     **kw)  # type: ignore[call-overload]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join(f"    {line}" for line in text)

    def stop(self) -> None:
        """SIGTERM the process group, wait, then SIGKILL whatever is left of it.

        Descendants that left the group (sshd's per-connection children call setsid) are
        noted first and signalled by pid as well.
        """
        pgid = self.proc.pid
        strays = descendants(pgid)
        for sig, late in ((signal.SIGTERM, f"did not stop within {STOP_TIMEOUT_S:.0f} s of "
                                           "SIGTERM: killing"),
                          (signal.SIGKILL, f"(pid {pgid}) survived SIGKILL?")):
            # the leader may be gone while children of its group are not: both, always
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            for pid in strays:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                note(f"{self.name} {late}")
        self._logf.close()


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def wait_for(cond: Callable[[], bool], timeout: float, what: str,
             procs: tuple[Proc, ...] = (), interval: float = 0.05) -> None:
    """Poll ``cond`` every ``interval`` seconds until it holds; raise RuntimeError after
    ``timeout`` seconds, or as soon as one of ``procs`` has exited."""
    end = time.monotonic() + timeout
    while not cond():
        for p in procs:
            if not p.running:
                raise RuntimeError(f"{p.name} exited with status {p.proc.returncode} while "
                                   f"waiting until {what}:\n{p.tail()}")
        if time.monotonic() >= end:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting until {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def first_line(argv: list[str]) -> str:
    """The first line a command prints (stdout, then stderr), blanks squeezed."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = (r.stdout + r.stderr).strip().splitlines()
    return " ".join(lines[0].split()) if lines else "unknown"


def lua_str(value: object) -> str:
    s = str(value)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- installing what is compared ---------------------------------------------------------

#: The executables the benchmarks may need, and the Debian package of each.
PACKAGES = {"lsyncd": "lsyncd", "sshd": "openssh-server", "ssh": "openssh-client",
            "rsync": "rsync", "unison": "unison"}


def find_tools(names: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for name in names:
        path = shutil.which(name) or next(
            (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)),
            None)
        if path:
            found[name] = path
    return found


def ensure_tools(names: tuple[str, ...] = ("lsyncd", "sshd", "ssh", "rsync")
                 ) -> dict[str, str]:
    """Paths of the named executables, installing the missing ones with apt-get.

    What cannot be installed is left out of the result; the caller decides what to skip.
    """
    found = find_tools(names)
    missing = [n for n in names if n not in found]
    if not missing:
        return found
    packages = sorted({PACKAGES[n] for n in missing})
    note(f"missing {', '.join(missing)}: installing {' '.join(packages)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600,
                       stdin=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env,
                       timeout=900, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        note(f"apt-get failed: {e}")
    return find_tools(names)


# -- a private sshd ------------------------------------------------------------------------


def has_aes() -> bool:
    """Whether the CPU announces AES instructions (the ``aes`` flag of /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "aes" in line.split(":", 1)[1].split()
                       for line in f)
    except OSError:
        return False


class Sshd:
    """``sshd -D`` on 127.0.0.1 with its own config, host key, authorized_keys (one key
    made for the run) and pid file, all under ``base``; started by ``start``, stopped
    with ``proc.stop()`` (which also reaches its per-connection children)."""

    def __init__(self, base: Path, bins: dict[str, str]) -> None:
        self.base = base
        self.bins = bins
        self.dir = base / "ssh"
        self.key = self.dir / "client_key"
        self.port = 0
        self.user = getpass.getuser()
        self.proc: Proc | None = None

    def start(self) -> Proc:
        ssh = self.dir
        ssh.mkdir(parents=True)
        os.chmod(ssh, 0o700)
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                            f"omirror-bench-{name}", "-f", str(ssh / name)], check=True,
                           stdin=subprocess.DEVNULL, timeout=30)
        auth = ssh / "authorized_keys"
        auth.write_text((ssh / "client_key.pub").read_text())
        os.chmod(auth, 0o600)
        (self.port,) = free_ports(1)
        cfg = ssh / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {ssh / 'host_key'}",
            f"PidFile {ssh / 'sshd.pid'}",
            f"AuthorizedKeysFile {auth}",
            "StrictModes no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "X11Forwarding no",
            "PrintMotd no",
            "LogLevel ERROR",
            "",
        ]))
        if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
            # sshd's privilege separation directory (Debian's init script makes it)
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        check = subprocess.run([self.bins["sshd"], "-t", "-f", str(cfg)],
                               capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"sshd -t rejects the config: {check.stderr.strip()}")
        self.proc = Proc("sshd", [self.bins["sshd"], "-D", "-e", "-f", str(cfg)],
                         self.base / "sshd.log")
        wait_for(lambda: port_open(self.port), 15, f"sshd listens on 127.0.0.1:{self.port}",
                 (self.proc,))
        probe = subprocess.run(
            [self.bins["ssh"], *self.options(), f"{self.user}@127.0.0.1", "rsync --version"],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        if probe.returncode != 0:
            raise RuntimeError(f"ssh into the private sshd failed ({probe.returncode}): "
                               f"{probe.stderr.strip()[-300:]}\n{self.proc.tail()}")
        return self.proc

    def options(self, cipher: str | None = None, port: int | None = None) -> list[str]:
        """ssh's options to reach this sshd (port, key, no host key check, batch);
        ``port`` is another way in (a proxy in front of it)."""
        opts = ["-p", str(port or self.port), "-i", str(self.key), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]
        if cipher:
            opts += ["-c", cipher]
        return opts


# -- omirrord peers ------------------------------------------------------------------------


def omirrord_argv() -> list[str]:
    """The ``omirrord`` next to this interpreter (the venv's), else ``python -m omirror``."""
    exe = Path(sys.executable).parent / "omirrord"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("omirrord")
    return [found] if found else [sys.executable, "-m", "omirror"]


class OmirrorPair:
    """``count`` ``omirrord`` (two unless told) on 127.0.0.1 set up as an operator would:
    an ``ssh-keygen`` host key per peer, one peers file, one Distfile ``FILES = ( /data )``
    listing every peer in its HOSTS (each is linked with every other), each peer with its
    own ``--root`` (``base/p<i>/root``) and ``--state-dir`` (``base/p<i>/state``).

    ``delay`` is omirrord's ``-d``; None leaves omirrord's default. Each peer is started
    and stopped on its own (``start(i)``, ``stop(i)``), with the environment of this
    process (``OMIRRORD_*`` left out) plus ``env[i]``, empty unless the caller sets it
    (e.g. ``OMIRROR_TEST_DIAL`` to route the peer's links through a proxy).
    """

    def __init__(self, base: Path, delay: float | None = None, count: int = 2) -> None:
        if count < 2:
            raise ValueError(f"an omirror mirror needs two peers at least, not {count}")
        base.mkdir(parents=True)
        self.base = base
        self.names = [f"127.0.0.1:{p}" for p in free_ports(count)]
        conf, peers = base / "omirrd.conf", base / "peers"
        conf.write_text(f"HOSTS = ( {' '.join(self.names)} )\nFILES = ( /data )\n"
                        "${FILES} -> ${HOSTS}\n\tinstall ;\n")
        lines: list[str] = []
        self.argvs: list[list[str]] = []
        self.roots: list[Path] = []
        self.states: list[Path] = []
        for i, name in enumerate(self.names):
            peer = base / f"p{i}"
            (peer / "root" / "data").mkdir(parents=True)
            state = peer / "state"
            state.mkdir()
            os.chmod(state, 0o700)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                            "-f", str(state / "host_key")], check=True,
                           stdin=subprocess.DEVNULL, timeout=30)
            lines.append(f"{name} " + " ".join(
                (state / "host_key.pub").read_text().split()[:2]) + "\n")
            argv = omirrord_argv() + [
                "-C", str(conf), "-n", name, "--root", str(peer / "root"),
                "--state-dir", str(state), "--peers", str(peers)]
            if delay is not None:
                argv += ["-d", str(delay)]
            self.argvs.append(argv)
            self.roots.append(peer / "root")
            self.states.append(state)
        peers.write_text("".join(lines))
        for f in (conf, peers):
            os.chmod(f, 0o600)
        self.data = [root / "data" for root in self.roots]
        self.procs: list[Proc | None] = [None] * count
        #: Extra environment of each peer's daemon, read by ``start``.
        self.env: list[dict[str, str]] = [{} for _ in range(count)]
        self.version = first_line(omirrord_argv() + ["-V"])

    @property
    def count(self) -> int:
        return len(self.names)

    def start(self, i: int) -> Proc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMIRRORD_")}
        env.update(self.env[i])
        proc = Proc(f"omirrord p{i}", self.argvs[i], self.base / f"p{i}.log", env=env,
                    cwd=self.base)
        self.procs[i] = proc
        return proc

    def up(self, i: int) -> bool:
        """The daemon writes status.json with its pid once its startup scan is done and
        its watches and listener are up."""
        proc = self.procs[i]
        if proc is None:
            return False
        try:
            return json.loads((self.states[i] / "status.json").read_text()).get(
                "pid") == proc.pid
        except (OSError, ValueError):
            return False

    def wait_up(self, i: int, timeout: float = STARTUP_TIMEOUT_S,
                interval: float = 0.05) -> None:
        proc = self.procs[i]
        assert proc is not None
        wait_for(lambda: self.up(i), timeout, f"{proc.name} writes its status.json",
                 (proc,), interval)

    def status(self, i: int) -> dict[str, Any] | None:
        """The running daemon's status dict, asked over its control socket (fresh, unlike
        status.json, which is rewritten every half second); None if nothing answers."""
        try:
            return control.request(self.states[i], "status", timeout=10)["status"]
        except OmirrorError:
            return None

    def running(self) -> tuple[Proc, ...]:
        """The peers' processes that run, for ``wait_for`` to watch."""
        return tuple(p for p in self.procs if p is not None and p.running)

    def stop(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None:
            proc.stop()
            self.procs[i] = None

    def stop_all(self) -> None:
        for i in reversed(range(len(self.procs))):
            self.stop(i)


# -- the machine ---------------------------------------------------------------------------


def filesystem(where: Path) -> str:
    """The type of the file system holding ``where``."""
    for argv in (["findmnt", "-n", "-o", "FSTYPE", "-T", str(where)],
                 ["stat", "-f", "-c", "%T", str(where)]):
        got = first_line(argv)
        if got != "unknown":
            return got
    return "unknown"


def machine_info(work: Path) -> dict[str, str]:
    info = {
        "nproc": str(os.cpu_count()),
        "python": sys.version.split()[0] + " (" + platform.python_implementation() + ")",
        "kernel": platform.release(),
        "filesystem": filesystem(work),
        "aes-ni": "yes" if has_aes() else "no",
    }
    try:
        cpu = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
               if line.startswith("model name")]
        if cpu:
            info["cpu"] = cpu[0]
    except OSError:
        pass
    return info
