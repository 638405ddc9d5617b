"""The Distfile parser: what it accepts, what it refuses, and where it says the error is."""

from __future__ import annotations

import os
import socket

import pytest

from omirror import config
from omirror.config import (
    Config,
    Host,
    InstallOptions,
    MirrorSet,
    Special,
    check_file_safety,
    load,
    parse,
    parse_host,
)
from omirror.errors import ConfigError

BLOCK = "${FILES} -> ${HOSTS}\n\tinstall ;\n"


def h(name: str, address: str | None = None, port: int = 2808, user: str | None = None) -> Host:
    return Host(name=name, address=address or name, port=port, user=user)


# --------------------------------------------------------------------------- good files

GOOD = [
    pytest.param(
        "# comment\nHOSTS = ( alpha beta:2808 gamma )\nFILES = ( /srv/www /etc/nginx )\n"
        + BLOCK + "\texcept /srv/www/cache ;\n\texcept_pat ( \\.swp$ ~$ ) ;\n",
        [dict(files=("/srv/www", "/etc/nginx"), hosts=(h("alpha"), h("beta"), h("gamma")),
              excepts=("/srv/www/cache",), except_pats=(r"\.swp$", "~$"), line=4)],
        id="design-example"),
    pytest.param(
        "( /a ) -> ( me@alpha beta:2809 [::1]:2810 [fe80::0001] 10.0.0.1:22 ) install ;",
        [dict(hosts=(h("alpha", user="me"), h("beta:2809", "beta", 2809),
                     h("[::1]:2810", "::1", 2810), h("[fe80::1]", "fe80::1"),
                     h("10.0.0.1:22", "10.0.0.1", 22)))],
        id="host-entries"),
    pytest.param(
        "( /a ) -> ( alpha ALPHA:2808 x@alpha beta ) install ;",
        [dict(hosts=(h("alpha"), h("beta")))],
        id="hosts-deduplicated-by-identity"),
    pytest.param(
        "( /srv/www/ //srv//log/./x /srv/www /etc ) -> a install ;",
        [dict(files=("/srv/www", "/srv/log/x", "/etc"))],
        id="files-normalised-and-deduplicated"),
    pytest.param(
        "( /a ) -> a install -onochkowner,nochkgroup -onochkmode -oignlnks,savetargets,"
        "follow,remove ;",
        [dict(options=InstallOptions(True, True, True, True, True, True))],
        id="all-install-options"),
    pytest.param(
        "( /a ) -> a install -onoxattrs ;\n( /b ) -> a install -osecurityxattrs ;",
        [dict(options=InstallOptions(noxattrs=True)),
         dict(options=InstallOptions(securityxattrs=True))],
        id="xattr-options"),
    pytest.param(
        "( /a ) -> a install ;",
        [dict(options=InstallOptions(), label=None, excepts=(), except_pats=(), specials=())],
        id="minimal-block"),
    pytest.param(
        "www: ( /srv/www ) -> ( a b ) install ;\n"
        "etc : ( /etc/nginx ) -> ( b c ) install -onochkmode ;\n"
        "( /opt ) -> ( a c ) install ;\n",
        [dict(label="www", hosts=(h("a"), h("b")), line=1),
         dict(label="etc", files=("/etc/nginx",), hosts=(h("b"), h("c")),
              options=InstallOptions(nochkmode=True), line=2),
         dict(label=None, files=("/opt",), hosts=(h("a"), h("c")), line=3)],
        id="several-blocks-with-differing-hosts"),
    pytest.param(
        "ALL = ( a b c d )\n( /x ) -> ${ALL} - ( b d ) install ;",
        [dict(hosts=(h("a"), h("c")))],
        id="difference"),
    pytest.param(
        "( /x ) -> ( a b ) + ( b c ) + d install ;",
        [dict(hosts=(h("a"), h("b"), h("c"), h("d")))],
        id="union"),
    pytest.param(
        "( /x ) -> ( a b c ) & ( c a z ) install ;",
        [dict(hosts=(h("a"), h("c")))],
        id="intersection"),
    pytest.param(
        "( /x ) -> ( a b c ) - ( a ) + ( z ) & ( z b ) install ;",
        [dict(hosts=(h("b"), h("z")))],
        id="operators-left-to-right"),
    pytest.param(
        "ALL = ( me@a:2808 b:2809 c )\n( /x ) -> ${ALL} - ( a b:2809 ) install ;",
        [dict(hosts=(h("c"),))],
        id="difference-compares-identities"),
    pytest.param(
        "F = ( /a /b /c )\nG = ${F} - /b\n${G} -> h install ;",
        [dict(files=("/a", "/c"))],
        id="variable-defined-by-expression"),
    pytest.param(
        "ROOT = /srv\nSUB = ( ${ROOT}/www ${ROOT}/log )\n${SUB} -> h install ;"
        " except ${ROOT}/www/cache ;",
        [dict(files=("/srv/www", "/srv/log"), excepts=("/srv/www/cache",))],
        id="embedded-variable"),
    pytest.param(
        'P = ( "\\.(tmp|bak)$" )\n( /a ) -> h install ;\n'
        '  except_pat ${P} "^/a/(x|y)/" \\.swp$ "a\\"b" ;',
        [dict(except_pats=(r"\.(tmp|bak)$", "^/a/(x|y)/", r"\.swp$", 'a"b'))],
        id="quoted-regexes"),
    pytest.param(
        "( /a ) -> h install ; except_pat $ \"a$b\" ^/a/$ x$1 ;",
        [dict(except_pats=("$", "a$b", "^/a/$", "x$1"))],
        id="dollar-not-before-a-name-is-literal"),
    pytest.param(
        '( /a ) -> h install ; special "echo \\\\ $HOME" ; '
        'special ( /a/x /a/y ) "reload" ; special /a/z "z" ;',
        [dict(specials=(Special(None, "echo \\ $HOME"), Special("/a/x", "reload"),
                        Special("/a/y", "reload"), Special("/a/z", "z")))],
        id="specials"),
    pytest.param(
        '( /a /b ) -> h install ; cmdspecial "reindex" ; '
        'cmdspecial ( /a/x /b ) "make -C /b" ; special /a/y "one" ;',
        [dict(specials=(Special(None, "reindex", True), Special("/a/x", "make -C /b", True),
                        Special("/b", "make -C /b", True), Special("/a/y", "one")))],
        id="cmdspecials"),
    pytest.param(
        '( /a ) -> h install ; except /a/cache ; special ( /a /a/cachet ) "x" ;',
        [dict(specials=(Special("/a", "x"), Special("/a/cachet", "x")))],
        id="special-beside-an-excluded-path"),
    pytest.param(
        "F=(/a)\nH=(x y)\n${F}->${H} install;except /a/b;",
        [dict(files=("/a",), hosts=(h("x"), h("y")), excepts=("/a/b",))],
        id="no-spaces-needed"),
    pytest.param(
        '( "/with space" "/lit${X}" ) -> h install ;',
        [dict(files=("/with space", "/lit${X}"))],
        id="quoted-words-are-literal"),
    pytest.param(
        "E = ( )\n( /a ) -> h install ; except ${E} ; except_pat ${E} ;",
        [dict(excepts=(), except_pats=())],
        id="empty-variable-in-command"),
    pytest.param(
        "( /a ) -> h install ; except /a/x /a/x/ ( /a/y ) ;\r\n",
        [dict(excepts=("/a/x", "/a/y"))],
        id="excepts-deduplicated-crlf"),
]


