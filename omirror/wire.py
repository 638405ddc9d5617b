"""The peer protocol's frames and messages: bytes in, validated dataclasses out.

A frame is a 4-byte big-endian length and a msgpack array ``[type, body]``. The length
is checked against a hard bound before a byte of the body is read, and msgpack's own
limits bound every string, array and map inside, so a hostile peer can neither make us
allocate without bound nor hand us a value of a type we did not expect: every field is
checked here, and anything else is a :class:`ProtocolError` that closes the link.

Nothing here knows about sockets or SSH: :func:`read_message` takes any object with
``readexactly`` (asyncio and asyncssh streams both have it), so the same protocol could
run over a plain pipe or OpenSSH.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from omirror import xattrs
from omirror.entry import Entry, Kind, Stamp
from omirror.errors import OmirrorError

PROTOCOL_VERSION = 6
#: The channel that carries one direction of live replication: the connecting side pushes.
SUBSYSTEM = "omirror-1"
#: The connecting side asks to be pushed to once, until caught up (``omirrord --once``).
PULL_SUBSYSTEM = "omirror-pull-1"
#: The connecting side asks for the index only, entries without content (``--check``).
INDEX_SUBSYSTEM = "omirror-index-1"
SUBSYSTEMS = (SUBSYSTEM, PULL_SUBSYSTEM, INDEX_SUBSYSTEM)
#: A content chunk is at most 1 MiB; a frame carries one chunk or one small file plus
#: its entry, so 4 MiB leaves room and still bounds what a peer can make us buffer.
MAX_FRAME = 4 << 20
CHUNK = 1 << 20
#: Files up to this size travel inside their entry: no round trip per file (over a
#: link with a 40 ms round trip, forty files of 1 MiB fetched one by one took 1.6 s of
#: round trips alone). The pusher's window bounds what is in flight.
INLINE_MAX = 1 << 20

_INT64 = (1 << 63) - 1
#: Numeric owner and group ids: -1 (not known) or a 32-bit id.
_ID_MAX = (1 << 32) - 2
#: Block sizes a WANT may ask for: the pusher hashes its file in blocks of that size, so
#: a tiny block would make it hash (and compare) millions of blocks per megabyte.
BLOCK_MIN, BLOCK_MAX = 64 << 10, 64 << 20
_MAX_PATH = 4096
_MAX_NAME = 255
_MAX_VECTOR = 256
#: No message holds more arrays than an ENTRY with a full vector (frame, fields, entry,
#: vector and its pairs); 4 MiB of empty arrays would otherwise unpack into four million
#: lists (about 280 MB and a second of the event loop) before the shape is checked.
_MAX_ARRAYS = _MAX_VECTOR + 9
_LENGTH = struct.Struct(">I")


class ProtocolError(OmirrorError):
    """A peer sent something this protocol does not allow; the link is closed."""


#: BYE's reason when a receiver ends a link to be sent again what its pusher left out
#: (see Store.begin_receiving): the pusher dials again at once.
ASK_AGAIN = "ask again"


class AskedAgain(ConnectionResetError):
    """The receiver ended the link to have the stream start again from its cursor: a
    host whose versions the pusher left out went away, and what it had not sent yet is
    to come from the pusher."""


class Type(enum.IntEnum):
    """The number that opens every frame's body; a number not listed closes the link."""

    HELLO = 1  # both ways, first: who I am, my store's epoch, my clock
    IHAVE = 2  # receiver -> pusher: how far I hold your log
    START = 3  # pusher -> receiver: streaming from this seq; full = everything (new epoch)
    ENTRY = 4  # pusher -> receiver: one version, with its content when small
    WANT = 5  # receiver -> pusher: send me the content of this version
    DATA = 6  # pusher -> receiver: bytes to append to the wanted content
    COPY = 7  # pusher -> receiver: append this range of your old version (block delta)
    NODATA = 8  # pusher -> receiver: that version is gone here; a newer entry follows
    ACK = 9  # receiver -> pusher: everything up to this seq is applied or settled
    BYE = 10  # either way, last: why the link is being closed
    PASSED = 11  # pusher -> receiver: nothing more for you up to this seq
    DIRECT = 12  # receiver -> pusher: the hosts whose own versions reach me directly
    HOLE = 13  # pusher -> receiver: the next bytes of the wanted content are a hole
    MARK = 14  # receiver -> pusher: tell me when you are next caught up
    CAUGHTUP = 15  # pusher -> receiver: caught up since that MARK, at this seq


