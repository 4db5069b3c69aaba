"""Comparing two trees: both listings spilled into sorted on-disk tables, then paired by name and
compared by size and content checksum. Used by ``sync`` (what to copy or delete) and ``verify``.

Memory stays flat whatever the number of objects: listings stream into SQLite tables (on disk,
with a small page cache), and the pairing is a sorted merge that SQLite runs over its indexes.
Sorting on our side also means the order in which a server lists does not matter (some
S3-compatible servers list depth-first rather than in byte order).

Checksums, cheapest first (``same_content``):

1. a cache entry from an earlier run (journal ``entries``) whose recorded versions of both sides
   are the versions listed now: equal without any request (mtime and ETag as the fast path);
2. the CRC32C in each object's metadata (written by every dicom-cloud upload) and, for a local
   file, its CRC32C computed here;
3. the provider's own checksum where it is reliable: an S3 single-part ETag is the MD5 of the bytes;
4. ``thorough``: read the object and compute its CRC32C (``verify`` does, ``sync`` re-copies instead).
"""

from __future__ import annotations

import asyncio
import sqlite3
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .checksum import Crc32c, crc32c_file, md5_etag, md5_file
from .errors import NotFoundError
from .filters import Filter
from .location import Location
from .store import CHECKSUM_METADATA_KEY, ObjectInfo
from .transfer import object_version

_BATCH = 1000


@dataclass(frozen=True)
class Entry:
    """One object of a tree: its name below the tree's prefix, key, size and version."""

    rel: str
    key: str
    size: int
    #: object_version(): ETag, or size and mtime. Changes whenever the object does.
    sig: str
    #: Modification time (seconds since the epoch), for conflict resolution; 0 when unknown.
    mtime: float


def create_tables(db: sqlite3.Connection, *names: str) -> None:
    db.execute("PRAGMA temp_store = FILE")  # spill to disk, not to memory
    for name in names:
        db.execute(f"DROP TABLE IF EXISTS temp.{name}")
        db.execute(
            f"CREATE TEMP TABLE {name} (rel TEXT PRIMARY KEY, key TEXT NOT NULL, size INTEGER NOT NULL,"
            " sig TEXT NOT NULL, mtime REAL NOT NULL)"
        )


def rel_name(location: Location, key: str, *, nfc: bool) -> str:
    rel = key[len(location.prefix) :]
    # macOS writes NFD names; one spelling on both sides avoids duplicates.
    return unicodedata.normalize("NFC", rel) if nfc else rel


async def spill(
    db: sqlite3.Connection, table: str, location: Location, *, nfc: bool, name_filter: Filter | None
) -> int:
    """List ``location``'s tree into ``table``; return the number of objects."""
    count = 0
    batch: list[tuple[str, str, int, str, float]] = []
    async for info in location.store.list(location.prefix):
        if info.key.endswith("/"):
            continue  # "folder" marker objects are not files
        rel = rel_name(location, info.key, nfc=nfc)
        if name_filter is not None and not name_filter.accepts_name(rel):
            continue
        batch.append((rel, info.key, info.size, object_version(info), _mtime(info)))
        if len(batch) >= _BATCH:
            count += _insert(db, table, batch)
    count += _insert(db, table, batch)
    return count


def _insert(db: sqlite3.Connection, table: str, batch: list[tuple[str, str, int, str, float]]) -> int:
    # Two local names that differ only in Unicode normalisation make one rel: the first one wins.
    db.executemany(f"INSERT OR IGNORE INTO {table} VALUES (?, ?, ?, ?, ?)", batch)  # noqa: S608
    count = len(batch)
    batch.clear()
    return count


def _mtime(info: ObjectInfo) -> float:
    return info.last_modified.timestamp() if info.last_modified else 0.0


def rows(db: sqlite3.Connection, query: str, params: tuple[object, ...] = ()) -> Iterator[tuple[object, ...]]:
    """A query's rows, fetched a batch at a time (the query runs over a table nobody writes meanwhile)."""
    cursor = db.execute(query, params)
    while True:
        batch = cursor.fetchmany(_BATCH)
        if not batch:
            return
        yield from batch


# -- checksums -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """What is known of one object's content."""

    crc32c: str | None = None
    md5: str | None = None


async def fingerprint(location: Location, key: str, *, want_md5: bool = False) -> Fingerprint:
    """CRC32C (and MD5 on request) of a local file; stored checksums of an object (one HEAD)."""
    if location.is_local:
        path = Path("/" + key)
        crc = await asyncio.to_thread(crc32c_file, path)
        md5 = await asyncio.to_thread(md5_file, path) if want_md5 else None
        return Fingerprint(crc, md5)
    info = await location.store.stat(key)
    stored = info.metadata.get(CHECKSUM_METADATA_KEY)
    return Fingerprint(
        stored.lower() if stored else None,
        md5_etag(info.etag) if location.store.features.etag_is_md5 else None,
    )


