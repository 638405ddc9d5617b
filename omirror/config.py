"""The Distfile (``omirrd.conf``): an rdist subset, lexed and parsed into frozen dataclasses.

Everything that can be wrong in the file is found here, at startup, and reported as
``file:line:col: found X, expected Y``, so that a typo stops the daemon before it mirrors
the wrong tree rather than after.

What is accepted (docs/contract.rst, "The Distfile")::

    HOSTS = ( alpha beta:2808 me@gamma [::1]:2809 )
    FILES = ( /srv/www /etc/nginx )
    www: ${FILES} -> ${HOSTS} - ( gamma )
            install -onochkowner,savetargets ;
            except /srv/www/cache ;
            except_pat ( \\.swp$ ~$ "\\.(tmp|bak)$" ) ;
            special /etc/nginx/nginx.conf "systemctl reload nginx" ;
            cmdspecial /srv/www "/usr/local/bin/reindex" ;

Choices made where rdist is loose or omirror differs:

* words end at white space, at ``( ) = ; " #`` and at ``->``; anything else (a regex with
  parentheses, a path with ``=``) must be double-quoted. Quoted strings are literal: no
  ``${NAME}`` expansion happens inside them, which is the escape hatch for a ``$``.
* ``$NAME`` without braces is an error (it is almost always a typo for ``${NAME}``); a
  ``$`` not followed by a letter, as in the regex ``\\.swp$``, is literal.
* a block's file list may not name a path inside another path of the same list: the
  inner one would be scanned and watched twice, and :meth:`MirrorSet.root_of` would be
  ambiguous.
* host names are compared case-insensitively (DNS is), so they are lower-cased in the
  identity; IPv6 identities are always written in brackets.
* the set operators compare host entries by identity and paths after normalisation, so
  ``${HOSTS} - ( beta )`` removes ``me@beta:2808`` too.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import posixpath
import re
import socket
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NoReturn

from omirror.errors import ConfigError

DEFAULT_PORT = 2808
CONFIG_DEFAULT = "/etc/omirrd.conf"

COMMANDS = ("install", "except", "except_pat", "special", "cmdspecial")

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_WHOLE_VAR = re.compile(r"\$\{([^}]*)\}\Z")
_BARE_VAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\Z")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_PORT = re.compile(r"[0-9]+\Z")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class Host:
    """One host entry of a HOSTS list.

    ``name`` is the identity used everywhere (peers file, stamps, logs, ``--name``): the
    entry without ``user@``, and without ``:port`` when the port is the default one, so
    that ``beta`` and ``beta:2808`` are the same host.
    """

    name: str
    address: str
    port: int
    user: str | None = None

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class InstallOptions:
    """The ``install -o`` options that make sense for a mirror (rdist's names)."""

    nochkowner: bool = False
    nochkgroup: bool = False
    nochkmode: bool = False
    ignlnks: bool = False
    savetargets: bool = False
    follow: bool = False
    #: extended attributes and ACLs are not mirrored (omirror/xattrs.py)
    noxattrs: bool = False
    #: ``security.*`` attributes (SELinux labels, file capabilities) are mirrored too
    securityxattrs: bool = False


#: Options accepted after ``install -o``; ``remove`` is rdist's "delete what the source
#: lacks", which a mirror always does, so it is accepted and means nothing more.
INSTALL_OPTIONS = (*InstallOptions.__dataclass_fields__, "remove")


@dataclass(frozen=True, slots=True)
class Special:
    """A shell command run here after a peer's version of a file under ``path`` (None:
    any path of the set) is applied: once per file (``special``), or once per burst of
    files with every name in ``$FILES`` (``cmdspecial``, ``burst`` true).

    The runner is omirror/specials.py."""

    path: str | None
    command: str
    burst: bool = False

    def matches(self, path: bytes) -> bool:
        """True for the logical path ``path`` when it is this special's path or lies
        below it; rdist matches the path only, a directory here stands for its tree."""
        if self.path is None:
            return True
        top = os.fsencode(self.path)[1:]
        return not top or path == top or path.startswith(top + b"/")


def set_label(title: str) -> str:
    """"set web" for a labelled set's title; an unlabelled one is "set at line 3"
    already (:attr:`MirrorSet.title`)."""
    return title if title.startswith("set ") else f"set {title}"


@dataclass(frozen=True)
class MirrorSet:
    """One block of the Distfile: these files, kept identical on these hosts, with these rules."""

    label: str | None
    files: tuple[str, ...]
    hosts: tuple[Host, ...]
    options: InstallOptions
    excepts: tuple[str, ...]
    except_pats: tuple[str, ...]
    specials: tuple[Special, ...]
    line: int
    # Precomputed in __post_init__ because is_excluded runs for every file of every scan.
    _except_prefixes: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _except_set: frozenset[str] = field(init=False, repr=False, compare=False)
    _patterns: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    #: (root, the root as a logical path, and as the prefix of what lies below it): a
    #: path is looked up in bytes, as it comes, without decoding it for every lookup
    _roots: tuple[tuple[str, bytes, bytes], ...] = field(init=False, repr=False,
                                                         compare=False)

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "_except_set", frozenset(self.excepts))
        setattr_(self, "_except_prefixes", tuple(_dir_prefix(p) for p in self.excepts))
        setattr_(self, "_patterns", tuple(re.compile(p) for p in self.except_pats))
        setattr_(self, "_roots", tuple(
            (f, os.fsencode(f)[1:], os.fsencode(_dir_prefix(f))[1:]) for f in self.files))

    @property
    def title(self) -> str:
        """How log messages name this set."""
        return self.label if self.label is not None else f"set at line {self.line}"

    def has_host(self, name: str) -> bool:
        """``name`` must be an identity as :func:`parse_host` makes it, not an entry as
        written: ``me@beta`` or ``BETA`` match nothing."""
        return any(h.name == name for h in self.hosts)

    def peers_of(self, name: str) -> tuple[Host, ...]:
        """The hosts this set is mirrored with, seen from host ``name``."""
        return tuple(h for h in self.hosts if h.name != name)

    def is_excluded(self, path: bytes) -> bool:
        """True when the logical path (relative to ``/``, e.g. ``b"srv/www/x"``) is excepted.

        An ``except`` path excludes itself and everything under it; an ``except_pat``
        regex excludes any path it matches anywhere (``re.search`` on the absolute path,
        as rdist does).
        """
        if not (self.excepts or self._patterns):
            return False  # the common case, on the scanner's hot path
        logical = "/" + os.fsdecode(path)
        if logical in self._except_set or logical.startswith(self._except_prefixes):
            return True
        return any(p.search(logical) for p in self._patterns)

    def contains(self, path: bytes) -> bool:
        """True when the logical path is in this set: below one of its roots, and not
        excluded by it."""
        return self.root_of(path) is not None and not self.is_excluded(path)

    def root_of(self, path: bytes) -> str | None:
        """The entry of ``files`` that contains the logical path, or None if none does."""
        for root, top, prefix in self._roots:
            if path == top or path.startswith(prefix):
                return root
        return None


