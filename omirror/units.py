"""Sizes and durations as people read them: one form everywhere (logs, status, progress,
the demo). Sizes are binary (KiB, MiB), as ``--min-free 512M`` reads them and as ``df
-h`` prints them."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``1234`` -> ``1.2 KiB``; whole bytes below 1 KiB."""
    value = float(n)
    if abs(value) < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def human_time(seconds: float) -> str:
    """``3725`` -> ``1:02:05``; ``125`` -> ``2:05``: a clock-like remaining time."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
