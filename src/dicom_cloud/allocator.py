"""How the C allocator treats the large buffers of a transfer: kept for reuse, not handed back.

glibc serves an allocation above its mmap threshold (128 KiB at first) with pages mapped for it
alone, and unmaps them when it is freed. A transfer allocates such buffers by the thousand:
obstore's chunks of a ranged download (up to 1 MiB, of whatever size the socket gave), the body of
every whole object, the bytes of every part. Each one is mapped, touched page by page (a page fault
per 4 KiB, the kernel zeroing every page) and unmapped again. glibc raises the threshold when a
mapped block is freed, but only to that block's size: a larger one is mapped again, and the heap
gives back what is freed at its top beyond twice the threshold.

Above a threshold of 4 MiB these buffers come from the heap, which keeps up to 8 MiB freed at its
top before giving memory back. A 1 GiB download took 80,000-125,000 minor page faults and 1.25-1.36
seconds (median 1.31), against 24,000-30,000 and 1.19-1.29 s (median 1.24); its peak RSS grew from
85-105 to 105-130 MiB (docs/benchmarks.md, 2026-12-05). Other C libraries are left as they are.
"""

from __future__ import annotations

import sys

#: mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Allocations up to this size come from the heap (glibc's dynamic threshold stops at 32 MiB).
MMAP_THRESHOLD = 4 * 1024 * 1024
#: Freed memory kept at the heap's top before it is given back to the system.
TRIM_THRESHOLD = 8 * 1024 * 1024


def keep_freed_buffers() -> bool:
    """Set glibc's thresholds for this process (see the module's docstring); False where the C
    library is not glibc or refuses them. Process-wide: for the faces (the CLI, the service's
    workers), never for a program that imports the library."""
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