@dataclass(frozen=True)
class Config:
    """A parsed Distfile: its mirror sets, in the order they are written."""

    path: str
    sets: tuple[MirrorSet, ...]

    def hosts(self) -> tuple[Host, ...]:
        """Every distinct host (by identity), in order of first appearance."""
        seen: dict[str, Host] = {}
        for mirror_set in self.sets:
            for host in mirror_set.hosts:
                seen.setdefault(host.name, host)
        return tuple(seen.values())

    def sets_of(self, name: str) -> tuple[MirrorSet, ...]:
        """The sets host ``name`` takes part in."""
        return tuple(s for s in self.sets if s.has_host(name))

    def find_self(self, name: str | None) -> Host:
        """This host's entry: the one named by ``--name``, else the one matching the hostname.

        Guessing from the hostname must find exactly one identity: several peers sharing
        a machine (tests, containers) would all match, and picking one silently would make
        two daemons claim the same identity.
        """
        if name is not None:
            return self._find_named(name)
        local = _local_names()
        matches: dict[str, Host] = {}
        for host in self.hosts():
            if host.address in local:
                matches.setdefault(host.name, host)
        if len(matches) == 1:
            return next(iter(matches.values()))
        names = ", ".join(sorted(local))
        if not matches:
            raise ConfigError(
                f"no host of {self.path} matches this machine ({names}); HOSTS lists: "
                f"{self._host_list()}; pass --name HOST to say which one this is")
        raise ConfigError(
            f"ambiguous: this machine ({names}) matches several hosts of {self.path}: "
            f"{', '.join(matches)}; pass --name HOST to say which one this is")

    def _find_named(self, name: str) -> Host:
        try:
            wanted = parse_host(name).name
        except ConfigError as e:
            raise ConfigError(f"--name {name!r}: {e.message}") from None
        for host in self.hosts():
            if host.name == wanted:
                return host
        raise ConfigError(
            f"host {wanted!r} is in no set of {self.path}; HOSTS lists: {self._host_list()}")

    def _host_list(self) -> str:
        return ", ".join(h.name for h in self.hosts()) or "(none)"