async def content_crc32c(location: Location, key: str) -> str:
    """Read the whole object and compute its CRC32C (the thorough way)."""
    if location.is_local:
        return await asyncio.to_thread(crc32c_file, Path("/" + key))
    crc = Crc32c()
    async for chunk in location.store.stream(key):
        crc.update(chunk)
    return crc.hexdigest()


@dataclass(frozen=True)
class Comparison:
    same: bool | None  # None: no checksum could tell (thorough=False)
    #: The content's CRC32C when it was learnt (to cache it).
    crc32c: str | None = None


async def same_content(
    a: Location, a_key: str, b: Location, b_key: str, *, thorough: bool = False
) -> Comparison:
    """Whether two objects of equal size hold the same bytes, by the cheapest reliable checksum."""
    try:
        fa = await fingerprint(a, a_key) if not a.is_local else None
        fb = await fingerprint(b, b_key) if not b.is_local else None
        if fa is None and fb is not None:
            fa = await fingerprint(a, a_key, want_md5=fb.crc32c is None and fb.md5 is not None)
        if fb is None and fa is not None:
            fb = await fingerprint(b, b_key, want_md5=fa.crc32c is None and fa.md5 is not None)
        if fa is None or fb is None:  # both local
            fa, fb = await fingerprint(a, a_key), await fingerprint(b, b_key)
    except NotFoundError:
        return Comparison(False)  # gone meanwhile: treat as different, the copy will tell
    if fa.crc32c and fb.crc32c:
        return Comparison(fa.crc32c == fb.crc32c, fa.crc32c)
    if fa.md5 and fb.md5:
        return Comparison(fa.md5 == fb.md5, fa.crc32c or fb.crc32c)
    if not thorough:
        return Comparison(None)
    crc_a = fa.crc32c or await content_crc32c(a, a_key)
    crc_b = fb.crc32c or await content_crc32c(b, b_key)
    return Comparison(crc_a == crc_b, crc_a)


# -- verify ----------------------------------------------------------------------------------

DifferenceKind = Literal["missing", "extra", "size", "content"]
DifferenceCallback = Callable[["Difference"], None]


@dataclass(frozen=True)
class Difference:
    """``missing``: only in the first tree; ``extra``: only in the second; ``size``/``content``: both
    have it with other bytes."""

    kind: DifferenceKind
    rel: str
    detail: str = ""


@dataclass
class VerifyResult:
    compared: int = 0
    differences: int = 0
    bytes: int = 0


async def verify_trees(
    a: Location,
    b: Location,
    *,
    on_difference: DifferenceCallback,
    parallel: int = 16,
    name_filter: Filter | None = None,
) -> VerifyResult:
    """Compare every object of two trees by name, size and content checksum (reading objects that
    carry no stored checksum); report each difference through ``on_difference``."""
    result = VerifyResult()
    # A private on-disk database: the listings may be larger than memory.
    db = sqlite3.connect("")
    try:
        create_tables(db, "va", "vb")
        await asyncio.gather(
            spill(db, "va", a, nfc=a.is_local and not b.is_local, name_filter=name_filter),
            spill(db, "vb", b, nfc=b.is_local and not a.is_local, name_filter=name_filter),
        )

        def differ(kind: DifferenceKind, rel: str, detail: str = "") -> None:
            result.differences += 1
            on_difference(Difference(kind, rel, detail))

        for rel, size in rows(
            db,
            "SELECT a.rel, a.size FROM va a LEFT JOIN vb b ON b.rel = a.rel"
            " WHERE b.rel IS NULL ORDER BY a.rel",
        ):
            differ("missing", str(rel), f"{size} bytes")
        for rel, size in rows(
            db,
            "SELECT b.rel, b.size FROM vb b LEFT JOIN va a ON a.rel = b.rel"
            " WHERE a.rel IS NULL ORDER BY b.rel",
        ):
            differ("extra", str(rel), f"{size} bytes")
        limit = asyncio.Semaphore(parallel)
        pending: set[asyncio.Task[None]] = set()

        async def compare(rel: str, a_key: str, b_key: str, size: int) -> None:
            try:
                outcome = await same_content(a, a_key, b, b_key, thorough=True)
                result.compared += 1
                result.bytes += size
                if not outcome.same:
                    differ("content", rel, "same size, different checksum")
            finally:
                limit.release()

        for rel, a_key, a_size, b_key, b_size in rows(
            db,
            "SELECT a.rel, a.key, a.size, b.key, b.size FROM va a JOIN vb b ON b.rel = a.rel ORDER BY a.rel",
        ):
            if a_size != b_size:
                result.compared += 1
                differ("size", str(rel), f"{a_size} vs {b_size} bytes")
                continue
            await limit.acquire()
            task = asyncio.create_task(compare(str(rel), str(a_key), str(b_key), int(str(a_size))))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*list(pending))
    finally:
        db.close()
    return result