@dataclass(frozen=True, slots=True)
class Hello:
    """Both sides' first frame: a name other than the key's, or another version, closes the link."""

    version: int
    name: str
    epoch: str
    now_ns: int


@dataclass(frozen=True, slots=True)
class IHave:
    """Where the pusher is to start in its log, and what it may leave out: the versions
    of ``direct`` (as :class:`Direct` says later), and up to ``held``, where the
    receiver's cursor is, everything but the versions of ``again`` (hosts it trusted to
    send them, which went away: Store.begin_receiving)."""

    epoch: str  # the pusher's epoch this cursor belongs to ("" = nothing held)
    seq: int
    direct: tuple[str, ...] = ()
    held: int = 0
    again: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Start:
    """The pusher's answer to IHAVE: where its stream begins, and whether it is everything."""

    seq: int  # entries with a larger seq follow
    full: bool  # the receiver's cursor was unusable: this is everything (TELLYOUEVERYTHING)
    total: int = 0  # how many entries of the log follow now, for progress (live ones come on)


@dataclass(frozen=True, slots=True)
class EntryMsg:
    """One version of one path from the pusher's log; content inline only up to INLINE_MAX."""

    seq: int  # 0: sent ahead of its place in the log (a parent before its children)
    entry: Entry
    data: bytes | None  # the whole content, for small files


@dataclass(frozen=True, slots=True)
class Want:
    """The receiver asks for content it has decided it needs (to apply, or as a conflict copy)."""

    want_id: int
    path: bytes
    digest: bytes
    block_size: int  # 0: no delta
    blocks: tuple[bytes, ...]  # digests of the receiver's old version, block by block


@dataclass(frozen=True, slots=True)
class Data:
    """A chunk (at most CHUNK) of wanted content; ``end`` closes that WANT."""

    want_id: int
    data: bytes
    end: bool


@dataclass(frozen=True, slots=True)
class Copy:
    """A block delta: the receiver takes this range from the old version it holds."""

    want_id: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Hole:
    """The next ``length`` bytes of the wanted content are a hole in the pusher's file:
    zeros that are neither sent nor allocated. The receiver refuses one that passes the
    end of the file the WANT is for (only it knows which that is)."""

    want_id: int
    length: int


@dataclass(frozen=True, slots=True)
class NoData:
    """The pusher cannot serve a WANT (gone, changed, not shared); a newer entry may follow."""

    want_id: int
    why: str


@dataclass(frozen=True, slots=True)
class Ack:
    """Everything up to ``seq`` is applied or settled here: the pusher's window moves on."""

    seq: int


@dataclass(frozen=True, slots=True)
class Bye:
    """Either side's last frame, so that the other logs a reason instead of a lost link."""

    why: str


@dataclass(frozen=True, slots=True)
class Passed:
    """Lets the receiver move its cursor past log entries that were not for it."""

    seq: int  # the pusher has read its log up to here: nothing else in it is for you


@dataclass(frozen=True, slots=True)
class Direct:
    """The hosts whose links into the receiver are up: their own versions reach it from
    them, so a pusher leaves those out (the receiver asks for them again if a maker goes
    away before it sent them: see Store.begin_receiving). Sent again whenever the list
    changes."""

    origins: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Mark:
    """Asks the pusher to say when it has next sent everything its log holds for the
    receiver (CAUGHTUP): then the receiver holds every version the pusher had made by
    the time it read this, and a relay need no longer be asked for those."""

    mark: int


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """The answer to MARK ``mark``: the pusher's log ended at ``seq`` when it found
    nothing more to send, after it read the MARK. Like PASSED, it settles ``seq``."""

    mark: int
    seq: int


Message = (Hello | IHave | Start | EntryMsg | Want | Data | Copy | NoData | Ack | Bye
           | Passed | Direct | Hole | Mark | CaughtUp)


# -- encoding ------------------------------------------------------------------------------

