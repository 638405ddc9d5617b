"""Progress lines: what a terminal shows, and what a log gets."""

from __future__ import annotations

import io
import logging

import pytest

from omirror.progress import Progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_line_has_bar_files_bytes_rate_and_eta() -> None:
    clock = Clock()
    p = Progress("reconciling", stream=io.StringIO(), clock=clock)
    clock.now += 10
    p.update(100, 5 << 20, 400)
    assert p.line() == ("reconciling [######------------------] 100/400 files, 5.0 MiB, "
                        "512.0 KiB/s, ETA 0:30")


def test_a_terminal_gets_one_line_redrawn_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    clock, out = Clock(), Tty()
    p = Progress("x", stream=out, clock=clock)
    for n in range(1, 4):
        clock.now += 1
        p.update(n, n * 1024, 3)
    p.close()
    assert out.getvalue().count("\r\x1b[K") == 4 and out.getvalue().endswith("3/3 files, "
                                                                             "3.0 KiB, 1.0 KiB/s\n")


def test_a_log_gets_a_line_now_and_then(monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    clock = Clock()
    p = Progress("x", stream=io.StringIO(), clock=clock)
    with caplog.at_level(logging.INFO, logger="omirror.progress"):
        for n in range(100):
            clock.now += 0.5
            p.update(n, 0, 100)
    assert len(caplog.records) == 5  # one every 10 s over 50 s
