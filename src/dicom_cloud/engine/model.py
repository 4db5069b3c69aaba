"""What the engine's parts speak to each other in: options, items, events, the summary, and the
values an attempt at one item produces (no shared dictionaries keyed by object name)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from ..crypto.envelope import ClientEncryption
from ..errors import (
    AuthenticationError,
    BucketNotFoundError,
    ConflictError,
    DicomCloudError,
    DicomFormatError,
    KeyMissingError,
    UntrustedCertificateError,
    UsageError,
)
from ..filters import Filter
from ..retry import DEFAULT_ATTEMPTS
from ..store import ObjectInfo, PutOptions

if TYPE_CHECKING:
    # The DICOM modules load pydicom (and numpy with it): a tenth of a second that a plain transfer,
    # run thousands of times by scripts, should not pay. They are imported where they are used.
    from ..dicom.deidentify import DeidentifyOptions
    from ..dicom.header import DicomIdentity
    from ..dicom.upload import DicomPolicy

MiB = 1024 * 1024

#: Concurrent object transfers. Measured on SeaweedFS with 512 KB DICOM instances (docs/benchmarks.md):
#: 32 beat 16 on downloads (hashing overlaps the network) and tied on uploads; 64 adds memory, not speed.
DEFAULT_PARALLEL = 32
#: Objects above this size go through multipart uploads or ranged parallel reads.
DEFAULT_MULTIPART_THRESHOLD = 16 * MiB
DEFAULT_PART_SIZE = 8 * MiB
#: Parts of one large object in flight at once.
DEFAULT_PART_CONCURRENCY = 8
#: Parts that obstore's multipart writer holds per upload slot (being read, queued, being sent):
#: measured as peak RSS over a 1 GiB upload.
HELD_PARTS_PER_SLOT = 3
#: Chunk size of streamed reads (ranged downloads, copies between providers). Ranged downloads write
#: each chunk on the event loop: it must stay within routes.INLINE_LIMIT.
STREAM_CHUNK = 1024 * 1024
#: Ranged downloads read parts of up to this size when the object has more than ``part_concurrency``
#: parts of ``part_size`` (never smaller than ``part_size``). Each part is streamed, so memory holds
#: about one chunk per part whatever its size, while every ranged GET costs the server: SeaweedFS spent
#: 1.85 CPU-seconds serving 1 GiB in 8 MiB parts, 1.22 in 64 MiB parts, and the download took 3.5 s
#: against 2.7 s (docs/benchmarks.md, 2026-12-04).
RANGED_PART_MAX = 64 * MiB


def ranged_part_size(size: int, part_size: int, part_concurrency: int) -> int:
    """The part size of a ranged download of ``size`` bytes: enough parts to keep
    ``part_concurrency`` in flight, each at most ``RANGED_PART_MAX``, never below ``part_size``."""
    # part_concurrency parts cover the object, in whole MiB (rounded up)
    spread = -(-size // (max(1, part_concurrency) * MiB)) * MiB
    return max(part_size, min(RANGED_PART_MAX, spread))


#: Bytes of object data held in memory by all workers together.
DEFAULT_MEMORY_BUDGET = 80 * MiB

#: Errors after which no other item can succeed either: stop the whole run at once. A permission
#: refusal is one too while nothing has succeeded yet (afterwards it concerns one object only).
FATAL = (AuthenticationError, BucketNotFoundError, KeyMissingError, UntrustedCertificateError)

#: What to do when a destination name already holds other bytes (see TransferOptions.on_conflict).
ConflictPolicy = Literal["overwrite", "skip", "keep-both", "fail"]

DICOM_CONTENT_TYPE = "application/dicom"
OCTET_STREAM = "application/octet-stream"


@dataclass(frozen=True)
class TransferOptions:
    parallel: int = DEFAULT_PARALLEL
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    part_size: int = DEFAULT_PART_SIZE
    part_concurrency: int = DEFAULT_PART_CONCURRENCY
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    #: Metadata, tags and content type for every object written.
    put: PutOptions = field(default_factory=PutOptions)
    #: Leave existing destination objects alone (reported as skipped).
    no_overwrite: bool = False
    #: Plan only: report what would be transferred, move nothing.
    dry_run: bool = False
    #: Attempts per object for failures worth retrying (network faults, throttling): retry.py's policy.
    attempts: int = DEFAULT_ATTEMPTS
    #: Client-side encryption: keys to decrypt with, and the format to encrypt in (see crypto/envelope.py).
    encryption: ClientEncryption | None = None
    #: Re-encrypt objects in place under the current master key; skip those already under it.
    rekey: bool = False
    #: DICOM-aware writes: names from a layout, attributes as metadata, validation (dicom/upload.py).
    dicom: DicomPolicy | None = None
    #: Which names and DICOM instances to take (include/exclude globs, files-from, modality, UIDs).
    filter: Filter | None = None
    #: De-identify every instance on its way (PS3.15 Basic Profile, dicom/deidentify.py).
    deidentify: DeidentifyOptions | None = None
    #: When the destination already holds an object under the same name with other bytes (for a
    #: DICOM layout: the same SOP Instance UID), whether written before the run or by another source
    #: of this run: overwrite it (reported as replaced), skip, keep both, or fail that object.
    #: Identical bytes are skipped (under "overwrite": only with the same metadata too).
    #: None: ``conflict_policy`` chooses.
    on_conflict: ConflictPolicy | None = None
    #: Receives each instance's UID mapping (old -> new) when de-identifying; called from worker threads.
    on_uid_map: Callable[[Mapping[str, str]], None] | None = None

    @property
    def conflict_policy(self) -> ConflictPolicy:
        """``on_conflict``, or its default: "fail" when a DICOM layout names the objects (two instances
        under one SOP Instance UID must never replace each other unseen; nothing is lost, the run
        lists them), "overwrite" otherwise (as cp, aws s3 cp and rclone copy do)."""
        if self.on_conflict is not None:
            return self.on_conflict
        return "fail" if self.dicom is not None and self.dicom.names_objects else "overwrite"

    def __post_init__(self) -> None:
        if self.rekey and not (self.encryption and self.encryption.writes_encrypted):
            raise UsageError("rekey needs the new master key to encrypt with")
        if self.parallel < 1:
            raise UsageError("--parallel must be at least 1")
        if self.attempts < 1:
            raise UsageError("attempts must be at least 1")
        if self.memory_budget < self.part_size:
            raise UsageError("the memory budget must hold at least one part")
        if self.part_size < 5 * MiB:
            raise UsageError("--part-size must be at least 5 MiB (the S3 minimum)")
        if self.multipart_threshold < 1:
            raise UsageError("--multipart-threshold must be positive")


@dataclass(frozen=True)
class TransferItem:
    src_key: str
    dst_key: str
    size: int
    #: The name below the source prefix, for items of a listing (None for a single object).
    relative: str | None = None
    #: What the source said of this version of the object (ETag, or size and mtime): a journal
    #: entry counts as done only for the same version.
    version: str = ""


def object_version(info: ObjectInfo) -> str:
    """A string that changes when the object changes: its ETag, else its size and modification time."""
    if info.etag:
        return f"etag:{info.etag}"
    stamp = info.last_modified.timestamp() if info.last_modified else ""
    return f"mtime:{info.size}:{stamp}"


class DoneCallback(Protocol):
    """Told of each object written and verified: its item, the CRC32C of the bytes written (when
    known) and the destination's ETag for them (when the store returned one)."""

    def __call__(self, item: TransferItem, crc32c: str | None, etag: str | None) -> None: ...


