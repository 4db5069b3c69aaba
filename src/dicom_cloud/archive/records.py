"""The plain records the archive hands to its callers (the service, the CLI): no ORM objects leak out.

Every record is a frozen dataclass. Records that carry patient data say so; none of them holds
a secret (tokens are returned once, as a separate value, by the calls that create them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from ..dicom.header import DicomIdentity
from ..errors import DicomFormatError

Scope = Literal["read", "write", "admin"]
#: Every scope, in increasing power.
SCOPES: Final[tuple[Scope, ...]] = ("read", "write", "admin")

UploadState = Literal["pending", "queued", "completing", "completed", "failed", "expired"]

#: A DICOM JSON object (PS3.18 F.2): ``{"0020000D": {"vr": "UI", "Value": [...]}, ...}``.
DicomJson = dict[str, Any]


@dataclass(frozen=True)
class InstanceRecord:
    """One stored instance, as the index knows it. Holds UIDs only (no patient data)."""

    tenant: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str | None
    transfer_syntax_uid: str
    number_of_frames: int | None
    rows: int | None
    columns: int | None
    #: Key of the DICOM object, relative to the archive's root in the store.
    object_key: str
    #: Key of the DICOM JSON sidecar (metadata without bulk data).
    sidecar_key: str
    #: Size in bytes of the DICOM instance (plaintext, after preamble sanitising).
    size: int
    #: CRC32C of the DICOM instance (plaintext, after sanitising), 8 lower-case hex digits.
    crc32c: str
    #: The stored object is client-side encrypted (format recorded in the object's metadata).
    encrypted: bool
    created: datetime


@dataclass(frozen=True)
class StoredInstance:
    """The outcome of one successful ingest."""

    record: InstanceRecord
    #: False when the very same instance (same SOP Instance UID, same bytes) was already stored.
    created: bool
    #: True when the 128-byte preamble held something else than zeros and was cleared.
    preamble_sanitised: bool
    #: Why the instance was stored with a caveat (stable texts, no patient data), e.g. its file
    #: meta naming another SOP Instance UID (``dicom.header.REASON_META_MISMATCH``).
    warnings: tuple[str, ...] = ()


#: The reason of :class:`OtherStudyError` (stable, free of patient data).
REASON_OTHER_STUDY: Final = "the instance is of another study"


class OtherStudyError(DicomFormatError):
    """A part of a request for one study (``POST /studies/{study}``) is an instance of another
    study: refused, not stored. ``identity`` names it (for the answer)."""

    def __init__(self, identity: DicomIdentity) -> None:
        super().__init__(REASON_OTHER_STUDY)
        self.identity = identity


@dataclass(frozen=True)
class Frames:
    """Frames of one instance, in the order asked for."""

    #: The transfer syntax the frames are encoded in (native frames: the instance's own, or
    #: Explicit VR Little Endian for native data, whose byte order is then little endian).
    transfer_syntax_uid: str
    frames: Sequence[bytes]
    #: True for compressed (encapsulated) frames: each one is a codestream (JPEG, JPEG 2000, RLE...).
    encapsulated: bool


@dataclass(frozen=True)
class Rendered:
    """A consumer-format picture of one frame (PS3.18 §8.3.5 rendered resources)."""

    media_type: Literal["image/jpeg", "image/png"]
    data: bytes
    width: int
    height: int
    #: The picture came from the derived-object cache instead of being rendered now.
    cached: bool


@dataclass(frozen=True)
class StudyLabels:
    """User labels of one study: tags and a free-text description (both searchable)."""

    study_instance_uid: str
    tags: tuple[str, ...]
    description: str | None


@dataclass(frozen=True)
class ApiToken:
    """An API token as stored: never the token itself, only who it is for and what it may do."""

    id: int
    tenant: str
    name: str
    scopes: tuple[Scope, ...]
    created: datetime
    revoked: datetime | None
    #: When the token stops being accepted; None: valid until revoked.
    expires: datetime | None = None

    def expired(self, now: datetime | None = None) -> bool:
        """Whether the token's lifetime is over at ``now`` (default: the current time)."""
        return self.expires is not None and (now or datetime.now(UTC)) >= self.expires

    def allows(self, scope: Scope) -> bool:
        """Whether the token grants ``scope`` (admin implies write implies read)."""
        held = max((SCOPES.index(s) for s in self.scopes), default=-1)
        return held >= SCOPES.index(scope)


@dataclass(frozen=True)
class ShareLink:
    """Read-only access to one study until ``expires``, unless revoked."""

    id: int
    tenant: str
    study_instance_uid: str
    created: datetime
    expires: datetime
    revoked: datetime | None


@dataclass(frozen=True)
class DeclaredFile:
    """A file a client announces before a presigned upload."""

    name: str
    size: int
    #: CRC32C as 8 hex digits, when the client computed it; checked at completion.
    crc32c: str | None = None
    #: The content type the client declared; an object stored with another is refused.
    content_type: str | None = None
    #: When the client's URL expired, for objects whose last write is the client's: one written
    #: later (a store that does not enforce the URL's expiry) is refused at completion.
    put_by: datetime | None = None


@dataclass(frozen=True)
class UploadSession:
    """A presigned upload in progress: one staging key per declared file, in the same order."""

    id: str
    tenant: str
    files: tuple[DeclaredFile, ...]
    staging_keys: tuple[str, ...]
    state: UploadState
    created: datetime
    expires: datetime
    #: The outcome recorded at completion (:meth:`UploadOutcome.as_json`), else None.
    result: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class AcceptedFile:
    index: int
    name: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    created: bool
    #: As ``StoredInstance.warnings``.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RejectedFile:
    index: int
    name: str
    #: A stable reason, free of patient data (e.g. ``not DICOM (no DICM marker)``, ``size mismatch``).
    reason: str
    #: Where the object was moved for inspection; None when nothing had been uploaded.
    quarantine_key: str | None


@dataclass(frozen=True)
class UploadOutcome:
    session_id: str
    accepted: tuple[AcceptedFile, ...] = field(default_factory=tuple)
    rejected: tuple[RejectedFile, ...] = field(default_factory=tuple)

    def as_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "accepted": [dict(a.__dict__) for a in self.accepted],
            "rejected": [dict(r.__dict__) for r in self.rejected],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UploadOutcome:
        return cls(
            str(data["session_id"]),
            accepted=tuple(
                AcceptedFile(**{**a, "warnings": tuple(a.get("warnings", ()))})
                for a in data.get("accepted", [])
            ),
            rejected=tuple(RejectedFile(**r) for r in data.get("rejected", [])),
        )


@dataclass(frozen=True)
class DeleteResult:
    """What a delete removed (counts of index rows; objects are removed after the rows)."""

    studies: int
    series: int
    instances: int


@dataclass(frozen=True)
class OrphanSweep:
    """What :meth:`Archive.collect_orphans` found: objects no index row points at."""

    scanned: int
    orphans: int
    #: Orphans deleted (0 on a dry run).
    removed: int
    #: Empty staging folders removed (local directories; object stores have none).
    empty_folders: int = 0
    #: Tenants swept (:meth:`Archive.sweep_orphans`; 1 for one tenant's collection).
    tenants: int = 1
