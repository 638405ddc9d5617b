"""The wall clock that stamps versions, in one place, so that tests can skew it.

``OMIRROR_TEST_CLOCK_OFFSET_S`` is **for tests only** (tests/fault): seconds, possibly
negative or fractional, added to every time this host puts into a stamp (the ctime of a
change found by a scan, the "now" of a deletion or a conflict copy) and into its HELLO
clock. A daemon started with it behaves exactly like a host whose clock is that far
off, without touching the machine's clock. Unset (always, outside tests) it is 0.
"""

from __future__ import annotations

import os
import time

_ENV = "OMIRROR_TEST_CLOCK_OFFSET_S"


def offset_ns() -> int:
    """How far this host's clock is made to be off, in ns: 0 unless testing skew."""
    text = os.environ.get(_ENV)
    return round(float(text) * 1e9) if text else 0


def now_ns() -> int:
    """Now, as this host's (possibly skewed) clock says: the time of a local stamp."""
    return time.time_ns() + offset_ns()