def set_for(path: bytes, sets: Iterable[MirrorSet]) -> MirrorSet | None:
    """The set that holds a logical path, of ``sets``; None when none does.

    This is the one rule by which every part of omirrord (watcher, indexer, scanner,
    pusher, content server, receiver, ``sync``, ``--check``) decides where a path
    belongs. A set holds a path that is below one of its roots and that it does not
    exclude; of several, the one with the deepest root wins (a set nested in another
    is more specific), and between equals the first written. So with
    ``www: /data except /data/cache`` and ``cached: /data/cache``, ``/data/cache/x``
    belongs to ``cached``, and ``/data/y`` to ``www``. Given the sets a host shares
    with one peer, it says whether a path may go to that peer, or come from it.
    """
    best: MirrorSet | None = None
    depth = -1
    for mset in sets:
        root = mset.root_of(path)
        if root is None or len(root) <= depth or mset.is_excluded(path):
            continue
        best, depth = mset, len(root)
    return best


def _dir_prefix(path: str) -> str:
    """``/srv/www`` -> ``/srv/www/``: what every path strictly under it starts with."""
    return path if path.endswith("/") else path + "/"


def _local_names() -> set[str]:
    """The names this machine answers to, lower-cased, as HOSTS entries would spell them."""
    hostname = socket.gethostname()
    names = {hostname, hostname.split(".", 1)[0], socket.getfqdn()}
    return {n.lower() for n in names if n}


# --------------------------------------------------------------------------- hosts


def parse_host(word: str, filename: str = "<string>", line: int = 0, col: int = 0) -> Host:
    """Parse ``[user@]host[:port]`` or ``[user@][v6addr][:port]`` into a :class:`Host`.

    The user is kept for connecting but is not part of the identity: ``me@beta`` and
    ``beta`` are the same peer.
    """

    def fail(reason: str) -> NoReturn:
        """Every error names the whole entry and the form expected; ``_ipv6`` and ``_port``
        report through it too."""
        raise ConfigError(f"bad host entry {word!r}: {reason}; expected [user@]host[:port]",
                          filename, line, col)

    user_text, at, rest = word.rpartition("@")
    user: str | None = None
    if at:
        if not _USER.match(user_text):
            fail(f"bad user name {user_text!r}")
        user = user_text
    if rest.startswith("["):
        inside, bracket, tail = rest[1:].partition("]")
        if not bracket:
            fail("missing ']' after the IPv6 address")
        if tail and not tail.startswith(":"):
            fail("expected ':port' after ']'")
        address = _ipv6(inside, fail)
        port = _port(tail[1:], fail) if tail else DEFAULT_PORT
    elif rest.count(":") > 1:
        address, port = _ipv6(rest, fail), DEFAULT_PORT
    else:
        address, colon, port_text = rest.partition(":")
        port = _port(port_text, fail) if colon else DEFAULT_PORT
        if not address:
            fail("empty host name")
        if not _HOSTNAME.match(address):
            fail("a host name is letters, digits, '.', '-' and '_'")
        address = address.lower()
    shown = f"[{address}]" if ":" in address else address
    name = shown if port == DEFAULT_PORT else f"{shown}:{port}"
    return Host(name=name, address=address, port=port, user=user)


def _ipv6(text: str, fail: Callable[[str], NoReturn]) -> str:
    if not text:
        fail("empty host name")
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        fail(f"{text!r} is not an IPv6 address")


def _port(text: str, fail: Callable[[str], NoReturn]) -> int:
    if not _PORT.match(text):
        fail(f"port {text!r} is not a number")
    digits = text.lstrip("0") or "0"
    port = int(digits) if len(digits) <= 5 else 65536  # int() of 5,000 digits would raise
    if not 1 <= port <= 65535:
        fail(f"port {port} is out of range 1-65535")
    return port


# --------------------------------------------------------------------------- files


