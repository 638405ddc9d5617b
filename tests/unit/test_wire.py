"""Frames and messages: every message round-trips; anything malformed is a ProtocolError."""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omirror.entry import Entry, Kind, Stamp
from omirror.wire import (
    MAX_FRAME,
    Ack,
    Bye,
    CaughtUp,
    Copy,
    Data,
    Direct,
    EntryMsg,
    Hello,
    Hole,
    IHave,
    Mark,
    NoData,
    Passed,
    ProtocolError,
    Start,
    Want,
    decode,
    encode,
    read_message,
)

ENTRY = Entry(path=b"srv/www/caf\xe9", kind=Kind.FILE, stamp=Stamp(10**18, "alpha"),
              vector=(("alpha", 10**18), ("beta", 5)), mode=0o644, owner="www",
              group="adm", mtime_ns=-5, size=3, digest=b"\x07" * 16, moved_from=b"srv/old",
              xattrs=((b"system.posix_acl_access", b"user::rw-\ngroup::r--\nother::---"),
                      (b"user.a", b"\0\xff")))

MESSAGES = [
    Hello(1, "alpha", "ab" * 16, 10**18), IHave("", 0), IHave("e" * 32, 42, ("gamma", "delta")),
    Start(7, True, 1234), EntryMsg(3, ENTRY, b"abc"), EntryMsg(4, ENTRY, None),
    Want(1, b"srv/x", b"\x01" * 16, 65536, (b"\x02" * 16,)), Data(1, b"x" * 1000, False),
    Copy(1, 65536, 65536), NoData(1, "changed"), Ack(99), Bye("shutting down"),
    Passed(50001),
    Direct(("gamma", "[::1]:2900")), Mark(1), CaughtUp(2, 0), CaughtUp(3, 10**12),
    Direct(()),
    Hole(1, 64 << 20), Hole(2, 1),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: object) -> None:
    frame = encode(msg)  # type: ignore[arg-type]
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert decode(frame[4:]) == msg


def body(kind: int, fields: object) -> bytes:
    return msgpack.packb([kind, fields], use_bin_type=True)


def entry_list(**changes: object) -> list[object]:
    fields = ["path", "kind", "time", "origin", "vector", "mode", "owner", "group", "mtime",
              "size", "digest", "target", "moved_from", "uid", "gid", "xattrs", "link"]
    values = dict(zip(fields, [b"p", 1, 5, "a", [["a", 5]], 0o644, "u", "g", 1, 3,
                               b"\0" * 16, b"", None, 1000, 1000, [], b""]))
    values.update(changes)
    return [values[f] for f in fields]


