"""A link's framed stream: frames written together, frames read from chunks."""

from __future__ import annotations

import asyncio

import pytest

from omirror.entry import Entry, Kind, Stamp
from omirror.link import LinkStats, Stream, check_hello
from omirror.wire import PROTOCOL_VERSION, Ack, EntryMsg, Hello, Passed, ProtocolError, encode


class _Writer:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    async def drain(self) -> None:
        return None


class _Reader:
    """Hands out what it holds in the chunk sizes given, as an SSH channel does."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data = data
        self.sizes = sizes

    async def read(self, n: int) -> bytes:
        size = min(n, self.sizes.pop(0) if self.sizes else n)
        chunk, self.data = self.data[:size], self.data[size:]
        return chunk


def _entry(i: int) -> EntryMsg:
    return EntryMsg(i, Entry(b"data/f%d" % i, Kind.FILE, Stamp(i, "alpha"), size=1,
                             digest=b"\x01" * 16), b"x")


def test_queued_frames_go_out_in_one_write_after_what_was_queued_before() -> None:
    """A page of small entries is one SSH write (one packet to encrypt and
    authenticate, not one per entry); a frame sent meanwhile keeps its place after
    them."""
    writer = _Writer()
    stats = LinkStats()
    stream = Stream(None, writer, stats)

    async def run() -> None:
        for i in range(1, 4):
            assert not stream.queue(_entry(i))
        assert writer.writes == []  # nothing leaves before a flush
        await stream.send(Passed(3))
    asyncio.run(run())
    expected = b"".join(encode(m) for m in [_entry(1), _entry(2), _entry(3), Passed(3)])
    assert writer.writes == [expected] and stats.bytes_sent == len(expected)


def test_a_full_queue_asks_for_a_flush() -> None:
    stream = Stream(None, _Writer(), LinkStats())
    big = EntryMsg(1, Entry(b"data/big", Kind.FILE, Stamp(1, "alpha"), size=60_000,
                            digest=b"\x01" * 16), b"y" * 60_000)
    assert [stream.queue(big) for _ in range(5)] == [False, False, False, False, True]


@pytest.mark.parametrize("sizes", [[1] * 400, [7, 3, 1000], [5000]])
def test_frames_are_cut_from_whatever_chunks_arrive(sizes: list[int]) -> None:
    msgs = [_entry(1), Ack(5), _entry(2), Passed(9)]
    data = b"".join(encode(m) for m in msgs)
    stats = LinkStats()
    stream = Stream(_Reader(data, list(sizes)), None, stats)

    async def run() -> list[object]:
        return [await stream.recv() for _ in msgs]
    assert asyncio.run(run()) == msgs
    assert stats.bytes_received == len(data)


def test_a_stream_that_ends_inside_a_read_says_what_arrived() -> None:
    stream = Stream(_Reader(b"abcdefg", [3, 3]), None, LinkStats())

    async def run() -> asyncio.IncompleteReadError:
        assert await stream.readexactly(2) == b"ab"
        with pytest.raises(asyncio.IncompleteReadError) as raised:
            await stream.readexactly(10)
        return raised.value
    error = asyncio.run(run())
    assert error.partial == b"cdefg" and error.expected == 10


def test_a_peer_of_an_older_protocol_is_refused_with_what_to_do() -> None:
    older = Hello(PROTOCOL_VERSION - 1, "beta", "e" * 32, 1)
    with pytest.raises(ProtocolError, match=f"peer speaks protocol {PROTOCOL_VERSION - 1}, "
                       f"this omirrord {PROTOCOL_VERSION}: upgrade omirror on that peer"):
        check_hello(older, "beta", LinkStats())
    newer = Hello(PROTOCOL_VERSION + 1, "beta", "e" * 32, 1)
    with pytest.raises(ProtocolError, match="upgrade omirror on this host"):
        check_hello(newer, "beta", LinkStats())
