"""The retry policy (retry.py), the adaptive concurrency limit (throttle.py) and their use by the engine."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest
from test_transfer_engine import FakeSource, _location

from dicom_cloud.backends import open_store
from dicom_cloud.errors import IntegrityError, NetworkError, ThrottledError, UsageError
from dicom_cloud.retry import RetryPolicy, call_with_retries, resumable_listing
from dicom_cloud.throttle import AdaptiveLimiter
from dicom_cloud.transfer import Transfer, TransferOptions


def test_full_jitter_within_exponential_bounds() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=4.0)
    rng = random.Random(3)
    for retry, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        draws = [policy.delay(retry, rng=rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.8  # spread over the whole range, not a fixed step


def test_retry_after_is_a_floor_capped_by_max_delay() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=5.0)
    assert policy.delay(1, retry_after=3.0) == 3.0
    assert policy.delay(1, retry_after=60.0) == 5.0


def test_what_is_retried() -> None:
    policy = RetryPolicy(attempts=3, deadline=10)
    now = time.monotonic()
    assert policy.should_retry(NetworkError("reset"), 1, now)
    assert policy.should_retry(ThrottledError("slow down"), 2, now)
    assert not policy.should_retry(ThrottledError("slow down"), 3, now)  # attempts spent
    assert not policy.should_retry(IntegrityError("bad crc"), 1, now)
    assert not policy.should_retry(ValueError("bug"), 1, now)
    assert not policy.should_retry(NetworkError("reset"), 1, now - 11)  # past the deadline
    with pytest.raises(UsageError):
        RetryPolicy(attempts=0)


def test_call_with_retries() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ThrottledError("slow down", retry_after=0.0)
        return "done"

    policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)
    assert asyncio.run(call_with_retries(flaky, policy)) == "done" and calls == 3
    calls = -10
    with pytest.raises(ThrottledError):
        asyncio.run(call_with_retries(flaky, policy))


def test_listing_resumes_after_the_last_key() -> None:
    keys = [f"k{i:02d}" for i in range(10)]
    opened: list[str | None] = []
    failed: set[str] = set()

    async def listing(after: str | None) -> AsyncIterator[str]:
        opened.append(after)
        for key in keys:
            if after is None or key > after:
                if key in ("k03", "k07") and key not in failed:
                    failed.add(key)
                    raise NetworkError("connection reset")
                yield key

    async def collect() -> list[str]:
        policy = RetryPolicy(attempts=2, base_delay=0.0, max_delay=0.0)
        return [k async for k in resumable_listing(listing, lambda k: k, policy)]

    assert asyncio.run(collect()) == keys  # nothing repeated, nothing missing
    assert opened == [None, "k02", "k06"]


def test_aimd_halves_once_per_cooldown_and_grows_back() -> None:
    limiter = AdaptiveLimiter(32, cooldown=60)
    limiter.on_throttled()
    limiter.on_throttled()  # the same congestion event: no second halving
    assert (limiter.limit, limiter.throttled) == (16, 2)

    async def succeed(times: int) -> None:
        for _ in range(times):
            await limiter.on_success()

    asyncio.run(succeed(16))
    assert limiter.limit == 17  # +1 after a window of successes
    limiter.cooldown = 0
    for _ in range(10):
        limiter.on_throttled()
    assert limiter.limit == limiter.lowest == 1  # never below one
    asyncio.run(succeed(10_000))
    assert limiter.limit == 32  # never above the configured parallelism


def test_limiter_bounds_work_in_flight() -> None:
    async def scenario() -> int:
        limiter = AdaptiveLimiter(8, cooldown=0)
        limiter.on_throttled()
        limiter.on_throttled()  # 8 -> 4 -> 2
        peak = 0

        async def work() -> None:
            nonlocal peak
            async with limiter.slot():
                peak = max(peak, limiter.in_flight)
                await asyncio.sleep(0.001)

        await asyncio.gather(*(work() for _ in range(50)))
        return peak

    assert asyncio.run(scenario()) <= 2


def test_listing_out_of_key_order_is_not_resumed() -> None:
    async def listing(after: str | None) -> AsyncIterator[str]:
        yield "a/x"
        yield "a b"  # depth-first order: resuming after "a b" would skip "a/y"
        raise NetworkError("connection reset")

    async def collect() -> list[str]:
        policy = RetryPolicy(attempts=5, base_delay=0.0, max_delay=0.0)
        return [k async for k in resumable_listing(listing, lambda k: k, policy)]

    with pytest.raises(NetworkError):
        asyncio.run(collect())


# -- in the engine ---------------------------------------------------------------------------


class _Refusing(FakeSource):
    """Refuses the first ``refusals`` reads of each object with ``error``."""

    def __init__(self, objects: dict[str, bytes], error: Exception, refusals: int) -> None:
        super().__init__(objects)
        self.error, self.refusals = error, refusals
        self.reads: dict[str, int] = {}

    async def get(self, key: str) -> bytes:
        self.reads[key] = self.reads.get(key, 0) + 1
        if self.reads[key] <= self.refusals:
            raise self.error
        return self.objects[key]


def test_engine_retries_throttled_objects_and_backs_off(mem_bucket: str) -> None:
    objects = {f"p/{i:03d}.dcm": bytes([i]) * 100 for i in range(40)}
    source = _Refusing(objects, ThrottledError("slow down"), refusals=1)
    transfer = Transfer(
        _location(source, "p/"),
        _location(open_store(f"memory://{mem_bucket}/"), ""),
        recursive=True,
        options=TransferOptions(parallel=16),
    )
    summary = asyncio.run(transfer.run())
    assert summary.files == 40 and not summary.failed
    assert summary.throttled == 40  # one refusal per object, every one retried
    assert summary.lowest_concurrency < 16
    assert all(count == 2 for count in source.reads.values())


def test_engine_stops_when_nothing_gets_through(mem_bucket: str) -> None:
    objects = {f"p/{i:03d}.dcm": b"x" for i in range(500)}
    source = _Refusing(objects, NetworkError("connection refused"), refusals=10**6)
    transfer = Transfer(
        _location(source, "p/"),
        _location(open_store(f"memory://{mem_bucket}/"), ""),
        recursive=True,
        options=TransferOptions(parallel=4, attempts=2),
    )
    with pytest.raises(NetworkError):
        asyncio.run(transfer.run())
    assert sum(source.reads.values()) < 40  # far from 500 objects x 2 attempts