@pytest.mark.parametrize("payload, match", [
    (b"\xc1", "undecodable"),
    (msgpack.packb({"a": 1}), "undecodable"),
    (msgpack.packb([1]), "expected an array of 2"),
    (body(99, []), "unknown message type"),
    (body(4, [1, entry_list(kind=9), None]), "entry kind"),
    (body(4, [1, entry_list(path=b""), None]), "path: empty"),
    (body(4, [1, entry_list(path="str"), None]), "path: expected bytes"),
    (body(4, [1, entry_list(time=-1), None]), "stamp time"),
    (body(4, [1, entry_list(time=1 << 63), None]), "stamp time"),
    (body(4, [1, entry_list(mode=0o10000), None]), "mode"),
    (body(4, [1, entry_list(digest=b"short"), None]), "digest"),
    (body(4, [1, entry_list(), b"toolong"]), "inline data does not fit"),
    (body(4, [-1, entry_list(), None]), "seq"),
    (body(4, [1, entry_list(vector=[["a"]]), None]), "vector element"),
    (body(4, [1, entry_list(size=True), None]), "size"),
    (body(9, ["1"]), "seq"),
    (body(1, [1, "x" * 300, "e", 1]), "name"),
    (body(5, [1, b"p", b"\0" * 16, 0, "notalist"]), "blocks"),
    (body(4, [1, entry_list(uid=-2), None]), "uid"),
    (body(4, [1, entry_list(gid=1 << 32), None]), "gid"),
    (body(4, [1, entry_list(xattrs=[b"user.a"]), None]), "xattrs"),
    (body(4, [1, entry_list(xattrs=[b"user.a", "1"]), None]), "xattr value"),
    (body(4, [1, entry_list(xattrs=[b"u" * 300, b"1"]), None]), "xattr name"),
    (body(4, [1, entry_list(xattrs=[b"user.a", b"x" * 65537]), None]), "xattr value"),
    (body(4, [1, entry_list(link="q"), None]), "link: expected bytes"),
    (body(4, [1, entry_list(link=None), None]), "link: expected bytes"),
    (body(4, [1, entry_list(link=b"q" * 4097), None]), "link: expected bytes"),
    (body(4, [1, entry_list(link=b"p"), None]), "names another path"),
    (body(4, [1, entry_list(kind=2, digest=b"", link=b"q"), None]), "belongs to a file"),
    (body(4, [1, entry_list()[:14], None]), "expected an array of 17"),
    # a block of one byte would make the pusher hash a 64 MiB file in 64 M pieces
    (body(5, [1, b"p", b"\0" * 16, 1, [b"\0" * 16]]), "WANT block size 1"),
    (body(5, [1, b"p", b"\0" * 16, 1 << 30, [b"\0" * 16]]), "block size"),
    # a hole of no bytes, or of fewer than none, is no hole
    (body(13, [1, 0]), "hole length"),
    (body(13, [1, -4096]), "hole length"),
    (body(13, [1, 1 << 63]), "hole length"),
    (body(13, [1, "4096"]), "hole length"),
    (body(13, [-1, 4096]), "want id"),
    (body(13, [1]), "HOLE: expected an array of 2"),
])
def test_malformed_frames_are_refused_with_a_reason(payload: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(payload)


def test_an_entry_of_fifteen_fields_is_one_without_extended_attributes() -> None:
    """An older omirrord's intent log holds entries without the attributes' field."""
    msg = decode(body(4, [1, entry_list()[:15], None]))
    assert isinstance(msg, EntryMsg) and msg.entry.xattrs == ()
    with_attrs = decode(body(4, [1, entry_list(xattrs=[b"user.a", b"1"]), None]))
    assert isinstance(with_attrs, EntryMsg)
    assert with_attrs.entry.xattrs == ((b"user.a", b"1"),)


def test_the_link_hint_round_trips_though_entries_compare_without_it() -> None:
    linked = replace(ENTRY, link=b"srv/www/other\xff")
    got = decode(encode(EntryMsg(3, linked, None))[4:])
    assert isinstance(got, EntryMsg) and got.entry.link == b"srv/www/other\xff"
    plain = decode(encode(EntryMsg(3, ENTRY, None))[4:])
    assert isinstance(plain, EntryMsg) and plain.entry.link == b""


def test_an_entry_of_15_fields_is_read_as_one_without_a_link_hint() -> None:
    """As an intent log written before the hint existed holds it."""
    got = decode(body(4, [1, entry_list()[:15], None]))
    assert isinstance(got, EntryMsg) and got.entry.link == b"" and got.entry.uid == 1000


class _Stream:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def readexactly(self, n: int) -> bytes:
        if len(self.data) < n:
            raise asyncio.IncompleteReadError(self.data, n)
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


async def test_an_oversized_frame_is_refused_before_its_body_is_read() -> None:
    stream = _Stream(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="outside"):
        await read_message(stream)


async def test_messages_are_read_back_to_back_from_a_stream() -> None:
    stream = _Stream(b"".join(encode(m) for m in MESSAGES))  # type: ignore[arg-type]
    assert [await read_message(stream) for _ in MESSAGES] == MESSAGES
    with pytest.raises(asyncio.IncompleteReadError):
        await read_message(stream)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_garbage_never_raises_anything_but_protocol_error(payload: bytes) -> None:
    try:
        decode(payload)
    except ProtocolError:
        pass


_leaf = st.one_of(st.integers(-(1 << 63), (1 << 64) - 1), st.binary(max_size=40),
                  st.text(max_size=10), st.booleans(), st.none())


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 13), st.recursive(_leaf, lambda c: st.lists(c, max_size=14),
                                        max_leaves=40))
def test_well_formed_msgpack_of_any_shape_is_validated(kind: int, fields: object) -> None:
    try:
        msg = decode(body(kind, fields))
    except ProtocolError:
        return
    assert decode(encode(msg)[4:]) == msg  # whatever is accepted is a valid message


async def test_a_frame_cut_short_by_the_end_of_the_stream_is_a_protocol_error() -> None:
    stream = _Stream(struct.pack(">I", 100) + b"\x92" * 10)
    with pytest.raises(ProtocolError, match=r"^frame cut short: the stream ended after 10 "
                                            r"of its 100 bytes$"):
        await read_message(stream)


def test_a_frame_of_millions_of_empty_arrays_is_refused_before_they_are_built() -> None:
    # 4 MiB that msgpack would unpack into four million lists (~280 MB, ~1 s)
    inner = b"\xdd" + struct.pack(">I", 262_000) + b"\x90" * 262_000
    payload = b"\x92\x04\xdd" + struct.pack(">I", 15) + inner * 15
    assert len(payload) <= MAX_FRAME
    started = time.monotonic()
    with pytest.raises(ProtocolError, match="undecodable frame: more than .* arrays"):
        decode(payload)
    assert time.monotonic() - started < 0.1


def test_an_entry_with_the_longest_vector_still_decodes() -> None:
    vector = tuple((f"host{i:03d}", i + 1) for i in range(256))
    entry = Entry(path=b"a", kind=Kind.DIR, stamp=Stamp(1, "host000"), vector=vector)
    msg = EntryMsg(1, entry, None)
    assert decode(encode(msg)[4:]) == msg


_nested = st.recursive(_leaf, lambda c: st.lists(c, max_size=6), max_leaves=400)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 12), _nested, st.integers(0, 50))
def test_frames_cut_anywhere_or_nested_deeply_raise_only_protocol_errors(
        kind: int, fields: object, cut: int) -> None:
    payload = body(kind, fields)
    for candidate in (payload, payload[:max(1, len(payload) - cut)],
                      b"\x91" * (cut * 40) + payload):
        try:
            decode(candidate)
        except ProtocolError:
            pass
