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
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from io import BytesIO
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.orm import Session

from ..checksum import Crc32c, crc32c_hex
from ..crypto.envelope import ClientEncryption
from ..errors import (
    ConflictError,
    DicomCloudError,
    IntegrityError,
    NotFoundError,
    RejectedObjectError,
    UsageError,
)
from ..location import Location, LocationOpener
from ..store import MultipartPlan, PutOptions, Store
from . import access, housekeeping, index, qido, uploads
from .bucket import BucketLayout, check_tenant
from .db import Database
from .ingest import Ingestor
from .objects import ArchiveObjects
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
from .settings import ArchiveSettings

if TYPE_CHECKING:  # numpy and pydicom's pixel code load on first use
    from .imaging import Viewport, Window

T = TypeVar("T")
#: Streamed writes into staging: 8 MiB parts (S3's smallest is 5 MiB), one in flight.
STAGING_WRITE_PLAN = MultipartPlan(part_size=8 * 1024 * 1024, concurrency=1)
_UID = re.compile(r"[0-9.]{1,64}")


def _check_uids(*uids: str | None) -> None:
    """UIDs named by a caller: digits and dots, at most 64 (every stored UID passed the strict
    policy, so anything else names nothing; refused before it reaches the database)."""
    for uid in uids:
        if uid is not None and (not isinstance(uid, str) or not _UID.fullmatch(uid)):
            raise UsageError("not a DICOM UID", hint="UIDs are digits and dots, at most 64 characters")


log = logging.getLogger("dicom_cloud.archive")

#: Instances ingested at once by ``complete_upload``.
_UPLOAD_CONCURRENCY = 4
#: Files of a queued upload ingested between two records of its progress (a retried job redoes
#: at most this many).
_PROGRESS_BATCH = 32
_MEDIA_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png"}

#: A QIDO query: attribute keys (keyword or 8-hex tag) and the reserved keys ``limit``,
#: ``offset``, ``includefield``, ``fuzzymatching``, ``label``, ``labeldescription``, each with
#: one value or several (a key repeated in the query string).
QueryParams = Mapping[str, str | Sequence[str]]


