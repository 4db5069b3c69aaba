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
    # Running statistics only: lists of per-partition figures would grow with the listing and
    # show up in the very measurement they serve.
    partitions_seen = 0
    smallest, largest, last_count = 10**12, 0, 0
    size_sum = size_square_sum = 0.0
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
        count, size = len(part.items), part.bytes
        if partitions_seen:  # the previous partition was not the last: a full one
            smallest, largest = min(smallest, last_count), max(largest, last_count)
        partitions_seen += 1
        last_count = count
        size_sum += size
        size_square_sum += size * size
        listed += count
        if listed >= next_report:
            current, peak = tracemalloc.get_traced_memory()
            print(
                f"{listed:>11,} keys  {partitions_seen:>7,} partitions  held {current / 1e6:6.2f} MB"
                f"  peak {peak / 1e6:6.2f} MB  {time.monotonic() - started:6.1f} s",
                flush=True,
            )
            next_report += every
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    seconds = time.monotonic() - started
    if partitions_seen == 1:
        smallest = largest = last_count
    mean = size_sum / partitions_seen
    stdev = max(size_square_sum / partitions_seen - mean * mean, 0.0) ** 0.5
    print(
        f"keys: {listed:,} in {partitions_seen:,} partitions, {seconds:.1f} s "
        f"({listed / seconds:,.0f} keys/s)"
    )
    print(f"peak of Python allocations: {peak / 1e6:.2f} MB (held at the end: {current / 1e6:.2f} MB)")
    print(
        f"objects per partition: min {smallest}, max {largest} (all but the last), last {last_count}; "
        f"bytes per partition: mean {mean / 1e6:.1f} MB, stdev {stdev / mean:.1%} of the mean"
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