@pytest.mark.parametrize("text, expected", GOOD)
def test_good_files(text: str, expected: list[dict[str, object]]) -> None:
    cfg = parse(text, "omirrd.conf")
    assert cfg.path == "omirrd.conf"
    assert len(cfg.sets) == len(expected)
    for mirror_set, fields in zip(cfg.sets, expected):
        for name, value in fields.items():
            assert getattr(mirror_set, name) == value, name


# --------------------------------------------------------------------------- bad files

BAD = [
    pytest.param("HOSTS = ( a b ;\n", 1, 15,
                 "expected ')' to close the list opened at 1:9, found ';'", id="unclosed-list"),
    pytest.param("X = 1\nHOSTS = ( a b\n\n# trailing\n", 4, 11,
                 "expected ')' to close the list opened at 2:9, found end of file",
                 id="unclosed-list-at-eof"),
    pytest.param('X = "abc\n', 1, 5, "unterminated string", id="unterminated-string"),
    pytest.param("( /a ) ( b )\n", 1, 8, "found '(', expected '->'", id="missing-arrow"),
    pytest.param("( /a ) :: stamp\n", 1, 8, "not supported", id="rdist-timestamp-form"),
    pytest.param("( /a ) -> ( b c )\n  except /a/b ;\n", 1, 1, "expected 'install ;'",
                 id="no-install"),
    pytest.param("x: ( /a ) -> ( b c )\n", 1, 1, "expected 'install ;'",
                 id="no-install-labelled"),
    pytest.param("H = ( )\n( /a ) -> ${H} install ;\n", 2, 11, "HOSTS list is empty",
                 id="empty-hosts-variable"),
    pytest.param("( /a ) ->\n  ( ) install ;\n", 2, 3, "HOSTS list is empty",
                 id="empty-hosts-list"),
    pytest.param("F = ( /a )\n${F} - ( /a ) -> h install ;\n", 2, 1, "file list is empty",
                 id="empty-file-list"),
    pytest.param("FILES = ( /ok www )\n${FILES} -> h install ;\n", 1, 15,
                 "FILES path 'www' is not absolute", id="relative-file"),
    pytest.param("( /a/../etc ) -> h install ;", 1, 3, "'..' component", id="dotdot-file"),
    pytest.param("( /a /a/b ) -> h install ;", 1, 6, "/a/b is inside /a", id="nested-files"),
    pytest.param("( /a ) -> ( b c:0 ) install ;", 1, 15, "port 0 is out of range",
                 id="port-zero"),
    pytest.param("( /a ) -> ( c:65536 ) install ;", 1, 13, "out of range", id="port-too-big"),
    pytest.param("( /a ) -> ( c:ssh ) install ;", 1, 13, "port 'ssh' is not a number",
                 id="port-not-numeric"),
    pytest.param("( /a ) -> ( me@:22 ) install ;", 1, 13, "empty host name", id="empty-host"),
    pytest.param("( /a ) -> ( b!d ) install ;", 1, 13, "bad host entry 'b!d'",
                 id="bad-host-char"),
    pytest.param("( /a ) -> ( [::1 ) install ;", 1, 13, "missing ']'", id="bad-ipv6"),
    pytest.param("( /a ) -> ${HOSTS} install ;", 1, 11, "undefined variable ${HOSTS}",
                 id="undefined-variable"),
    pytest.param("( ${ROOT}/x ) -> h install ;", 1, 3, "undefined variable ${ROOT}",
                 id="undefined-embedded"),
    pytest.param("R = ( /a /b )\n( /x${R}/y ) -> h install ;", 2, 5, "holds 2 words",
                 id="embedded-list-variable"),
    pytest.param("( $ROOT/x ) -> h install ;", 1, 3, "write ${ROOT}", id="dollar-no-braces"),
    pytest.param("( /x/${R ) -> h install ;", 1, 6, "unclosed '${'", id="unclosed-brace"),
    pytest.param("( /a ) -> h install -onochkowner,bogus ;", 1, 21,
                 "unknown install option 'bogus'; expected nochkowner", id="unknown-option"),
    pytest.param("( /a ) -> h install -onoxattrs -osecurityxattrs ;", 1, 32,
                 "noxattrs and securityxattrs contradict", id="xattr-options-contradict"),
    pytest.param("( /a ) -> h install -b ;", 1, 21, "unknown install flag '-b'",
                 id="unknown-flag"),
    pytest.param("( /a ) -> h install /dest ;", 1, 21, "install takes no destination",
                 id="install-destination"),
    pytest.param("( /a ) -> h install\n  except /a/b ;", 2, 3,
                 "found 'except', expected ';'", id="install-missing-semicolon"),
    pytest.param("( /a ) -> h install ;\n except /a/b\n except_pat x ;", 3, 2,
                 "found 'except_pat', expected ';'", id="except-missing-semicolon"),
    pytest.param("( /a ) -> h install ;\n except /a/b", 2, 13,
                 "found end of file, expected ';'", id="missing-semicolon-at-eof"),
    pytest.param("( /a ) -> h install ; except a/b ;", 1, 30, "except path 'a/b' is not absolute",
                 id="relative-except"),
    pytest.param("( /a ) -> h install ; except ;", 1, 30, "expected a path after except",
                 id="except-without-path"),
    pytest.param('( /a ) -> h install ; except_pat ok "(x" ;', 1, 37,
                 "bad regular expression '(x': missing ), unterminated subpattern",
                 id="bad-regex"),
    pytest.param("( /a ) -> h install ; special /a/x ;", 1, 36,
                 "expected a quoted shell command", id="special-without-command"),
    pytest.param("( /a ) -> h install ; cmdspecial /a/x ;", 1, 39,
                 "expected a quoted shell command after cmdspecial",
                 id="cmdspecial-without-command"),
    pytest.param("( /a ) -> h install ; cmdspecial /a/x reindex ;", 1, 39,
                 "found 'reindex', expected a quoted shell command",
                 id="cmdspecial-unquoted-command"),
    pytest.param('( /a ) -> h install ; cmdspecial "  " ;', 1, 34,
                 "the cmdspecial command is empty", id="cmdspecial-empty-command"),
    pytest.param('( /srv/www ) -> h install ;\n  special /srv/wwwx "reload" ;', 2, 11,
                 "special path /srv/wwwx is not inside this block's files (/srv/www): it "
                 "could never match", id="special-outside-files"),
    pytest.param('( /a /b ) -> h install ;\n  cmdspecial ( /a/x / ) "r" ;', 2, 21,
                 "cmdspecial path / is not inside this block's files (/a, /b)",
                 id="cmdspecial-outside-files"),
    pytest.param('( /a ) -> h install ;\n special /a/c/x "r" ;\n except /a/c ;', 2, 10,
                 "special path /a/c/x is excluded by this block's except or except_pat",
                 id="special-excluded"),
    pytest.param('( /a ) -> h install ; except_pat "\\.tmp$" ;\n cmdspecial /a/x.tmp "r" ;',
                 2, 13, "cmdspecial path /a/x.tmp is excluded", id="cmdspecial-excluded"),
    pytest.param("( /a ) -> h install ;\n  excpet /a/x ;", 2, 3,
                 "unknown command 'excpet'; expected one of install, except, except_pat, "
                 "special, cmdspecial", id="unknown-command"),
    pytest.param("# nothing\nX = ( a )\n", 2, 10, "no mirror set", id="no-block"),
    pytest.param("", 1, 1, "no mirror set", id="empty-file"),
    pytest.param("( /a ) -> h install ;\n) x", 2, 1, "found ')', expected a variable definition",
                 id="unexpected-token"),
    pytest.param("( /a ) ->", 1, 10, "found end of file, expected a list", id="eof-after-arrow"),
    pytest.param("9X = ( a )\n", 1, 1, "bad variable name '9X'", id="bad-variable-name"),
    pytest.param("x: ( /a ) -> h install ;\nx: ( /b ) -> h install ;", 2, 1,
                 "label 'x' is already used at 1:1", id="duplicate-label"),
]