def check_file_safety(path: str | os.PathLike[str], what: str = "config file") -> None:
    """Refuse a file that someone other than root or this daemon's user could change.

    Whoever can write the Distfile or the peers file decides what is mirrored and who
    may connect, so such a file is as good as root access (omirr's README asked the same).
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"cannot read {what}: {e.strerror}", os.fspath(path)) from None
    _check_stat(st, os.fspath(path), what)


def read_checked_file(path: str | os.PathLike[str], what: str = "config file") -> str:
    """Read a file as UTF-8 after :func:`check_file_safety`'s checks, on the same open file.

    Checking the descriptor that is read (not the name, then opening it again) leaves no
    window for the file to be swapped in between.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise ConfigError(f"cannot read {what}: {e.strerror}", name) from None
    try:
        _check_stat(os.fstat(fd), name, what)
        data = _read_all(fd)
    finally:
        os.close(fd)
    return _decode(data, name)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _check_stat(st: os.stat_result, name: str, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} is not a regular file", name)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise ConfigError(
            f"{what} is group- or world-writable (mode {mode:04o}): whoever can write it "
            f"decides what this daemon does; run: chmod go-w {name}", name)
    euid = os.geteuid()
    if st.st_uid not in (0, euid):
        raise ConfigError(
            f"{what} is owned by uid {st.st_uid}, not by root or by this daemon's user "
            f"(uid {euid}); run: chown root {name}", name)


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        col = len(data[line_start:e.start].decode("utf-8", "replace")) + 1
        raise ConfigError(f"not UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8",
                          name, line, col) from None


def load(path: str | os.PathLike[str]) -> Config:
    """Read, check and parse a Distfile."""
    name = os.fspath(path)
    return parse(read_checked_file(name, "config file"), name)


def parse(text: str, filename: str = "<string>") -> Config:
    """Parse Distfile text; every error is a :class:`ConfigError` with its position."""
    return _Parser(_tokenize(text, filename), filename).parse_file()


# --------------------------------------------------------------------------- lexer


class _T(enum.Enum):
    WORD = "word"
    STRING = "string"
    LPAREN = "("
    RPAREN = ")"
    EQUALS = "="
    SEMI = ";"
    ARROW = "->"
    COLON = ":"
    DCOLON = "::"
    OP = "operator"
    EOF = "end of file"


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _T
    text: str
    line: int
    col: int

    def describe(self) -> str:
        """How an error message names this token after "found"."""
        if self.kind is _T.EOF:
            return "end of file"
        if self.kind is _T.STRING:
            return f'the string "{self.text}"'
        return f"'{self.text}'"


_SPACE = " \t\r\f\v"
_WORD_STOP = _SPACE + '()=;"#'
_PUNCT = {"(": _T.LPAREN, ")": _T.RPAREN, "=": _T.EQUALS, ";": _T.SEMI}


def _tokenize(text: str, filename: str) -> list[_Token]:
    """Split the text into tokens, each with its 1-based line and column."""
    tokens: list[_Token] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        _tokenize_line(line, lineno, filename, tokens)
    tokens.append(_Token(_T.EOF, "", *_end_position(text)))
    return tokens


def _end_position(text: str) -> tuple[int, int]:
    """Just after the last character of the last non-empty line, where "end of file" is shown."""
    lines = text.rstrip("\r\n").split("\n")
    return len(lines), len(lines[-1].rstrip("\r")) + 1


def _tokenize_line(line: str, lineno: int, filename: str, out: list[_Token]) -> None:
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c in _SPACE:
            i += 1
        elif c == "#":
            return
        elif c in _PUNCT:
            out.append(_Token(_PUNCT[c], c, lineno, i + 1))
            i += 1
        elif c == '"':
            i = _string(line, i, lineno, filename, out)
        elif line.startswith("->", i):
            out.append(_Token(_T.ARROW, "->", lineno, i + 1))
            i += 2
        elif c in "-+&" and (i + 1 == n or line[i + 1] in _SPACE + "("):
            out.append(_Token(_T.OP, c, lineno, i + 1))
            i += 1
        else:
            i = _word(line, i, lineno, out)


def _string(line: str, start: int, lineno: int, filename: str, out: list[_Token]) -> int:
    """A double-quoted string; only ``\\"`` and ``\\\\`` are escapes, so regexes read as written."""
    chars: list[str] = []
    i = start + 1
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line) and line[i + 1] in '"\\':
            chars.append(line[i + 1])
            i += 2
        elif c == '"':
            out.append(_Token(_T.STRING, "".join(chars), lineno, start + 1))
            return i + 1
        else:
            chars.append(c)
            i += 1
    raise ConfigError("unterminated string: expected '\"' before the end of the line",
                      filename, lineno, start + 1)


