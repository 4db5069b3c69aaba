"""Ingest: one DICOM instance into the archive, from a request body (STOW-RS) or from an object a
client uploaded into staging (presigned uploads), refused ones moved to quarantine.

The order of writes is the archive's rule: instance object, then sidecar, then the index rows
that point at both (one transaction). Objects are named by UID hash and content CRC32C, so a
writer racing with other bytes under the same UID never overwrites what a row points at; the
loser of any race removes its own objects. Spec: ``docs/archive.md`` (Ingest; Write and delete
ordering).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial

from sqlalchemy.exc import IntegrityError as DatabaseIntegrityError
from sqlalchemy.orm import Session

from ..budget import ByteBudget
from ..checksum import Crc32c, crc32c_hex
from ..dicom.header import (
    REASON_META_MISMATCH,
    REASON_TOO_LONG,
    REASON_UNREADABLE,
    DicomIdentity,
    check_element_order,
    read_identity_from_store,
)
from ..errors import (
    ConflictError,
    DicomCloudError,
    DicomFormatError,
    IntegrityError,
    NotFoundError,
    RejectedObjectError,
    UsageError,
)
from ..store import MultipartPlan, PutOptions
from . import index
from .bucket import BucketLayout, check_tenant
from .db import Database
from .objects import ArchiveObjects
from .parsing import PREAMBLE_LENGTH, ParsedInstance, parse_head, parse_instance, sanitise_preamble
from .records import InstanceRecord, OtherStudyError, StoredInstance
from .settings import ArchiveSettings

log = logging.getLogger("dicom_cloud.archive")

#: Reasons of refusals that are not about the DICOM format (stable strings, no patient data).
REASON_NOT_UPLOADED = "not uploaded"
REASON_SIZE_MISMATCH = "size differs from the declared size"
REASON_CHECKSUM_MISMATCH = "CRC32C differs from the declared checksum"
REASON_TOO_LARGE = "larger than the largest instance accepted"
REASON_CONFLICT = "another instance with this SOP Instance UID is stored"
REASON_CONTENT_TYPE = "stored with another content type than declared"
REASON_WRITTEN_LATE = "written after its upload URL expired"
#: How far the store's clock may run ahead of ours before a write counts as late.
URL_CLOCK_SKEW = timedelta(seconds=5)
#: Copies of an instance an ingest holds at its peak (see ArchiveSettings.ingest_memory).
_INGEST_COPIES = 3


def _written_late(written: datetime | None, deadline: datetime | None) -> bool:
    """Whether an object was written after its URL's deadline (unknown times: not late)."""
    return written is not None and deadline is not None and written > deadline + URL_CLOCK_SKEW


#: Head read for a streamed ingest, doubled while the header runs past it, up to the last.
_FIRST_HEAD = 64 * 1024
_MAX_HEAD = 8 * 1024 * 1024
#: Parts of staging writes of streamed STOW-RS instances (S3's smallest is 5 MiB), one in flight.
_STAGING_PLAN = MultipartPlan(part_size=8 * 1024 * 1024, concurrency=1)
DICOM_TYPE, SIDECAR_TYPE = "application/dicom", "application/dicom+json"


