"""Cross-cutting behaviour as wrappers around one item's work (as restic wraps its backends):
retries under the one retry policy, concurrency that backs off under throttling, and the job
journal that skips what an earlier run finished and records what this one finishes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import DicomCloudError, ThrottledError
from ..journal import Journal
from ..retry import RetryPolicy, call_with_retries
from ..throttle import AdaptiveLimiter
from .model import TransferItem, Written

T = TypeVar("T")


class Retrying:
    """Attempts an operation again while the policy allows (retry.py), unless the run is stopping."""

    def __init__(self, policy: RetryPolicy, *, stopping: Callable[[], bool]) -> None:
        self.policy = policy
        self._stopping = stopping

    async def __call__(
        self,
        operation: Callable[[], Awaitable[T]],
        *,
        what: str,
        on_retry: Callable[[DicomCloudError], None],
    ) -> T:
        return await call_with_retries(
            operation, self.policy, what=what, on_retry=on_retry, stopping=self._stopping
        )


class Throttled:
    """An operation holds a slot of the adaptive limiter while it runs; a throttling answer that
    outlasted the store's own retries halves the concurrency, successes grow it back (throttle.py)."""

    def __init__(self, limiter: AdaptiveLimiter) -> None:
        self.limiter = limiter

    async def __call__(self, operation: Callable[[], Awaitable[T]]) -> T:
        async with self.limiter.slot():
            try:
                result = await operation()
            except ThrottledError:
                self.limiter.on_throttled()
                raise
        await self.limiter.on_success()
        return result


class Journaled:
    """The job journal around items: an object an earlier run finished (same version) is not
    moved again; each object finished now is recorded (journal.py batches the writes)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def done_before(self, item: TransferItem) -> bool:
        return self.journal.is_done(item.src_key, item.version)

    def record(self, item: TransferItem, result: Written) -> None:
        """``item`` as planned (a layout or keep-both may have written it under another name)."""
        self.journal.record_done(item.src_key, item.version, item.dst_key, item.size, result.crc32c)
