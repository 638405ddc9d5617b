"""The ``omirrord`` command line: the contract of DESIGN §1, and nothing else.

Every option of the daemon is accepted before or after the subcommand
(``omirrord -C x check`` and ``omirrord check -C x``) and from its environment variable,
because operators script all three. Exit codes: 0 ok, 1 differences (check), 2 error.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, NoReturn, TypeVar

import click
from click.core import ParameterSource

from omirror import __version__
from omirror.errors import NotImplementedYet, OmirrorError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DIFFERENCES, EXIT_ERROR = 0, 1, 2
DEFAULT_DELAY_S = 0.001

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
                 help="With --check/--once: compare contents, not only stamps."),
    click.option("-v", "--verbose", envvar="OMIRRORD_VERBOSE", count=True,
                 help="More log output (-vv for every file)."),
]
_NAMES = [f.name for f in fields(Options)]


def shared_options(func: F) -> F:
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


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose <= 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # asyncssh logs every channel at INFO: only with -vvv
    logging.getLogger("asyncssh").setLevel(logging.DEBUG if verbose >= 3 else logging.WARNING)


def fail(message: str) -> NoReturn:
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
@click.version_option(__version__, "-V", "--version", prog_name="omirrord")
@click.pass_context
def main(ctx: click.Context, check_mode: bool, once_mode: bool, **_: Any) -> None:
    """omirrord: keep directory trees identical across hosts, live, over SSH."""
    if ctx.invoked_subcommand is not None:
        if check_mode or once_mode:
            raise click.UsageError("--check and --once take no subcommand")
        return
    if check_mode and once_mode:
        raise click.UsageError("--check and --once exclude each other")
    opts = Options(**{name: ctx.params[name] for name in _NAMES})
    if check_mode:
        _check(opts)
    elif once_mode:
        _once(opts)
    else:
        _run(opts)


@main.command("run")
@shared_options
@click.pass_context
def run_command(ctx: click.Context, **_: Any) -> None:
    """Run the daemon in the foreground (the default)."""
    _run(options_of(ctx))


@main.command("check")
@shared_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_context
def check_command(ctx: click.Context, as_json: bool, **_: Any) -> None:
    """Dry reconciliation: compare with the peers, print the plan, change nothing."""
    _check(options_of(ctx))


@reports_errors
def _run(opts: Options) -> None:
    setup_logging(opts.verbose)
    from omirror.daemon import run_daemon

    sys.exit(run_daemon(opts.config, opts.name, opts.root, opts.state_dir, opts.peers,
                        delay_s=opts.delay, compress=opts.compress))


@reports_errors
def _check(opts: Options) -> None:
    setup_logging(opts.verbose - 1)
    _load(opts)
    raise NotImplementedYet("--check compares with the peers' indexes over the peer links, "
                            "which this version does not have; the configuration is valid")


@reports_errors
def _once(opts: Options) -> None:
    setup_logging(opts.verbose)
    _load(opts)
    raise NotImplementedYet("--once reconciles over the peer links, which this version "
                            "does not have; the configuration is valid")


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
def status_command(ctx: click.Context, as_json: bool, **_: Any) -> None:
    """Ask the running daemon how it is doing."""
    raise NotImplementedYet("status asks the daemon over its control socket, which this "
                            "version does not have")


@main.command("keygen")
@shared_options
@click.pass_context
@reports_errors
def keygen_command(ctx: click.Context, **_: Any) -> None:
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
def log_dump(ctx: click.Context, since_seq: int, path_prefix: str | None,
             origin: str | None, **_: Any) -> None:
    """Print the change log: seq, stamp, origin, kind, path."""
    from omirror.store import Store

    opts = options_of(ctx)
    setup_logging(opts.verbose - 1)
    db = os.path.join(opts.state_dir, "state.db")
    if not os.path.exists(db):
        raise OmirrorError(f"no state database at {db}: has omirrord run with "
                           f"--state-dir {opts.state_dir}?")
    prefix = None if path_prefix is None else os.fsencode(path_prefix.strip("/"))
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
                extra = f" (from /{os.fsdecode(entry.moved_from)})"
            click.echo(f"{record.seq}\t{when}.{entry.stamp.time_ns % 10**9:09d}Z\t"
                       f"{entry.stamp.origin}\t{entry.kind.name.lower()}\t"
                       f"/{os.fsdecode(entry.path)}{extra}")


@log_group.command("truncate")
@shared_options
@click.option("--older-than", "days", type=click.FloatRange(min=0.0), default=30.0,
              show_default=True, help="Collect deletions older than this many days.")
@click.pass_context
@reports_errors
def log_truncate(ctx: click.Context, days: float, **_: Any) -> None:
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
@click.pass_context
@reports_errors
def log_replay(ctx: click.Context, **_: Any) -> None:
    """Send entries from a sequence number to a peer again."""
    raise NotImplementedYet("log replay sends over the peer links, which this version "
                            "does not have")


@main.command("sync")
@shared_options
@click.argument("paths", nargs=-1, required=True)
@click.pass_context
@reports_errors
def sync_command(ctx: click.Context, paths: tuple[str, ...], **_: Any) -> None:
    """Push these paths out now."""
    raise NotImplementedYet("sync asks the running daemon over its control socket, which "
                            "this version does not have")


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