@pytest.mark.parametrize("text, line, col, fragment", BAD)
def test_bad_files(text: str, line: int, col: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(text, "omirrd.conf")
    assert (e.value.filename, e.value.line, e.value.col) == ("omirrd.conf", line, col)
    assert fragment in e.value.message
    assert str(e.value).startswith(f"omirrd.conf:{line}:{col}: ")


def test_error_reads_file_line_col_found_expected() -> None:
    with pytest.raises(ConfigError, match=r"^omirrd\.conf:7:12: expected '\)' to close the "
                                          r"list opened at 7:3, found ';'$"):
        parse("\n" * 6 + "  ( /srv/w ; ) -> h install ;", "omirrd.conf")


# --------------------------------------------------------------------------- hosts


@pytest.mark.parametrize("word, expected", [
    pytest.param("beta", h("beta"), id="plain"),
    pytest.param("beta:2808", h("beta"), id="default-port-dropped"),
    pytest.param("root@Beta.Example.COM:22",
                 h("beta.example.com:22", "beta.example.com", 22, "root"),
                 id="user-port-lowercased"),
    pytest.param("[::1]:2809", h("[::1]:2809", "::1", 2809), id="ipv6-port"),
    pytest.param("::1", h("[::1]", "::1"), id="ipv6-bare"),
    pytest.param("u@[::1]", h("[::1]", "::1", user="u"), id="ipv6-user"),
])
def test_parse_host(word: str, expected: Host) -> None:
    assert parse_host(word) == expected


@pytest.mark.parametrize("word, fragment", [
    pytest.param("beta:", "port '' is not a number", id="empty-port"),
    pytest.param("beta:-1", "not a number", id="negative-port"),
    pytest.param("beta:" + "9" * 5000, "out of range", id="huge-port"),
    pytest.param(":2808", "empty host name", id="no-host"),
    pytest.param("-oProxyCommand=x@h", "bad user name", id="option-as-user"),
    pytest.param("[::1]x", "expected ':port' after ']'", id="junk-after-bracket"),
    pytest.param("[nope]:1", "not an IPv6 address", id="not-ipv6"),
    pytest.param("a..b/c", "host name is letters", id="slash"),
])
def test_parse_host_errors_point_at_the_word(word: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_host(word, "f.conf", 3, 7)
    assert (e.value.filename, e.value.line, e.value.col) == ("f.conf", 3, 7)
    assert fragment in e.value.message


# --------------------------------------------------------------------------- MirrorSet


@pytest.fixture
def www() -> MirrorSet:
    return parse("( /srv/www /etc/nginx ) -> ( a b:2809 me@c ) install ;\n"
                 "  except /srv/www/cache /etc/nginx/secret.key ;\n"
                 '  except_pat \\.swp$ "(^|/)\\.git/" ;\n').sets[0]


@pytest.mark.parametrize("path, excluded", [
    (b"srv/www/index.html", False),
    (b"srv/www/cache", True),
    (b"srv/www/cache/a/b", True),
    (b"srv/www/cachex", False),
    (b"etc/nginx/secret.key", True),
    (b"srv/www/a.swp", True),
    (b"srv/www/a.swp.txt", False),
    (b"srv/www/.git/config", True),
    (b"srv/www/x.git/config", False),
    (b"srv/www/caf\xe9.swp", True),  # not UTF-8: still matched, never a crash
])
def test_is_excluded(www: MirrorSet, path: bytes, excluded: bool) -> None:
    assert www.is_excluded(path) is excluded


def test_except_of_root_excludes_everything() -> None:
    s = parse("( /a ) -> h install ; except / ;").sets[0]
    assert s.is_excluded(b"a/x") and s.is_excluded(b"")


@pytest.mark.parametrize("path, root", [
    (b"srv/www", "/srv/www"),
    (b"srv/www/x/y", "/srv/www"),
    (b"etc/nginx/nginx.conf", "/etc/nginx"),
    (b"srv/wwwx", None),
    (b"srv", None),
    (b"etc", None),
])
def test_root_of(www: MirrorSet, path: bytes, root: str | None) -> None:
    assert www.root_of(path) == root


def test_hosts_and_peers(www: MirrorSet) -> None:
    assert www.has_host("b:2809") and not www.has_host("b")
    assert [p.name for p in www.peers_of("a")] == ["b:2809", "c"]
    assert [p.name for p in www.peers_of("zz")] == ["a", "b:2809", "c"]
    assert www.title == "set at line 1"
    assert parse("w: ( /a ) -> h install ;").sets[0].title == "w"


def test_mirror_set_is_frozen_and_comparable(www: MirrorSet) -> None:
    again = parse("( /srv/www /etc/nginx ) -> ( a b:2809 me@c ) install ;\n"
                  "  except /srv/www/cache /etc/nginx/secret.key ;\n"
                  '  except_pat \\.swp$ "(^|/)\\.git/" ;\n').sets[0]
    assert again == www and hash(again) == hash(www)
    with pytest.raises(AttributeError):
        www.label = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- Config

THREE = ("( /a ) -> ( alpha beta:2809 ) install ;\n"
         "( /b ) -> ( me@beta:2809 gamma ) install ;\n")


def test_config_hosts_and_sets_of() -> None:
    cfg = parse(THREE, "three.conf")
    assert [x.name for x in cfg.hosts()] == ["alpha", "beta:2809", "gamma"]
    assert [s.files for s in cfg.sets_of("beta:2809")] == [("/a",), ("/b",)]
    assert [s.files for s in cfg.sets_of("gamma")] == [("/b",)]
    assert cfg.sets_of("nobody") == ()


@pytest.mark.parametrize("name, identity", [
    ("gamma", "gamma"), ("gamma:2808", "gamma"), ("root@GAMMA", "gamma"),
    ("beta:2809", "beta:2809"),
])
def test_find_self_by_name(name: str, identity: str) -> None:
    assert parse(THREE).find_self(name).name == identity


def test_find_self_host_in_no_set() -> None:
    with pytest.raises(ConfigError) as e:
        parse(THREE, "three.conf").find_self("beta")
    assert e.value.message == ("host 'beta' is in no set of three.conf; "
                               "HOSTS lists: alpha, beta:2809, gamma")


def test_find_self_bad_name() -> None:
    with pytest.raises(ConfigError, match=r"^--name 'beta:0': .*out of range"):
        parse(THREE).find_self("beta:0")


@pytest.fixture
def hostname(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Set this machine's (hostname, fqdn) for find_self."""
    names = ["none", "none"]
    monkeypatch.setattr(socket, "gethostname", lambda: names[0])
    monkeypatch.setattr(socket, "getfqdn", lambda *a: names[1])
    return names


def test_find_self_by_hostname(hostname: list[str]) -> None:
    hostname[:] = ["Gamma.example.com", "gamma.example.com"]
    assert parse(THREE).find_self(None) == h("gamma")


def test_find_self_by_fqdn(hostname: list[str]) -> None:
    hostname[:] = ["alpha", "alpha.example.com"]
    cfg = parse("( /a ) -> ( alpha.example.com b ) install ;")
    assert cfg.find_self(None).name == "alpha.example.com"


def test_find_self_no_match(hostname: list[str]) -> None:
    hostname[:] = ["delta", "delta.lan"]
    with pytest.raises(ConfigError, match=r"^no host of .* matches this machine .*--name"):
        parse(THREE).find_self(None)


def test_find_self_ambiguous(hostname: list[str]) -> None:
    hostname[:] = ["beta", "beta"]
    with pytest.raises(ConfigError, match=r"^ambiguous: .*beta, beta:2809; pass --name"):
        parse("( /a ) -> ( beta beta:2809 ) install ;").find_self(None)


# --------------------------------------------------------------------------- files on disk

GOOD_TEXT = "( /a ) -> ( alpha beta ) install ;\n"


def _write(path: os.PathLike[str], mode: int, text: str = GOOD_TEXT) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)


def test_load_accepts_0600(tmp_path: os.PathLike[str]) -> None:
    conf = os.path.join(tmp_path, "omirrd.conf")
    _write(conf, 0o600)
    check_file_safety(conf)
    cfg = load(conf)
    assert isinstance(cfg, Config) and cfg.path == conf
    assert [x.name for x in cfg.hosts()] == ["alpha", "beta"]


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_writable_by_others_is_refused(tmp_path: os.PathLike[str], mode: int) -> None:
    conf = os.path.join(tmp_path, "omirrd.conf")
    _write(conf, mode)
    for call in (check_file_safety, load):
        with pytest.raises(ConfigError) as e:
            call(conf)
        assert e.value.filename == conf
        assert f"group- or world-writable (mode {mode:04o})" in e.value.message
        assert f"chmod go-w {conf}" in e.value.message


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_owned_by_another_user_is_refused(tmp_path: os.PathLike[str]) -> None:
    conf = os.path.join(tmp_path, "omirrd.conf")
    _write(conf, 0o644)
    os.chown(conf, 12345, -1)
    with pytest.raises(ConfigError) as e:
        check_file_safety(conf, "peers file")
    assert "peers file is owned by uid 12345" in e.value.message
    assert f"chown root {conf}" in e.value.message


def test_missing_file(tmp_path: os.PathLike[str]) -> None:
    conf = os.path.join(tmp_path, "nope.conf")
    for call in (check_file_safety, load):
        with pytest.raises(ConfigError) as e:
            call(conf)
        assert str(e.value) == f"{conf}: cannot read config file: No such file or directory"


def test_directory_is_refused(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        check_file_safety(tmp_path)
    with pytest.raises(ConfigError, match="not a regular file"):
        load(tmp_path)


def test_not_utf8_is_positioned(tmp_path: os.PathLike[str]) -> None:
    conf = os.path.join(tmp_path, "omirrd.conf")
    with open(conf, "wb") as f:
        f.write(b"# ok\n( /caf\xe9 ) -> h install ;\n")
    os.chmod(conf, 0o600)
    with pytest.raises(ConfigError) as e:
        load(conf)
    assert (e.value.line, e.value.col) == (2, 7)
    assert "not UTF-8 (byte 0xe9)" in e.value.message


def test_load_reports_parse_errors_with_the_path(tmp_path: os.PathLike[str]) -> None:
    conf = os.path.join(tmp_path, "omirrd.conf")
    _write(conf, 0o600, "( /a ) -> h\n")
    with pytest.raises(ConfigError, match=rf"^{conf}:1:1: .*install ;"):
        load(conf)


def test_defaults() -> None:
    assert config.DEFAULT_PORT == 2808
    assert config.CONFIG_DEFAULT == "/etc/omirrd.conf"


def test_one_rule_says_which_set_holds_a_path() -> None:
    """``set_for``: of the sets that hold a path and do not exclude it, the deepest root,
    the first written between equals. Every part of the daemon asks it, so a set nested
    in a path another set excludes is watched, indexed, sent and accepted."""
    cfg = config.parse(
        "HOSTS = ( a b c )\n"
        "www: ( /data ) -> ${HOSTS} install ; except /data/cache /data/private ;\n"
        "cached: ( /data/cache ) -> ${HOSTS} install ; except_pat ( \\.tmp$ ) ;\n"
        "priv: ( /data/private ) -> ( a c ) install ;\n"
        "again: ( /data ) -> ( a b ) install ;\n", "t.conf")
    www, cached, priv, again = cfg.sets
    assert config.set_for(b"data/x", cfg.sets) is www  # the first of two equal roots
    assert config.set_for(b"data/cache/x", cfg.sets) is cached
    assert config.set_for(b"data/cache/x.tmp", cfg.sets) is again  # cached excludes it
    assert config.set_for(b"data/private/p", cfg.sets) is priv
    assert config.set_for(b"data/private/p", [www, cached, again]) is again
    assert config.set_for(b"data/private/p", [www, cached]) is None  # what b shares with a
    assert config.set_for(b"etc/passwd", cfg.sets) is None
    assert www.contains(b"data/x") and not www.contains(b"data/cache/x")
