"""Comparing two trees: both listings spilled into sorted on-disk tables, then paired by name and
compared by size and content checksum. Used by ``sync`` (what to copy or delete) and ``verify``.

Memory stays flat whatever the number of objects: listings stream into SQLite tables (on disk,
with a small page cache), and the pairing is a sorted merge that SQLite runs over its indexes.
Sorting on our side also means the order in which a server lists does not matter (some
S3-compatible servers list depth-first rather than in byte order).

Sizes first: objects of other sizes differ. Then checksums, cheapest first (``same_content``, the
one comparison ``sync`` and ``verify`` share):

1. the CRC32C in each object's metadata (written by every dicom-cloud upload) and, for a local
   file, its CRC32C computed here;
2. the provider's own checksum where it is reliable: an S3 single-part ETag is the MD5 of the bytes;
   an S3 multipart ETag is the MD5 of the parts' MD5s, recomputed from a local file for the part
   sizes that yield its part count;
3. ``thorough``: read the object and compute its CRC32C (``verify`` and ``sync --checksum`` do;
   a plain ``sync`` copies again instead).

``sync`` also has a faster path before all of these: a journal entry whose recorded versions of
both sides are the versions listed now (sync.py).
"""

from __future__ import annotations

import asyncio
import sqlite3
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .checksum import (
    Crc32c,
    crc32c_file,
    file_digests,
    md5_etag,
    multipart_etag_parts,
    part_size_guesses,
)
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
    """What an object's listing entry and metadata say of its content (one HEAD, no read)."""

    crc32c: str | None = None
    #: A single-part S3 ETag: the MD5 of the bytes.
    md5: str | None = None
    #: A multipart S3 ETag (``<hex>-<parts>``), comparable with a local file once its part size is
    #: inferred.
    multipart_etag: str | None = None
    size: int = 0


async def fingerprint(location: Location, key: str) -> Fingerprint:
    """The checksums an object carries: our CRC32C in its metadata, its ETag when it is an MD5 or a
    multipart ETag of S3's kind."""
    info = await location.store.stat(key)
    stored = info.metadata.get(CHECKSUM_METADATA_KEY)
    etag = (info.etag or "").strip('"').lower() if location.store.features.etag_is_md5 else ""
    return Fingerprint(
        stored.lower() if stored else None,
        md5_etag(etag),
        etag if multipart_etag_parts(etag) is not None else None,
        info.size,
    )


async def content_crc32c(location: Location, key: str) -> str:
    """Read the whole object and compute its CRC32C (the last resort)."""
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
    """Whether two objects of equal size hold the same bytes, by the cheapest sufficient evidence.

    The one definition of "equal" that ``sync`` and ``verify`` share. In order: the CRC32C kept in
    each object's metadata (a local file's is computed); an S3 single-part ETag against the other
    side's MD5; an S3 multipart ETag against the same ETag recomputed from a local file, with the
    part size inferred from the size and part count; two identical multipart ETags. Only then, with
    ``thorough``, are the objects read and their CRC32Cs compared; without it the answer is None
    (unknown). Callers compare sizes first: objects of other sizes differ.
    """
    try:
        if a.is_local and b.is_local:
            crc_a = await asyncio.to_thread(crc32c_file, Path("/" + a_key))
            crc_b = await asyncio.to_thread(crc32c_file, Path("/" + b_key))
            return Comparison(crc_a == crc_b, crc_a)
        if a.is_local or b.is_local:
            local_key, remote, remote_key = (a_key, b, b_key) if a.is_local else (b_key, a, a_key)
            return await _local_and_remote(Path("/" + local_key), remote, remote_key, thorough=thorough)
        fa, fb = await asyncio.gather(fingerprint(a, a_key), fingerprint(b, b_key))
        if fa.crc32c and fb.crc32c:
            return Comparison(fa.crc32c == fb.crc32c, fa.crc32c)
        if fa.md5 and fb.md5:
            return Comparison(fa.md5 == fb.md5, fa.crc32c or fb.crc32c)
        if fa.multipart_etag and fa.multipart_etag == fb.multipart_etag:
            # Same part MD5s in the same order: the same bytes. (Different multipart ETags prove
            # nothing: the part sizes may differ.)
            return Comparison(True, fa.crc32c or fb.crc32c)
        if not thorough:
            return Comparison(None)
        crc_a = fa.crc32c or await content_crc32c(a, a_key)
        crc_b = fb.crc32c or await content_crc32c(b, b_key)
        return Comparison(crc_a == crc_b, crc_a)
    except NotFoundError:
        return Comparison(False)  # gone meanwhile: treat as different, the copy will tell


async def _local_and_remote(path: Path, remote: Location, key: str, *, thorough: bool) -> Comparison:
    stored = await fingerprint(remote, key)
    parts = multipart_etag_parts(stored.multipart_etag)
    guesses = (
        part_size_guesses(stored.size, parts)
        if parts is not None and not stored.crc32c and not stored.md5
        else []
    )
    # One read of the local file gives its CRC32C, and the MD5 or multipart ETags the remote side
    # can be compared with.
    local = await asyncio.to_thread(
        file_digests, path, md5=stored.md5 is not None and not stored.crc32c, part_sizes=guesses
    )
    if stored.crc32c:
        return Comparison(stored.crc32c == local.crc32c, local.crc32c)
    if stored.md5:
        return Comparison(stored.md5 == local.md5, local.crc32c)
    if stored.multipart_etag in local.multipart_etags.values():
        return Comparison(True, local.crc32c)
    # No multipart ETag matched: other bytes, or a part size not guessed. Only reading tells.
    if not thorough:
        return Comparison(None)
    remote_crc = await content_crc32c(remote, key)
    return Comparison(remote_crc == local.crc32c, local.crc32c)


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
    #: One object was compared with one object (``verify_object``), not two trees.
    single: bool = False


async def verify_object(
    a: Location, a_key: str, b: Location, b_key: str, *, on_difference: DifferenceCallback, name: str
) -> VerifyResult:
    """Compare one object with another as ``verify_trees`` compares a pair (size, then
    ``same_content``, reading when no checksum tells), reporting a difference under ``name``.
    A missing first object is an error (NotFoundError); a missing second one is a difference."""
    result = VerifyResult(single=True)
    info_a = await a.store.stat(a_key)
    try:
        info_b = await b.store.stat(b_key)
    except NotFoundError:
        result.differences = 1
        on_difference(Difference("missing", name, f"{info_a.size} bytes"))
        return result
    result.compared = 1
    if info_a.size != info_b.size:
        result.differences = 1
        on_difference(Difference("size", name, f"{info_a.size} vs {info_b.size} bytes"))
        return result
    result.bytes = info_a.size
    if not (await same_content(a, a_key, b, b_key, thorough=True)).same:
        result.differences = 1
        on_difference(Difference("content", name, "same size, different checksum"))
    return result


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