def _word(line: str, start: int, lineno: int, out: list[_Token]) -> int:
    """A word; a trailing ``:`` or ``::`` is split off as the label or timestamp token."""
    i = start
    while i < len(line) and line[i] not in _WORD_STOP and not line.startswith("->", i):
        i += 1
    word = line[start:i]
    for suffix, kind in (("::", _T.DCOLON), (":", _T.COLON)):
        if word.endswith(suffix):
            if len(word) > len(suffix):
                out.append(_Token(_T.WORD, word[:-len(suffix)], lineno, start + 1))
            out.append(_Token(kind, suffix, lineno, start + len(word) - len(suffix) + 1))
            return i
    out.append(_Token(_T.WORD, word, lineno, start + 1))
    return i


# --------------------------------------------------------------------------- parser


@dataclass(frozen=True, slots=True)
class _Item:
    """One value of a list, with where it was written (for errors about that value)."""

    text: str
    line: int
    col: int


class _Parser:
    """Recursive descent over the token list; variables are expanded as they are read."""

    def __init__(self, tokens: list[_Token], filename: str) -> None:
        self.tokens = tokens
        self.pos = 0
        self.filename = filename
        self.variables: dict[str, list[_Item]] = {}
        self.sets: list[MirrorSet] = []
        self.labels: dict[str, _Token] = {}

    # -- helpers

    def peek(self, ahead: int = 0) -> _Token:
        """Past the end it keeps returning the EOF token, so lookahead needs no bounds check."""
        return self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]

    def advance(self) -> _Token:
        """Never moves past EOF: a loop that looks for ';' meets EOF and reports it."""
        token = self.peek()
        self.pos = min(self.pos + 1, len(self.tokens) - 1)
        return token

    def fail(self, message: str, line: int, col: int) -> NoReturn:
        """Every parse error goes through here, so each carries ``file:line:col``."""
        raise ConfigError(message, self.filename, line, col)

    def fail_at(self, token: _Token | _Item, message: str) -> NoReturn:
        """Point at where the token or value was written, not where the parser is now."""
        self.fail(message, token.line, token.col)

    # -- statements

    def parse_file(self) -> Config:
        """The whole file; one without a block is an error, since it would mirror nothing."""
        while self.peek().kind is not _T.EOF:
            self.statement()
        if not self.sets:
            self.fail_at(self.peek(), "no mirror set: expected a block like "
                                      "'${FILES} -> ${HOSTS} install ;', found end of file")
        return Config(path=self.filename, sets=tuple(self.sets))

    def statement(self) -> None:
        """A definition or a block, told apart by the token after the first (``=``, ``:``)."""
        token, following = self.peek(), self.peek(1)
        if token.kind is _T.WORD and following.kind is _T.EQUALS:
            self.definition()
        elif token.kind is _T.WORD and following.kind is _T.COLON:
            self.block(self.label())
        elif token.kind in (_T.WORD, _T.STRING, _T.LPAREN):
            self.block(None)
        else:
            self.fail_at(token, f"found {token.describe()}, expected a variable definition "
                                "'NAME = ( ... )' or a block '${FILES} -> ${HOSTS} install ;'")

    def definition(self) -> None:
        """``NAME = expression``, expanded now: defining NAME again changes only what follows."""
        name = self.advance()
        if not _NAME.match(name.text):
            self.fail_at(name, f"bad variable name '{name.text}': expected letters, digits "
                               "and '_', not starting with a digit")
        self.advance()  # '='
        items, _ = self.expression("after '='")
        self.variables[name.text] = items

    def label(self) -> _Token:
        """A block's ``label:``, used once per file: it is how logs name the set."""
        token = self.advance()
        self.advance()  # ':'
        if not _LABEL.match(token.text):
            self.fail_at(token, f"bad label '{token.text}': expected letters, digits, "
                                "'.', '-' and '_'")
        if token.text in self.labels:
            first = self.labels[token.text]
            self.fail_at(token, f"label '{token.text}' is already used at "
                                f"{first.line}:{first.col}")
        self.labels[token.text] = token
        return token

    def block(self, label: _Token | None) -> None:
        """``files -> hosts`` and its commands; rdist's ``::`` is refused, ``install`` required."""
        start = label or self.peek()
        file_items, files_at = self.expression("as the file list of a block")
        arrow = self.peek()
        if arrow.kind is _T.DCOLON:
            self.fail_at(arrow, "rdist's '::' (copy if newer than a timestamp file) is not "
                                "supported: omirror mirrors continuously; use '->'")
        if arrow.kind is not _T.ARROW:
            self.fail_at(arrow, f"found {arrow.describe()}, expected '->' after the file list")
        self.advance()
        host_items, hosts_at = self.expression("after '->'")
        files = self.files(file_items, files_at)
        hosts = self.hosts(host_items, hosts_at)
        rules = _Rules()
        while self.at_command():
            self.command(rules, files)
        if not rules.installed:
            self.fail_at(start, "this block has no install command: expected 'install ;' "
                                "after the host list")
        self.sets.append(MirrorSet(
            label=label.text if label else None, files=files, hosts=hosts,
            options=rules.options(), excepts=tuple(_unique(rules.excepts)),
            except_pats=tuple(_unique(rules.except_pats)), specials=tuple(rules.specials),
            line=start.line))
        self.check_specials(self.sets[-1], rules)

    def files(self, items: list[_Item], at: _Token) -> tuple[str, ...]:
        """Refuses a path inside another of the same list; across blocks, :func:`set_for`
        decides instead."""
        if not items:
            self.fail_at(at, "the file list is empty: expected absolute paths")
        paths: dict[str, _Item] = {}
        for item in items:
            paths.setdefault(self.absolute(item, "FILES path"), item)
        for path, item in paths.items():
            for other in paths:
                if other != path and path.startswith(_dir_prefix(other)):
                    self.fail_at(item, f"FILES path {path} is inside {other}, also in this "
                                       f"block's file list: list only {other}")
        return tuple(paths)

    def hosts(self, items: list[_Item], at: _Token) -> tuple[Host, ...]:
        """An identity listed twice is kept once, as first written (with that entry's user)."""
        if not items:
            self.fail_at(at, "HOSTS list is empty: expected host entries [user@]host[:port]")
        hosts: dict[str, Host] = {}
        for item in items:
            host = parse_host(item.text, self.filename, item.line, item.col)
            hosts.setdefault(host.name, host)
        return tuple(hosts.values())

    def absolute(self, item: _Item, what: str) -> str:
        """Check and normalise a path: absolute, no ``..`` (it would escape the tree)."""
        text = item.text
        if not text.startswith("/"):
            self.fail_at(item, f"{what} '{text}' is not absolute: expected a path starting "
                               "with '/'")
        if ".." in text.split("/"):
            self.fail_at(item, f"{what} '{text}' has a '..' component: expected a plain "
                               "absolute path")
        if "\0" in text:
            self.fail_at(item, f"{what} '{text}' contains a NUL character")
        return "/" + posixpath.normpath(text).lstrip("/")

    # -- commands

    def at_command(self) -> bool:
        """True when the next token starts a command rather than the next statement."""
        token, following = self.peek(), self.peek(1)
        return (token.kind is _T.WORD and _NAME.match(token.text) is not None
                and following.kind not in (_T.EQUALS, _T.COLON, _T.ARROW, _T.DCOLON, _T.OP))

    def command(self, rules: _Rules, files: tuple[str, ...]) -> None:
        """Only :data:`COMMANDS`; any other rdist command is an error naming those."""
        name = self.advance()
        if name.text == "install":
            self.install(name, rules)
        elif name.text == "except":
            for item in self.arguments(name, "a path"):
                rules.excepts.append(self.absolute(item, "except path"))
        elif name.text == "except_pat":
            for item in self.arguments(name, "a regular expression"):
                rules.except_pats.append(self.regex(item))
        elif name.text in ("special", "cmdspecial"):
            self.special(name, rules, files)
        else:
            self.fail_at(name, f"unknown command '{name.text}'; expected one of "
                               f"{', '.join(COMMANDS)}")

    def install(self, name: _Token, rules: _Rules) -> None:
        """Takes ``-o`` options only: rdist's destination is refused, every peer mirrors the
        same paths."""
        rules.installed = True
        previous = name
        while (token := self.advance()).kind is not _T.SEMI:
            if token.kind is _T.WORD and token.text.startswith("-o"):
                self.install_options(token, rules)
            elif token.kind is _T.WORD and token.text.startswith("-"):
                self.fail_at(token, f"unknown install flag '{token.text}': expected "
                                    "-oOPTION[,OPTION...] or ';'")
            elif token.kind in (_T.WORD, _T.STRING, _T.LPAREN) and token.line == previous.line:
                self.fail_at(token, "install takes no destination: every peer mirrors "
                                    "the same paths; expected ';'")
            else:  # on a later line: the next command or block, so the ';' was forgotten
                self.fail_at(token, f"found {token.describe()}, expected ';' to end the "
                                    "install command")
            previous = token

    def install_options(self, token: _Token, rules: _Rules) -> None:
        """Several ``-o`` words add up; an unknown or empty option is an error."""
        for option in token.text[2:].split(","):
            if option not in INSTALL_OPTIONS:
                shown = f"'{option}'" if option else "an empty option"
                self.fail_at(token, f"unknown install option {shown}; expected "
                                    f"{', '.join(INSTALL_OPTIONS)}")
            rules.flags.add(option)
        if {"noxattrs", "securityxattrs"} <= rules.flags:
            self.fail_at(token, "install options noxattrs and securityxattrs contradict "
                                "each other; keep one")

    def arguments(self, name: _Token, what: str) -> list[_Item]:
        """The values of a command up to its ';' (words, strings, lists, ${NAME}s).

        A value that is a command name means the ';' was forgotten, so it is reported as
        that rather than as a bad path.
        """
        items: list[_Item] = []
        written = False
        while (token := self.peek()).kind is not _T.SEMI:
            if token.kind not in (_T.WORD, _T.STRING, _T.LPAREN) or token.text in COMMANDS:
                self.fail_at(token, f"found {token.describe()}, expected ';' to end the "
                                    f"{name.text} command")
            items += self.expression(f"after {name.text}")[0]
            written = True
        if not written:
            self.fail_at(token, f"found ';', expected {what} after {name.text}")
        self.advance()
        return items

    def regex(self, item: _Item) -> str:
        """Compiled here so that a bad pattern is reported where it was written."""
        try:
            re.compile(item.text)
        except re.error as e:
            self.fail_at(item, f"bad regular expression '{item.text}': {e}")
        return item.text

    def special(self, name: _Token, rules: _Rules, files: tuple[str, ...]) -> None:
        """``special`` and ``cmdspecial``: without a path, every path of the set; a path
        must lie in the block's FILES, since one outside could never match and would be
        silently ignored. The command must be quoted (it is the shell's text)."""
        paths: list[tuple[str | None, _Item | None]] = [(None, None)]
        if self.peek().kind in (_T.WORD, _T.LPAREN):
            items, _ = self.operand(f"after {name.text}")
            paths = [(self.absolute(item, f"{name.text} path"), item) for item in items]
        for path, item in paths:
            if path is not None and item is not None and not any(
                    path == f or path.startswith(_dir_prefix(f)) for f in files):
                self.fail_at(item, f"{name.text} path {path} is not inside this block's "
                                   f"files ({', '.join(files)}): it could never match")
        command = self.advance()
        if command.kind is not _T.STRING:
            self.fail_at(command, f"found {command.describe()}, expected a quoted shell "
                                  f"command after {name.text}, like \"systemctl reload "
                                  "nginx\"")
        if not command.text.strip():
            self.fail_at(command, f"the {name.text} command is empty")
        self.expect_semi(name)
        for path, item in paths:
            rules.specials.append(Special(path, command.text, name.text == "cmdspecial"))
            if item is not None:
                rules.special_items.append((path or "", item, name.text))

    def check_specials(self, mset: MirrorSet, rules: _Rules) -> None:
        """A special path the block excludes (``except`` may come after it) could never
        match either."""
        for path, item, command in rules.special_items:
            if mset.is_excluded(os.fsencode(path)[1:]):
                self.fail_at(item, f"{command} path {path} is excluded by this block's "
                                   "except or except_pat: it could never match")

    def expect_semi(self, name: _Token) -> None:
        """A missing ';' is reported at the token found instead, naming the command."""
        token = self.advance()
        if token.kind is not _T.SEMI:
            self.fail_at(token, f"found {token.describe()}, expected ';' to end the "
                                f"{name.text} command")

    # -- lists and expressions

    def expression(self, context: str) -> tuple[list[_Item], _Token]:
        """``operand (op operand)*``, left to right: ``-`` difference, ``+`` union, ``&`` both."""
        start = self.peek()
        items, _ = self.operand(context)
        while self.peek().kind is _T.OP:
            op = self.advance()
            right, _ = self.operand(f"after '{op.text}'")
            items = _combine(op.text, items, right)
        return items, start

    def operand(self, context: str) -> tuple[list[_Item], _Token]:
        """A list, word or string, with its first token: where errors about it all point."""
        token = self.peek()
        if token.kind is _T.LPAREN:
            return self.list_(), token
        if token.kind is _T.WORD:
            self.advance()
            return self.expand(token), token
        if token.kind is _T.STRING:
            self.advance()
            return [_Item(token.text, token.line, token.col)], token
        self.fail_at(token, f"found {token.describe()}, expected a list '( ... )', a word "
                            f"or ${{NAME}} {context}")

    def list_(self) -> list[_Item]:
        """``( ... )``: no nested lists; a ``${NAME}`` inside one adds all its words."""
        opened = self.advance()
        items: list[_Item] = []
        while True:
            token = self.advance()
            if token.kind is _T.RPAREN:
                return items
            if token.kind is _T.WORD:
                items += self.expand(token)
            elif token.kind is _T.STRING:
                items.append(_Item(token.text, token.line, token.col))
            else:
                self.fail_at(token, f"expected ')' to close the list opened at "
                                    f"{opened.line}:{opened.col}, found {token.describe()}")

    def expand(self, token: _Token) -> list[_Item]:
        """``${NAME}`` alone is the variable's list; inside a word, its one word."""
        whole = _WHOLE_VAR.match(token.text)
        if whole:
            return list(self.lookup(whole.group(1), token, 0))
        return [_Item(self.substitute(token), token.line, token.col)]

    def substitute(self, token: _Token) -> str:
        """Each ``${NAME}`` in a word must hold one word; bare ``$NAME`` is refused as a
        likely typo, any other ``$`` stays literal."""
        text, i = token.text, 0
        out: list[str] = []
        while (dollar := text.find("$", i)) >= 0:
            out.append(text[i:dollar])
            bare = _BARE_VAR.match(text, dollar)
            if text.startswith("${", dollar):
                close = text.find("}", dollar)
                if close < 0:
                    self.fail(f"unclosed '${{' in '{text}': expected '}}'",
                              token.line, token.col + dollar)
                values = self.lookup(text[dollar + 2:close], token, dollar)
                if len(values) != 1:
                    self.fail(f"${{{text[dollar + 2:close]}}} holds {len(values)} words; only "
                              "a one-word variable can be used inside a word",
                              token.line, token.col + dollar)
                out.append(values[0].text)
                i = close + 1
            elif bare:
                shown = bare.group(1)
                self.fail(f"'${shown}' is not expanded: write ${{{shown}}} (or quote the "
                          "word to keep a literal '$')", token.line, token.col + dollar)
            else:
                out.append("$")
                i = dollar + 1
        out.append(text[i:])
        return "".join(out)

    def lookup(self, name: str, token: _Token, offset: int) -> list[_Item]:
        """One pass: a variable must be defined above its first use."""
        if not _NAME.match(name):
            self.fail(f"bad variable name '{name}' in ${{...}}: expected letters, digits "
                      "and '_'", token.line, token.col + offset)
        if name not in self.variables:
            defined = ", ".join(self.variables) or "none yet"
            self.fail(f"undefined variable ${{{name}}} (defined: {defined})",
                      token.line, token.col + offset)
        return self.variables[name]


