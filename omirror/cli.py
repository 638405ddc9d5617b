"""The ``omirrord`` command line: the contract of docs/contract.rst, and nothing else.

Every option of the daemon is accepted before or after the subcommand
(``omirrord -C x check`` and ``omirrord check -C x``) and from its environment variable,
because operators script all three. Exit codes: 0 ok, 1 differences (check), 2 error.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, NoReturn, TypeVar

import click
from click.core import ParameterSource

from omirror import __version__
from omirror.diskspace import Reserve, parse_reserve
from omirror.errors import NotImplementedYet, OmirrorError
from omirror.paths import show, show_name, show_text
from omirror.specials import DEFAULT_TIMEOUT_S as DEFAULT_SPECIAL_TIMEOUT_S
from omirror.versions import DEFAULT_KEEP_DAYS

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DIFFERENCES, EXIT_ERROR = 0, 1, 2
DEFAULT_DELAY_S = 0.001
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SYSLOG_SOCKET = "/dev/log"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Options:
    """The options shared by the daemon, --check and --once."""

    config: str
    name: str | None
    root: str
    state_dir: str
    peers: str
    delay: float
    compress: bool
    force: bool
    verbose: int
    syslog: str | None
    min_free: Reserve
    keep_versions: float
    special_timeout: float
    bwlimit: int
    metrics_file: str | None


_OPTIONS = [
    click.option("-C", "--config", envvar="OMIRRORD_CONFIG", default="/etc/omirrd.conf",
                 show_default=True, metavar="PATH", help="The Distfile."),
    click.option("-n", "--name", envvar="OMIRRORD_NAME", default=None, metavar="HOST",
                 help="This host's entry in HOSTS (default: the one matching the hostname)."),
    click.option("--root", envvar="OMIRRORD_ROOT", default="/", show_default=True,
                 metavar="DIR", help="Prefix under which every FILES path lives on this host."),
    click.option("--state-dir", envvar="OMIRRORD_STATE_DIR", default="/var/lib/omirror",
                 show_default=True, metavar="DIR",
                 help="State database, host key and control socket."),
    click.option("--peers", envvar="OMIRRORD_PEERS", default="/etc/omirror/peers",
                 show_default=True, metavar="PATH", help="The peer keys file."),
    click.option("-d", "--delay", envvar="OMIRRORD_DELAY", default=DEFAULT_DELAY_S,
                 show_default=True, type=click.FloatRange(min=0.0), metavar="SECONDS",
                 help="Coalescing window for events."),
    click.option("-z", "--compress", envvar="OMIRRORD_COMPRESS", is_flag=True,
                 help="Compress the stream, for slow links."),
    click.option("-f", "--force", envvar="OMIRRORD_FORCE", is_flag=True,
                 help="With --check: compare contents, not only stamps; with keygen: "
                      "replace an existing host key."),
    click.option("-v", "--verbose", envvar="OMIRRORD_VERBOSE", count=True,
                 help="More log output (-vv for every file)."),
    click.option("--syslog", envvar="OMIRRORD_SYSLOG", default=None, metavar="FACILITY",
                 callback=lambda ctx, param, value: syslog_facility(value),
                 help="Log to syslog (/dev/log) with this facility, e.g. local7, daemon."),
    click.option("--min-free", envvar="OMIRRORD_MIN_FREE", default="1%", show_default=True,
                 metavar="SIZE|N%", callback=lambda ctx, param, value: _reserve(value),
                 help="Free space that files from peers never fill: a size (512M, 2G) or "
                      "a percentage of the file system; 0 for none."),
    click.option("--keep-versions", envvar="OMIRRORD_KEEP_VERSIONS",
                 default=DEFAULT_KEEP_DAYS, show_default=True,
                 type=click.FloatRange(min=0.0), metavar="DAYS",
                 help="Days the versions kept by 'install -osavetargets' stay; 0 for "
                      "ever."),
    click.option("--special-timeout", envvar="OMIRRORD_SPECIAL_TIMEOUT",
                 default=DEFAULT_SPECIAL_TIMEOUT_S, show_default=True,
                 type=click.FloatRange(min=0.0, min_open=True), metavar="SECONDS",
                 help="A special or cmdspecial command running longer is stopped "
                      "(its process group: SIGTERM, then SIGKILL)."),
    click.option("--bwlimit", envvar="OMIRRORD_BWLIMIT", default=0, show_default=True,
                 type=click.IntRange(min=0), metavar="KIB",
                 help="KiB per second that each link to a peer may write; 0 for no "
                      "limit."),
    click.option("--metrics-file", envvar="OMIRRORD_METRICS_FILE", default=None,
                 metavar="PATH",
                 help="The daemon keeps its metrics in this file, in the Prometheus text "
                      "format, for node_exporter's textfile collector (name it *.prom)."),
]


def _reserve(value: str | Reserve) -> Reserve:
    if isinstance(value, Reserve):
        return value
    try:
        return parse_reserve(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
_NAMES = [f.name for f in fields(Options)]


def shared_options(func: F) -> F:
    """Give a command every daemon option, so each works after the subcommand too
    (:func:`options_of` merges both places)."""
    for option in reversed(_OPTIONS):
        func = option(func)
    return func


def options_of(ctx: click.Context) -> Options:
    """Merge the options given to the group and to the subcommand.

    A value typed after the subcommand beats one typed before it, and either beats the
    environment and the default.
    """
    values: dict[str, Any] = {}
    parent = ctx.find_root() if ctx.parent is not None else None
    for name in _NAMES:
        value = ctx.params.get(name)
        if parent is not None and ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE \
                and parent.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            value = parent.params[name]
        values[name] = value
    return Options(**values)


def setup_logging(verbose: int, syslog: str | None = None) -> None:
    """Plain lines on stderr; with their syslog priority ("<4>") and without a time
    stamp when stderr is the journal, so ``journalctl -p warning`` works; or, with
    ``syslog`` (a facility name), to the local syslog daemon instead of stderr."""
    from omirror import systemd

    level = logging.WARNING if verbose < 0 else logging.INFO if verbose <= 1 else logging.DEBUG
    if syslog is not None:
        handler = syslog_handler(syslog)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(systemd.JournalFormatter() if systemd.stderr_is_journal()
                             else logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    # asyncssh logs every channel at INFO: only with -vvv
    logging.getLogger("asyncssh").setLevel(logging.DEBUG if verbose >= 3 else logging.WARNING)


def syslog_facility(value: str | None) -> str | None:
    """A syslog facility name as logging.handlers knows it: "local7", also "LOG_LOCAL7"
    as omirr's configuration spelled it; anything else is a usage error (exit 2)."""
    if value is None:
        return None
    from logging.handlers import SysLogHandler

    name = value.lower().removeprefix("log_")
    if name not in SysLogHandler.facility_names:
        raise click.BadParameter(f"unknown syslog facility {value!r}; one of: "
                                 + ", ".join(sorted(SysLogHandler.facility_names)))
    return name


