"""The tree worker: the one thread that touches mirrored trees.

Scans, applies and the content a receiver builds all run here, one job at a time, so an
apply and the indexing of the same path never interleave, and the store is written by
one thread. The event loop hands jobs over and awaits them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class TreeWorker:
    """A single-thread executor, awaited from the loop."""

    THREAD_NAME = "omirror-tree"

    def __init__(self, name: str = THREAD_NAME) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, name)

    async def __call__(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``func(*args, **kwargs)`` in the worker; a job once begun runs to its end,
        even when the awaiting task is cancelled."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(func, *args, **kwargs))

    def shutdown(self) -> None:
        """Wait for the job in progress (a file being installed is installed or not at
        all), then stop the thread."""
        self._pool.shutdown(wait=True)
