"""A byte-counting semaphore: bounds the bytes held in memory by concurrent work, not the number of tasks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ByteBudget:
    """At most ``limit`` bytes reserved at once; a reservation larger than the limit waits for all of it.

    Many small files and a few large parts share one budget, so peak memory is the limit
    plus one oversize item, whatever the mix.
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("budget must be positive")
        self.limit = limit
        self._used = 0
        self._changed = asyncio.Condition()

    @property
    def used(self) -> int:
        return self._used

    @asynccontextmanager
    async def reserve(self, size: int) -> AsyncIterator[None]:
        # An item larger than the whole budget runs alone rather than never.
        size = min(max(size, 0), self.limit)
        async with self._changed:
            await self._changed.wait_for(lambda: self._used + size <= self.limit)
            self._used += size
        try:
            yield
        finally:
            async with self._changed:
                self._used -= size
                self._changed.notify_all()