def syslog_handler(facility: str) -> logging.Handler:
    """A handler that sends to the local syslog daemon; refuses (exit 2) when none
    listens, because logging.handlers would otherwise drop every line in silence."""
    import socket
    from logging.handlers import SysLogHandler

    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):  # as SysLogHandler tries them
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(SYSLOG_SOCKET)
                break
            except OSError as e:
                error = e
    else:
        raise OmirrorError(f"--syslog {facility}: no syslog daemon listens on "
                           f"{SYSLOG_SOCKET}: {error.strerror or error}")
    handler = SysLogHandler(SYSLOG_SOCKET, SysLogHandler.facility_names[facility])
    handler.setFormatter(logging.Formatter(
        "omirrord[%(process)d]: %(levelname)s %(name)s: %(message)s"))
    return handler


def fail(message: str) -> NoReturn:
    """Exit 2, the contract's error status, with one line on stderr and no traceback."""
    click.echo(f"omirrord: error: {message}", err=True)
    sys.exit(EXIT_ERROR)


def reports_errors(func: F) -> F:
    """Turn omirror's own errors into one clear line on stderr and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NotImplementedYet as e:
            fail(f"{e} (omirrord {__version__})")
        except OmirrorError as e:
            fail(str(e))
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


# -- the group: the daemon itself, --check and --once --------------------------------------

@click.group(invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@shared_options
@click.option("--check", "check_mode", is_flag=True,
              help="Dry reconciliation: print what differs, change nothing.")
@click.option("--once", "once_mode", is_flag=True,
              help="Reconcile with every reachable peer, then exit.")
@click.option("--json", "as_json", is_flag=True, help="With --check: the plan as JSON.")
@click.version_option(__version__, "-V", "--version", prog_name="omirrord")
@click.pass_context
def main(ctx: click.Context, /, check_mode: bool, once_mode: bool, as_json: bool,
         **_: Any) -> None:
    """omirrord: keep directory trees identical across hosts, live, over SSH."""
    if ctx.invoked_subcommand is not None:
        if check_mode or once_mode:
            raise click.UsageError("--check and --once take no subcommand")
        return
    if check_mode and once_mode:
        raise click.UsageError("--check and --once exclude each other")
    opts = Options(**{name: ctx.params[name] for name in _NAMES})
    if check_mode:
        _check(opts, as_json)
    elif once_mode:
        _once(opts)
    else:
        _run(opts)


@main.command("run")
@shared_options
@click.pass_context
def run_command(ctx: click.Context, /, **_: Any) -> None:
    """Run the daemon in the foreground (the default)."""
    _run(options_of(ctx))


@main.command("check")
@shared_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_context
def check_command(ctx: click.Context, /, as_json: bool, **_: Any) -> None:
    """Dry reconciliation: compare with the peers, print the plan, change nothing."""
    _check(options_of(ctx), as_json)


@reports_errors
def _run(opts: Options) -> None:
    setup_logging(opts.verbose, opts.syslog)
    from omirror.daemon import run_daemon

    sys.exit(run_daemon(opts.config, opts.name, opts.root, opts.state_dir, opts.peers,
                        delay_s=opts.delay, compress=opts.compress, min_free=opts.min_free,
                        keep_versions=opts.keep_versions,
                        special_timeout_s=opts.special_timeout, bwlimit_kib=opts.bwlimit,
                        metrics_file=opts.metrics_file))


@reports_errors
def _check(opts: Options, as_json: bool = False) -> None:
    setup_logging(opts.verbose - 1)
    from omirror.reconcile import Checker, render

    checker = Checker(opts.config, opts.name, opts.root, opts.state_dir, opts.peers,
                      force=opts.force, compress=opts.compress)
    report = asyncio.run(checker.check())
    click.echo(render(report, as_json))
    sys.exit(report.exit_code)


@reports_errors
def _once(opts: Options) -> None:
    setup_logging(opts.verbose, opts.syslog)
    from omirror import control
    from omirror.daemon import run_once

    pid = control.daemon_running(opts.state_dir)
    if pid is not None:
        raise OmirrorError(f"omirrord (pid {pid}) runs with --state-dir {opts.state_dir} and "
                           "keeps this host in sync already; use 'omirrord sync PATH' to "
                           "push paths now")
    sys.exit(run_once(opts.config, opts.name, opts.root, opts.state_dir, opts.peers,
                      compress=opts.compress, report=click.echo, min_free=opts.min_free,
                      special_timeout_s=opts.special_timeout, bwlimit_kib=opts.bwlimit))


def _load(opts: Options) -> tuple[Any, str]:
    """Read the Distfile and find this host in it; both fail loudly and early."""
    from omirror import config

    cfg = config.load(opts.config)
    me = cfg.find_self(opts.name).name
    return cfg, me


# -- subcommands ---------------------------------------------------------------------------

@main.command("status")
@shared_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@reports_errors
def status_command(ctx: click.Context, /, as_json: bool, **_: Any) -> None:
    """Ask the running daemon how it is doing: peers, links, lag, queue, last scan,
    conflicts and failing paths."""
    import json

    from omirror import control
    from omirror.status import render

    opts = options_of(ctx)
    status = control.request(opts.state_dir, "status")["status"]
    click.echo(json.dumps(status, indent=2, sort_keys=True) if as_json else render(status))


@main.command("metrics")
@shared_options
@click.pass_context
@reports_errors
def metrics_command(ctx: click.Context, /, **_: Any) -> None:
    """Ask the running daemon how it is doing, in the Prometheus text format: what
    status shows, as gauges and counters (the metrics of --metrics-file)."""
    from omirror import control
    from omirror.metrics import exposition

    opts = options_of(ctx)
    status = control.request(opts.state_dir, "status")["status"]
    click.echo(exposition(status), nl=False)


@main.command("keygen")
@shared_options
@click.pass_context
@reports_errors
def keygen_command(ctx: click.Context, /, **_: Any) -> None:
    """Make this host's key if missing, and print its line for the peers file.

    An existing key is kept unless -f/--force is given (its peers then need the new line).
    """
    from omirror import config, peerkeys

    opts = options_of(ctx)
    setup_logging(opts.verbose - 1)
    if opts.name is not None:
        name = config.parse_host(opts.name, "--name").name
    else:
        name = _load(opts)[1]
    key, created = peerkeys.ensure_host_key(opts.state_dir, force=opts.force)
    where = peerkeys.host_key_path(opts.state_dir)
    click.echo(f"{'made' if created else 'kept existing'} host key {where}", err=True)
    click.echo(peerkeys.peer_line(name, key))


@main.group("log")
def log_group() -> None:
    """Inspect the change log (like Heimdal's iprop-log)."""


@log_group.command("dump")
@shared_options
@click.option("--since", "since_seq", type=click.IntRange(min=0), default=0,
              help="Only changes after this sequence number.")
@click.option("--path", "path_prefix", default=None,
              help="Only this path and what lies below it.")
@click.option("--origin", default=None, help="Only changes made on this host.")
@click.pass_context
@reports_errors
def log_dump(ctx: click.Context, /, since_seq: int, path_prefix: str | None,
             origin: str | None, **_: Any) -> None:
    """Print the change log: seq, stamp, origin, kind, path."""
    from omirror.store import Store

    opts = options_of(ctx)
    setup_logging(opts.verbose - 1)
    db = os.path.join(opts.state_dir, "state.db")
    if not os.path.exists(db):
        raise OmirrorError(f"no state database at {db}: has omirrord run with "
                           f"--state-dir {opts.state_dir}?")
    # "--path /" is every path (stripped, it would be b"" and match none)
    prefix = os.fsencode((path_prefix or "").strip("/")) or None
    with Store.open(opts.state_dir) as store:
        click.echo(f"# epoch {store.epoch} last_seq {store.last_seq} floor {store.floor}")
        for record in store.since(since_seq):
            entry = record.entry
            if origin is not None and entry.stamp.origin != origin:
                continue
            if prefix is not None and not (entry.path == prefix
                                           or entry.path.startswith(prefix + b"/")):
                continue
            when = time.strftime("%Y-%m-%dT%H:%M:%S",
                                 time.gmtime(entry.stamp.time_ns // 10**9))
            extra = ""
            if entry.moved_from is not None:
                extra = f" (from {show(entry.moved_from)})"
            click.echo(f"{record.seq}\t{when}.{entry.stamp.time_ns % 10**9:09d}Z\t"
                       f"{show_text(entry.stamp.origin)}\t{entry.kind.name.lower()}\t"
                       f"{show(entry.path)}{extra}")


@log_group.command("truncate")
@shared_options
@click.option("--older-than", "days", type=click.FloatRange(min=0.0), default=30.0,
              show_default=True, help="Collect deletions older than this many days.")
@click.pass_context
@reports_errors
def log_truncate(ctx: click.Context, /, days: float, **_: Any) -> None:
    """Forget deletions older than a bound; peers behind it will be sent everything."""
    from omirror.store import Store

    opts = options_of(ctx)
    setup_logging(opts.verbose - 1)
    with Store.open(opts.state_dir) as store:
        bound = time.time_ns() - int(days * 86400 * 10**9)
        collected = store.collect_tombstones(bound)
        click.echo(f"collected {collected} deletions; floor is now seq {store.floor}")


@log_group.command("replay")
@shared_options
@click.option("--peer", required=True, metavar="HOST", help="The peer to send to again.")
@click.option("--from", "from_seq", required=True, type=click.IntRange(min=0),
              metavar="SEQ", help="Send every entry after this sequence number.")
@click.pass_context
@reports_errors
def log_replay(ctx: click.Context, /, peer: str, from_seq: int, **_: Any) -> None:
    """Send entries from a sequence number to a peer again.

    The running daemon restarts its link to the peer and streams its log from SEQ, as
    if the peer had lost what came after it; the peer applies what it lacks.
    """
    from omirror import control

    opts = options_of(ctx)
    reply = control.request(opts.state_dir, "replay", peer=peer, from_seq=from_seq)
    click.echo(f"replaying to {reply['peer']} from seq {reply['from_seq']} (log at seq "
               f"{reply['last_seq']}): the link restarts now; `omirrord status` shows it")


@main.command("sync")
@shared_options
@click.argument("paths", nargs=-1, required=True)
@click.pass_context
@reports_errors
def sync_command(ctx: click.Context, /, paths: tuple[str, ...], **_: Any) -> None:
    """Push these paths out now: the running daemon rescans each (a directory with
    everything below it) and sends what changed.

    PATH is absolute, as the Distfile names it (/srv/www/index.html), whatever --root
    is. Waits until the rescan is done; Ctrl-C leaves it running in the daemon.
    """
    from omirror import control
    from omirror.status import plural

    opts = options_of(ctx)
    r = control.request(opts.state_dir, "sync", timeout=None, paths=list(paths))
    click.echo(f"rescanned {', '.join(paths)}: {plural(r['files'], 'file')}, "
               f"{plural(r['dirs'], 'directory')}, {plural(r['symlinks'], 'symlink')}; "
               f"recorded {plural(r['recorded'], 'change')} ({r['new']} new, "
               f"{r['changed']} changed, {r['deleted']} deleted, {r['moved']} moved); "
               f"log at seq {r['last_seq']}")
    for problem in r.get("unreadable", []):
        click.echo(f"unreadable: {problem}", err=True)
    links = r.get("links_out", {})
    down = sorted(name for name, state in links.items() if state != "up")
    if r["recorded"]:
        up = sorted(set(links) - set(down))
        click.echo(f"sending now to {', '.join(up) or 'no peer'}"
                   + (f"; later to {', '.join(down)} (link not up)" if down else ""))


@main.command("versions")
@shared_options
@click.argument("paths", nargs=-1)
@click.pass_context
@reports_errors
def versions_command(ctx: click.Context, /, paths: tuple[str, ...], **_: Any) -> None:
    """List the old versions that 'install -osavetargets' kept on this host: when each
    was kept (UTC), its size in bytes, the path it was, and the kept file.

    PATH is absolute, as the Distfile names it; only versions of it and of what lies
    below it are listed (all without PATH). Needs no running daemon. A version is
    restored by copying the kept file back (cp -a KEPT PATH): a local change, mirrored
    like any edit.
    """
    from omirror.setdirs import SetDirs
    from omirror.versions import Versions

    opts = options_of(ctx)
    setup_logging(opts.verbose - 1)
    for path in paths:
        if not path.startswith("/"):
            raise click.UsageError(f"{path!r} is not absolute: name paths as the Distfile "
                                   "does (/srv/www/index.html)")
    cfg, me = _load(opts)
    # the areas belong to the daemon's user, who owns its state directory
    try:
        owner: int | None = os.stat(opts.state_dir).st_uid
    except OSError:
        owner = None
    kept_here = Versions(SetDirs(os.fsencode(os.path.abspath(opts.root))), owner=owner)
    wanted = [os.fsencode(p.strip("/")) for p in paths]
    for kept in kept_here.listing(cfg.sets_of(me), wanted,
                                  lambda text: click.echo(f"omirrord: {text}", err=True)):
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(kept.kept_at))
        click.echo(f"{when}\t{kept.size}\t{show(kept.path)}\t{show_name(kept.where)}")


@main.command("demo")
@click.option("--dir", "directory", default="omirror-demo", show_default=True,
              metavar="DIR", type=click.Path(file_okay=False),
              help="Where the three peers live; kept afterwards, so a re-run starts fast.")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0.0, min_open=True),
              default=None, metavar="SECONDS",
              help="Stop by itself this long after the peers are up (default: at Ctrl-C).")
