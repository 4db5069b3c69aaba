"""C-MOVE and C-GET: the archive sends the instances an identifier names, read from its store
(decrypted, size and CRC32C checked) in the transfer syntax they were stored in.

The identifier is matched by the same QIDO search as C-FIND (``find.identifier_query``) at the
instance level, so a retrieve takes exactly what a C-FIND at that level lists; its unique key must
have a value (PatientID, StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID by level), so an
empty identifier never sends a whole archive.

C-MOVE sends to a configured peer (AE title, host, port) of the caller's tenant, on a new
association proposing each SOP class in its stored transfer syntax and the two uncompressed ones;
C-GET sends on the caller's own association, in the contexts it proposed with the SCP role.
Instances are read a few ahead of the one being sent (``_READ_AHEAD``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from io import BytesIO
from typing import Any, Final

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.presentation import PresentationContext, build_context

from ..archive import Archive, InstanceRecord
from ..archive.qido import resolve_extra_tags
from ..errors import DicomCloudError, UsageError
from .find import CANCELLED, IDENTIFIER_MISMATCH, UNABLE_TO_PROCESS, Query, identifier_query, search_pages
from .scp import Caller, Listener

log = logging.getLogger("dicom_cloud.dimse")

_READ_AHEAD: Final = 4
_UNIQUE: Final = {
    "patient": "00100020",
    "study": "0020000D",
    "series": "0020000E",
    "instance": "00080018",
}
#: A requestor may propose at most 128 presentation contexts.
_MAX_CONTEXTS: Final = 128
PENDING = 0xFF00


def _first(result: dict[str, Any], tag: str) -> str:
    values = result.get(tag, {}).get("Value") or [""]
    return str(values[0])


def matching_instances(
    listener: Listener, archive: Archive, caller: Caller, identifier: Dataset
) -> list[InstanceRecord]:
    """The instances an identifier names, in study, series, instance order."""
    query = identifier_query(identifier, resolve_extra_tags(archive.settings.extra_query_tags))
    unique = _UNIQUE[query.level]
    if not query.params.get(unique):
        raise UsageError(f"a {query.level_name} retrieve needs a value for its unique key ({unique})")
    params = {k: v for k, v in query.params.items() if k != "includefield"}
    wanted: dict[str, set[str]] = {}
    for result in search_pages(listener, archive, caller.tenant, Query("instance", "IMAGE", params)):
        wanted.setdefault(_first(result, "0020000D"), set()).add(_first(result, "00080018"))
    records: list[InstanceRecord] = []
    for study, sops in wanted.items():
        for record in listener.call(archive.instances(caller.tenant, study)):
            if record.sop_instance_uid in sops:
                records.append(record)
    return records


def contexts_for(records: Sequence[InstanceRecord]) -> list[PresentationContext]:
    """Storage contexts to propose for sending ``records``: each SOP class in its stored transfer
    syntaxes, then the uncompressed ones."""
    syntaxes: dict[str, list[str]] = {}
    for record in records:
        if record.sop_class_uid:
            found = syntaxes.setdefault(record.sop_class_uid, [])
            if record.transfer_syntax_uid not in found:
                found.append(record.transfer_syntax_uid)
    contexts = []
    for sop_class, stored in list(syntaxes.items())[:_MAX_CONTEXTS]:
        wanted = list(dict.fromkeys([*stored, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        contexts.append(build_context(sop_class, wanted))
    return contexts


def _datasets(
    listener: Listener, archive: Archive, records: Sequence[InstanceRecord], event: Any
) -> Iterator[tuple[int, Dataset | None]]:
    """(Pending, dataset) per record, reading ahead; Cancel when the peer cancels."""
    pending: deque[Future[bytes]] = deque()
    upcoming = iter(records)
    try:
        for record in upcoming:
            pending.append(listener.submit(archive.read_instance(record)))
            if len(pending) >= _READ_AHEAD:
                break
        while pending:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            future = pending.popleft()
            following = next(upcoming, None)
            if following is not None:
                pending.append(listener.submit(archive.read_instance(following)))
            try:
                data = future.result()
                dataset: Dataset | None = dcmread(BytesIO(data))
            except (DicomCloudError, Exception) as exc:  # one unreadable instance: a failed sub-op
                log.error("an instance could not be read for sending", extra={"error": type(exc).__name__})
                dataset = None
            yield PENDING, dataset
    finally:
        for future in pending:
            future.cancel()


def _failure(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class ArchiveMove:
    """The EVT_C_MOVE handler of the archive face."""

    def __init__(self, listener: Listener, archive: Archive) -> None:
        self._listener = listener
        self._archive = archive

    def __call__(self, event: Any) -> Iterator[Any]:
        caller = self._listener.caller(event)
        destination_ae = str(event.move_destination).strip()
        target = self._listener.settings.peer(destination_ae)
        if (
            not caller.allows("move")
            or target is None
            or target.port is None
            or (target.tenant is not None and target.tenant != caller.tenant)
        ):
            log.warning(
                "C-MOVE refused: destination unknown or not allowed",
                extra={"calling_ae": caller.ae_title, "destination_ae": destination_ae},
            )
            yield None, None  # pynetdicom answers 0xA801 (move destination unknown)
            return
        try:
            records = matching_instances(self._listener, self._archive, caller, event.identifier)
        except UsageError as exc:
            # pynetdicom needs a destination first; the failure follows as the only sub-op status.
            yield target.host, target.port
            yield 1
            yield _failure(IDENTIFIER_MISMATCH, str(exc)), None
            return
        except DicomCloudError:
            yield target.host, target.port
            yield 1
            yield _failure(UNABLE_TO_PROCESS, "the archive could not run the query"), None
            return
        yield target.host, target.port, {"contexts": contexts_for(records) or None}
        yield len(records)
        yield from _datasets(self._listener, self._archive, records, event)


class ArchiveGet:
    """The EVT_C_GET handler of the archive face."""

    def __init__(self, listener: Listener, archive: Archive) -> None:
        self._listener = listener
        self._archive = archive

    def __call__(self, event: Any) -> Iterator[Any]:
        caller = self._listener.caller(event)
        if not caller.allows("get"):
            yield 1
            yield _failure(0x0124, "C-GET not allowed for this AE"), None
            return
        try:
            records = matching_instances(self._listener, self._archive, caller, event.identifier)
        except UsageError as exc:
            yield 1
            yield _failure(IDENTIFIER_MISMATCH, str(exc)), None
            return
        except DicomCloudError:
            yield 1
            yield _failure(UNABLE_TO_PROCESS, "the archive could not run the query"), None
            return
        yield len(records)
        yield from _datasets(self._listener, self._archive, records, event)
