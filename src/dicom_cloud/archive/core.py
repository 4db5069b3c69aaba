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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from ..backends import StoreConfig
from ..crypto.envelope import ClientEncryption
from ..store import Store
from .records import (
    ApiToken,
    DeclaredFile,
    DeleteResult,
    DicomJson,
    Frames,
    InstanceRecord,
    Rendered,
    Scope,
    ShareLink,
    StoredInstance,
    StudyLabels,
    UploadOutcome,
    UploadSession,
    UploadState,
)

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
    #: Largest instance accepted by ``store_instance`` and ``ingest_object`` (held in memory).
    max_instance_size: int = 512 * 1024 * 1024
    #: Default and largest ``limit`` of a QIDO query.
    default_query_limit: int = 100
    max_query_limit: int = 1000
    #: Longest side in pixels of a thumbnail.
    thumbnail_size: int = 128


class Archive:
    """The archive core. Open with :meth:`open`, close with :meth:`close` (or ``async with``)."""

    store: Store

    @classmethod
    async def open(cls, settings: ArchiveSettings) -> Archive:
        """Open the store and the index, bringing the schema up to date (Alembic) first."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release the store's connections and the database pool."""
        raise NotImplementedError

    async def __aenter__(self) -> Archive:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- keys the service needs ----------------------------------------------------------

    def store_key(self, key: str) -> str:
        """The key in :attr:`store` of an archive key (records hold keys relative to the archive
        root); use it to presign staging uploads: ``store.sign(store_key(k), ttl, "PUT")``."""
        raise NotImplementedError

    # -- ingest --------------------------------------------------------------------------

    async def store_instance(self, tenant: str, data: bytes | memoryview) -> StoredInstance:
        """Store one DICOM Part 10 instance (the STOW-RS path).

        Refuses what is not Part 10 (DicomFormatError, ``reason`` stable and PHI-free); zeroes
        the preamble; writes the object (encrypted if configured), then the sidecar, then the
        index row. The same SOP Instance UID with identical bytes is an idempotent success
        (``created=False``); with different bytes it is ConflictError (409) and nothing changes.
        """
        raise NotImplementedError

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
        raise NotImplementedError

    # -- presigned upload sessions ---------------------------------------------------------

    async def create_upload(
        self, tenant: str, files: Sequence[DeclaredFile], expires_in: timedelta = timedelta(hours=1)
    ) -> UploadSession:
        """Record an upload session and assign one staging key per declared file."""
        raise NotImplementedError

    async def get_upload(self, tenant: str, session_id: str) -> UploadSession:
        """The session; NotFoundError if unknown to this tenant."""
        raise NotImplementedError

    async def set_upload_state(
        self, tenant: str, session_id: str, state: UploadState, result: Mapping[str, object] | None = None
    ) -> UploadSession:
        """Change a session's state (and record its outcome)."""
        raise NotImplementedError

    async def complete_upload(self, tenant: str, session_id: str) -> UploadOutcome:
        """Ingest every declared file of a session; refused ones are quarantined. The outcome is
        recorded on the session; completing twice returns the recorded outcome. An expired
        session is UsageError (its staging objects are removed)."""
        raise NotImplementedError

    # -- query (QIDO-RS) -----------------------------------------------------------------

    async def search_studies(
        self, tenant: str, params: QueryParams, *, base_url: str | None = None
    ) -> list[DicomJson]:
        """Studies matching ``params`` (PS3.18 §8.3.4), as DICOM JSON objects. ``base_url`` (the
        service's DICOMweb root) fills RetrieveURL. Bad parameters: UsageError (400)."""
        raise NotImplementedError

    async def search_series(
        self,
        tenant: str,
        params: QueryParams,
        *,
        study_instance_uid: str | None = None,
        base_url: str | None = None,
    ) -> list[DicomJson]:
        """Series matching ``params``, within one study or across all."""
        raise NotImplementedError

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
        raise NotImplementedError

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
        raise NotImplementedError

    async def read_instance(self, record: InstanceRecord) -> bytes:
        """The instance's Part 10 bytes: decrypted, size and CRC32C checked (IntegrityError)."""
        raise NotImplementedError

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
        raise NotImplementedError

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
        raise NotImplementedError

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
        raise NotImplementedError

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
        raise NotImplementedError

    # -- labels ----------------------------------------------------------------------------

    async def get_labels(self, tenant: str, study_instance_uid: str) -> StudyLabels:
        raise NotImplementedError

    async def set_labels(
        self,
        tenant: str,
        study_instance_uid: str,
        *,
        tags: Sequence[str] | None = None,
        description: str | None = None,
    ) -> StudyLabels:
        """Replace the study's tags (when given) and description (when given; "" clears it)."""
        raise NotImplementedError

    # -- API tokens ------------------------------------------------------------------------

    async def create_token(self, tenant: str, name: str, scopes: Sequence[Scope]) -> tuple[str, ApiToken]:
        """A new random token (returned once, never stored: only its SHA-256 is) and its record."""
        raise NotImplementedError

    async def authenticate(self, token: str) -> ApiToken | None:
        """The record of a valid, unrevoked token; None otherwise."""
        raise NotImplementedError

    async def list_tokens(self, tenant: str) -> list[ApiToken]:
        raise NotImplementedError

    async def revoke_token(self, tenant: str, token_id: int) -> ApiToken:
        raise NotImplementedError

    # -- share links -----------------------------------------------------------------------

    async def create_share(
        self, tenant: str, study_instance_uid: str, expires_in: timedelta
    ) -> tuple[str, ShareLink]:
        """A new share token for read-only access to one study (returned once) and its record."""
        raise NotImplementedError

    async def resolve_share(self, token: str) -> ShareLink | None:
        """The link of a valid share token; None when unknown, expired or revoked."""
        raise NotImplementedError

    async def list_shares(self, tenant: str, study_instance_uid: str | None = None) -> list[ShareLink]:
        raise NotImplementedError

    async def revoke_share(self, tenant: str, share_id: int) -> ShareLink:
        raise NotImplementedError
