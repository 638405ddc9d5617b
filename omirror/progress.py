"""How far a long reconciliation is, told the way the place it runs in can show it.

On a terminal: one line redrawn in place, with a bar, files, bytes, rate and ETA. Under
systemd: ``STATUS=`` (what ``systemctl status`` shows) and a log line now and then.
Anywhere else: a log line now and then, since a redrawn line in a log file is noise.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from omirror import systemd
from omirror.units import human_bytes, human_time

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
DRAW_EVERY_S = 0.1
_BAR = 24


class Progress:
    """Progress of one job, in files (entries) and bytes; the total of files may grow."""

    def __init__(self, label: str, *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.started = clock()
        self.files = self.total_files = 0
        self.bytes = 0
        self._drawn = 0.0
        self._logged = self.started
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.under_systemd = bool(os.environ.get("NOTIFY_SOCKET"))

    def line(self) -> str:
        """``label [####----] 120/400 files, 3.2 MB, 1.1 MB/s, ETA 0:04``"""
        elapsed = max(self.clock() - self.started, 1e-9)
        parts = [self.label]
        if self.total_files:
            done = min(self.files / self.total_files, 1.0)
            fill = int(done * _BAR)
            parts.append(f"[{'#' * fill}{'-' * (_BAR - fill)}] "
                         f"{self.files:,}/{self.total_files:,} files")
        else:
            parts.append(f"{self.files:,} files")
        text = " ".join(parts) + f", {human_bytes(self.bytes)}, " \
                                 f"{human_bytes(self.bytes / elapsed)}/s"
        if self.total_files and 0 < self.files < self.total_files:
            eta = elapsed * (self.total_files - self.files) / self.files
            text += f", ETA {human_time(eta)}"
        return text

    def update(self, files: int, bytes_: int, total_files: int | None = None) -> None:
        """Running totals, not increments. The terminal is redrawn at most every
        DRAW_EVERY_S and the log written every LOG_EVERY_S, but STATUS= goes on every call."""
        self.files, self.bytes = files, bytes_
        if total_files is not None:
            self.total_files = max(total_files, files)
        now = self.clock()
        if self.tty:
            if now - self._drawn >= DRAW_EVERY_S:
                self._drawn = now
                self.stream.write("\r\x1b[K" + self.line())
                self.stream.flush()
            return
        if self.under_systemd:
            systemd.status(self.line())
        if now - self._logged >= LOG_EVERY_S:
            self._logged = now
            log.info("%s", self.line())

    def close(self) -> None:
        """Leave the final figures: a finished line on a terminal, a log line elsewhere."""
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line() + "\n")
            self.stream.flush()
        elif self.files or self.bytes:
            log.info("%s", self.line())
