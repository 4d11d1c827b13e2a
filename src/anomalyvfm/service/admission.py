"""Server-wide memory budgets: decoded pixels and request-body bytes held by all requests together.

Per-request limits alone do not bound memory: 64 clients each sending a legal 36 MP image would hold
7 GB of decoded pixels. A request therefore takes its image's pixel count from the budget (read from the
header, before decoding) and gives it back once the answer, maps included, is encoded; while the budget is
spent, further requests wait — up to their deadline, then 503. Body bytes are taken chunk by chunk as they
arrive and are never waited for (a half-received body cannot pause), so a full byte budget answers 503.
All of it runs on the event loop thread, so no lock is needed.

glibc keeps freed heap memory for reuse, so without help the RSS stays at its peak after a large request
(984 MB at rest after the 36 MP cases of benchmarks/serve_memory.py, against 490 MB before them);
`release_memory` (glibc's `malloc_trim`) hands it back once a large request is done and nothing is held.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

TRIM_AFTER_PIXELS = 4_000_000  # requests at least this large hand freed heap memory back to the system


def _malloc_trim() -> Callable[[], None] | None:
    """glibc's `malloc_trim(0)`, or None elsewhere (musl, macOS, Windows: nothing to do there)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


release_memory = _malloc_trim()


class Budget:
    """An amount (`total` pixels or bytes) that requests take from and give back."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.waiting = 0  # requests now waiting in `take`: lets a test (or a gauge) see a request queue for room
        self._freed: asyncio.Event | None = None  # set (and replaced) whenever something is given back

    def try_take(self, amount: int) -> bool:
        if self.used + amount > self.total:
            return False
        self.used += amount
        return True

    async def take(self, amount: int, timeout: float) -> None:
        """Take `amount`, waiting up to `timeout` s for others to give some back; `TimeoutError` after."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.try_take(amount):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            if self._freed is None:
                self._freed = asyncio.Event()
            self.waiting += 1
            try:
                await asyncio.wait_for(self._freed.wait(), remaining)
            except asyncio.TimeoutError:
                raise TimeoutError from None
            finally:
                self.waiting -= 1

    def give(self, amount: int) -> None:
        self.used -= amount
        if self._freed is not None:
            self._freed.set()
            self._freed = None

    @asynccontextmanager
    async def hold(self, amount: int, timeout: float) -> AsyncIterator[None]:
        await self.take(amount, timeout)
        try:
            yield
        finally:
            self.give(amount)
