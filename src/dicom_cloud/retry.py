"""When and how long to wait before trying again: one retry policy for every retry dicom-cloud makes.

Two layers use it (docs/reliability.md): ``RequestRetries`` for one HTTP request, applied to every
HTTP stack we send through (obstore's ``RetryConfig``, google-api-core's ``Retry`` in gcs.py, the
requests loop of rest.py), and ``RetryPolicy`` for whole objects and listings, in the engine.

Exponential backoff with full jitter: before retry ``n`` (1, 2, ...) the wait is drawn uniformly
from ``[0, min(max_delay, base_delay * 2 ** (n - 1))]``, so that many workers throttled at the same
moment do not come back at the same moment. A server's ``Retry-After`` (where a backend can read it)
is a floor under that draw, still capped by ``max_delay``. Retries stop after ``attempts`` attempts
in all, or once ``deadline`` seconds have passed since the first failure, whichever comes first.

Only errors that say so are retried (``DicomCloudError.retryable``: network faults and throttling);
the numbers and the layering with the backends' own per-request retries are in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from .errors import DicomCloudError, NetworkError, ThrottledError, UsageError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Attempts per object (the first and the retries) unless told otherwise (--attempts).
DEFAULT_ATTEMPTS = 5
DEFAULT_BASE_DELAY = 0.25
DEFAULT_MAX_DELAY = 10.0
#: Seconds after an object's first failure past which no new attempt starts.
DEFAULT_DEADLINE = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = DEFAULT_ATTEMPTS
    base_delay: float = DEFAULT_BASE_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    deadline: float = DEFAULT_DEADLINE

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise UsageError("attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < self.base_delay:
            raise UsageError("retry delays must satisfy 0 <= base <= max")
        if self.deadline < 0:
            raise UsageError("the retry deadline cannot be negative")

    def delay(
        self, retry: int, *, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** max(0, retry - 1))
        drawn = (rng or random).uniform(0.0, ceiling)
        if retry_after is not None and retry_after > drawn:
            return min(self.max_delay, retry_after)
        return drawn

    def should_retry(self, error: BaseException, attempt: int, first_failure: float | None) -> bool:
        """Whether attempt number ``attempt`` (1-based), which failed with ``error``, gets another.

        ``first_failure`` is the ``time.monotonic()`` of the first failure of this operation.
        """
        if not (isinstance(error, DicomCloudError) and error.retryable):
            return False
        if attempt >= self.attempts:
            return False
        return first_failure is None or time.monotonic() - first_failure < self.deadline


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (the delta-seconds form; an HTTP date is ignored)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


#: Per-request retries: the first wait and the ceiling of the doubling waits, in seconds.
REQUEST_FIRST_DELAY = 0.1
REQUEST_MAX_DELAY = 8.0
#: HTTP statuses worth sending the same request again for.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def status_exhausted(message: str, status: int, retry_after: float | None) -> NetworkError:
    """The error of a request whose retries a transient status used up: ThrottledError for 429 and
    503 (the object layer's limiter hears of it, with the server's Retry-After), else NetworkError."""
    if status in (429, 503):
        return ThrottledError(message, retry_after=retry_after)
    return NetworkError(message)


@dataclass(frozen=True)
class RequestRetries:
    """The request layer: how often and how long one HTTP request is repeated by the stack that
    sent it, the same numbers for every stack. Waits double from ``first_delay`` up to
    ``max_delay`` with full jitter; a server's ``Retry-After``, where the stack exposes it, is a
    floor under the draw (capped by ``max_delay``: a longer wait is the object layer's business,
    and the error it raises carries the server's value there). No retry starts more than
    ``timeout`` seconds after the first try."""

    retries: int = 4
    first_delay: float = REQUEST_FIRST_DELAY
    max_delay: float = REQUEST_MAX_DELAY
    timeout: float = 300.0

    def delay(
        self, retry: int, *, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        ceiling = min(self.max_delay, self.first_delay * 2 ** max(0, retry - 1))
        drawn = (rng or random).uniform(0.0, ceiling)
        if retry_after is not None and retry_after > drawn:
            return min(self.max_delay, retry_after)
        return drawn

    def allows(self, retries_done: int, started: float) -> bool:
        """Whether another retry may start: retries are left, and the first try (at ``started``,
        ``time.monotonic()``) was less than ``timeout`` ago."""
        return retries_done < self.retries and time.monotonic() - started < self.timeout

    def obstore_config(self) -> dict[str, Any]:
        """This policy as obstore's ``RetryConfig`` (obstore does not expose response headers, so
        its own backoff applies without Retry-After)."""
        return {
            "max_retries": self.retries,
            "retry_timeout": timedelta(seconds=max(self.timeout, 1.0)),
            "backoff": {
                "init_backoff": timedelta(seconds=self.first_delay),
                "max_backoff": timedelta(seconds=self.max_delay),
                "base": 2,
            },
        }

    def sleeps(self, retry_after: Callable[[], float | None] = lambda: None) -> Iterator[float]:
        """The waits between tries, as a generator (google-api-core's ``sleep_generator``);
        ``retry_after`` tells the latest error's Retry-After when there is one."""
        retry = 0
        while True:
            retry += 1
            yield self.delay(retry, retry_after=retry_after())


#: The policy used where nothing else was configured (objects take theirs from --attempts).
DEFAULT_POLICY = RetryPolicy()
#: Listings: fewer, shorter waits. The first listing of a run is also the check that the store
#: answers at all, and an unreachable endpoint should be reported within seconds.
LISTING_POLICY = RetryPolicy(attempts=3, max_delay=2.0, deadline=30.0)


def retry_after_of(error: BaseException) -> float | None:
    """The server's ``Retry-After``, in seconds, if the error carries one."""
    value = getattr(error, "retry_after", None)
    return float(value) if isinstance(value, int | float) else None


async def call_with_retries(
    operation: Callable[[], Awaitable[T]],
    policy: RetryPolicy = DEFAULT_POLICY,
    *,
    what: str = "",
    on_retry: Callable[[DicomCloudError], None] | None = None,
    stopping: Callable[[], bool] | None = None,
) -> T:
    """Run ``operation`` until it succeeds, fails with an error not worth retrying, or the policy
    gives up (the last error is raised). ``on_retry`` hears of each failure that is retried;
    ``stopping`` says when no new attempt should start (the run is ending)."""
    attempt = 0
    first_failure: float | None = None
    while True:
        attempt += 1
        try:
            return await operation()
        except DicomCloudError as error:
            first_failure = first_failure or time.monotonic()
            if not policy.should_retry(error, attempt, first_failure) or (
                stopping is not None and stopping()
            ):
                raise
            if on_retry is not None:
                on_retry(error)
            wait = policy.delay(attempt, retry_after=retry_after_of(error))
            log.debug("retrying %s in %.2f s (attempt %d: %s)", what or "request", wait, attempt, error)
            await asyncio.sleep(wait)


async def resumable_listing(
    open_listing: Callable[[str | None], AsyncIterator[T]],
    key_of: Callable[[T], str],
    policy: RetryPolicy = LISTING_POLICY,
    *,
    what: str = "",
) -> AsyncIterator[T]:
    """Items of a listing in key order, restarted after the last key yielded when it fails on a
    retryable error. ``open_listing(after)`` lists the keys strictly greater than ``after`` (all
    keys when ``after`` is None). Each successful item resets the count of attempts. A listing whose
    items came out of key order is not resumed (its error is raised): resuming could skip keys."""
    after: str | None = None
    failures = 0  # consecutive failures without an item in between
    first_failure: float | None = None
    #: Resuming "after a key" is sound only if the server lists in key order (some S3-compatible
    #: servers list depth-first): once an item comes out of order, a failure is not resumed.
    in_order = True
    while True:
        try:
            async for item in open_listing(after):
                key = key_of(item)
                if after is not None and key <= after:
                    in_order = False
                after = key
                failures, first_failure = 0, None
                yield item
            return
        except DicomCloudError as error:
            failures += 1
            first_failure = first_failure or time.monotonic()
            if not in_order or not policy.should_retry(error, failures, first_failure):
                raise
            wait = policy.delay(failures, retry_after=retry_after_of(error))
            log.debug("listing %s failed (%s); resuming after %r in %.2f s", what, error, after, wait)
            await asyncio.sleep(wait)
