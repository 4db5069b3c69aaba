"""What a partition's task sends back to the client, in values that survive pickling.

dicom-cloud's errors take keyword arguments that pickle does not restore, so an error travels as
its class (module and name), message and plain attributes, and is rebuilt on the client as the
same class: the summary, the exit codes and the error lines are those of a local run.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..engine.model import TransferEvent, TransferSummary
from ..errors import ConflictError, DicomCloudError, DicomFormatError

_PLAIN = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class PortableError:
    module: str
    name: str
    message: str
    attributes: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, error: DicomCloudError) -> PortableError:
        kind = type(error)
        plain = {key: value for key, value in vars(error).items() if isinstance(value, _PLAIN)}
        return cls(kind.__module__, kind.__qualname__, str(error), plain)

    def restore(self) -> DicomCloudError:
        kind: Any = DicomCloudError
        try:
            found = getattr(importlib.import_module(self.module), self.name)
        except (ImportError, AttributeError):
            found = None
        if isinstance(found, type) and issubclass(found, DicomCloudError):
            kind = found
        error: DicomCloudError = kind.__new__(kind)
        Exception.__init__(error, self.message)
        error.message = self.message
        error.hint = None
        vars(error).update(self.attributes)
        return error


@dataclass(frozen=True)
class PortableEvent:
    """A ``TransferEvent`` without its error object."""

    kind: str
    src: str
    dst: str
    size: int
    bytes: int = 0
    error: PortableError | None = None
    already_done: bool = False

    @classmethod
    def of(cls, event: TransferEvent) -> PortableEvent:
        error = PortableError.of(event.error) if event.error is not None else None
        return cls(event.kind, event.src, event.dst, event.size, event.bytes, error, event.already_done)

    def restore(self) -> TransferEvent:
        error = self.error.restore() if self.error is not None else None
        return TransferEvent(
            self.kind,  # type: ignore[arg-type]  # one of EventKind: made from one
            self.src,
            self.dst,
            self.size,
            bytes=self.bytes,
            error=error,
            already_done=self.already_done,
        )


#: The summary's fields that hold (name, error) pairs.
_ERROR_LISTS = ("failed", "conflicts", "rejected")


@dataclass(frozen=True)
class PortableSummary:
    counts: Mapping[str, Any]
    errors: Mapping[str, tuple[tuple[str, PortableError], ...]]

    @classmethod
    def of(cls, summary: TransferSummary) -> PortableSummary:
        counts = {f.name: getattr(summary, f.name) for f in fields(summary) if f.name not in _ERROR_LISTS}
        errors = {
            name: tuple((url, PortableError.of(error)) for url, error in getattr(summary, name))
            for name in _ERROR_LISTS
        }
        return cls(counts, errors)

    def add_to(self, total: TransferSummary) -> None:
        """Add these counts and errors to ``total`` (the run's summary)."""
        for name, value in self.counts.items():
            if name in ("seconds", "dry_run"):
                continue
            if name == "lowest_concurrency":
                if value and (not total.lowest_concurrency or value < total.lowest_concurrency):
                    total.lowest_concurrency = value
                continue
            setattr(total, name, getattr(total, name) + value)
        total.failed.extend((url, error.restore()) for url, error in self.errors["failed"])
        total.conflicts.extend(
            (url, restored)
            for url, error in self.errors["conflicts"]
            if isinstance(restored := error.restore(), ConflictError)
        )
        total.rejected.extend(
            (url, restored)
            for url, error in self.errors["rejected"]
            if isinstance(restored := error.restore(), DicomFormatError)
        )
