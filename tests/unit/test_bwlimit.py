"""The token bucket of ``--bwlimit`` on a fake clock, and a link's stream paced by it."""

from __future__ import annotations

import asyncio

import pytest

from omirror.bwlimit import KIB, PIECE, Bucket
from omirror.link import LinkStats, Stream
from omirror.wire import Data, encode


class FakeClock:
    """A monotonic clock that moves only when a writer sleeps on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # let the other writers run, as a real sleep does


class Writer:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes | memoryview) -> None:
        self.writes.append(bytes(data))  # as asyncssh does: it copies what it is given

    async def drain(self) -> None:
        return None


def test_the_burst_goes_at_once_then_each_byte_waits_for_its_token() -> None:
    clock = FakeClock()
    bucket = Bucket(1000, burst=500, clock=clock, sleep=clock.sleep)
    assert bucket.reserve(500) == 0.0
    assert bucket.reserve(250) == pytest.approx(0.25)  # on credit: 250 bytes at 1000/s
    assert bucket.reserve(100) == pytest.approx(0.35)  # behind the first one's debt
    clock.now += 0.35
    assert bucket.reserve(0) == pytest.approx(0.0, abs=1e-9)  # paid, nothing left over
    assert bucket.reserve(1) == pytest.approx(0.001)


def test_tokens_refill_at_the_rate_up_to_the_burst_only() -> None:
    clock = FakeClock()
    bucket = Bucket(1000, burst=500, clock=clock, sleep=clock.sleep)
    assert bucket.reserve(500) == 0.0
    clock.now += 0.2
    assert bucket.reserve(200) == 0.0 and bucket.reserve(1) > 0
    clock.now += 3600  # idle for an hour: still no more than the burst at once
    assert bucket.reserve(500) == 0.0
    assert bucket.reserve(1000) == pytest.approx(1.0)


def test_a_transfer_takes_its_size_over_the_rate_less_the_burst() -> None:
    """4 MiB at 512 KiB/s: 7 s of waiting after the first second's worth went at once,
    and the waits add up in ``waited``."""
    clock = FakeClock()
    bucket = Bucket(512 * KIB, clock=clock, sleep=clock.sleep)
    start = clock.now

    async def send() -> None:
        for _ in range(64):
            await bucket.take(64 * KIB)
    asyncio.run(send())
    assert clock.now - start == pytest.approx(7.0)
    assert bucket.waited == pytest.approx(7.0)


def test_kib_makes_the_bucket_of_the_option() -> None:
    assert Bucket.kib(0) is None
    bucket = Bucket.kib(512)
    assert bucket is not None and bucket.rate == 512 * KIB and bucket.burst == 512 * KIB
    with pytest.raises(ValueError):
        Bucket(0)


def test_a_large_write_goes_in_pieces_each_after_its_tokens() -> None:
    clock = FakeClock()
    writer = Writer()
    bucket = Bucket(100 * KIB, clock=clock, sleep=clock.sleep)
    data = bytes(range(256)) * (1 << 12)  # 1 MiB
    waited = asyncio.run(bucket.write(writer, data))
    assert b"".join(writer.writes) == data
    assert max(len(w) for w in writer.writes) == PIECE
    # the first 100 KiB went at once, each later piece waited 0.64 s for its tokens
    assert waited == pytest.approx((len(data) - 100 * KIB) / (100 * KIB))
    assert clock.sleeps[0] == pytest.approx((2 * PIECE - 100 * KIB) / (100 * KIB))
    assert all(s == pytest.approx(PIECE / (100 * KIB)) for s in clock.sleeps[1:])


def test_a_slow_rate_writes_pieces_no_larger_than_its_burst() -> None:
    clock = FakeClock()
    writer = Writer()
    bucket = Bucket(KIB, clock=clock, sleep=clock.sleep)
    asyncio.run(bucket.write(writer, b"z" * (10 * KIB)))
    assert [len(w) for w in writer.writes] == [KIB] * 10
    assert clock.now - 100.0 == pytest.approx(9.0)


def test_two_writers_of_one_link_never_interleave_their_pieces() -> None:
    """A pusher's stream and the content it serves write through one stream: the pieces
    of one frame must not be cut by another's."""
    clock = FakeClock()
    writer = Writer()
    bucket = Bucket(64 * KIB, clock=clock, sleep=clock.sleep)
    first, second = b"a" * (300 * KIB), b"b" * (200 * KIB)

    async def both() -> None:
        await asyncio.gather(bucket.write(writer, first), bucket.write(writer, second))
    asyncio.run(both())
    assert b"".join(writer.writes) == first + second


def test_a_writer_waiting_for_tokens_leaves_the_loop_free() -> None:
    """The deficit is awaited, never slept in the loop's thread: while one write waits,
    other coroutines run, and the write resumes only when its sleep ends."""
    writer = Writer()
    wakes: list[asyncio.Future[None]] = []

    async def sleep(seconds: float) -> None:
        wake = asyncio.get_running_loop().create_future()
        wakes.append(wake)
        await wake

    async def run() -> None:
        now = [0.0]
        bucket = Bucket(KIB, clock=lambda: now[0], sleep=sleep)
        task = asyncio.create_task(bucket.write(writer, b"x" * (2 * KIB)))
        for _ in range(5):
            await asyncio.sleep(0)  # this coroutine runs while the write waits
        assert len(wakes) == 1 and writer.writes == [b"x" * KIB] and not task.done()
        now[0] += 1.0
        wakes[0].set_result(None)
        assert await task == pytest.approx(1.0)
        assert writer.writes == [b"x" * KIB] * 2
    asyncio.run(run())


def test_a_limited_stream_counts_its_waits_in_the_link_stats() -> None:
    clock = FakeClock()
    writer = Writer()
    stats = LinkStats(bwlimit_kib=64)
    stream = Stream(None, writer, stats, Bucket(64 * KIB, clock=clock, sleep=clock.sleep))
    frames = [Data(1, b"d" * (96 * KIB), False), Data(1, b"", True)]

    async def send() -> None:
        for frame in frames:
            await stream.send(frame)
    asyncio.run(send())
    sent = b"".join(encode(f) for f in frames)
    assert b"".join(writer.writes) == sent and stats.bytes_sent == len(sent)
    assert stats.bwlimit_wait_s == pytest.approx((len(sent) - 64 * KIB) / (64 * KIB))


def test_an_unlimited_stream_writes_each_flush_whole() -> None:
    writer = Writer()
    stats = LinkStats()
    stream = Stream(None, writer, stats)
    frame = Data(1, b"d" * (300 * KIB), False)
    asyncio.run(stream.send(frame))
    assert writer.writes == [encode(frame)] and stats.bwlimit_wait_s == 0.0
