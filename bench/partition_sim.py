"""The cluster's partitioner over a generated listing of 10 million keys, with a fake lister.

    python bench/partition_sim.py [--keys 10000000] [--partition-size 500] [--in-flight 4]

The fake lister makes each key as it is asked for (as a paged listing does), so what the run holds
is what the client holds: the partition being filled and the partitions "in flight" (a bounded
window that the simulated cluster drains in order, as the runner's backpressure does). Reports the
peak of Python allocations (tracemalloc) at checkpoints along the listing, which stays flat when
nothing grows with the number of keys, and how even the partitions are (objects and bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dicom_cloud.cluster.partition import DEFAULT_PARTITION_BYTES, Partition, partitions
from dicom_cloud.engine.model import TransferItem


async def fake_listing(count: int) -> AsyncIterator[TransferItem]:
    """Keys as an archive lays them out (study/series/instance), sizes of 100 KB to 1.1 MB."""
    for n in range(count):
        study, series, instance = n // 2000, (n // 200) % 10, n % 200
        relative = f"{study:07d}/{series:02d}/{instance:04d}.dcm"
        size = 100_000 + (n * 7919) % 1_000_000
        yield TransferItem("src/" + relative, "dst/" + relative, size, relative, f"etag:{n:x}")


async def simulate(keys: int, partition_size: int, in_flight: int, checkpoints: int) -> None:
    window: collections.deque[Partition] = collections.deque()
    counts: list[int] = []
    sizes: list[int] = []
    listed = 0
    every = max(keys // checkpoints, 1)
    next_report = every
    started = time.monotonic()
    tracemalloc.start()
    listing = fake_listing(keys)
    async for part in partitions(listing, max_items=partition_size, max_bytes=DEFAULT_PARTITION_BYTES):
        if len(window) >= in_flight:
            window.popleft()  # the oldest partition in flight finished
        window.append(part)
        counts.append(len(part.items))
        sizes.append(part.bytes)
        listed += len(part.items)
        if listed >= next_report:
            current, peak = tracemalloc.get_traced_memory()
            print(
                f"{listed:>11,} keys  {len(counts):>7,} partitions  held {current / 1e6:6.2f} MB"
                f"  peak {peak / 1e6:6.2f} MB  {time.monotonic() - started:6.1f} s",
                flush=True,
            )
            next_report += every
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    seconds = time.monotonic() - started
    full = counts[:-1] or counts
    print(f"keys: {listed:,} in {len(counts):,} partitions, {seconds:.1f} s ({listed / seconds:,.0f} keys/s)")
    print(f"peak of Python allocations: {peak / 1e6:.2f} MB (held at the end: {current / 1e6:.2f} MB)")
    print(
        f"objects per partition: min {min(full)}, max {max(full)}, last {counts[-1]}; "
        f"bytes per partition: mean {statistics.mean(sizes) / 1e6:.1f} MB, "
        f"stdev {statistics.pstdev(sizes) / statistics.mean(sizes):.1%} of the mean"
    )


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--keys", type=int, default=10_000_000)
    parser.add_argument("--partition-size", type=int, default=500)
    parser.add_argument("--in-flight", type=int, default=4, help="partitions held (2 per worker thread)")
    parser.add_argument("--checkpoints", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(simulate(args.keys, args.partition_size, args.in_flight, args.checkpoints))


if __name__ == "__main__":
    main()
