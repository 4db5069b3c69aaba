"""Header parsing rate: DICOM identities read per second from the benchmark's synthetic study.

Run after bench/run.py has generated its data: `.venv/bin/python bench/parse_rate.py [DATA_DIR]`.
Prints instances/s for local files (header only) and for a memory store (ranged reads),
next to the time a plain read of the same files takes, so the cost can be compared with the transfer,
and the rate of parsing pydicom's CT_small.dcm from memory.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from dicom_cloud.backends import open_store
from dicom_cloud.dicom.header import read_identity_from_file, read_identity_from_store


def main() -> int:
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / ".data" / "inputs"
    files = sorted((data / "study").glob("*.dcm"))
    if not files:
        print(f"no study under {data}: run bench/run.py first", file=sys.stderr)
        return 2
    started = time.perf_counter()
    for path in files:
        read_identity_from_file(path)
    local = len(files) / (time.perf_counter() - started)

    store = open_store("memory://parse-rate")

    async def remote() -> float:
        for path in files:
            await store.put(path.name, path.read_bytes())
        began = time.perf_counter()
        for path in files:
            await read_identity_from_store(store, path.name)
        return len(files) / (time.perf_counter() - began)

    ranged = asyncio.run(remote())
    started = time.perf_counter()
    for path in files:
        path.read_bytes()
    whole = len(files) / (time.perf_counter() - started)
    print(
        f"{len(files)} instances: header from file {local:,.0f}/s, "
        f"from a store by ranged read {ranged:,.0f}/s; reading the whole files {whole:,.0f}/s"
    )
    print(f"read_identity of pydicom's CT_small.dcm in memory: {in_memory_rate():,.0f}/s")
    return 0


def in_memory_rate(count: int = 2000) -> float:
    """Identities per second parsed from bytes already in memory (no I/O at all)."""
    from pydicom.data import get_testdata_file

    from dicom_cloud.dicom.header import read_identity

    data = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    started = time.perf_counter()
    for _ in range(count):
        read_identity(data)
    return count / (time.perf_counter() - started)


if __name__ == "__main__":
    raise SystemExit(main())
