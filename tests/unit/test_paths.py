"""check_path: what a peer may name, and why everything else is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest

from omirror import config
from omirror.entry import Entry, Kind, Stamp, conflict_name
from omirror.errors import PathRefused
from omirror.paths import PATH_MAX, show
from omirror.resolve import check_entry, check_path

DISTFILE = r"""
www: ( /srv/www /etc/nginx ) -> ( alpha beta )
    install ;
    except /srv/www/cache ;
    except_pat ( \.swp$ ) ;
data: ( /data ) -> ( alpha gamma )
    install ;
cached: ( /srv/www/cache ) -> ( alpha beta )
    install ;
"""

SETS = config.parse(DISTFILE, "test.conf").sets
WWW, DATA, CACHED = SETS
#: What alpha shares with beta: not /data.
WITH_BETA = (WWW, CACHED)

CONFLICT = conflict_name(b"index.html", Stamp(1_700_000_000_000_000_000, "gamma"))

ACCEPTED = [
    (b"srv/www", WWW, "a set root itself"),
    (b"srv/www/index.html", WWW, "a file"),
    (b"etc/nginx/sites/default", WWW, "the second root of a set"),
    (b"srv/www/a b/c\tq", WWW, "spaces and tabs are just bytes"),
    (b"srv/www/caf\xe9", WWW, "a Latin-1 name, not UTF-8"),
    (b"srv/www/\xff\xfe/\x80", WWW, "bytes that decode to nothing"),
    (b"srv/www/" + CONFLICT, WWW, "a conflict copy is user data"),
    (b"srv/www/x.omirror", WWW, ".omirror not at the start of a name"),
    (b"srv/www/.omirro", WWW, "a prefix of the own prefix"),
    (b"srv/www/" + b"n" * 255, WWW, "a name of exactly 255 bytes"),
    (b"srv/www/..a/a..", WWW, "dots inside names"),
    (b"srv/www/cache/x", CACHED, "excluded in one set, mirrored by another"),
    (b"srv/www/cachet", WWW, "an except path is not a string prefix"),
    (b"srv/www/" + b"d/" * 2043 + b"xy", WWW, "4096 bytes exactly"),
]


@pytest.mark.parametrize(("path", "expected", "why"), ACCEPTED, ids=[a[2] for a in ACCEPTED])
def test_accepted(path: bytes, expected: config.MirrorSet, why: str) -> None:
    assert check_path(path, WITH_BETA) is expected


REFUSED = [
    ("srv/www/a", "is a str, not bytes", "a str"),
    (bytearray(b"srv/www/a"), "is a bytearray, not bytes", "a bytearray"),
    (None, "is a NoneType, not bytes", "None"),
    (b"", "is empty", "empty"),
    (b"srv/www/" + b"d/" * 2043 + b"xyz", "is 4097 bytes long, longer than 4096", "too long"),
    (b"/srv/www/a", "is absolute; logical paths are relative to /", "absolute"),
    (b"/", "is absolute; logical paths are relative to /", "the root"),
    (b"srv/www/a\0b", "contains a NUL byte", "NUL"),
    (b"srv/www//a", r"has an empty component \(a doubled or trailing '/'\)", "double slash"),
    (b"srv/www/a/", r"has an empty component", "trailing slash"),
    (b"srv/www/./a", "has a '.' component", "dot"),
    (b"srv/www/../../etc/passwd", "has a '..' component", "dot-dot climbing out"),
    (b"srv/www/a/..", "has a '..' component", "dot-dot at the end"),
    (b"..", "has a '..' component", "dot-dot alone"),
    (b"srv/www/" + b"n" * 256, "has a component of 256 bytes, longer than 255", "long name"),
    (b"srv/www/.omirror-root", "names the daemon's own file '.omirror-root'", "root marker"),
    (b"srv/www/d/.omirror-tmp-0123abcd", "names the daemon's own file", "a temp file"),
    (b"srv/www/.omirror/x", "names the daemon's own file '.omirror'", "own directory"),
    (b"srv/www/.omirror-conflict-x-1", "names the daemon's own file", "conflict infix at start"),
    (b"srv/www/.omirror-versions/a~20240501-093000",
     "names the daemon's own file '.omirror-versions'", "the versions area"),
    (b"srv/www/.omirror-versions", "names the daemon's own file '.omirror-versions'",
     "the versions area itself"),
    (b"data/a", "is in no set this host shares with the peer", "a set not shared"),
    (b"srv", "is in no set this host shares with the peer", "above a root"),
    (b"srv/wwwx/a", "is in no set this host shares with the peer", "root as string prefix"),
    (b"etc/passwd", "is in no set this host shares with the peer", "outside every set"),
    (b"etc/nginx/a.swp", "excluded here by set www", "except_pat"),
]


@pytest.mark.parametrize(("path", "reason", "why"), REFUSED, ids=[r[2] for r in REFUSED])
def test_refused(path: object, reason: str, why: str) -> None:
    with pytest.raises(PathRefused, match=r"^refused path .*: " + reason) as caught:
        check_path(path, WITH_BETA)  # type: ignore[arg-type]
    assert caught.value.path is path


def test_excluded_when_no_other_set_mirrors_it() -> None:
    with pytest.raises(PathRefused, match=r"^refused path '/?srv/www/cache/x': excluded here "
                                          r"by set www$"):
        check_path(b"srv/www/cache/x", (WWW,))


def test_no_shared_set_refuses_everything() -> None:
    with pytest.raises(PathRefused, match="is in no set this host shares"):
        check_path(b"srv/www/a", ())


def test_message_escapes_what_a_peer_sent() -> None:
    """A name from a peer cannot forge a log line or flood it."""
    with pytest.raises(PathRefused) as caught:
        check_path(b"srv/www/a\nERROR forged\xff/../x", WITH_BETA)
    message = str(caught.value)
    # the one escaped form of paths (paths.show_name), as everywhere a person reads one
    assert "\n" not in message and r"a\x0aERROR forged\xff/../x" in message
    with pytest.raises(PathRefused) as caught:
        check_path(b"a" * 10_000, WITH_BETA)
    assert len(str(caught.value)) < 400
    assert "(10002 characters)" in str(caught.value)


def test_longest_limits_are_the_kernel_ones() -> None:
    assert PATH_MAX == 4096


@pytest.mark.parametrize("change, reason", [
    ({"stamp": Stamp(5, "x\0y")}, "its origin"),
    ({"stamp": Stamp(5, "a/b")}, "its origin"),
    ({"stamp": Stamp(5, "")}, "its origin"),
    ({"stamp": Stamp(5, "h" * 256)}, "its origin"),
    ({"vector": (("q\n", 5),)}, "its origin"),
    ({"owner": "a\0b"}, "its owner"),
    ({"owner": "x\x1b[31m"}, "its owner"),
    ({"group": "g:h"}, "its group"),
    ({"stamp": Stamp(1 << 62, "x")}, "beyond the year 2116"),
    ({"vector": (("x", (1 << 63) - 1),)}, "beyond the year 2116"),
    ({"moved_from": b"../etc/passwd"}, "'..' component"),
])
def test_entries_no_honest_peer_makes_are_refused(change: dict[str, object],
                                                   reason: str) -> None:
    good = Entry(b"data/f", Kind.FILE, Stamp(5, "[::1]:2809"), vector=(("beta.example", 4),),
                 owner="www-data", group="www-data", digest=b"\0" * 16)
    check_entry(good)
    with pytest.raises(PathRefused, match=reason):
        check_entry(replace(good, **change))  # type: ignore[arg-type]


def test_shown_paths_are_one_line_of_printable_text() -> None:
    """One escaped form everywhere a person reads a path: unambiguous (a backslash is
    doubled), one line, nothing a terminal acts on."""
    assert show(b"srv/www/index.html") == "/srv/www/index.html"
    assert show(b"a\nb") == "/a\\x0ab"
    assert show(b"x\x1b[31m") == "/x\\x1b[31m"
    assert show(b"\xff\xfe") == "/\\xff\\xfe"
    assert show(b"back\\slash") == "/back\\\\slash"
    assert show("\u202eevil".encode()) == "/\\u202eevil"
    assert show(b"a\\x0ab") != show(b"a\nb")
    for name in (b"a\nb", b"\x00", "\u2028".encode(), b"\x7f", b"\xc2\x85"):
        assert show(name).isprintable()