@dataclass
class _Rules:
    """What the commands of one block have said so far."""

    installed: bool = False
    flags: set[str] = field(default_factory=set)
    excepts: list[str] = field(default_factory=list)
    except_pats: list[str] = field(default_factory=list)
    specials: list[Special] = field(default_factory=list)
    #: where each special path was written, and by which command: for the check of
    #: the block's exclusions, which may come after it
    special_items: list[tuple[str, _Item, str]] = field(default_factory=list)

    def options(self) -> InstallOptions:
        """``remove`` is dropped here: a mirror always removes what the source lacks."""
        return InstallOptions(**{f: f in self.flags for f in InstallOptions.__dataclass_fields__})


def _combine(op: str, left: list[_Item], right: list[_Item]) -> list[_Item]:
    """rdist's set operators on lists, keeping the left operand's order.

    Values are compared by what they mean, not how they are spelled: ``me@beta:2808``
    and ``beta`` are one host, ``/srv/www/`` and ``/srv/www`` one path.
    """
    right_keys = {_identity(item.text) for item in right}
    if op == "-":
        return [item for item in left if _identity(item.text) not in right_keys]
    if op == "&":
        return [item for item in left if _identity(item.text) in right_keys]
    left_keys = {_identity(item.text) for item in left}
    return left + [item for item in right if _identity(item.text) not in left_keys]


def _identity(text: str) -> str:
    """The value a list item stands for: a normalised path or a host identity, else itself."""
    if text.startswith("/"):
        return "/" + posixpath.normpath(text).lstrip("/")
    try:
        return parse_host(text).name
    except ConfigError:
        return text


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))