def entry_fields(e: Entry) -> list[Any]:
    """The 17 fields :func:`decode_entry` expects; the intent log stores entries this way
    too. The extended attributes travel as one flat array, name, value, name, value."""
    return [e.path, int(e.kind), e.stamp.time_ns, e.stamp.origin,
            [[o, t] for o, t in e.vector], e.mode, e.owner, e.group, e.mtime_ns, e.size,
            e.digest, e.target, e.moved_from, e.uid, e.gid,
            xattrs.flat(e.xattrs), e.link]


def _body(msg: Message) -> tuple[Type, list[Any]]:
    if isinstance(msg, Hello):
        return Type.HELLO, [msg.version, msg.name, msg.epoch, msg.now_ns]
    if isinstance(msg, IHave):
        return Type.IHAVE, [msg.epoch, msg.seq, list(msg.direct), msg.held,
                            list(msg.again)]
    if isinstance(msg, Start):
        return Type.START, [msg.seq, msg.full, msg.total]
    if isinstance(msg, EntryMsg):
        return Type.ENTRY, [msg.seq, entry_fields(msg.entry), msg.data]
    if isinstance(msg, Want):
        return Type.WANT, [msg.want_id, msg.path, msg.digest, msg.block_size, list(msg.blocks)]
    if isinstance(msg, Data):
        return Type.DATA, [msg.want_id, msg.data, msg.end]
    if isinstance(msg, Copy):
        return Type.COPY, [msg.want_id, msg.offset, msg.length]
    if isinstance(msg, NoData):
        return Type.NODATA, [msg.want_id, msg.why]
    if isinstance(msg, Ack):
        return Type.ACK, [msg.seq]
    if isinstance(msg, Bye):
        return Type.BYE, [msg.why]
    if isinstance(msg, Passed):
        return Type.PASSED, [msg.seq]
    if isinstance(msg, Direct):
        return Type.DIRECT, [list(msg.origins)]
    if isinstance(msg, Hole):
        return Type.HOLE, [msg.want_id, msg.length]
    if isinstance(msg, Mark):
        return Type.MARK, [msg.mark]
    if isinstance(msg, CaughtUp):
        return Type.CAUGHTUP, [msg.mark, msg.seq]
    raise TypeError(f"not a protocol message: {msg!r}")


