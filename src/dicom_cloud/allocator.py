"""How the C allocator treats the large buffers of a transfer: kept for reuse, not handed back.

glibc serves an allocation above its mmap threshold (128 KiB at first) with pages mapped for it
alone, and unmaps them when it is freed. A transfer allocates such buffers by the thousand:
obstore's chunks of a ranged download (up to 1 MiB, of whatever size the socket gave), the body of
every whole object, the bytes of every part. Each one is mapped, touched page by page (a page fault
per 4 KiB, the kernel zeroing every page) and unmapped again. glibc raises the threshold when a
mapped block is freed, but only to that block's size: a larger one is mapped again, and the heap
gives back what is freed at its top beyond twice the threshold.

Setting the thresholds turns that adjustment off, so they are set where it would end: up to
32 MiB (the largest threshold glibc chooses itself) buffers come from the heap, a transfer's parts
(16 MiB by default) included, and the heap keeps up to 32 MiB freed at its top. Measured on
2026-12-05 (docs/benchmarks.md): a 1 GiB download took 72,000-101,000 minor page faults and
1.28-1.48 s, against 24,000-30,000 and 1.22-1.34 s; a 1 GiB upload in 16 MiB parts stayed as it was
(21,000 faults, against 33,000-60,000). Lower thresholds were worse: at 4 MiB every part of that
upload was mapped afresh (533,000 faults, 0.4 system CPU-seconds more), and with the heap keeping
only 8 MiB each freed part was given back and faulted in again (330,000). Peak RSS of the download
grew from 78-87 to 105-130 MiB. Other C libraries are left as they are.
"""

from __future__ import annotations

import sys

#: mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Allocations up to this size come from the heap (glibc's own threshold stops at 32 MiB).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Freed memory kept at the heap's top before it is given back to the system.
TRIM_THRESHOLD = 32 * 1024 * 1024


def keep_freed_buffers() -> bool:
    """Set glibc's thresholds for this process (see the module's docstring); False where the C
    library is not glibc or refuses them. Process-wide: for a face's own process (the CLI sets
    them), never for a program that imports the library. The service's whole-study reads showed
    no difference with them (0.154 against 0.155 s), and it does not set them."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # 1.6 ms of start-up: only where it is used

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library to load, or none with mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # musl has a mallopt that does nothing and answers 0.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
