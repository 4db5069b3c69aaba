"""One memory budget over every request body the service holds: STOW-RS parts (with the copies
their ingest makes) and service-signed upload PUTs.

A request reserves its share before it reads its body and keeps it to the end. A request that
cannot get its share waits, up to ``request_memory_wait_seconds``, then is answered 503 with
Retry-After: under load, memory stays at the budget and clients are told to come back instead
of the process growing until the kernel kills it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..budget import ByteBudget
from .http_errors import ServiceBusyError


class RequestMemory:
    """At most ``limit`` bytes held by request bodies at once; waits of at most ``wait_seconds``."""

    def __init__(self, limit: int, wait_seconds: float) -> None:
        self._budget = ByteBudget(limit)
        self.limit = limit
        self.wait_seconds = wait_seconds

    @property
    def used(self) -> int:
        return self._budget.used

    @asynccontextmanager
    async def reserve(self, size: int) -> AsyncIterator[None]:
        """Hold ``size`` bytes of the budget (a request larger than all of it runs alone)."""
        reservation = self._budget.reserve(size)
        try:
            # Cancelled while waiting, the reservation has taken nothing.
            await asyncio.wait_for(reservation.__aenter__(), self.wait_seconds)
        except TimeoutError:
            raise ServiceBusyError(
                "the service is busy: the memory for request bodies is taken",
                retry_after=max(1, math.ceil(self.wait_seconds)),
                hint="try again later, or send fewer concurrent requests",
            ) from None
        try:
            yield
        finally:
            await reservation.__aexit__(None, None, None)
