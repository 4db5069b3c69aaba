"""An adaptive concurrency limit: fewer objects in flight while the store says "slow down".

AIMD, as TCP does with its window: each time the store throttles (429, 503 SlowDown, Azure
ServerBusy: ``ThrottledError``) the number of objects allowed in flight is halved, at most once per
``cooldown`` seconds (the requests already in flight when the store started refusing all fail
together, and that is one signal, not thirty); after as many successes as the current limit allows,
it grows back by one. It never goes below 1 nor above the configured parallelism.

Workers hold a slot for each attempt at an object (``async with limiter.slot():``), so lowering the
limit takes effect as the attempts in flight finish; nothing in flight is interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

log = logging.getLogger(__name__)

#: Seconds after a decrease during which further throttling does not decrease again.
DEFAULT_COOLDOWN = 1.0


class AdaptiveLimiter:
    def __init__(self, maximum: int, *, cooldown: float = DEFAULT_COOLDOWN) -> None:
        if maximum < 1:
            raise ValueError("the concurrency limit must be at least 1")
        self.maximum = maximum
        #: Objects allowed in flight now.
        self.limit = maximum
        #: The lowest the limit went during the run.
        self.lowest = maximum
        #: Throttling answers seen (each one, including those inside a cooldown).
        self.throttled = 0
        self.cooldown = cooldown
        self._in_flight = 0
        self._successes = 0
        self._last_decrease = float("-inf")
        self._changed = asyncio.Condition()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait until fewer than ``limit`` attempts are in flight, and count this one while it runs."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._in_flight < self.limit)
            self._in_flight += 1
        try:
            yield
        finally:
            async with self._changed:
                self._in_flight -= 1
                self._changed.notify_all()

    def on_throttled(self) -> None:
        self.throttled += 1
        now = time.monotonic()
        if now - self._last_decrease < self.cooldown:
            return
        self._last_decrease = now
        self._successes = 0
        before = self.limit
        self.limit = max(1, self.limit // 2)
        self.lowest = min(self.lowest, self.limit)
        if self.limit != before:
            log.info("the store is throttling: concurrency %d -> %d", before, self.limit)

    async def on_success(self) -> None:
        if self.limit >= self.maximum:
            return
        self._successes += 1
        if self._successes >= self.limit:
            self._successes = 0
            self.limit += 1
            log.debug("no throttling for a while: concurrency -> %d", self.limit)
            async with self._changed:
                self._changed.notify_all()