def _outcome(session_id: str, files: Iterable[AcceptedFile | RejectedFile]) -> UploadOutcome:
    ordered = sorted(files, key=lambda f: f.index)
    return UploadOutcome(
        session_id,
        accepted=tuple(f for f in ordered if isinstance(f, AcceptedFile)),
        rejected=tuple(f for f in ordered if isinstance(f, RejectedFile)),
    )


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
        self._db = db
        self._objects = ArchiveObjects(
            location.store, location.prefix, settings.encryption or ClientEncryption()
        )
        self._layout = BucketLayout(settings.name_key)
        self._extra = qido.resolve_extra_tags(settings.extra_query_tags)
        self._limits = qido.QueryLimits(settings.default_query_limit, settings.max_query_limit)
        self._ingest = Ingestor(
            settings, self._objects, db, self._layout, [int(e.tag, 16) for e in self._extra]
        )
        #: Shared by concurrent ingests (ArchiveSettings.ingest_memory).
        self._budget = self._ingest.budget

    @classmethod
    async def open(cls, settings: ArchiveSettings) -> Archive:
        """Open the store and the index, bringing the schema up to date (Alembic) first."""
        settings.check()  # bad configuration fails before any connection
        qido.resolve_extra_tags(settings.extra_query_tags)
        opener = LocationOpener(replace(settings.store_config, local_private=settings.private_files))
        try:
            location = opener.open(settings.storage_url)
            db = await Database.open(settings.database_url, private=settings.private_files)
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
        return self._objects.key(key)

    async def _run(self, work: Callable[[Session], T]) -> T:
        return await self._db.run(work)

    async def _read(self, work: Callable[[Session], T]) -> T:
        """Run ``work``, which only reads, without taking the index's write lock."""
        return await self._db.read(work)

    # -- ingest --------------------------------------------------------------------------

    async def store_instance(self, tenant: str, data: bytes | memoryview) -> StoredInstance:
        """Store one DICOM Part 10 instance (the STOW-RS path).

        Refuses what is not Part 10 (DicomFormatError, ``reason`` stable and PHI-free); zeroes
        the preamble; writes the object (encrypted if configured), then the sidecar, then the
        index row. The same SOP Instance UID with identical bytes is an idempotent success
        (``created=False``); with different bytes it is ConflictError (409) and nothing changes.
        """
        return await self._ingest.store_instance(tenant, data)

    async def store_instances(
        self, tenant: str, parts: Sequence[bytes | memoryview], *, study: str | None = None
    ) -> list[StoredInstance | DicomCloudError]:
        """Store several held instances (the parts of one STOW-RS request): the outcome of each,
        in order, as :meth:`store_instance` would have it (a refusal as its error, returned, not
        raised), with one parse trip, one lookup and one index transaction for them all. An
        error of the store itself (it is down) is raised, nothing of this call left stored.
        With ``study`` (a request to ``/studies/{study}``), an instance of another study is
        refused with :class:`OtherStudyError` and not stored."""
        return await self._ingest.store_instances(tenant, parts, study=study)

    async def store_instance_stream(self, tenant: str, chunks: AsyncIterable[bytes]) -> StoredInstance:
        """Store one instance arriving as a stream, too large to hold (a STOW-RS part): staged
        as it comes, then ingested as a stream; refusals as :meth:`store_instance`, and nothing
        kept of them (no quarantine copy). ``chunks`` raising stores nothing."""
        return await self._ingest.store_instance_stream(tenant, chunks)

    async def ingest_object(
        self,
        tenant: str,
        staging_key: str,
        expected_size: int | None = None,
        expected_crc32c: str | None = None,
        *,
        content_type: str | None = None,
        put_by: datetime | None = None,
    ) -> StoredInstance:
        """Ingest an object a client PUT under the staging prefix (the presigned-upload path).

        Checks that it exists, has ``expected_size`` bytes and ``expected_crc32c``, the declared
        ``content_type`` and was written by ``put_by`` (when the store reports them); reads its
        header by a ranged read and validates it; then stores it as :meth:`store_instance` does
        (as a stream above ``stream_threshold``) and removes the staging object. A refused object
        is moved to the quarantine prefix (deleted when larger than declared) and
        RejectedObjectError (``reason``, ``quarantine_key``) is raised.
        """
        return await self._ingest.ingest_object(
            tenant, staging_key, expected_size, expected_crc32c, content_type=content_type, put_by=put_by
        )

    # -- housekeeping ----------------------------------------------------------------------

    async def reindex_extra_tags(self, batch: int = 500) -> int:
        """Fill the configured extra query tags of every stored instance (all tenants) from the
        sidecars: what to run after adding a tag to ``extra_query_tags``. Returns the number of
        instances visited. Safe to repeat, and to run while instances are being stored."""
        return await housekeeping.reindex_extra_tags(self._objects, self._db, self._extra, batch)

    async def collect_orphans(
        self, tenant: str, *, older_than: timedelta = timedelta(hours=1), dry_run: bool = False
    ) -> OrphanSweep:
        """Find (and unless ``dry_run`` delete) a tenant's instance, sidecar and derived objects
        that no index row points at: what a crash between writing objects and committing their
        row, or a failed object delete, leaves behind. Objects younger than ``older_than`` are
        left alone (an ingest may be about to commit their row), as are objects whose date the
        store does not report. Memory stays flat: the listing is checked 1000 keys at a time."""
        check_tenant(tenant)
        return await housekeeping.collect_orphans(
            self._objects, self._db, tenant, older_than=older_than, dry_run=dry_run
        )

    # -- presigned upload sessions ---------------------------------------------------------

    async def sweep_orphans(self, *, older_than: timedelta = timedelta(hours=1)) -> OrphanSweep:
        """:meth:`collect_orphans` for every tenant with objects in the store, and removal of
        empty staging folders (left on local directories by finished upload sessions), both
        only past ``older_than``. What a service runs on a schedule."""
        return await housekeeping.sweep_orphans(self._objects, self._db, older_than=older_than)

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

    async def write_staging(
        self, tenant: str, session_id: str, index_: int, data: bytes | AsyncIterable[bytes]
    ) -> None:
        """Put one declared file's bytes into staging (for stores that cannot presign). ``data``
        may be a stream: written as it arrives, and a stream of another size than declared
        stores nothing (the write fails before it completes)."""
        upload = await self.get_upload(tenant, session_id)
        if upload.state != "pending" or datetime.now(UTC) >= upload.expires:
            raise UsageError("the upload session is no longer open")
        if not 0 <= index_ < len(upload.files):
            raise NotFoundError("no such file in the upload session")
        declared = upload.files[index_].size
        key = self.store_key(upload.staging_keys[index_])
        # Stored under the declared type, which the completion compares with the object's.
        options = PutOptions(content_type=upload.files[index_].content_type)
        if isinstance(data, bytes):
            if len(data) != declared:
                raise UsageError("the file's size differs from the declared size")
            await self.store.put(key, data, options)
            return

        async def of_declared_size(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
            size = 0
            async for chunk in chunks:
                size += len(chunk)
                if size > declared:
                    break
                yield chunk
            if size != declared:
                raise UsageError("the file's size differs from the declared size")

        await self.store.put_stream(key, of_declared_size(data), options, plan=STAGING_WRITE_PLAN)

    async def stage_upload(
        self,
        tenant: str,
        files: AsyncIterator[tuple[str, AsyncIterable[bytes]]],
        expires_in: timedelta = timedelta(days=1),
    ) -> UploadSession:
        """An upload session made of streams the service receives itself (a STOW-RS request to be
        ingested by the queue): each ``(content type, chunks)`` is written to staging as it
        arrives, then the session is recorded, pending, with the sizes and CRC32Cs seen, for
        :meth:`queue_upload`. If anything fails, the files staged so far are removed again."""
        check_tenant(tenant)
        session_id = uploads.new_session_id()
        max_size = self.settings.max_upload_size
        staged: list[DeclaredFile] = []
        keys: list[str] = []
        try:
            async for content_type, chunks in files:
                if len(staged) >= uploads.MAX_FILES:
                    raise UsageError(
                        f"a queued request holds at most {uploads.MAX_FILES} files",
                        hint="split it into several requests",
                    )
                keys.append(BucketLayout.staging_key(tenant, session_id, len(staged)))
                counted = _CountedStream(chunks, max_size, f"file {len(staged)}")
                options = PutOptions(content_type=content_type)
                await self.store.put_stream(
                    self.store_key(keys[-1]), counted.chunks(), options, plan=STAGING_WRITE_PLAN
                )
                name, size, crc = f"part-{len(staged) + 1}", counted.size, counted.crc
                staged.append(DeclaredFile(name, size, crc.hexdigest(), content_type=content_type))
            return await self._run(
                lambda s: uploads.create(s, tenant, staged, expires_in, max_size, session_id=session_id)
            )
        except BaseException:
            # A failure to remove is logged, not raised: the orphan sweep is the second chance.
            await asyncio.shield(self._objects.delete(keys))
            raise

    async def get_upload(self, tenant: str, session_id: str) -> UploadSession:
        """The session; NotFoundError if unknown to this tenant."""
        check_tenant(tenant)
        return await self._read(lambda s: uploads.get(s, tenant, session_id))

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
                await self._objects.delete(upload.staging_keys)
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
            await self._objects.delete(upload.staging_keys)
        return len(expired)

    async def queue_upload(self, tenant: str, session_id: str) -> tuple[UploadSession, bool]:
        """The ingest queue's side of :meth:`complete_upload`: mark a pending session (or a failed
        one, to try again) ``queued`` for a worker. Returns the session and whether this call
        queued it; the caller then enqueues its job (or calls :meth:`unqueue_upload` if it cannot).
        A session already queued, completing or completed is returned as it is; an expired one is
        UsageError (its staging objects are removed)."""
        check_tenant(tenant)
        now = datetime.now(UTC)
        upload, claimed = await self._run(lambda s: uploads.claim_for_queue(s, tenant, session_id, now))
        if not claimed and upload.state == "expired":
            await self._objects.delete(upload.staging_keys)
            raise UsageError("the upload session has expired", hint="start a new upload")
        return upload, claimed

    async def unqueue_upload(self, tenant: str, session_id: str) -> None:
        """Give a session :meth:`queue_upload` queued back to its client (its job could not be
        enqueued): pending again, to be completed again."""
        await self.set_upload_state(tenant, session_id, "pending")

    async def run_queued_upload(self, tenant: str, session_id: str) -> UploadOutcome | None:
        """Ingest a queued session's files (what an ingest worker's job does). Idempotent: the
        outcome of each batch of files is recorded on the session before their staging objects
        are removed, so an attempt after a worker died skips what is recorded and ingests the
        rest again; a file ingested but not yet recorded is found in staging again and stored
        as a duplicate (nothing twice, ``created`` false), one refused is found in quarantine.
        Returns None when the session is not queued or completing (done by an earlier attempt,
        whose staging objects are then removed, or never queued): nothing to do."""
        check_tenant(tenant)
        upload, claimed = await self._run(lambda s: uploads.claim_for_worker(s, tenant, session_id))
        if not claimed:
            if upload.state == "completed":  # an attempt died between recording and removing
                await self._objects.delete(upload.staging_keys)
            return None
        earlier = UploadOutcome.from_json(upload.result) if upload.result else UploadOutcome(upload.id)
        outcomes: dict[int, AcceptedFile | RejectedFile] = {f.index: f for f in earlier.accepted}
        outcomes.update((f.index, f) for f in earlier.rejected)
        todo = [i for i in range(len(upload.files)) if i not in outcomes]
        limit = asyncio.Semaphore(_UPLOAD_CONCURRENCY)

        async def one(i: int) -> AcceptedFile | RejectedFile:
            async with limit:
                return await self._ingest_file(upload, i, keep_staging=True)

        outcome = _outcome(upload.id, outcomes.values())
        if not todo:  # every file was recorded by an earlier attempt
            await self.set_upload_state(tenant, session_id, "completed", outcome.as_json())
        for start in range(0, len(todo), _PROGRESS_BATCH):
            batch = await asyncio.gather(*(one(i) for i in todo[start : start + _PROGRESS_BATCH]))
            outcomes.update((f.index, f) for f in batch)
            outcome = _outcome(upload.id, outcomes.values())
            # The last batch's record is the completion itself (one write less per session).
            last = start + _PROGRESS_BATCH >= len(todo)
            await self.set_upload_state(
                tenant, session_id, "completed" if last else "completing", outcome.as_json()
            )
            await self._objects.delete(
                [upload.staging_keys[f.index] for f in batch if isinstance(f, AcceptedFile)]
            )
        return outcome

    async def fail_queued_upload(self, tenant: str, session_id: str, error: str) -> None:
        """Mark a queued session ``failed`` (its job's last attempt failed), keeping the outcomes
        of the files done so far and ``error`` (a reason free of patient data) in its result.
        Its staging objects stay: completing it again queues it anew."""
        upload = await self.get_upload(tenant, session_id)
        if upload.state not in ("queued", "completing"):
            return
        result = dict(upload.result) if upload.result else UploadOutcome(upload.id).as_json()
        await self.set_upload_state(tenant, session_id, "failed", {**result, "error": error})

    async def _ingest_session(self, upload: UploadSession) -> UploadOutcome:
        limit = asyncio.Semaphore(_UPLOAD_CONCURRENCY)

        async def one(i: int) -> AcceptedFile | RejectedFile:
            async with limit:
                return await self._ingest_file(upload, i, keep_staging=False)

        return _outcome(upload.id, await asyncio.gather(*(one(i) for i in range(len(upload.files)))))

    async def _ingest_file(
        self, upload: UploadSession, i: int, *, keep_staging: bool
    ) -> AcceptedFile | RejectedFile:
        declared, key = upload.files[i], upload.staging_keys[i]
        try:
            stored = await self._ingest.ingest_object(
                upload.tenant,
                key,
                declared.size,
                declared.crc32c,
                content_type=declared.content_type,
                put_by=declared.put_by,
                keep_staging=keep_staging,
            )
        except RejectedObjectError as exc:
            refusal = exc
            if keep_staging and exc.quarantine_key is None:
                # Gone from staging: an earlier attempt may have refused it before its outcome
                # was recorded; then its quarantine note says why.
                refusal = await self._ingest.quarantined_reason(upload.tenant, key) or exc
            return RejectedFile(i, declared.name, refusal.reason, refusal.quarantine_key)
        r = stored.record
        return AcceptedFile(
            i,
            declared.name,
            r.sop_instance_uid,
            r.study_instance_uid,
            r.series_instance_uid,
            stored.created,
            stored.warnings,
        )

    # -- query (QIDO-RS) -----------------------------------------------------------------

    async def _search(
        self, tenant: str, level: qido.Level, params: QueryParams, **scope: Any
    ) -> list[DicomJson]:
        check_tenant(tenant)
        _check_uids(scope.get("study_instance_uid"), scope.get("series_instance_uid"))
        return await self._read(
            lambda s: qido.search(
                s, tenant, level, params, extra_tags=self._extra, limits=self._limits, **scope
            )
        )

    async def search_studies(
        self,
        tenant: str,
        params: QueryParams,
        *,
        base_url: str | None = None,
        warnings: list[str] | None = None,
        only_included: bool = False,
    ) -> list[DicomJson]:
        """Studies matching ``params`` (PS3.18 §8.3.4), as DICOM JSON objects. ``base_url`` (the
        service's DICOMweb root) fills RetrieveURL. Bad parameters: UsageError (400); keys that
        are ignored (unknown, not indexed) are described in ``warnings`` when given.
        ``only_included``: the ``includefield`` attributes only, not the level's defaults."""
        return await self._search(
            tenant, "study", params, base_url=base_url, warnings=warnings, only_included=only_included
        )

    async def search_series(
        self,
        tenant: str,
        params: QueryParams,
        *,
        study_instance_uid: str | None = None,
        base_url: str | None = None,
        warnings: list[str] | None = None,
        only_included: bool = False,
    ) -> list[DicomJson]:
        """Series matching ``params``, within one study or across all."""
        return await self._search(
            tenant,
            "series",
            params,
            study_instance_uid=study_instance_uid,
            base_url=base_url,
            warnings=warnings,
            only_included=only_included,
        )

    async def search_instances(
        self,
        tenant: str,
        params: QueryParams,
        *,
        study_instance_uid: str | None = None,
        series_instance_uid: str | None = None,
        base_url: str | None = None,
        warnings: list[str] | None = None,
        only_included: bool = False,
    ) -> list[DicomJson]:
        """Instances matching ``params``, within a study, a series, or across all."""
        return await self._search(
            tenant,
            "instance",
            params,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            base_url=base_url,
            warnings=warnings,
            only_included=only_included,
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
        if series_instance_uid is not None and sop_instance_uid is not None:
            # One instance (per-instance WADO-RS, metadata, frames): one statement, no session.
            return [
                await asyncio.to_thread(
                    self._instance_now, tenant, study_instance_uid, series_instance_uid, sop_instance_uid
                )
            ]
        return await self._read(
            lambda s: index.require_instances(
                s, tenant, study_instance_uid, series_instance_uid, sop_instance_uid
            )
        )

    async def read_instance(self, record: InstanceRecord) -> bytes:
        """The instance's Part 10 bytes: decrypted, size and CRC32C checked (IntegrityError)."""
        return _matching(record, *await self._objects.get_with_crc(record.object_key))

    async def instance_with_bytes(
        self, tenant: str, study: str, series: str, sop: str, *, max_size: int
    ) -> tuple[InstanceRecord, bytes | None]:
        """One instance by its three UIDs, with its bytes as :meth:`read_instance` gives them when
        it is at most ``max_size`` (None when larger: stream it). NotFoundError when missing.

        Where the store reads with blocking calls (local disk), the lookup, the read and the
        checks are one worker-thread call: per-instance retrieval's hops are most of its cost."""
        if not self._objects.reads_now:
            record = (await self.instances(tenant, study, series, sop))[0]
            return record, await self.read_instance(record) if record.size <= max_size else None
        check_tenant(tenant)
        _check_uids(study, series, sop)

        def now() -> tuple[InstanceRecord, bytes | None]:
            record = self._instance_now(tenant, study, series, sop)
            if record.size > max_size:
                return record, None
            return record, _matching(record, *self._objects.get_with_crc_now(record.object_key))

        return await asyncio.to_thread(now)

    def _instance_now(self, tenant: str, study: str, series: str, sop: str) -> InstanceRecord:
        """The instance of these three UIDs, in one statement on a bare connection (blocking: for
        a worker thread). NotFoundError when there is none."""
        found = self._db.lookup_sync(lambda c: index.instance_at(c, tenant, study, series, sop))
        if not found:
            raise NotFoundError("no such instance")
        return found[0]

    async def stream_instance(
        self, record: InstanceRecord, chunk_size: int = 1024 * 1024
    ) -> AsyncIterator[bytes]:
        """The instance's bytes as chunks, decrypted, holding about one chunk in memory: for
        instances too large for :meth:`read_instance`. Size and CRC32C are checked at the end: a
        mismatch (or a failed GCM tag) raises IntegrityError after the last chunk, so a response
        being streamed must then be aborted, not completed."""
        crc, size = Crc32c(), 0
        async for chunk in self._objects.stream(record.object_key, chunk_size):
            crc.update(chunk)
            size += len(chunk)
            yield chunk
        if size != record.size or crc.hexdigest() != record.crc32c:
            raise IntegrityError("a stored instance does not match the size and CRC32C in the index")

    async def read_instances(
        self, records: Sequence[InstanceRecord], *, prefetch: int = 4
    ) -> AsyncIterator[tuple[InstanceRecord, bytes]]:
        """Each record with its bytes, in order, reading up to ``prefetch`` instances ahead: what a
        multipart/related response streams. Memory holds at most ``prefetch + 1`` instances."""
        if prefetch < 1:
            raise UsageError("prefetch must be at least 1")
        if self._objects.reads_now:
            async for pair in self._read_in_batches(records, max(1, prefetch // 2)):
                yield pair
            return
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

    async def _read_in_batches(
        self, records: Sequence[InstanceRecord], batch: int
    ) -> AsyncIterator[tuple[InstanceRecord, bytes]]:
        """:meth:`read_instances` on a store read with blocking calls: ``batch`` instances per
        worker-thread call, the next batch read while this one is consumed (``2 * batch``
        instances in memory). Each hop costs two thread switches, about a fifth of a whole-study
        retrieval's CPU when made per instance (perf)."""

        def read(group: Sequence[InstanceRecord]) -> list[bytes]:
            return [_matching(r, *self._objects.get_with_crc_now(r.object_key)) for r in group]

        def started(group: Sequence[InstanceRecord]) -> asyncio.Task[list[bytes]]:
            return asyncio.create_task(asyncio.to_thread(read, group))

        groups = [records[i : i + batch] for i in range(0, len(records), batch)]
        ahead = started(groups[0]) if groups else None
        try:
            for number, group in enumerate(groups, start=1):
                assert ahead is not None
                datas = await ahead
                ahead = started(groups[number]) if number < len(groups) else None
                for record, data in zip(group, datas, strict=True):
                    yield record, data
        finally:
            if ahead is not None:  # stops the read ahead of a consumer that left
                ahead.cancel()

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
                sidecar: DicomJson = json.loads(await self._objects.get(record.sidecar_key))
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
        *,
        transfer_syntax: str | None = None,
    ) -> Frames:
        """Frames (1-based numbers) of one instance. A number outside 1..NumberOfFrames is
        UsageError; an instance without pixel data is NotFoundError. With ``transfer_syntax``
        (an uncompressed syntax, ``transcode.UNCOMPRESSED_TARGETS``) the frames are decoded to
        native little endian pixels; NotSupportedError when the archive cannot decode them."""
        record = await self._one(tenant, study_instance_uid, series_instance_uid, sop_instance_uid)
        return await self.frames_of(record, numbers, transfer_syntax=transfer_syntax)

    async def frames_of(
        self, record: InstanceRecord, numbers: Sequence[int], *, transfer_syntax: str | None = None
    ) -> Frames:
        """:meth:`frames` of an instance already looked up (by :meth:`instances`)."""
        data = await self.read_instance(record)
        if transfer_syntax is not None:
            from .transcode import decode_frames

            decoded = await asyncio.to_thread(decode_frames, data, list(numbers), transfer_syntax)
            return Frames(transfer_syntax, decoded, False)
        from .imaging import extract_frames

        syntax, frames, encapsulated = await asyncio.to_thread(extract_frames, data, list(numbers))
        return Frames(syntax, frames, encapsulated)

    async def transcode(self, data: bytes, transfer_syntax: str) -> bytes:
        """The instance ``data`` (Part 10 bytes, as :meth:`read_instance` returns them) in
        ``transfer_syntax``: the same bytes when stored so, else decoded to an uncompressed syntax
        (in a worker thread). NotSupportedError when the archive cannot produce it."""
        from .transcode import transcode_instance

        return await asyncio.to_thread(transcode_instance, data, transfer_syntax)

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
        window: Window | None = None,
        viewport: Viewport | None = None,
    ) -> Rendered:
        """A JPEG or PNG of one frame (windowed to 8 bits), or a thumbnail of it, cached as a
        derived object. ``window`` replaces the instance's own VOI window; ``viewport`` sets the
        picture's size (and source region) instead of the thumbnail size. Unsupported media
        types: NotSupportedError (406 for the service)."""
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
        for option in (window, viewport):
            if option is not None:
                name += f"-{option.label}"
        if media_type == "image/jpeg":
            name += f"-q{quality}"
        key = (
            self._layout.derived_prefix(tenant, record.sop_instance_uid, record.crc32c)
            + f"{name}.{extension}"
        )
        try:
            cached = await self._objects.get(key)
        except NotFoundError:
            pass
        else:
            with Image.open(BytesIO(cached)) as image:
                width, height = image.size
            return Rendered(media_type, cached, width, height, cached=True)  # type: ignore[arg-type]
        data = await self.read_instance(record)
        from .imaging import render_frame

        picture, width, height = await asyncio.to_thread(
            render_frame,
            data,
            frame,
            media_type,
            max_size=size,
            quality=quality,
            window=window,
            viewport=viewport,
        )
        await self._objects.put(key, picture, media_type)
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
        await self._objects.delete(keys, prefixes)
        return DeleteResult(studies=studies, series=series, instances=len(records))

    # -- labels ----------------------------------------------------------------------------

    async def get_labels(self, tenant: str, study_instance_uid: str) -> StudyLabels:
        check_tenant(tenant)
        _check_uids(study_instance_uid)
        return await self._read(lambda s: index.get_labels(s, tenant, study_instance_uid))

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

    async def create_token(
        self, tenant: str, name: str, scopes: Sequence[Scope], expires_in: timedelta | None = None
    ) -> tuple[str, ApiToken]:
        """A new random token (returned once, never stored: only its SHA-256 is) and its record.
        With ``expires_in`` (at most 3650 days) it is refused once that time has passed."""
        check_tenant(tenant)
        return await self._run(lambda s: access.create_token(s, tenant, name, scopes, expires_in))

    async def authenticate(self, token: str, now: datetime | None = None) -> ApiToken | None:
        """The record of a valid token, neither revoked nor expired (at ``now``, default the
        current time); None otherwise."""
        return await self._read(lambda s: access.authenticate(s, token, now))

    async def list_tokens(self, tenant: str) -> list[ApiToken]:
        check_tenant(tenant)
        return await self._read(lambda s: access.list_tokens(s, tenant))

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
        return await self._read(lambda s: access.resolve_share(s, token))

    async def list_shares(self, tenant: str, study_instance_uid: str | None = None) -> list[ShareLink]:
        check_tenant(tenant)
        _check_uids(study_instance_uid)
        return await self._read(lambda s: access.list_shares(s, tenant, study_instance_uid))

    async def revoke_share(self, tenant: str, share_id: int) -> ShareLink:
        check_tenant(tenant)
        return await self._run(lambda s: access.revoke_share(s, tenant, share_id))


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


class _CountedStream:
    """Chunks passed through, their size and CRC32C kept; UsageError past ``max_size`` bytes."""

    def __init__(self, chunks: AsyncIterable[bytes], max_size: int, name: str) -> None:
        self._chunks = chunks
        self._max_size = max_size
        self._name = name
        self.size = 0
        self.crc = Crc32c()

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            self.size += len(chunk)
            if self.size > self._max_size:
                raise UsageError(f"{self._name}: larger than {self._max_size} bytes")
            self.crc.update(chunk)
            yield chunk


def _matching(record: InstanceRecord, data: bytes, crc: str | None) -> bytes:
    """``data`` if it has the record's size and CRC32C (``crc``: its CRC32C when already known);
    IntegrityError otherwise."""
    if len(data) != record.size or (crc or crc32c_hex(data)) != record.crc32c:
        raise IntegrityError("a stored instance does not match the size and CRC32C in the index")
    return data
