"""The archive: the one object the DICOMweb service (and any other face) calls.

An :class:`Archive` joins a store (the bucket holding instances, sidecars and derived objects,
laid out as ``docs/archive.md`` specifies) and an index database (SQLAlchemy: SQLite or
PostgreSQL). Every method is scoped to a tenant: a tenant never sees, fetches or deletes
another tenant's data, whatever UIDs it names.

Write ordering (the restic rule): data first, then the sidecar, then the index row that points
at both; deletes in reverse (index rows first, then objects). A crash can leave an object with
no row (invisible, collected by nothing worse than a listing), never a row with no object.

Methods are coroutines: the store is asynchronous, and database work runs in worker threads so
that a slow query never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from io import BytesIO
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError as DatabaseIntegrityError
from sqlalchemy.orm import Session

from ..backends import StoreConfig
from ..budget import ByteBudget
from ..checksum import Crc32c, crc32c_hex
from ..crypto.envelope import ClientEncryption
from ..dicom.header import REASON_TOO_LONG, REASON_UNREADABLE, DicomIdentity, read_identity_from_store
from ..errors import (
    ConflictError,
    DicomCloudError,
    DicomFormatError,
    IntegrityError,
    NotFoundError,
    RejectedObjectError,
    UsageError,
)
from ..location import Location, LocationOpener
from ..store import CHECKSUM_METADATA_KEY, MultipartPlan, PutOptions, Store
from . import access, index, qido, uploads
from .bucket import BucketLayout, check_tenant
from .db import Database
from .parsing import (
    PREAMBLE_LENGTH,
    ParsedInstance,
    json_value_text,
    parse_head,
    parse_instance,
    sanitise_preamble,
)
from .records import (
    AcceptedFile,
    ApiToken,
    DeclaredFile,
    DeleteResult,
    DicomJson,
    Frames,
    InstanceRecord,
    OrphanSweep,
    RejectedFile,
    Rendered,
    Scope,
    ShareLink,
    StoredInstance,
    StudyLabels,
    UploadOutcome,
    UploadSession,
    UploadState,
)

T = TypeVar("T")
_UID = re.compile(r"[0-9.]{1,64}")


def _check_uids(*uids: str | None) -> None:
    """UIDs named by a caller: digits and dots, at most 64 (every stored UID passed the strict
    policy, so anything else names nothing; refused before it reaches the database)."""
    for uid in uids:
        if uid is not None and (not isinstance(uid, str) or not _UID.fullmatch(uid)):
            raise UsageError("not a DICOM UID", hint="UIDs are digits and dots, at most 64 characters")


log = logging.getLogger("dicom_cloud.archive")

#: Reasons of refusals that are not about the DICOM format (stable strings, no patient data).
REASON_NOT_UPLOADED = "not uploaded"
REASON_SIZE_MISMATCH = "size differs from the declared size"
REASON_CHECKSUM_MISMATCH = "CRC32C differs from the declared checksum"
REASON_TOO_LARGE = "larger than the largest instance accepted"
REASON_CONFLICT = "another instance with this SOP Instance UID is stored"
#: Copies of an instance an ingest holds at its peak (see ArchiveSettings.ingest_memory).
_INGEST_COPIES = 3
#: Head read for a streamed ingest, doubled while the header runs past it, up to the last.
_FIRST_HEAD = 64 * 1024
_MAX_HEAD = 8 * 1024 * 1024
#: Parts of streamed writes: 8 MiB, 4 in flight.
_STREAM_PLAN = MultipartPlan(part_size=8 * 1024 * 1024, concurrency=4)
#: Instances ingested at once by ``complete_upload``.
_UPLOAD_CONCURRENCY = 4
_MEDIA_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png"}

#: A QIDO query: attribute keys (keyword or 8-hex tag) and the reserved keys ``limit``,
#: ``offset``, ``includefield``, ``fuzzymatching``, ``label``, ``labeldescription``, each with
#: one value or several (a key repeated in the query string).
QueryParams = Mapping[str, str | Sequence[str]]


@dataclass(frozen=True)
class ArchiveSettings:
    """How to open an archive."""

    #: Where objects live: ``s3://bucket/prefix``, ``gs://...``, ``azure://...``, a local
    #: directory, or ``memory://name`` (tests). Every key the archive writes is under it.
    storage_url: str
    #: The index: ``sqlite:///path/index.db`` (default in the embedded mode) or
    #: ``postgresql://user@host/db`` (psycopg 3 is used whatever driver the URL names).
    database_url: str = "sqlite:///dicom-cloud-index.db"
    #: Client-side encryption of everything written (instances, sidecars, previews); also the
    #: keys to read objects written encrypted before.
    encryption: ClientEncryption | None = None
    #: Extra attributes indexed for QIDO matching (keywords or tags), beyond the built-in ones.
    extra_query_tags: Sequence[str] = ()
    #: Store connection settings (endpoint, region, server-side encryption...).
    store_config: StoreConfig = field(default_factory=StoreConfig)
    #: HMAC key for the hashed object names (``dicom.layout.uid_hash``); None: plain SHA-256.
    name_key: bytes | None = None
    #: Largest instance held in memory: ``store_instance`` bodies, presigned uploads up to
    #: ``stream_threshold``, and what ``read_instance``, frames and renderings read.
    max_instance_size: int = 512 * 1024 * 1024
    #: Presigned uploads larger than this (or than ``max_instance_size``) are ingested as streams
    #: (two passes over the staged object: checksums, then the copy), never held whole in memory.
    stream_threshold: int = 64 * 1024 * 1024
    #: Largest presigned upload accepted.
    max_upload_size: int = 64 * 1024 * 1024 * 1024
    #: Bytes that concurrent ingests may hold in memory at once (about three times each instance's
    #: size: the original, the sanitised copy, the encrypted copy); ingests beyond it wait.
    ingest_memory: int = 1024 * 1024 * 1024
    #: Default and largest ``limit`` of a QIDO query.
    default_query_limit: int = 100
    max_query_limit: int = 1000
    #: Longest side in pixels of a thumbnail.
    thumbnail_size: int = 128


class Archive:
    """The archive core. Open with :meth:`open`, close with :meth:`close` (or ``async with``)."""

    store: Store

    def __init__(
        self, settings: ArchiveSettings, opener: LocationOpener, location: Location, db: Database
    ) -> None:
        """Use :meth:`open`."""
        self.settings = settings
        self.store = location.store
        self._opener = opener
        self._root = location.prefix
        self._db = db
        self._crypto = settings.encryption or ClientEncryption()
        self._layout = BucketLayout(settings.name_key)
        self._extra = qido.resolve_extra_tags(settings.extra_query_tags)
        self._extra_ints = [int(e.tag, 16) for e in self._extra]
        self._limits = qido.QueryLimits(settings.default_query_limit, settings.max_query_limit)
        self._budget = ByteBudget(settings.ingest_memory)

    @classmethod
    async def open(cls, settings: ArchiveSettings) -> Archive:
        """Open the store and the index, bringing the schema up to date (Alembic) first."""
        qido.resolve_extra_tags(settings.extra_query_tags)  # bad configuration fails before any connection
        if settings.default_query_limit < 1 or settings.max_query_limit < settings.default_query_limit:
            raise UsageError("query limits: 1 <= default_query_limit <= max_query_limit")
        if min(settings.ingest_memory, settings.max_instance_size, settings.max_upload_size) < 1:
            raise UsageError("ingest_memory, max_instance_size and max_upload_size must be positive")
        if settings.stream_threshold < 1:
            raise UsageError("stream_threshold must be positive")
        opener = LocationOpener(settings.store_config)
        try:
            location = opener.open(settings.storage_url)
            db = await Database.open(settings.database_url)
        except BaseException:
            await opener.close()
            raise
        return cls(settings, opener, location, db)

    async def close(self) -> None:
        """Release the store's connections and the database pool."""
        await self._opener.close()
        await asyncio.to_thread(self._db.close)

    async def __aenter__(self) -> Archive:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing --------------------------------------------------------------------------

    def store_key(self, key: str) -> str:
        """The key in :attr:`store` of an archive key (records hold keys relative to the archive
        root); use it to presign staging uploads: ``store.sign(store_key(k), ttl, "PUT")``."""
        return self._root + key

    async def _run(self, work: Callable[[Session], T]) -> T:
        return await self._db.run(work)

    async def _put(self, key: str, data: bytes, content_type: str) -> None:
        """Write an object, encrypted when configured, with the CRC32C of the stored bytes."""
        metadata: dict[str, str] = {}
        if self._crypto.writes_encrypted:
            data = await asyncio.to_thread(self._crypto.encrypt, data)
            metadata.update(self._crypto.marker())
        metadata[CHECKSUM_METADATA_KEY] = crc32c_hex(data)
        await self.store.put(
            self.store_key(key), data, PutOptions(content_type=content_type, metadata=metadata)
        )

    async def _get(self, key: str) -> bytes:
        """Read an object written by :meth:`_put`, decrypting it when it is encrypted."""
        full = self.store_key(key)
        info, blob = await self.store.read(full)
        recorded = info.metadata.get(CHECKSUM_METADATA_KEY)
        if recorded is not None and crc32c_hex(blob) != recorded:
            raise IntegrityError(f"{self.store.url(full)} does not match its recorded CRC32C")
        fmt = self._crypto.detect(full, info.metadata)
        if fmt is None:
            return bytes(blob)
        return await asyncio.to_thread(self._crypto.decrypt, self.store.url(full), fmt, info.metadata, blob)

    async def _delete_objects(self, keys: Sequence[str], prefixes: Sequence[str] = ()) -> None:
        """Remove objects (and everything under ``prefixes``) after their rows are gone. A failure
        leaves unreferenced objects behind: it is logged, without keys, and not raised."""
        limit = asyncio.Semaphore(16)

        async def under(prefix: str) -> list[str]:
            async with limit:
                return [info.key async for info in self.store.list(self.store_key(prefix))]

        try:
            found = [self.store_key(k) for k in keys]
            for listed in await asyncio.gather(*(under(p) for p in prefixes)):
                found += listed
            for start in range(0, len(found), 1000):
                await self.store.delete(found[start : start + 1000])
        except Exception as exc:
            log.warning("objects left behind after a delete: %s (%d keys)", type(exc).__name__, len(keys))

    # -- ingest --------------------------------------------------------------------------

    async def store_instance(self, tenant: str, data: bytes | memoryview) -> StoredInstance:
        """Store one DICOM Part 10 instance (the STOW-RS path).

        Refuses what is not Part 10 (DicomFormatError, ``reason`` stable and PHI-free); zeroes
        the preamble; writes the object (encrypted if configured), then the sidecar, then the
        index row. The same SOP Instance UID with identical bytes is an idempotent success
        (``created=False``); with different bytes it is ConflictError (409) and nothing changes.
        """
        check_tenant(tenant)
        if len(data) > self.settings.max_instance_size:
            raise UsageError(f"the instance is larger than {self.settings.max_instance_size} bytes")
        async with self._budget.reserve(_INGEST_COPIES * len(data)):
            sanitised, changed = sanitise_preamble(data)
            parsed = await asyncio.to_thread(parse_instance, sanitised, self._extra_ints)
            return await self._store_parsed(tenant, sanitised, parsed, changed)

    def _same(self, existing: InstanceRecord, size: int, crc: str, changed: bool) -> StoredInstance:
        if existing.size == size and existing.crc32c == crc:
            return StoredInstance(existing, created=False, preamble_sanitised=changed)
        raise self._conflict()

    @staticmethod
    def _conflict() -> ConflictError:
        return ConflictError(
            "an instance with this SOP Instance UID and other content is already stored",
            hint="delete the stored instance first to replace it",
        )

    async def _store_parsed(
        self, tenant: str, data: bytes, parsed: ParsedInstance, changed: bool
    ) -> StoredInstance:
        async def write(key: str) -> None:
            await self._put(key, data, "application/dicom")

        return await self._store(tenant, parsed, len(data), crc32c_hex(data), changed, write)

    async def _store(
        self,
        tenant: str,
        parsed: ParsedInstance,
        size: int,
        crc: str,
        changed: bool,
        write_object: Callable[[str], Awaitable[None]],
    ) -> StoredInstance:
        """Store an instance of ``size`` bytes and CRC32C ``crc`` whose bytes ``write_object(key)``
        writes: data, then sidecar, then the rows that point at both."""
        uid = parsed.identity.sop_instance_uid
        existing = await self._run(lambda s: index.find_instance(s, tenant, uid))
        if existing is not None:
            return self._same(existing, size, crc, changed)
        object_key = self._layout.instance_key(tenant, uid, crc)
        sidecar_key = self._layout.sidecar_key(tenant, uid, crc)

        def insert(session: Session) -> InstanceRecord:
            return index.insert_instance(
                session,
                tenant,
                parsed.attributes,
                object_key=object_key,
                sidecar_key=sidecar_key,
                size=size,
                crc32c=crc,
                encrypted=self._crypto.writes_encrypted,
            )

        try:
            await write_object(object_key)
            sidecar = json.dumps(parsed.sidecar, separators=(",", ":")).encode()
            await self._put(sidecar_key, sidecar, "application/dicom+json")
            for _attempt in range(5):
                try:
                    record = await self._run(insert)
                    return StoredInstance(record, created=True, preamble_sanitised=changed)
                except DatabaseIntegrityError:
                    # Another writer created a row first: this instance (then decide), or its
                    # patient/study/series (then try again: they exist now).
                    existing = await self._run(lambda s: index.find_instance(s, tenant, uid))
                    if existing is not None:
                        if existing.object_key == object_key:
                            return self._same(existing, size, crc, changed)  # same bytes, same objects
                        raise self._conflict() from None
            raise ConflictError("the index kept refusing the instance's rows; try again")
        except BaseException:
            await self._remove_unindexed(tenant, uid, object_key, sidecar_key)
            raise

    async def _remove_unindexed(self, tenant: str, uid: str, object_key: str, sidecar_key: str) -> None:
        """Remove the objects of a failed ingest, unless a row points at them after all (a commit
        whose acknowledgement was lost) or the index cannot tell (then they stay, unreferenced)."""
        try:
            existing = await self._run(lambda s: index.find_instance(s, tenant, uid))
        except Exception:
            log.warning("objects of a failed ingest left in place: the index is unreachable")
            return
        if existing is None or existing.object_key != object_key:
            await self._delete_objects([object_key, sidecar_key])

    async def ingest_object(
        self,
        tenant: str,
        staging_key: str,
        expected_size: int | None = None,
        expected_crc32c: str | None = None,
    ) -> StoredInstance:
        """Ingest an object a client PUT under the staging prefix (the presigned-upload path).

        Checks that it exists, has ``expected_size`` bytes and ``expected_crc32c``; reads its
        header by a ranged read and validates it; then stores it as :meth:`store_instance` does
        and removes the staging object. A refused object is moved to the quarantine prefix and
        RejectedObjectError (``reason``, ``quarantine_key``) is raised.
        """
        check_tenant(tenant)
        if not staging_key.startswith(BucketLayout.staging_prefix(tenant)) or ".." in staging_key:
            raise UsageError("the object is not in this tenant's staging area")
        full = self.store_key(staging_key)
        try:
            info = await self.store.stat(full)
        except NotFoundError:
            raise RejectedObjectError(REASON_NOT_UPLOADED) from None
        if expected_size is not None and info.size != expected_size:
            raise await self._reject(tenant, staging_key, REASON_SIZE_MISMATCH)
        if info.size > self.settings.max_upload_size:
            raise await self._reject(tenant, staging_key, REASON_TOO_LARGE)
        try:
            # The header first, by a ranged read: junk is refused without reading it whole.
            identity = await read_identity_from_store(self.store, full, policy="strict", size=info.size)
        except DicomFormatError as exc:
            raise await self._reject(tenant, staging_key, exc.reason) from None
        except DicomCloudError:
            raise  # the store failed: nothing is known about the object
        except Exception:  # pydicom failing late on a malformed header (e.g. an unknown VR)
            raise await self._reject(tenant, staging_key, REASON_UNREADABLE) from None
        if info.size > min(self.settings.stream_threshold, self.settings.max_instance_size):
            stored = await self._ingest_streamed(tenant, staging_key, info.size, identity, expected_crc32c)
            await self.store.delete([full])
            return stored
        async with self._budget.reserve(_INGEST_COPIES * info.size):
            data = bytes(await self.store.get(full))
            if len(data) != info.size:
                raise await self._reject(tenant, staging_key, REASON_SIZE_MISMATCH)
            if expected_crc32c is not None and crc32c_hex(data) != expected_crc32c.lower():
                raise await self._reject(tenant, staging_key, REASON_CHECKSUM_MISMATCH)
            try:
                sanitised, changed = sanitise_preamble(data)
                del data
                parsed = await asyncio.to_thread(parse_instance, sanitised, self._extra_ints)
                stored = await self._store_parsed(tenant, sanitised, parsed, changed)
            except DicomFormatError as exc:
                raise await self._reject(tenant, staging_key, exc.reason) from None
            except ConflictError:
                raise await self._reject(tenant, staging_key, REASON_CONFLICT) from None
        await self.store.delete([full])
        return stored

    async def _ingest_streamed(
        self,
        tenant: str,
        staging_key: str,
        size: int,
        identity: DicomIdentity,
        expected_crc32c: str | None,
    ) -> StoredInstance:
        """Ingest a staged object too large to hold: its head for the sidecar and the index, one
        pass for the checksums (the object's name needs its CRC32C), one pass to copy it, with the
        preamble zeroed and encrypted when configured, into its canonical key."""
        full = self.store_key(staging_key)
        head_size, parsed = _FIRST_HEAD, None
        while parsed is None:
            head = bytes(await self.store.get_range(full, 0, min(head_size, size)))
            try:
                parsed = await asyncio.to_thread(
                    parse_head, _zero_preamble(head, 0), size, identity, self._extra_ints
                )
            except DicomFormatError as exc:
                raise await self._reject(tenant, staging_key, exc.reason) from None
            if parsed is None:
                if head_size >= _MAX_HEAD:
                    raise await self._reject(tenant, staging_key, REASON_TOO_LONG)
                head_size *= 2
        changed = any(head[:PREAMBLE_LENGTH])

        uploaded, sanitised, offset = Crc32c(), Crc32c(), 0
        async for chunk in self.store.stream(full):
            uploaded.update(chunk)
            sanitised.update(_zero_preamble(chunk, offset))
            offset += len(chunk)
        if offset != size:
            raise await self._reject(tenant, staging_key, REASON_SIZE_MISMATCH)
        if expected_crc32c is not None and uploaded.hexdigest() != expected_crc32c.lower():
            raise await self._reject(tenant, staging_key, REASON_CHECKSUM_MISMATCH)
        crc = sanitised.hexdigest()

        async def copy_of_staged() -> AsyncIterator[bytes]:
            check, at = Crc32c(), 0
            async for chunk in self.store.stream(full):
                out = _zero_preamble(chunk, at)
                at += len(chunk)
                check.update(out)
                yield out
            if at != size or check.hexdigest() != crc:
                # Raised before the stream ends: the multipart upload is never completed.
                raise IntegrityError("the staged object changed while it was ingested")

        async def write(key: str) -> None:
            await self._put_stream(key, copy_of_staged(), "application/dicom", crc)

        try:
            return await self._store(tenant, parsed, size, crc, changed, write)
        except ConflictError:
            raise await self._reject(tenant, staging_key, REASON_CONFLICT) from None

    async def _put_stream(
        self, key: str, chunks: AsyncIterator[bytes], content_type: str, plaintext_crc: str
    ) -> None:
        """Write a large object from a stream, encrypted when configured. Plaintext objects carry
        their CRC32C (known beforehand); encrypted ones are authenticated by their GCM tags."""
        metadata: dict[str, str] = {}
        body: AsyncIterator[bytes] = chunks
        if self._crypto.writes_encrypted:
            metadata.update(self._crypto.marker())
            body = _encrypted(self._crypto, chunks)
        else:
            metadata[CHECKSUM_METADATA_KEY] = plaintext_crc
        await self.store.put_stream(
            self.store_key(key), body, PutOptions(content_type=content_type, metadata=metadata), _STREAM_PLAN
        )

    async def _reject(self, tenant: str, staging_key: str, reason: str) -> RejectedObjectError:
        """Move a staging object to quarantine, with its reason beside it; the error to raise."""
        quarantine_key = BucketLayout.quarantine_key(tenant, staging_key)
        src, dst = self.store_key(staging_key), self.store_key(quarantine_key)
        if self.store.features.server_side_copy:
            await self.store.copy(src, dst)
        else:
            await self.store.put(dst, bytes(await self.store.get(src)))
        note = {"reason": reason, "quarantined": datetime.now(UTC).isoformat(), "staging_key": staging_key}
        await self.store.put(
            dst + ".reason.json", json.dumps(note).encode(), PutOptions(content_type="application/json")
        )
        await self.store.delete([src])
        log.info("upload refused and quarantined: %s", reason)
        return RejectedObjectError(reason, quarantine_key=quarantine_key)

    async def reindex_extra_tags(self, batch: int = 500) -> int:
        """Fill the configured extra query tags of every stored instance (all tenants) from the
        sidecars: what to run after adding a tag to ``extra_query_tags``. Returns the number of
        instances visited. Safe to repeat, and to run while instances are being stored."""
        tags = [e.tag for e in self._extra]
        if not tags:
            return 0
        visited, after = 0, 0
        limit = asyncio.Semaphore(16)

        async def values(pk: int, sidecar_key: str) -> tuple[int, list[tuple[str, str, str]]]:
            async with limit:
                try:
                    sidecar = json.loads(await self._get(sidecar_key))
                except NotFoundError:
                    return pk, []  # deleted meanwhile
            found = []
            for extra in self._extra:
                element = sidecar.get(extra.tag)
                text = json_value_text(element) if isinstance(element, dict) else None
                if text is not None:
                    found.append((extra.tag, str(element.get("vr", extra.vr)), text))
            return pk, found

        while True:
            page = await self._run(partial(index.instance_page, after=after, size=batch))
            if not page:
                return visited
            found = await asyncio.gather(*(values(pk, key) for pk, key in page))
            await self._run(partial(index.replace_extra_attributes, values=found, tags=tags))
            visited += len(page)
            after = page[-1][0]

    async def collect_orphans(
        self, tenant: str, *, older_than: timedelta = timedelta(hours=1), dry_run: bool = False
    ) -> OrphanSweep:
        """Find (and unless ``dry_run`` delete) a tenant's instance, sidecar and derived objects
        that no index row points at: what a crash between writing objects and committing their
        row, or a failed object delete, leaves behind. Objects younger than ``older_than`` are
        left alone (an ingest may be about to commit their row), as are objects whose date the
        store does not report. Memory stays flat: the listing is checked 1000 keys at a time."""
        check_tenant(tenant)
        cutoff = datetime.now(UTC) - older_than
        scanned = orphans = removed = 0

        async def settle(batch: list[tuple[str, str]]) -> tuple[int, int]:
            """(orphans, removed) among ``batch``: (store key, instance key it belongs to)."""
            wanted = list({owner for _, owner in batch})
            known = await self._run(lambda s: index.referenced_object_keys(s, tenant, wanted))
            lost = [key for key, owner in batch if owner not in known]
            if lost and not dry_run:
                await self.store.delete(lost)
            return len(lost), 0 if dry_run else len(lost)

        for kind in ("instances", "metadata", "derived"):
            prefix = self.store_key(f"{tenant}/{kind}/")
            batch: list[tuple[str, str]] = []
            async for info in self.store.list(prefix):
                scanned += 1
                owner = BucketLayout.instance_key_of(tenant, info.key[len(self._root) :])
                if owner is None or info.last_modified is None or info.last_modified > cutoff:
                    continue
                batch.append((info.key, owner))
                if len(batch) == 1000:
                    found, gone = await settle(batch)
                    orphans, removed, batch = orphans + found, removed + gone, []
            if batch:
                found, gone = await settle(batch)
                orphans, removed = orphans + found, removed + gone
        if orphans:
            log.info("orphaned objects: %d found, %d removed", orphans, removed)
        return OrphanSweep(scanned=scanned, orphans=orphans, removed=removed)

    # -- presigned upload sessions ---------------------------------------------------------

    async def create_upload(
        self, tenant: str, files: Sequence[DeclaredFile], expires_in: timedelta = timedelta(hours=1)
    ) -> UploadSession:
        """Record an upload session and assign one staging key per declared file."""
        check_tenant(tenant)
        max_size = self.settings.max_upload_size
        return await self._run(lambda s: uploads.create(s, tenant, files, expires_in, max_size))

    async def upload_urls(self, upload: UploadSession, expires_in: timedelta | None = None) -> list[str]:
        """Presigned PUT URLs of a session's staging keys, valid until the session expires (or
        ``expires_in``). NotSupportedError on stores without presigning (local disk, memory):
        the service then takes the bytes itself and calls :meth:`write_staging`."""
        ttl = expires_in or max(upload.expires - datetime.now(UTC), timedelta(seconds=1))
        return [await self.store.sign(self.store_key(k), ttl, "PUT") for k in upload.staging_keys]

    async def write_staging(self, tenant: str, session_id: str, index_: int, data: bytes) -> None:
        """Put one declared file's bytes into staging (for stores that cannot presign)."""
        upload = await self.get_upload(tenant, session_id)
        if upload.state != "pending" or datetime.now(UTC) >= upload.expires:
            raise UsageError("the upload session is no longer open")
        if not 0 <= index_ < len(upload.files):
            raise NotFoundError("no such file in the upload session")
        if len(data) != upload.files[index_].size:
            raise UsageError("the file's size differs from the declared size")
        await self.store.put(self.store_key(upload.staging_keys[index_]), data)

    async def get_upload(self, tenant: str, session_id: str) -> UploadSession:
        """The session; NotFoundError if unknown to this tenant."""
        check_tenant(tenant)
        return await self._run(lambda s: uploads.get(s, tenant, session_id))

    async def set_upload_state(
        self, tenant: str, session_id: str, state: UploadState, result: Mapping[str, object] | None = None
    ) -> UploadSession:
        """Change a session's state (and record its outcome)."""
        check_tenant(tenant)
        return await self._run(lambda s: uploads.set_state(s, tenant, session_id, state, result))

    async def complete_upload(self, tenant: str, session_id: str) -> UploadOutcome:
        """Ingest every declared file of a session; refused ones are quarantined. The outcome is
        recorded on the session; completing twice returns the recorded outcome. An expired
        session is UsageError (its staging objects are removed); one being completed by another
        request is ConflictError."""
        check_tenant(tenant)
        now = datetime.now(UTC)
        upload, claimed = await self._run(lambda s: uploads.claim(s, tenant, session_id, now))
        if not claimed:
            if upload.state == "completed" and upload.result is not None:
                return UploadOutcome.from_json(upload.result)
            if upload.state == "expired":
                await self._delete_objects(upload.staging_keys)
                raise UsageError("the upload session has expired", hint="start a new upload")
            raise ConflictError("the upload session is being completed by another request")
        try:
            outcome = await self._ingest_session(upload)
        except BaseException:
            await self.set_upload_state(tenant, session_id, "pending")
            raise
        await self.set_upload_state(tenant, session_id, "completed", outcome.as_json())
        return outcome

    async def expire_uploads(self, now: datetime | None = None) -> int:
        """Housekeeping for every tenant: mark pending sessions past their deadline ``expired``
        and remove their staging objects. Returns how many sessions expired. Safe to run from
        several service instances at once."""
        when = now or datetime.now(UTC)
        expired = await self._run(lambda s: uploads.expire_due(s, when))
        for upload in expired:
            await self._delete_objects(upload.staging_keys)
        return len(expired)

    async def _ingest_session(self, upload: UploadSession) -> UploadOutcome:
        limit = asyncio.Semaphore(_UPLOAD_CONCURRENCY)

        async def one(i: int) -> AcceptedFile | RejectedFile:
            declared, key = upload.files[i], upload.staging_keys[i]
            async with limit:
                try:
                    stored = await self.ingest_object(upload.tenant, key, declared.size, declared.crc32c)
                except RejectedObjectError as exc:
                    return RejectedFile(i, declared.name, exc.reason, exc.quarantine_key)
            r = stored.record
            return AcceptedFile(
                i,
                declared.name,
                r.sop_instance_uid,
                r.study_instance_uid,
                r.series_instance_uid,
                stored.created,
            )

        results = await asyncio.gather(*(one(i) for i in range(len(upload.files))))
        return UploadOutcome(
            upload.id,
            accepted=tuple(r for r in results if isinstance(r, AcceptedFile)),
            rejected=tuple(r for r in results if isinstance(r, RejectedFile)),
        )

    # -- query (QIDO-RS) -----------------------------------------------------------------

    async def _search(
        self, tenant: str, level: qido.Level, params: QueryParams, **scope: Any
    ) -> list[DicomJson]:
        check_tenant(tenant)
        _check_uids(scope.get("study_instance_uid"), scope.get("series_instance_uid"))
        return await self._run(
            lambda s: qido.search(
                s, tenant, level, params, extra_tags=self._extra, limits=self._limits, **scope
            )
        )

    async def search_studies(
        self, tenant: str, params: QueryParams, *, base_url: str | None = None
    ) -> list[DicomJson]:
        """Studies matching ``params`` (PS3.18 §8.3.4), as DICOM JSON objects. ``base_url`` (the
        service's DICOMweb root) fills RetrieveURL. Bad parameters: UsageError (400)."""
        return await self._search(tenant, "study", params, base_url=base_url)

    async def search_series(
        self,
        tenant: str,
        params: QueryParams,
        *,
        study_instance_uid: str | None = None,
        base_url: str | None = None,
    ) -> list[DicomJson]:
        """Series matching ``params``, within one study or across all."""
        return await self._search(
            tenant, "series", params, study_instance_uid=study_instance_uid, base_url=base_url
        )

    async def search_instances(
        self,
        tenant: str,
        params: QueryParams,
        *,
        study_instance_uid: str | None = None,
        series_instance_uid: str | None = None,
        base_url: str | None = None,
    ) -> list[DicomJson]:
        """Instances matching ``params``, within a study, a series, or across all."""
        return await self._search(
            tenant,
            "instance",
            params,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            base_url=base_url,
        )

    # -- retrieve (WADO-RS) --------------------------------------------------------------

    async def instances(
        self,
        tenant: str,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> list[InstanceRecord]:
        """The instances of a study, a series or one instance, ordered by series then instance
        number. NotFoundError when there are none (for this tenant)."""
        check_tenant(tenant)
        _check_uids(study_instance_uid, series_instance_uid, sop_instance_uid)
        return await self._run(
            lambda s: index.require_instances(
                s, tenant, study_instance_uid, series_instance_uid, sop_instance_uid
            )
        )

    async def read_instance(self, record: InstanceRecord) -> bytes:
        """The instance's Part 10 bytes: decrypted, size and CRC32C checked (IntegrityError)."""
        data = await self._get(record.object_key)
        if len(data) != record.size or crc32c_hex(data) != record.crc32c:
            raise IntegrityError("a stored instance does not match the size and CRC32C in the index")
        return data

    async def stream_instance(
        self, record: InstanceRecord, chunk_size: int = 1024 * 1024
    ) -> AsyncIterator[bytes]:
        """The instance's bytes as chunks, decrypted, holding about one chunk in memory: for
        instances too large for :meth:`read_instance`. Size and CRC32C are checked at the end: a
        mismatch (or a failed GCM tag) raises IntegrityError after the last chunk, so a response
        being streamed must then be aborted, not completed."""
        full = self.store_key(record.object_key)
        info = await self.store.stat(full)
        fmt = self._crypto.detect(full, info.metadata)
        decryptor = None
        if fmt is not None:
            head = bytes(await self.store.get_range(full, 0, min(16, info.size))) if info.size else b""
            decryptor = self._crypto.decryptor(self.store.url(full), fmt, info.metadata, head)
        crc, size = Crc32c(), 0
        async for chunk in self.store.stream(full, chunk_size=chunk_size):
            out = decryptor.update(chunk) if decryptor is not None else bytes(chunk)
            if out:
                crc.update(out)
                size += len(out)
                yield out
        if decryptor is not None:
            tail = decryptor.finalize()
            if tail:
                crc.update(tail)
                size += len(tail)
                yield tail
        if size != record.size or crc.hexdigest() != record.crc32c:
            raise IntegrityError("a stored instance does not match the size and CRC32C in the index")

    async def read_instances(
        self, records: Sequence[InstanceRecord], *, prefetch: int = 4
    ) -> AsyncIterator[tuple[InstanceRecord, bytes]]:
        """Each record with its bytes, in order, reading up to ``prefetch`` instances ahead: what a
        multipart/related response streams. Memory holds at most ``prefetch + 1`` instances."""
        if prefetch < 1:
            raise UsageError("prefetch must be at least 1")
        pending: deque[asyncio.Task[bytes]] = deque()
        upcoming = iter(records)
        try:
            for record in upcoming:
                pending.append(asyncio.create_task(self.read_instance(record)))
                if len(pending) > prefetch:
                    break
            for record in records:
                data = await pending.popleft()
                yield record, data
                following = next(upcoming, None)
                if following is not None:
                    pending.append(asyncio.create_task(self.read_instance(following)))
        finally:
            for task in pending:
                task.cancel()

    async def bulkdata(
        self,
        tenant: str,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        tag: str,
    ) -> bytes:
        """The value of one top-level bulk data element (``tag``: 8 hex digits, as in the
        sidecar's ``BulkDataURI``), as stored: encapsulated pixel data stays encapsulated.
        NotFoundError when the instance lacks it."""
        if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag):
            raise UsageError("a bulk data tag is 8 hex digits")
        record = await self._one(tenant, study_instance_uid, series_instance_uid, sop_instance_uid)
        data = await self.read_instance(record)
        from .imaging import element_bytes  # numpy and pydicom's pixel code load on first use

        value = await asyncio.to_thread(element_bytes, data, int(tag, 16))
        if value is None:
            raise NotFoundError("the instance has no such bulk data element")
        return value

    async def metadata(
        self,
        tenant: str,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
        *,
        base_url: str | None = None,
    ) -> list[DicomJson]:
        """DICOM JSON metadata of each instance, from the sidecars. Bulk data (pixel data, large
        binary values) appear as ``BulkDataURI``: relative (``bulkdata/7FE00010``) or, with
        ``base_url``, absolute (``{base_url}/studies/S/series/R/instances/I/bulkdata/7FE00010``)."""
        records = await self.instances(tenant, study_instance_uid, series_instance_uid, sop_instance_uid)
        limit = asyncio.Semaphore(16)

        async def one(record: InstanceRecord) -> DicomJson:
            async with limit:
                sidecar: DicomJson = json.loads(await self._get(record.sidecar_key))
            if base_url is not None:
                prefix = (
                    f"{base_url.rstrip('/')}/studies/{record.study_instance_uid}/series/"
                    f"{record.series_instance_uid}/instances/{record.sop_instance_uid}/"
                )
                _absolute_bulk_uris(sidecar, prefix)
            return sidecar

        return list(await asyncio.gather(*(one(r) for r in records)))

    async def _one(
        self, tenant: str, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str
    ) -> InstanceRecord:
        return (await self.instances(tenant, study_instance_uid, series_instance_uid, sop_instance_uid))[0]

    async def frames(
        self,
        tenant: str,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        numbers: Sequence[int],
    ) -> Frames:
        """Frames (1-based numbers) of one instance. A number outside 1..NumberOfFrames is
        UsageError; an instance without pixel data is NotFoundError."""
        record = await self._one(tenant, study_instance_uid, series_instance_uid, sop_instance_uid)
        data = await self.read_instance(record)
        from .imaging import extract_frames

        syntax, frames, encapsulated = await asyncio.to_thread(extract_frames, data, list(numbers))
        return Frames(syntax, frames, encapsulated)

    async def rendered(
        self,
        tenant: str,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        *,
        frame: int = 1,
        media_type: str = "image/jpeg",
        thumbnail: bool = False,
        quality: int = 90,
    ) -> Rendered:
        """A JPEG or PNG of one frame (windowed to 8 bits), or a thumbnail of it, cached as a
        derived object. Unsupported media types: NotSupportedError (406 for the service)."""
        from PIL import Image

        from ..errors import NotSupportedError

        extension = _MEDIA_EXTENSIONS.get(media_type)
        if extension is None:
            raise NotSupportedError(
                f"cannot render as '{media_type}'", hint="ask for image/jpeg or image/png"
            )
        if not 1 <= quality <= 100:
            raise UsageError("quality must be between 1 and 100")
        record = await self._one(tenant, study_instance_uid, series_instance_uid, sop_instance_uid)
        size = self.settings.thumbnail_size if thumbnail else None
        name = f"thumbnail-{frame}-{size}" if thumbnail else f"frame-{frame}"
        if media_type == "image/jpeg":
            name += f"-q{quality}"
        key = (
            self._layout.derived_prefix(tenant, record.sop_instance_uid, record.crc32c)
            + f"{name}.{extension}"
        )
        try:
            cached = await self._get(key)
        except NotFoundError:
            pass
        else:
            with Image.open(BytesIO(cached)) as image:
                width, height = image.size
            return Rendered(media_type, cached, width, height, cached=True)  # type: ignore[arg-type]
        data = await self.read_instance(record)
        from .imaging import render_frame

        picture, width, height = await asyncio.to_thread(
            render_frame, data, frame, media_type, max_size=size, quality=quality
        )
        await self._put(key, picture, media_type)
        return Rendered(media_type, picture, width, height, cached=False)  # type: ignore[arg-type]

    # -- delete ----------------------------------------------------------------------------

    async def delete(
        self,
        tenant: str,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> DeleteResult:
        """Delete a study, a series or one instance: index rows first, then objects, sidecars
        and derived objects. NotFoundError when nothing matches (for this tenant)."""
        check_tenant(tenant)
        _check_uids(study_instance_uid, series_instance_uid, sop_instance_uid)
        records, series, studies = await self._run(
            lambda s: index.delete_instances(
                s, tenant, study_instance_uid, series_instance_uid, sop_instance_uid
            )
        )
        keys = [k for r in records for k in (r.object_key, r.sidecar_key)]
        prefixes = [self._layout.derived_prefix(tenant, r.sop_instance_uid, r.crc32c) for r in records]
        await self._delete_objects(keys, prefixes)
        return DeleteResult(studies=studies, series=series, instances=len(records))

    # -- labels ----------------------------------------------------------------------------

    async def get_labels(self, tenant: str, study_instance_uid: str) -> StudyLabels:
        check_tenant(tenant)
        _check_uids(study_instance_uid)
        return await self._run(lambda s: index.get_labels(s, tenant, study_instance_uid))

    async def set_labels(
        self,
        tenant: str,
        study_instance_uid: str,
        *,
        tags: Sequence[str] | None = None,
        description: str | None = None,
    ) -> StudyLabels:
        """Replace the study's tags (when given) and description (when given; "" clears it)."""
        check_tenant(tenant)
        _check_uids(study_instance_uid)
        return await self._run(lambda s: index.set_labels(s, tenant, study_instance_uid, tags, description))

    # -- API tokens ------------------------------------------------------------------------

    async def create_token(self, tenant: str, name: str, scopes: Sequence[Scope]) -> tuple[str, ApiToken]:
        """A new random token (returned once, never stored: only its SHA-256 is) and its record."""
        check_tenant(tenant)
        return await self._run(lambda s: access.create_token(s, tenant, name, scopes))

    async def authenticate(self, token: str) -> ApiToken | None:
        """The record of a valid, unrevoked token; None otherwise."""
        return await self._run(lambda s: access.authenticate(s, token))

    async def list_tokens(self, tenant: str) -> list[ApiToken]:
        check_tenant(tenant)
        return await self._run(lambda s: access.list_tokens(s, tenant))

    async def revoke_token(self, tenant: str, token_id: int) -> ApiToken:
        check_tenant(tenant)
        return await self._run(lambda s: access.revoke_token(s, tenant, token_id))

    # -- share links -----------------------------------------------------------------------

    async def create_share(
        self, tenant: str, study_instance_uid: str, expires_in: timedelta
    ) -> tuple[str, ShareLink]:
        """A new share token for read-only access to one study (returned once) and its record."""
        check_tenant(tenant)
        _check_uids(study_instance_uid)
        return await self._run(lambda s: access.create_share(s, tenant, study_instance_uid, expires_in))

    async def resolve_share(self, token: str) -> ShareLink | None:
        """The link of a valid share token; None when unknown, expired or revoked."""
        return await self._run(lambda s: access.resolve_share(s, token))

    async def list_shares(self, tenant: str, study_instance_uid: str | None = None) -> list[ShareLink]:
        check_tenant(tenant)
        _check_uids(study_instance_uid)
        return await self._run(lambda s: access.list_shares(s, tenant, study_instance_uid))

    async def revoke_share(self, tenant: str, share_id: int) -> ShareLink:
        check_tenant(tenant)
        return await self._run(lambda s: access.revoke_share(s, tenant, share_id))


def _zero_preamble(chunk: bytes | memoryview, offset: int) -> bytes:
    """``chunk`` (found at ``offset`` in an instance) with any preamble bytes in it set to zero."""
    if offset >= PREAMBLE_LENGTH:
        return bytes(chunk)
    cut = min(PREAMBLE_LENGTH - offset, len(chunk))
    return bytes(cut) + bytes(chunk[cut:])


async def _encrypted(crypto: ClientEncryption, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    encryptor = crypto.encryptor()
    yield encryptor.header
    async for chunk in chunks:
        out = encryptor.update(chunk)
        if out:
            yield out
    yield encryptor.finalize()


def _absolute_bulk_uris(node: Any, prefix: str) -> None:
    """Make the relative BulkDataURIs of a sidecar absolute (in place, nested sequences too)."""
    if isinstance(node, dict):
        uri = node.get("BulkDataURI")
        if isinstance(uri, str) and not uri.startswith(("http://", "https://")):
            node["BulkDataURI"] = prefix + uri
        for value in node.values():
            if isinstance(value, dict | list):
                _absolute_bulk_uris(value, prefix)
    elif isinstance(node, list):
        for item in node:
            _absolute_bulk_uris(item, prefix)