def encode(msg: Message) -> bytes:
    """One frame: length prefix and msgpack body."""
    kind, body = _body(msg)
    payload: bytes = msgpack.packb([int(kind), body], use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise ValueError(f"{kind.name} frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return _LENGTH.pack(len(payload)) + payload


# -- decoding ------------------------------------------------------------------------------

class Reader(Protocol):
    """All :func:`read_message` needs of a stream, so any transport (or a test) can feed it."""

    async def readexactly(self, n: int) -> bytes:
        """``asyncio.IncompleteReadError`` when the stream ends before ``n`` bytes."""
        ...


async def read_message(reader: Reader) -> Message:
    """Read and validate one frame; :class:`ProtocolError` for anything malformed,
    a frame cut short included.

    ``asyncio.IncompleteReadError`` (the peer closed the stream between two frames)
    passes through.
    """
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length == 0 or length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes is outside 1..{MAX_FRAME}")
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError as e:
        # an SSH channel ends in the middle of a frame only if the peer ended it there:
        # a lost connection is reported as such, not as an end of stream
        raise ProtocolError(f"frame cut short: the stream ended after {len(e.partial)} "
                            f"of its {length} bytes") from None
    return decode(payload)


def decode(payload: bytes) -> Message:
    """Validate one frame's body (without its length prefix) into a message."""
    try:
        obj = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True,
                              max_bin_len=MAX_FRAME, max_str_len=_MAX_PATH,
                              max_array_len=max(_MAX_VECTOR, MAX_FRAME // 16),
                              max_map_len=0, max_ext_len=0, list_hook=_ArrayBudget())
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise ProtocolError(f"undecodable frame: {e}") from None
    body = _array(obj, 2, "frame")
    try:
        kind = Type(_int(body[0], "message type", 1, 255))
    except ValueError:
        raise ProtocolError(f"unknown message type {body[0]!r}") from None
    fields = body[1]
    decoder = _DECODERS[kind]
    return decoder(fields)


class _ArrayBudget:
    """msgpack's ``list_hook``: stops unpacking a frame at its ``_MAX_ARRAYS + 1``-th
    array, as it is built."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = _MAX_ARRAYS

    def __call__(self, value: list[Any]) -> list[Any]:
        self.left -= 1
        if self.left < 0:
            raise ValueError(f"more than {_MAX_ARRAYS} arrays")
        return value


def _array(value: object, n: int, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) != n:
        raise ProtocolError(f"{what}: expected an array of {n}, got {_shape(value)}")
    return value


def _shape(value: object) -> str:
    if isinstance(value, list):
        return f"an array of {len(value)}"
    return type(value).__name__


def _int(value: object, what: str, low: int = 0, high: int = _INT64) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"{what}: expected an integer in {low}..{high}, got {value!r:.40}")
    return value


def _bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise ProtocolError(f"{what}: expected a boolean, got {_shape(value)}")
    return value


def _str(value: object, what: str, limit: int = _MAX_NAME) -> str:
    if type(value) is not str or len(value) > limit:
        raise ProtocolError(f"{what}: expected a string of at most {limit}, "
                            f"got {_shape(value)}")
    return value


def _bytes(value: object, what: str, limit: int, sizes: tuple[int, ...] = ()) -> bytes:
    if type(value) is not bytes or len(value) > limit or (sizes and len(value) not in sizes):
        raise ProtocolError(f"{what}: expected bytes of at most {limit}, got {_shape(value)}")
    return value


def _path(value: object, what: str = "path") -> bytes:
    path = _bytes(value, what, _MAX_PATH)
    if not path:
        raise ProtocolError(f"{what}: empty")
    return path


def decode_entry(value: object) -> Entry:
    """An entry from the wire: types and ranges only; path safety and what the names may
    hold are the receiver's checks (``resolve.check_path`` and ``resolve.check_entry``),
    which refuse one entry without closing the link.

    An array of 15 (an entry without its attributes and link hint, as an intent log
    written by an older omirrord holds it) is read as having neither."""
    if isinstance(value, list) and len(value) == 15:
        value = [*value, [], b""]
    f = _array(value, 17, "entry")
    try:
        kind = Kind(_int(f[1], "entry kind", 0, 3))
    except ValueError:
        raise ProtocolError(f"entry kind {f[1]!r} is unknown") from None
    raw_vector = f[4]
    if not isinstance(raw_vector, list) or len(raw_vector) > _MAX_VECTOR:
        raise ProtocolError("entry vector: expected an array of [origin, time] pairs")
    vector = []
    for pair in raw_vector:
        p = _array(pair, 2, "vector element")
        vector.append((_str(p[0], "vector origin"), _int(p[1], "vector time")))
    digest = _bytes(f[10], "digest", 16, (0, 16))
    if kind is Kind.FILE and len(digest) != 16:
        raise ProtocolError("a file entry needs a 16-byte digest")
    entry = Entry(
        path=_path(f[0]), kind=kind,
        stamp=Stamp(_int(f[2], "stamp time"), _str(f[3], "stamp origin")),
        vector=tuple(sorted(set(vector))), mode=_int(f[5], "mode", 0, 0o7777),
        owner=_str(f[6], "owner", 64), group=_str(f[7], "group", 64),
        mtime_ns=_int(f[8], "mtime", -_INT64, _INT64), size=_int(f[9], "size"),
        digest=digest, target=_bytes(f[11], "symlink target", _MAX_PATH),
        moved_from=None if f[12] is None else _path(f[12], "moved_from"),
        uid=_int(f[13], "uid", -1, _ID_MAX), gid=_int(f[14], "gid", -1, _ID_MAX),
        xattrs=_xattrs(f[15]), link=_bytes(f[16], "link", _MAX_PATH))
    if entry.link and (kind is not Kind.FILE or entry.link == entry.path):
        raise ProtocolError("a link hint belongs to a file entry and names another path")
    return entry


def _xattrs(value: object) -> tuple[tuple[bytes, bytes], ...]:
    """Types and sizes; which names may come is the receiver's check (xattrs.check)."""
    if not isinstance(value, list) or len(value) % 2 or len(value) > 2 * xattrs.COUNT_MAX:
        raise ProtocolError(f"entry xattrs: expected an array of name, value pairs, got "
                            f"{_shape(value)}")
    return xattrs.paired([_bytes(v, "xattr name" if i % 2 == 0 else "xattr value",
                                 xattrs.NAME_MAX if i % 2 == 0 else xattrs.VALUE_MAX)
                          for i, v in enumerate(value)])


def _hello(f: object) -> Hello:
    a = _array(f, 4, "HELLO")
    return Hello(_int(a[0], "protocol version", 1, 1 << 16), _str(a[1], "name"),
                 _str(a[2], "epoch", 64), _int(a[3], "clock"))


def _ihave(f: object) -> IHave:
    a = _array(f, 5, "IHAVE")
    return IHave(_str(a[0], "epoch", 64), _int(a[1], "seq"), _origins(a[2], "IHAVE"),
                 _int(a[3], "held"), _origins(a[4], "IHAVE"))


def _start(f: object) -> Start:
    a = _array(f, 3, "START")
    return Start(_int(a[0], "seq"), _bool(a[1], "full"), _int(a[2], "total"))


def _entry(f: object) -> EntryMsg:
    a = _array(f, 3, "ENTRY")
    entry = decode_entry(a[1])
    data = None if a[2] is None else _bytes(a[2], "inline data", INLINE_MAX)
    if data is not None and (entry.kind is not Kind.FILE or len(data) != entry.size):
        raise ProtocolError("inline data does not fit its entry")
    return EntryMsg(_int(a[0], "seq"), entry, data)


def _want(f: object) -> Want:
    a = _array(f, 5, "WANT")
    if not isinstance(a[4], list):
        raise ProtocolError("WANT blocks: expected an array")
    blocks = tuple(_bytes(b, "block digest", 16, (16,)) for b in a[4])
    block_size = _int(a[3], "block size", 0, BLOCK_MAX)
    if block_size and block_size < BLOCK_MIN:
        raise ProtocolError(f"WANT block size {block_size}: expected 0 or "
                            f"{BLOCK_MIN}..{BLOCK_MAX}")
    return Want(_int(a[0], "want id"), _path(a[1]), _bytes(a[2], "digest", 16, (16,)),
                block_size, blocks)


def _data(f: object) -> Data:
    a = _array(f, 3, "DATA")
    return Data(_int(a[0], "want id"), _bytes(a[1], "data", CHUNK), _bool(a[2], "end"))


def _copy(f: object) -> Copy:
    a = _array(f, 3, "COPY")
    return Copy(_int(a[0], "want id"), _int(a[1], "offset"), _int(a[2], "length", 1, 1 << 30))


def _nodata(f: object) -> NoData:
    a = _array(f, 2, "NODATA")
    return NoData(_int(a[0], "want id"), _str(a[1], "reason", 1024))


def _ack(f: object) -> Ack:
    return Ack(_int(_array(f, 1, "ACK")[0], "seq"))


def _bye(f: object) -> Bye:
    return Bye(_str(_array(f, 1, "BYE")[0], "reason", 1024))


def _passed(f: object) -> Passed:
    return Passed(_int(_array(f, 1, "PASSED")[0], "seq"))


def _direct(f: object) -> Direct:
    return Direct(_origins(_array(f, 1, "DIRECT")[0], "DIRECT"))


def _origins(origins: object, what: str) -> tuple[str, ...]:
    if not isinstance(origins, list) or len(origins) > _MAX_VECTOR:
        raise ProtocolError(f"{what}: expected an array of at most {_MAX_VECTOR} names, "
                            f"got {_shape(origins)}")
    return tuple(_str(o, "origin") for o in origins)


def _hole(f: object) -> Hole:
    a = _array(f, 2, "HOLE")
    return Hole(_int(a[0], "want id"), _int(a[1], "hole length", 1))


def _mark(f: object) -> Mark:
    return Mark(_int(_array(f, 1, "MARK")[0], "mark", 1))


def _caughtup(f: object) -> CaughtUp:
    a = _array(f, 2, "CAUGHTUP")
    return CaughtUp(_int(a[0], "mark", 1), _int(a[1], "seq"))


_DECODERS: dict[Type, Callable[[Any], Message]] = {
    Type.HELLO: _hello, Type.IHAVE: _ihave, Type.START: _start, Type.ENTRY: _entry,
    Type.WANT: _want, Type.DATA: _data, Type.COPY: _copy, Type.NODATA: _nodata,
    Type.ACK: _ack, Type.BYE: _bye, Type.PASSED: _passed, Type.DIRECT: _direct,
    Type.HOLE: _hole, Type.MARK: _mark, Type.CAUGHTUP: _caughtup}