EventKind = Literal["planned", "started", "progress", "completed", "skipped", "failed", "deleted", "counted"]


@dataclass(frozen=True)
class ListingTotals:
    """What the counting pass has found so far: the objects the run will look at and their bytes,
    and among them those that an earlier, interrupted run of the same job finished (skipped now).
    ``complete`` once the whole source is counted; until then the totals only grow."""

    files: int = 0
    bytes: int = 0
    already_done: int = 0
    already_done_bytes: int = 0
    complete: bool = False


@dataclass(frozen=True)
class TransferEvent:
    """One step of one object.

    ``bytes`` counts bytes moved that no earlier event counted: the increment for
    ``progress``, and for ``completed`` the rest of the object (all of it for small objects,
    which report no progress of their own).

    ``counted`` events are of the whole run, not of one object: ``src`` and ``dst`` are the two
    trees, ``size`` the bytes counted so far, and ``totals`` says the rest.
    """

    kind: EventKind
    src: str
    dst: str
    size: int
    bytes: int = 0
    error: DicomCloudError | None = None
    #: A ``skipped`` object that an earlier, interrupted run of the same job finished.
    already_done: bool = False
    #: The counting pass's findings (``counted`` events only).
    totals: ListingTotals | None = None


EventCallback = Callable[[TransferEvent], None]