class Ingestor:
    """Stores instances into one archive's objects and index."""

    def __init__(
        self,
        settings: ArchiveSettings,
        objects: ArchiveObjects,
        db: Database,
        layout: BucketLayout,
        extra_tags: Sequence[int],
    ) -> None:
        self.settings = settings
        self.objects = objects
        self.db = db
        self.layout = layout
        self.extra_tags = list(extra_tags)
        #: Bounds the memory of concurrent in-memory ingests (ArchiveSettings.ingest_memory).
        self.budget = ByteBudget(settings.ingest_memory)

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
        async with self.budget.reserve(_INGEST_COPIES * len(data)):
            sanitised, changed, parsed, crc = await asyncio.to_thread(
                _sanitise_and_parse, data, self.extra_tags
            )
            return await self._store_parsed(tenant, sanitised, parsed, crc, changed)

    def _same(
        self, existing: InstanceRecord, size: int, crc: str, changed: bool, warnings: tuple[str, ...]
    ) -> StoredInstance:
        if existing.size == size and existing.crc32c == crc:
            return StoredInstance(existing, created=False, preamble_sanitised=changed, warnings=warnings)
        raise self._conflict()

    @staticmethod
    def _conflict() -> ConflictError:
        return ConflictError(
            "an instance with this SOP Instance UID and other content is already stored",
            hint="delete the stored instance first to replace it",
        )

    async def _store_parsed(
        self, tenant: str, data: bytes, parsed: ParsedInstance, crc: str, changed: bool
    ) -> StoredInstance:
        async def write(key: str) -> None:
            await self.objects.put(key, data, "application/dicom", plaintext_crc=crc)

        return await self._store(tenant, parsed, len(data), crc, changed, write)

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
        warnings = _warnings(tenant, parsed.identity)
        existing = await self.db.read(lambda s: index.find_instance(s, tenant, uid))
        if existing is not None:
            return self._same(existing, size, crc, changed, warnings)
        object_key = self.layout.instance_key(tenant, uid, crc)
        sidecar_key = self.layout.sidecar_key(tenant, uid, crc)
        try:
            await write_object(object_key)
            await self.objects.put(sidecar_key, parsed.sidecar_bytes(), "application/dicom+json")
            item = _Prepared(parsed, size, crc, changed, object_key, sidecar_key)
            return await self._index(tenant, item, warnings)
        except BaseException:
            await self._remove_unindexed(tenant, uid, object_key, sidecar_key)
            raise

    async def _index(self, tenant: str, item: _Prepared, warnings: tuple[str, ...]) -> StoredInstance:
        """The index rows of one instance whose objects are written, in a transaction of its own;
        a race with another writer is decided here (the same objects: success; others: conflict)."""
        uid = item.parsed.identity.sop_instance_uid
        for _attempt in range(5):
            try:
                record = await self.db.run(partial(item.insert, tenant, self.objects.writes_encrypted))
                return StoredInstance(
                    record, created=True, preamble_sanitised=item.changed, warnings=warnings
                )
            except DatabaseIntegrityError:
                # Another writer created a row first: this instance (then decide), or its
                # patient/study/series (then try again: they exist now).
                existing = await self.db.read(lambda s: index.find_instance(s, tenant, uid))
                if existing is not None:
                    if existing.object_key == item.object_key:
                        return self._same(existing, item.size, item.crc, item.changed, warnings)
                    raise self._conflict() from None
        raise ConflictError("the index kept refusing the instance's rows; try again")

    # -- several held instances at once (the parts of one STOW-RS request) ---------------------

    async def store_instances(
        self, tenant: str, parts: Sequence[bytes | memoryview], *, study: str | None = None
    ) -> list[StoredInstance | DicomCloudError]:
        """Store several held instances as :meth:`store_instance` stores each, with the outcome of
        each in their order (a refusal as its error, not raised).

        The work is batched: one worker-thread trip parses them all, one index read finds those
        stored already, their objects are written concurrently, and their rows go in ONE
        transaction. If that transaction fails (a race with another writer, a series filed under
        another study), it is rolled back whole and each instance is indexed on its own as
        :meth:`store_instance` does, so outcomes never differ from storing them one by one. An
        error of the store that is not a refusal (the store is down) is raised, after the objects
        this call wrote and did not index are removed. With ``study``, an instance of another
        study is refused (:class:`OtherStudyError`), checked on the batch's own parse.
        """
        check_tenant(tenant)
        results: list[StoredInstance | DicomCloudError | None] = [None] * len(parts)
        fitting = []
        limit = self.settings.max_instance_size
        for i, data in enumerate(parts):
            if len(data) > limit:
                results[i] = UsageError(f"the instance is larger than {limit} bytes")
            else:
                fitting.append(i)
        async with self.budget.reserve(_INGEST_COPIES * sum(len(parts[i]) for i in fitting)):
            parsed_all = await asyncio.to_thread(
                _sanitise_and_parse_all, [parts[i] for i in fitting], self.extra_tags
            )
            prepared: dict[int, _Prepared] = {}
            later: list[int] = []  # a UID seen earlier in this batch: stored after it, on its own
            seen: set[str] = set()
            for i, outcome in zip(fitting, parsed_all, strict=True):
                if isinstance(outcome, DicomCloudError):
                    results[i] = outcome
                    continue
                sanitised, changed, parsed, crc, sidecar = outcome
                if study is not None and parsed.identity.study_instance_uid != study:
                    results[i] = OtherStudyError(parsed.identity)
                    continue
                uid = parsed.identity.sop_instance_uid
                if uid in seen:
                    later.append(i)
                    results[i] = None
                seen.add(uid)
                prepared[i] = _Prepared(
                    parsed,
                    len(sanitised),
                    crc,
                    changed,
                    self.layout.instance_key(tenant, uid, crc),
                    self.layout.sidecar_key(tenant, uid, crc),
                    sanitised,
                    sidecar,
                )
            first = [i for i in prepared if i not in later]
            uids = [prepared[i].parsed.identity.sop_instance_uid for i in first]
            existing = (
                await self.db.read(lambda s: index.find_instances(s, tenant, uids), len(uids)) if uids else {}
            )
            new: list[int] = []
            for i in first:
                item = prepared[i]
                found = existing.get(item.parsed.identity.sop_instance_uid)
                if found is None:
                    new.append(i)
                    continue
                try:
                    warnings = _warnings(tenant, item.parsed.identity)
                    results[i] = self._same(found, item.size, item.crc, item.changed, warnings)
                except ConflictError as exc:
                    results[i] = exc
            await self._store_batch(tenant, prepared, new, results)
            for i in later:
                item = prepared[i]
                try:
                    results[i] = await self._store_parsed(
                        tenant, item.data, item.parsed, item.crc, item.changed
                    )
                except DicomCloudError as exc:
                    results[i] = exc
        done = [r for r in results if r is not None]
        assert len(done) == len(parts)
        return done

    async def _store_batch(
        self,
        tenant: str,
        prepared: dict[int, _Prepared],
        new: list[int],
        results: list[StoredInstance | DicomCloudError | None],
    ) -> None:
        """Objects, then sidecars, then the rows of instances ``new`` (of ``prepared``): the
        outcome of each into ``results``."""
        if not new:
            return
        indexed: set[int] = set()
        try:
            # Each instance's object, then its sidecar: one call for the batch (on a local disk,
            # one worker-thread trip).
            writes: list[tuple[str, bytes, str, str | None]] = []
            for i in new:
                item = prepared[i]
                writes += [
                    (item.object_key, item.data, DICOM_TYPE, item.crc),
                    (item.sidecar_key, item.sidecar, SIDECAR_TYPE, None),
                ]
            outcomes = await self.objects.put_many(writes)
            written = [outcomes[2 * n] or outcomes[2 * n + 1] for n in range(len(new))]
            for error in written:
                if error is not None and error.http_status >= 500 and error.retryable:
                    raise error  # the store is down: the whole request fails
            ready = [i for i, e in zip(new, written, strict=True) if e is None]
            for i, e in zip(new, written, strict=True):
                if isinstance(e, DicomCloudError):
                    results[i] = e
                    await self._forget(tenant, prepared[i])
            encrypted = self.objects.writes_encrypted

            def insert_all(session: Session) -> list[InstanceRecord]:
                rows = index.LevelRows()  # one per attempt: a retried transaction looks up afresh
                return [prepared[i].insert(tenant, encrypted, session, rows) for i in ready]

            try:
                records = await self.db.run(insert_all, len(ready)) if ready else []
            except (DatabaseIntegrityError, ConflictError):
                records = None  # rolled back whole: each on its own, as one store would
            if records is not None:
                for i, record in zip(ready, records, strict=True):
                    item = prepared[i]
                    warnings = _warnings(tenant, item.parsed.identity)
                    results[i] = StoredInstance(
                        record, created=True, preamble_sanitised=item.changed, warnings=warnings
                    )
                    indexed.add(i)
                return
            for i in ready:
                try:
                    warnings = _warnings(tenant, prepared[i].parsed.identity)
                    results[i] = await self._index(tenant, prepared[i], warnings)
                except DicomCloudError as exc:
                    results[i] = exc
                    await self._forget(tenant, prepared[i])
                indexed.add(i)
        except BaseException:
            for i in new:
                if i not in indexed:
                    await self._forget(tenant, prepared[i])
            raise

    async def _forget(self, tenant: str, item: _Prepared) -> None:
        await self._remove_unindexed(
            tenant, item.parsed.identity.sop_instance_uid, item.object_key, item.sidecar_key
        )

    async def _remove_unindexed(self, tenant: str, uid: str, object_key: str, sidecar_key: str) -> None:
        """Remove the objects of a failed ingest, unless a row points at them after all (a commit
        whose acknowledgement was lost) or the index cannot tell (then they stay, unreferenced)."""
        try:
            existing = await self.db.read(lambda s: index.find_instance(s, tenant, uid))
        except Exception:
            log.warning("objects of a failed ingest left in place: the index is unreachable")
            return
        if existing is None or existing.object_key != object_key:
            await self.objects.delete([object_key, sidecar_key])

    async def ingest_object(
        self,
        tenant: str,
        staging_key: str,
        expected_size: int | None = None,
        expected_crc32c: str | None = None,
        *,
        content_type: str | None = None,
        put_by: datetime | None = None,
        keep_staging: bool = False,
    ) -> StoredInstance:
        """Ingest an object a client PUT under the staging prefix (the presigned-upload path).

        Checks that it exists, has ``expected_size`` bytes and ``expected_crc32c``, was stored
        with ``content_type`` (when the store reports one) and written by ``put_by`` (when the
        store reports the time); reads its header by a ranged read and validates it; then
        stores it as :meth:`store_instance` does and removes the staging object (unless
        ``keep_staging``: a queued job removes it once the outcome is recorded, so that a job
        retried in between finds the object again and ingests it as a duplicate). A refused
        object is moved to the quarantine prefix (one larger than declared is deleted, not
        copied) and RejectedObjectError (``reason``, ``quarantine_key``) is raised.
        """
        check_tenant(tenant)
        if not staging_key.startswith(BucketLayout.staging_prefix(tenant)) or ".." in staging_key:
            raise UsageError("the object is not in this tenant's staging area")
        full = self.objects.key(staging_key)
        try:
            info = await self.objects.store.stat(full)
        except NotFoundError:
            raise RejectedObjectError(REASON_NOT_UPLOADED) from None
        if info.size > self.settings.max_upload_size:
            raise await self._reject(tenant, staging_key, REASON_TOO_LARGE, keep=False)
        if expected_size is not None and info.size != expected_size:
            # Bytes beyond what was declared are not worth a copy: the object is deleted.
            keep = info.size < expected_size
            raise await self._reject(tenant, staging_key, REASON_SIZE_MISMATCH, keep=keep)
        if content_type is not None and info.content_type is not None:
            stored_type = info.content_type.split(";", 1)[0].strip().lower()
            if stored_type != content_type.lower():
                raise await self._reject(tenant, staging_key, REASON_CONTENT_TYPE)
        if _written_late(info.last_modified, put_by):
            raise await self._reject(tenant, staging_key, REASON_WRITTEN_LATE)
        try:
            # The header first, by a ranged read: junk is refused without reading it whole.
            identity = await read_identity_from_store(
                self.objects.store, full, policy="strict", size=info.size
            )
        except DicomFormatError as exc:
            raise await self._reject(tenant, staging_key, exc.reason) from None
        except DicomCloudError:
            raise  # the store failed: nothing is known about the object
        except Exception:  # pydicom failing late on a malformed header (e.g. an unknown VR)
            raise await self._reject(tenant, staging_key, REASON_UNREADABLE) from None
        if info.size > min(self.settings.stream_threshold, self.settings.max_instance_size):
            try:
                await self._check_element_order(full, info.size)
            except DicomFormatError as exc:
                raise await self._reject(tenant, staging_key, exc.reason) from None
            stored = await self._ingest_streamed(tenant, staging_key, info.size, identity, expected_crc32c)
            if not keep_staging:
                await self.objects.store.delete([full])
            return stored
        async with self.budget.reserve(_INGEST_COPIES * info.size):
            data = bytes(await self.objects.store.get(full))
            if len(data) != info.size:
                raise await self._reject(tenant, staging_key, REASON_SIZE_MISMATCH)
            if (
                expected_crc32c is not None
                and await asyncio.to_thread(crc32c_hex, data) != expected_crc32c.lower()
            ):
                raise await self._reject(tenant, staging_key, REASON_CHECKSUM_MISMATCH)
            try:
                sanitised, changed, parsed, crc = await asyncio.to_thread(
                    _sanitise_and_parse, data, self.extra_tags
                )
                del data
                stored = await self._store_parsed(tenant, sanitised, parsed, crc, changed)
            except DicomFormatError as exc:
                raise await self._reject(tenant, staging_key, exc.reason) from None
            except ConflictError:
                raise await self._reject(tenant, staging_key, REASON_CONFLICT) from None
        if not keep_staging:
            await self.objects.store.delete([full])
        return stored

    async def quarantined_reason(self, tenant: str, staging_key: str) -> RejectedObjectError | None:
        """The refusal recorded beside a staging object's quarantine copy, if there is one: what a
        retried job reports for a file an earlier attempt refused (its staging object is gone)."""
        quarantine_key = BucketLayout.quarantine_key(tenant, staging_key)
        try:
            note = json.loads(
                bytes(await self.objects.store.get(self.objects.key(quarantine_key) + ".reason.json"))
            )
        except NotFoundError:
            return None
        return RejectedObjectError(str(note["reason"]), quarantine_key=quarantine_key)

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
        full = self.objects.key(staging_key)
        head_size, parsed = _FIRST_HEAD, None
        while parsed is None:
            head = bytes(await self.objects.store.get_range(full, 0, min(head_size, size)))
            try:
                parsed = await asyncio.to_thread(
                    parse_head, _zero_preamble(head, 0), size, identity, self.extra_tags
                )
            except DicomFormatError as exc:
                raise await self._reject(tenant, staging_key, exc.reason) from None
            if parsed is None:
                if head_size >= _MAX_HEAD:
                    raise await self._reject(tenant, staging_key, REASON_TOO_LONG)
                head_size *= 2
        changed = any(head[:PREAMBLE_LENGTH])

        uploaded, sanitised, offset = Crc32c(), Crc32c(), 0
        async for chunk in self.objects.store.stream(full):
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
            async for chunk in self.objects.store.stream(full):
                out = _zero_preamble(chunk, at)
                at += len(chunk)
                check.update(out)
                yield out
            if at != size or check.hexdigest() != crc:
                # Raised before the stream ends: the multipart upload is never completed.
                raise IntegrityError("the staged object changed while it was ingested")

        async def write(key: str) -> None:
            await self.objects.put_stream(key, copy_of_staged(), "application/dicom", crc)

        try:
            return await self._store(tenant, parsed, size, crc, changed, write)
        except ConflictError:
            raise await self._reject(tenant, staging_key, REASON_CONFLICT) from None

    async def _reject(
        self, tenant: str, staging_key: str, reason: str, *, keep: bool = True
    ) -> RejectedObjectError:
        """Move a staging object to quarantine, with its reason beside it (or, ``keep`` false,
        delete it); the error to raise."""
        src = self.objects.key(staging_key)
        if not keep:
            await self.objects.store.delete([src])
            log.info("upload refused and deleted: %s", reason)
            return RejectedObjectError(reason)
        quarantine_key = BucketLayout.quarantine_key(tenant, staging_key)
        dst = self.objects.key(quarantine_key)
        if self.objects.store.features.server_side_copy:
            await self.objects.store.copy(src, dst)
        else:
            await self.objects.store.put(dst, bytes(await self.objects.store.get(src)))
        note = {"reason": reason, "quarantined": datetime.now(UTC).isoformat(), "staging_key": staging_key}
        await self.objects.store.put(
            dst + ".reason.json", json.dumps(note).encode(), PutOptions(content_type="application/json")
        )
        await self.objects.store.delete([src])
        log.info("upload refused and quarantined: %s", reason)
        return RejectedObjectError(reason, quarantine_key=quarantine_key)

    async def _check_element_order(self, full: str, size: int) -> None:
        """``check_element_order`` on a stored object's head (64 KiB, 8 MiB if the header runs
        on), before a parser reads up to 8 MiB of it."""
        for head_size in (_FIRST_HEAD, _MAX_HEAD):
            head = bytes(await self.objects.store.get_range(full, 0, min(size, head_size)))
            if await asyncio.to_thread(check_element_order, head) or len(head) >= size:
                return

    # -- STOW-RS instances too large to hold ------------------------------------------------

    async def store_instance_stream(self, tenant: str, chunks: AsyncIterable[bytes]) -> StoredInstance:
        """Store one instance that arrives as a stream (a STOW-RS part too large to hold).

        The chunks are written to a staging object as they come, then ingested as a staged
        upload too large to hold is (:meth:`_ingest_streamed`, whatever its size): memory stays
        at a few parts. Refusals raise DicomFormatError (``reason`` as for uploads) and
        ConflictError as :meth:`store_instance` does, and keep nothing: the client reads the
        reason in its answer, so no quarantine copy is left. The staging object is removed in
        every case; ``chunks`` raising leaves no object.
        """
        check_tenant(tenant)
        staging_key = BucketLayout.staging_key(tenant, "stow-" + secrets.token_hex(12), 0)
        full = self.objects.key(staging_key)
        try:
            options = PutOptions(content_type="application/dicom")
            failed: list[BaseException] = []

            async def watched() -> AsyncIterator[bytes]:
                try:
                    async for chunk in chunks:
                        yield chunk
                except BaseException as exc:
                    failed.append(exc)
                    raise

            try:
                await self.objects.store.put_stream(full, watched(), options, _STAGING_PLAN)
            except Exception:
                if failed:  # the stream's own error, not the store client's wrapping of it
                    raise failed[0] from None
                raise
            size = (await self.objects.store.stat(full)).size
            if size > self.settings.max_upload_size:
                raise DicomFormatError(REASON_TOO_LARGE)
            try:
                identity = await read_identity_from_store(
                    self.objects.store, full, policy="strict", size=size
                )
                await self._check_element_order(full, size)
            except DicomCloudError:
                raise
            except Exception:  # pydicom failing late on a malformed header (e.g. an unknown VR)
                raise DicomFormatError(REASON_UNREADABLE) from None
            return await self._ingest_streamed(tenant, staging_key, size, identity, None)
        except RejectedObjectError as exc:
            if exc.quarantine_key is not None:
                quarantined = self.objects.key(exc.quarantine_key)
                await self.objects.store.delete([quarantined, quarantined + ".reason.json"])
            if exc.reason == REASON_CONFLICT:
                raise self._conflict() from None
            raise DicomFormatError(exc.reason) from None
        finally:
            try:
                await self.objects.store.delete([full])
            except DicomCloudError:
                log.warning("a staged STOW-RS part was left behind: the store refused its removal")


