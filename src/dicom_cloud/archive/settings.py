"""How an archive is opened: one validated settings record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..backends import StoreConfig
from ..crypto.envelope import ClientEncryption
from ..errors import UsageError


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
    #: A local storage directory and a SQLite index are created owner-only (directories 0700,
    #: files 0600, the SQLite -wal and -shm files included): they hold patient data.
    private_files: bool = True

    def check(self) -> None:
        """UsageError for values no archive can work with."""
        if self.default_query_limit < 1 or self.max_query_limit < self.default_query_limit:
            raise UsageError("query limits: 1 <= default_query_limit <= max_query_limit")
        if min(self.ingest_memory, self.max_instance_size, self.max_upload_size) < 1:
            raise UsageError("ingest_memory, max_instance_size and max_upload_size must be positive")
        if self.stream_threshold < 1:
            raise UsageError("stream_threshold must be positive")
        if self.thumbnail_size < 1:
            raise UsageError("thumbnail_size must be positive")
