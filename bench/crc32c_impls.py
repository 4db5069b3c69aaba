"""CRC32C implementations side by side: the crc32c package (LGPL) and google-crc32c (Apache-2.0).

Single-thread throughput over buffer sizes the engine uses (a small DICOM header, 64 KiB reads,
8 MiB chunks and parts), then two threads hashing at once: an implementation that holds the GIL
gains nothing from the second thread. One run; prints a Markdown table for docs/benchmarks.md.

    python bench/crc32c_impls.py [--total-mib 512]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable

import crc32c
import google_crc32c

Impl = Callable[[bytes | memoryview, int], int]

#: google-crc32c 1.x takes only ``bytes`` (not memoryview or bytearray, which the engine hashes as
#: parts stream by): the second form pays the copy such a caller would need.
IMPLEMENTATIONS: dict[str, Impl] = {
    "crc32c": lambda data, value: crc32c.crc32c(data, value),
    "google-crc32c, bytes": lambda data, value: google_crc32c.extend(value, data),
    "google-crc32c, memoryview copied": lambda data, value: google_crc32c.extend(value, bytes(data)),
}
SIZES = (512, 64 * 1024, 8 * 1024 * 1024)


def _run(impl: Impl, buffer: memoryview, size: int, total: int, bytes_only: bool) -> float:
    """Seconds to hash ``total`` bytes in ``size``-byte slices of ``buffer``."""
    rounds = max(1, total // size)
    # Bytes objects cut beforehand for the bytes-only form; memoryview slices (no copy) otherwise.
    slices = [buffer[o : o + size] for o in range(0, len(buffer) - size + 1, size)][:64]
    if bytes_only:
        slices = [s.tobytes() for s in slices]  # type: ignore[misc]
    value = 0
    start = time.perf_counter()
    for i in range(rounds):
        value = impl(slices[i % len(slices)], value)
    return time.perf_counter() - start


def _threads(impl: Impl, buffer: memoryview, size: int, total: int, bytes_only: bool, n: int) -> float:
    workers = [threading.Thread(target=_run, args=(impl, buffer, size, total, bytes_only)) for _ in range(n)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--total-mib", type=int, default=512, help="bytes hashed per measurement (MiB)")
    args = parser.parse_args()
    total = args.total_mib * 1024 * 1024
    buffer = memoryview(os.urandom(16 * 1024 * 1024))
    reference = b"123456789"
    for name, impl in IMPLEMENTATIONS.items():
        assert impl(reference, 0) == 0xE3069283, name  # the CRC32C check value
    print(f"crc32c hardware: {crc32c.hardware_based}; google-crc32c: {google_crc32c.implementation}")
    print("| implementation | buffer | 1 thread, GB/s | 2 threads, GB/s (total) |")
    print("|---|---|---|---|")
    for size in SIZES:
        amount = total if size >= 65536 else total // 16
        for name, impl in IMPLEMENTATIONS.items():
            bytes_only = name.endswith(", bytes")
            best = min(_run(impl, buffer, size, amount, bytes_only) for _ in range(3))
            two = min(_threads(impl, buffer, size, amount, bytes_only, 2) for _ in range(3))
            print(f"| {name} | {size:,} B | {amount / best / 1e9:.2f} | {2 * amount / two / 1e9:.2f} |")


if __name__ == "__main__":
    main()