@dataclass(frozen=True)
class _Prepared:
    """An instance parsed and named, ready to be written and indexed."""

    parsed: ParsedInstance
    size: int
    crc: str
    changed: bool
    object_key: str
    sidecar_key: str
    data: bytes = b""
    sidecar: bytes = b""

    def insert(
        self, tenant: str, encrypted: bool, session: Session, rows: index.LevelRows | None = None
    ) -> InstanceRecord:
        return index.insert_instance(
            session,
            tenant,
            self.parsed.attributes,
            object_key=self.object_key,
            sidecar_key=self.sidecar_key,
            size=self.size,
            crc32c=self.crc,
            encrypted=encrypted,
            rows=rows,
        )


def _sanitise_and_parse_all(
    parts: Sequence[bytes | memoryview], extra_tags: Sequence[int]
) -> list[tuple[bytes, bool, ParsedInstance, str, bytes] | DicomCloudError]:
    """:func:`_sanitise_and_parse` of each part and its sidecar's bytes, a refusal as its error
    (one worker-thread trip for them all)."""
    out: list[tuple[bytes, bool, ParsedInstance, str, bytes] | DicomCloudError] = []
    for data in parts:
        try:
            sanitised, changed, parsed, crc = _sanitise_and_parse(data, extra_tags)
            out.append((sanitised, changed, parsed, crc, parsed.sidecar_bytes()))
        except DicomCloudError as exc:
            out.append(exc)
    return out


