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
(16 MiB by default) included, and a heap keeps up to 32 MiB freed at its top. The threads share two
heaps (arenas) instead of up to eight per core, each keeping its own freed memory. Lower thresholds
were worse: at 4 MiB every part of an upload was mapped afresh (533,000 faults for 1 GiB, 0.4 system
CPU-seconds more), and with 8 MiB kept each freed part was given back and faulted in again
(330,000). Measured on 2026-12-05 (docs/benchmarks.md, 5 alternating runs each):

=============================  =========================  =========================
                               before                     after
=============================  =========================  =========================
1 GiB download                 1.45-2.06 s, 81-102k       1.22-1.97 s, 16-18k
                               faults, 86-96 MiB RSS      faults, 76-82 MiB RSS
three 1 GiB objects at once    4.32-7.17 s, 234-305k      3.61-5.39 s, 31-32k
                               faults, 161-176 MiB        faults, 135-139 MiB
1 GiB upload, 16 MiB parts     7.00-7.68 s, 25-40k        6.94-7.84 s, 17-23k
                               faults, 89-98 MiB          faults, 81-106 MiB
=============================  =========================  =========================

Other C libraries are left as they are.
"""

from __future__ import annotations

import sys

#: mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Allocations up to this size come from the heap (glibc's own threshold stops at 32 MiB).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Freed memory kept at the heap's top before it is given back to the system.
TRIM_THRESHOLD = 32 * 1024 * 1024
#: Heaps the threads allocate from. glibc makes up to eight per core, one for each thread that finds
#: the others busy, and each keeps its own freed memory: obstore's runtime threads allocate the
#: chunks, worker threads and the event loop free them.
ARENAS = 2

_SETTINGS = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_ARENA_MAX, ARENAS))


def keep_freed_buffers() -> bool:
    """Set glibc's thresholds and arenas for this process (the module's docstring); False where the C
    library is not glibc or refuses them. Process-wide: for a face's own process (the CLI's runner
    sets them for every command it runs: transfers, the DIMSE face, the ingest worker), never for a
    program that imports the library. ``serve`` does not set them: its workers are uvicorn's, and
    their whole-study reads showed no difference with them (0.154 against 0.155 s)."""
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
    return all([bool(mallopt(parameter, value)) for parameter, value in _SETTINGS])  # each one set