@dataclass
class TransferSummary:
    #: Objects written (new, replaced, or kept beside another object), and their bytes.
    files: int = 0
    bytes: int = 0
    #: Objects not written without an error: identical, resumed, rejected, conflicts left alone.
    skipped: int = 0
    #: Objects that failed, conflicts under --on-conflict fail included.
    failed: list[tuple[str, DicomCloudError]] = field(default_factory=list)
    #: Of ``files``: written over an object that held other bytes (--on-conflict overwrite).
    replaced: int = 0
    #: Of ``files``: written beside an object that held other bytes, as name~<crc32c> (keep-both).
    kept_both: int = 0
    #: Of ``skipped``: the destination already held these very bytes (or another source of the
    #: run wrote them there).
    identical: int = 0
    #: Different bytes under a name already taken, not written: in ``failed`` (fail) or in
    #: ``skipped`` (skip).
    conflicts: list[tuple[str, ConflictError]] = field(default_factory=list)
    #: Files left out by validation (not DICOM, malformed), with the reason: counted in ``skipped`` too.
    rejected: list[tuple[str, DicomFormatError]] = field(default_factory=list)
    seconds: float = 0.0
    dry_run: bool = False
    #: Objects skipped because an earlier, interrupted run of the same job finished them.
    resumed: int = 0
    #: Objects whose header the DICOM filters (modality, UIDs) left out: counted in ``skipped`` too.
    filtered_out: int = 0
    #: Throttling answers that reached the engine, and the lowest concurrency it backed off to.
    throttled: int = 0
    lowest_concurrency: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def selected(self) -> int:
        """Objects the filters let through, whatever became of them (written, skipped, failed)."""
        return self.files + self.skipped + len(self.failed) - self.filtered_out


class Skip(Exception):
    """This object needs no work (reported as skipped, with the reason in the log)."""


class FilteredOut(Skip):
    """The DICOM filters leave this object out (its header does not match)."""


class Identical(Skip):
    """The destination already holds these very bytes."""


class ConflictLeft(Skip):
    """Other bytes are at the name and --on-conflict skip leaves them."""

    def __init__(self, conflict: ConflictError) -> None:
        super().__init__(str(conflict))
        self.conflict = conflict


#: How an object was written when not as a new object.
Outcome = Literal["", "replaced", "kept-both"]


@dataclass(frozen=True)
class Written:
    """What a route returns: the CRC32C of the bytes written (when known) and the destination's
    ETag for them (when the store returned one)."""

    crc32c: str | None = None
    etag: str | None = None


NOTHING_KNOWN = Written()


@dataclass
class Attempt:
    """One attempt at one item, and what it learnt on the way: the state of a local source when its
    reading began, the DICOM identity, the name finally written, and how it was written. A new one
    is made for every attempt, so a failed attempt leaves nothing behind for the next."""

    item: TransferItem
    src_url: str
    dst_url: str
    #: The local source file as its transfer began (None for remote sources).
    snapshot: os.stat_result | None = None
    #: The instance's identity, when a DICOM policy read it.
    identity: DicomIdentity | None = None
    #: The destination key written, when a layout or keep-both chose another than the item's.
    named: str | None = None
    outcome: Outcome = ""
    #: The object replaced or kept beside, for the manifest's reason.
    other: str = ""
    #: CRC32C of what was written, once known (the manifest's).
    crc32c: str | None = None