def _sanitise_and_parse(
    data: bytes | memoryview, extra_tags: Sequence[int]
) -> tuple[bytes, bool, ParsedInstance, str]:
    """The preamble zeroed, the instance parsed and its CRC32C: CPU work, in one trip to a worker
    thread. Junk after a valid header is refused before the parser would walk it
    (``check_element_order``)."""
    sanitised, changed = sanitise_preamble(data)
    check_element_order(sanitised)
    return sanitised, changed, parse_instance(sanitised, extra_tags), crc32c_hex(sanitised)


def _warnings(tenant: str, identity: DicomIdentity) -> tuple[str, ...]:
    """The caveats an instance is stored with (logged without its UIDs: no patient data)."""
    if not identity.meta_mismatch:
        return ()
    log.warning("instance stored with a warning: %s (tenant %s)", REASON_META_MISMATCH, tenant)
    return (REASON_META_MISMATCH,)


def _zero_preamble(chunk: bytes | memoryview, offset: int) -> bytes:
    """``chunk`` (found at ``offset`` in an instance) with any preamble bytes in it set to zero."""
    if offset >= PREAMBLE_LENGTH:
        return bytes(chunk)
    cut = min(PREAMBLE_LENGTH - offset, len(chunk))
    return bytes(cut) + bytes(chunk[cut:])
