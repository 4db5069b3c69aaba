"""Accounting: what became of each item, told once to everyone who keeps count.

The summary's counts, the events the faces render (progress bytes given back when an attempt
fails), the manifest's rows, and the ``on_done`` callback all hear of an item here, from the
outcome its attempts came to; routes and wrappers only return values or raise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ConflictError, DicomCloudError, DicomFormatError
from .model import (
    Attempt,
    ConflictLeft,
    DoneCallback,
    EventCallback,
    FilteredOut,
    Identical,
    Skip,
    TransferEvent,
    TransferItem,
    TransferSummary,
    Written,
)

if TYPE_CHECKING:
    from ..dicom.manifest import ManifestWriter

log = logging.getLogger(__name__)


def _ignore(_: TransferEvent) -> None:
    return None


class Accounting:
    """The run's summary, events and manifest."""

    def __init__(
        self,
        summary: TransferSummary,
        on_event: EventCallback | None,
        manifest: ManifestWriter | None,
        on_done: DoneCallback | None,
        display: Callable[[str], str],
    ) -> None:
        #: The URL of a destination key, for the manifest.
        self._display = display
        self.summary = summary
        self._on_event = on_event or _ignore
        self._manifest = manifest
        self._on_done = on_done
        #: An exception raised by the event callback (a closed pipe...): stops the run, re-raised at the end.
        self.callback_error: BaseException | None = None
        #: Bytes of in-flight objects already reported through progress events, by source URL.
        self._reported: dict[str, int] = {}

    def emit(self, event: TransferEvent) -> None:
        if self.callback_error is not None:
            return
        try:
            self._on_event(event)
        except Exception as exc:  # the consumer failed, not the transfer: stop, then say so
            self.callback_error = exc

    # -- bytes on the way ---------------------------------------------------------------

    def progress(self, attempt: Attempt, count: int) -> None:
        if count:
            src_url = attempt.src_url
            self._reported[src_url] = self._reported.get(src_url, 0) + count
            self.emit(TransferEvent("progress", src_url, attempt.dst_url, attempt.item.size, bytes=count))

    def take_back(self, src_url: str, dst_url: str, size: int) -> None:
        """A failed attempt's bytes were not moved after all: report them back as negative progress."""
        undone = self._reported.pop(src_url, 0)
        if undone:
            self.emit(TransferEvent("progress", src_url, dst_url, size, bytes=-undone))

    # -- outcomes ------------------------------------------------------------------------

    def planned(self, item: TransferItem, src_url: str, dst_url: str) -> None:
        self.emit(TransferEvent("planned", src_url, dst_url, item.size))
        self.summary.files += 1
        self.summary.bytes += item.size

    def resumed(self, item: TransferItem, src_url: str, dst_url: str) -> None:
        self.summary.skipped += 1
        self.summary.resumed += 1
        self.emit(TransferEvent("skipped", src_url, dst_url, item.size, already_done=True))

    def started(self, item: TransferItem, src_url: str, dst_url: str) -> None:
        self.emit(TransferEvent("started", src_url, dst_url, item.size))

    def completed(self, original: TransferItem, attempt: Attempt, written: Written) -> None:
        """``original`` as planned; ``attempt.item`` as written (renamed by a layout or keep-both)."""
        summary = self.summary
        summary.files += 1
        summary.bytes += original.size
        if attempt.outcome == "replaced":
            summary.replaced += 1
        elif attempt.outcome == "kept-both":
            summary.kept_both += 1
        attempt.crc32c = written.crc32c
        if self._on_done is not None:
            self._on_done(original, written.crc32c, written.etag)
        if attempt.outcome == "replaced":
            self._row(attempt, original.size, "replaced", f"replaced other bytes{attempt.other}")
        elif attempt.outcome == "kept-both":
            self._row(attempt, original.size, "uploaded", f"kept beside {attempt.other} (other bytes)")
        else:
            self._row(attempt, original.size, "uploaded")
        rest = original.size - self._reported.pop(attempt.src_url, 0)
        self.emit(TransferEvent("completed", attempt.src_url, attempt.dst_url, original.size, bytes=rest))

    def conflict_failed(self, attempt: Attempt, size: int, conflict: ConflictError) -> None:
        self.take_back(attempt.src_url, attempt.dst_url, size)
        self.summary.failed.append((attempt.src_url, conflict))
        self.summary.conflicts.append((attempt.src_url, conflict))
        self._row(attempt, size, "conflict", str(conflict))
        self.emit(TransferEvent("failed", attempt.src_url, attempt.dst_url, size, error=conflict))

    def skipped(self, attempt: Attempt, size: int, reason: Skip) -> None:
        src_url, dst_url = attempt.src_url, attempt.dst_url
        self.take_back(src_url, dst_url, size)
        summary = self.summary
        summary.skipped += 1
        if isinstance(reason, ConflictLeft):
            summary.conflicts.append((src_url, reason.conflict))
            self._row(attempt, size, "conflict", str(reason))
            self.emit(TransferEvent("skipped", src_url, dst_url, size, error=reason.conflict))
            return
        log.debug("skipped %s: %s", src_url, reason)
        summary.filtered_out += isinstance(reason, FilteredOut)
        if isinstance(reason, Identical):
            summary.identical += 1
        rejected = reason.__cause__ if isinstance(reason.__cause__, DicomFormatError) else None
        if rejected is not None:
            summary.rejected.append((src_url, rejected))
        self._row(
            attempt,
            size,
            "rejected" if rejected else "skipped",
            rejected.reason if rejected else str(reason) if isinstance(reason, Identical) else "",
        )
        self.emit(TransferEvent("skipped", src_url, dst_url, size, error=rejected))

    def failed(self, attempt: Attempt, size: int, error: DicomCloudError) -> None:
        self.take_back(attempt.src_url, attempt.dst_url, size)
        self.summary.failed.append((attempt.src_url, error))
        self._row(attempt, size, "failed", str(error))
        self.emit(TransferEvent("failed", attempt.src_url, attempt.dst_url, size, error=error))

    def _row(self, attempt: Attempt, size: int, status: str, reason: str = "") -> None:
        if self._manifest is None:
            return
        from ..dicom.manifest import ManifestRow

        named = attempt.named
        row = ManifestRow.from_identity(
            attempt.identity,
            source=attempt.src_url,
            key=attempt.dst_url if named is None else self._display(named),
            size=size,
            crc32c=attempt.crc32c,
            status=status,  # type: ignore[arg-type]
            reason=reason,
        )
        self._manifest.write(row)
