"""The manifest: an inventory of what a transfer did with each file (written, replaced, skipped,
in conflict, rejected, failed), one row a file.

Written as the transfer goes, with memory that does not grow with the number of rows: JSON
lines and CSV rows go straight to the file; Parquet rows are buffered in batches of
:data:`PARQUET_BATCH_ROWS` and written as one row group each. The format follows the
extension of the path:

``.jsonl``
    one JSON object a line, keys as in :data:`FIELDS`, absent values as ``null``.
``.csv``
    a header line with :data:`FIELDS`, then one line a row (RFC 4180 quoting, ``\\r\\n``);
    absent values are empty cells.
``.parquet``
    needs ``pyarrow`` (``pip install 'dicom-cloud[parquet]'``); ``size`` is int64, every other column a
    nullable UTF-8 string.

Columns (:data:`FIELDS`): ``source`` (the local path or URL read), ``key`` (URL of the object
written), ``size`` (bytes), ``crc32c`` (8 lowercase hex digits, as in the object metadata),
``study_instance_uid``, ``series_instance_uid``, ``sop_instance_uid``, ``sop_class_uid``,
``modality``, ``status`` and ``reason``:

``uploaded``
    written where nothing was (reason empty), or beside an object that holds other bytes
    (``--on-conflict keep-both``: reason ``kept beside <url> (other bytes)``, ``key`` the new name);
``replaced``
    written over an object that held other bytes (``--on-conflict overwrite``);
``skipped``
    not written and nothing wrong: reason ``identical bytes already at <url>`` when the destination
    held (or another file of the run wrote) the same bytes, empty for other skips;
``conflict``
    not written: the name already holds other bytes (``fail`` or ``skip``); reason says which;
``rejected``
    left out by validation (not DICOM, malformed); reason says why;
``failed``
    the object could not be transferred (unreadable, changed while read, a store error...);
    reason is the error.

**No patient data.** The manifest never holds PatientID, PatientName, AccessionNumber, dates
or any other patient attribute: :class:`ManifestRow` has no field for them, and
:meth:`ManifestRow.from_identity` copies only the UIDs, SOP class and modality from the
:class:`~dicom_cloud.dicom.header.DicomIdentity`. (``source`` and ``key`` are names chosen by
whoever stored the files; if those names carry patient data, so does the manifest.)

**Atomic.** Rows are written to ``<name>.partial`` beside the final path, which is renamed to
``<name>`` by :meth:`ManifestWriter.close`. A manifest under its final name is therefore
always complete. Decision: when the run fails (the ``with`` block raises, or
:meth:`ManifestWriter.abort` is called) the ``.partial`` file is kept, closed properly, for
inspection; it lists what was done before the failure. After a hard kill the ``.partial``
JSON lines or CSV file is readable up to its last whole line; a killed Parquet ``.partial``
has no footer and is unreadable. A later run with the same path overwrites both.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Final, Literal

from ..errors import UsageError
from ..extras import require

if TYPE_CHECKING:
    from .header import DicomIdentity

__all__ = ["FIELDS", "PARQUET_BATCH_ROWS", "ManifestRow", "ManifestWriter", "Status"]

Status = Literal["uploaded", "replaced", "skipped", "conflict", "rejected", "failed"]
_STATUSES: Final = frozenset({"uploaded", "replaced", "skipped", "conflict", "rejected", "failed"})

#: Rows buffered before a Parquet row group is written.
PARQUET_BATCH_ROWS: Final = 10_000

_FORMATS: Final = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class ManifestRow:
    """One object of the inventory. Holds no patient data by construction."""

    source: str
    key: str
    size: int
    crc32c: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    modality: str | None
    status: Status
    reason: str = ""

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"manifest status must be one of {sorted(_STATUSES)}, not {self.status!r}")

    @classmethod
    def from_identity(
        cls,
        identity: DicomIdentity | None,
        *,
        source: str,
        key: str,
        size: int,
        crc32c: str | None,
        status: Status,
        reason: str = "",
    ) -> ManifestRow:
        """The row for an object whose header gave ``identity`` (``None`` when unreadable).

        Only the UIDs, SOP class and modality are taken from the identity; its patient
        fields are never copied.
        """
        return cls(
            source=source,
            key=key,
            size=size,
            crc32c=crc32c,
            study_instance_uid=identity.study_instance_uid if identity else None,
            series_instance_uid=identity.series_instance_uid if identity else None,
            sop_instance_uid=identity.sop_instance_uid if identity else None,
            sop_class_uid=identity.sop_class_uid if identity else None,
            modality=identity.modality if identity else None,
            status=status,
            reason=reason,
        )


#: Column names, in order.
FIELDS: Final[tuple[str, ...]] = tuple(f.name for f in fields(ManifestRow))


class _Sink:
    def write(self, row: ManifestRow) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _JsonlSink(_Sink):
    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("w", encoding="utf-8", newline="\n")

    def write(self, row: ManifestRow) -> None:
        self._file.write(json.dumps(asdict(row), ensure_ascii=False, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class _CsvSink(_Sink):
    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("w", encoding="utf-8", newline="")
        self._csv = csv.writer(self._file)
        self._csv.writerow(FIELDS)

    def write(self, row: ManifestRow) -> None:
        self._csv.writerow(["" if v is None else v for v in (getattr(row, f) for f in FIELDS)])

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class _ParquetSink(_Sink):
    def __init__(self, path: Path) -> None:
        require("parquet", "a .parquet manifest")
        # Imported by name: pyarrow ships no type stubs.
        pa = importlib.import_module("pyarrow")
        pq = importlib.import_module("pyarrow.parquet")
        self._pa: Any = pa
        self._schema: Any = pa.schema(
            [(name, pa.int64() if name == "size" else pa.string()) for name in FIELDS]
        )
        self._writer: Any = pq.ParquetWriter(str(path), self._schema)
        self._columns: dict[str, list[Any]] = {name: [] for name in FIELDS}
        self._pending = 0

    def write(self, row: ManifestRow) -> None:
        for name in FIELDS:
            self._columns[name].append(getattr(row, name))
        self._pending += 1
        if self._pending >= PARQUET_BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            table = self._pa.Table.from_pydict(self._columns, schema=self._schema)
            self._writer.write_table(table)
            for column in self._columns.values():
                column.clear()
            self._pending = 0

    def close(self) -> None:
        try:
            self._flush()
        finally:
            self._writer.close()


_SINKS: Final[dict[str, Callable[[Path], _Sink]]] = {
    "jsonl": _JsonlSink,
    "csv": _CsvSink,
    "parquet": _ParquetSink,
}


class ManifestWriter:
    """Writes manifest rows to ``<path>.partial`` and renames it to ``path`` on :meth:`close`.

    Use as a context manager: a normal exit closes (commits) the manifest; an exception
    aborts it, keeping ``<path>.partial`` for inspection. Not thread-safe: one writer, one
    task.
    """

    def __init__(self, path: Path, sink: _Sink, partial: Path) -> None:
        self.path = path
        #: Where rows go until the manifest is committed.
        self.partial_path = partial
        self._sink = sink
        self._closed = False
        #: Rows written so far.
        self.rows = 0

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ManifestWriter:
        """Start a manifest at ``path``, its format chosen by the extension.

        Raises :class:`UsageError` for an extension other than ``.jsonl``, ``.csv`` or
        ``.parquet``, or for ``.parquet`` without pyarrow installed.
        """
        final = Path(path)
        kind = _FORMATS.get(final.suffix.lower())
        if kind is None:
            raise UsageError(
                f"cannot tell the manifest format of '{final.name}'",
                hint="name the manifest *.jsonl, *.csv or *.parquet",
            )
        partial = final.with_name(final.name + ".partial")
        return cls(final, _SINKS[kind](partial), partial)

    def write(self, row: ManifestRow) -> None:
        """Append one row."""
        if self._closed:
            raise ValueError("write to a closed manifest")
        self._sink.write(row)
        self.rows += 1

    def close(self) -> None:
        """Finish the file and rename it to its final name. Closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        self._sink.close()
        os.replace(self.partial_path, self.path)

    def abort(self) -> None:
        """Finish the file but leave it under ``<name>.partial``: the run did not complete."""
        if self._closed:
            return
        self._closed = True
        self._sink.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
