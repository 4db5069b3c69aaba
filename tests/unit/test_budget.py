from __future__ import annotations

import asyncio
import random

import pytest

from dicom_cloud.budget import ByteBudget


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ByteBudget(0)


def test_never_more_than_the_limit_under_concurrency() -> None:
    limit = 1000
    rng = random.Random(42)
    sizes = [rng.randint(1, 400) for _ in range(300)]

    async def main() -> tuple[int, int]:
        budget = ByteBudget(limit)
        held = 0
        peak = 0

        async def job(size: int) -> None:
            nonlocal held, peak
            async with budget.reserve(size):
                held += size
                peak = max(peak, held)
                assert budget.used <= limit
                await asyncio.sleep(0)
                await asyncio.sleep(rng.random() / 2000)
                held -= size

        await asyncio.gather(*(job(s) for s in sizes))
        return peak, budget.used

    peak, used = asyncio.run(main())
    assert peak <= limit
    assert peak > limit // 2  # the budget was actually shared, not serialised
    assert used == 0


def test_oversize_reservation_runs_alone() -> None:
    async def main() -> list[str]:
        budget = ByteBudget(100)
        log: list[str] = []

        async def small(name: str) -> None:
            async with budget.reserve(40):
                log.append(f"{name}+")
                await asyncio.sleep(0.01)
                log.append(f"{name}-")

        async def big() -> None:
            await asyncio.sleep(0.001)  # let the small ones start first
            async with budget.reserve(10_000):
                assert budget.used == 100
                log.append("big+")
                await asyncio.sleep(0.01)
                log.append("big-")

        await asyncio.wait_for(asyncio.gather(small("a"), small("b"), big()), timeout=5)
        assert budget.used == 0
        return log

    log = asyncio.run(main())
    start = log.index("big+")
    assert log[start + 1] == "big-"  # nothing else ran while the oversize item held the budget
    assert {"a+", "a-", "b+", "b-"} <= set(log)


def test_zero_and_negative_sizes_do_not_block() -> None:
    async def main() -> None:
        budget = ByteBudget(10)
        async with budget.reserve(10), budget.reserve(0), budget.reserve(-5):
            assert budget.used == 10

    asyncio.run(asyncio.wait_for(main(), timeout=5))


def test_released_on_exception() -> None:
    async def main() -> int:
        budget = ByteBudget(100)
        with pytest.raises(RuntimeError):
            async with budget.reserve(80):
                raise RuntimeError("boom")
        # The next full-size reservation must not wait forever.
        async with asyncio.timeout(2), budget.reserve(100):
            assert budget.used == 100
        return budget.used

    assert asyncio.run(main()) == 0


def test_waiter_cancelled_while_waiting_leaves_no_reservation() -> None:
    async def main() -> int:
        budget = ByteBudget(100)
        async with budget.reserve(100):

            async def waiter() -> None:
                async with budget.reserve(50):
                    pass

            task = asyncio.create_task(waiter())
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        async with asyncio.timeout(2), budget.reserve(100):
            pass
        return budget.used

    assert asyncio.run(main()) == 0