@click.option("-v", "--verbose", count=True, help="Say what the demo itself does, on stderr.")
@reports_errors
def demo_command(directory: str, duration_s: float | None, verbose: int) -> None:
    """Three peers on this machine, live, for a first look.

    Runs three omirrord daemons on 127.0.0.1 whose trees are DIR/alpha/shared,
    DIR/beta/shared and DIR/gamma/shared, and prints each change as each tree shows it.
    Ctrl-C stops them; a daemon that dies stops the demo with its log and status 2.
    """
    from pathlib import Path

    from omirror.demo import run_demo

    setup_logging(verbose - 1)
    run_demo(Path(directory), click.echo, duration_s)


@main.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh"]))
def completion_command(shell: str) -> None:
    """Print the completion script for SHELL (bash or zsh), as click makes it.

    Install it once, for every user (or source it from a shell's rc file):

    \b
      omirrord completion bash > /usr/share/bash-completion/completions/omirrord
      omirrord completion zsh > /usr/local/share/zsh/site-functions/_omirrord

    The zsh directory must be in $fpath. Each completion runs omirrord itself.
    """
    from click.shell_completion import get_completion_class

    complete = get_completion_class(shell)
    if complete is None:  # click knows both; a click without one is a broken install
        fail(f"this click cannot complete {shell}")
    # the variable the script sets when it runs omirrord: click derives it from the
    # program name, and main() answers it with the completions (click's bash_source)
    click.echo(complete(main, {}, "omirrord", "_OMIRRORD_COMPLETE").source())
