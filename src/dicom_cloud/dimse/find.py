"""C-FIND over the archive's index, with QIDO-RS's matching (``archive/qido.py``): an identifier
becomes QIDO parameters and the QIDO search runs; there is no second matcher.

An identifier element becomes:

- a value: a QIDO condition on that attribute: ``*`` and ``?`` wildcards, ``A-B`` date and time
  ranges, lists of UIDs separated by ``\\``, person names case-insensitively, exactly as QIDO-RS;
- zero length: a return key (QIDO ``includefield``);
- an attribute the index does not hold, a sequence, or one below the query level: returned empty
  and not matched (PS3.4 C.2.2.1: an SCP may not support matching on optional keys).

Levels: PATIENT (studies searched with the patient keys, one response per patient), STUDY,
SERIES, IMAGE; the Patient Root and Study Root models answer alike. The search returns the keys of
the identifier and nothing else (no level defaults, no counts nobody asked for), and a response is
built from those keys of a result alone, never by decoding the whole result. Results come page by page
(``max_query_limit`` each) until the search is exhausted or the peer cancels. Values are sent as
UTF-8 (Specific Character Set ``ISO_IR 192``): the index keeps text as Unicode. Pending responses
are encoded from the results and sent by ``responses.PendingSender`` (pynetdicom's per-message
path cost most of a many-match C-FIND's CPU); ``response`` below, through pynetdicom, is the
fallback for what that encoder does not cover.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.jsonrep import JSON_VALUE_KEYS
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from ..archive import Archive
from ..archive.qido import ExtraTag, Level, attribute_level, resolve_extra_tags
from ..errors import DicomCloudError, UsageError
from .responses import NotEncodable, PendingSender, identifier_bytes
from .scp import NOT_AUTHORIZED, Listener

log = logging.getLogger("dicom_cloud.dimse")

LEVELS: Final[dict[str, Level]] = {
    "PATIENT": "patient",
    "STUDY": "study",
    "SERIES": "series",
    "IMAGE": "instance",
}
_RANK: Final = {"patient": 0, "study": 1, "series": 2, "instance": 3}
_NOT_KEYS: Final = {Tag(0x0008, 0x0052), Tag(0x0008, 0x0005), Tag(0x0008, 0x0054)}
#: PatientID, PatientName: what tells patients apart at the PATIENT level.
_PATIENT_KEYS: Final = ("00100020", "00100010")
PENDING = 0xFF00
CANCELLED = 0xFE00
UNABLE_TO_PROCESS = 0xC000
IDENTIFIER_MISMATCH = 0xA900


@dataclass
class Query:
    """An identifier as QIDO parameters."""

    level: Level
    level_name: str
    params: dict[str, str] = field(default_factory=dict)
    include: list[str] = field(default_factory=list)
    #: Every key of the identifier the index holds (returned, with a value or without).
    returned: list[str] = field(default_factory=list)


def _text(value: Any) -> str:
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def identifier_query(identifier: Dataset, extra_tags: Sequence[ExtraTag]) -> Query:
    """The QIDO parameters of a C-FIND/C-MOVE/C-GET identifier; UsageError on a bad level."""
    level_name = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level_name not in LEVELS:
        raise UsageError("QueryRetrieveLevel must be PATIENT, STUDY, SERIES or IMAGE")
    level = LEVELS[level_name]
    extra = {e.tag for e in extra_tags}
    query = Query(level, level_name)
    for element in identifier:
        if element.tag in _NOT_KEYS or element.tag.group in (0x0002, 0xFFFE) or element.VR == "SQ":
            continue
        key = f"{int(element.tag):08X}"
        owner = attribute_level(key)
        if owner is None and key not in extra:
            continue  # not in the index: returned empty
        if owner is not None and _RANK[owner] > _RANK[level]:
            continue  # below the query level
        if level == "patient" and owner != "patient":
            continue  # patients are found through their studies: patient keys only
        query.returned.append(key)
        if element.is_empty:
            query.include.append(key)
        else:
            query.params[key] = _text(element.value)
    if query.include:
        query.params["includefield"] = ",".join(query.include)
    return query


def search_pages(
    listener: Listener,
    archive: Archive,
    tenant: str,
    query: Query,
    *,
    only_returned: bool = False,
    **scope: str,
) -> Iterator[dict[str, Any]]:
    """Every QIDO result of ``query`` (DICOM JSON), fetched a page at a time; with
    ``only_returned``, each holds the identifier's keys (``query.returned``) and no more."""
    page = archive.settings.max_query_limit
    offset = 0
    searches: dict[str, Callable[..., Coroutine[Any, Any, list[dict[str, Any]]]]] = {
        "patient": archive.search_studies,
        "study": archive.search_studies,
        "series": archive.search_series,
        "instance": archive.search_instances,
    }
    search = searches[query.level]
    base = dict(query.params)
    if only_returned:
        returned = query.returned + [k for k in _PATIENT_KEYS if query.level == "patient"]
        base["includefield"] = ",".join(dict.fromkeys(returned))
    while True:
        params = {**base, "limit": str(page), "offset": str(offset)}
        results = listener.call(search(tenant, params, only_included=only_returned, **scope))
        yield from results
        if len(results) < page:
            return
        offset += page


def _json_element(key: str, attribute: dict[str, Any]) -> DataElement:
    """One attribute of a DICOM JSON result as a DataElement (as Dataset.from_json decodes each)."""
    value_keys = [k for k in attribute if k in JSON_VALUE_KEYS]
    if not value_keys:
        return DataElement.from_json(Dataset, key, attribute["vr"], "", None)
    return DataElement.from_json(Dataset, key, attribute["vr"], attribute[value_keys[0]], value_keys[0])


def response(identifier: Dataset, found: dict[str, Any], query: Query, ae_title: str) -> Dataset:
    """The C-FIND response: every key of the identifier, with its value when the result (DICOM
    JSON) has one; only those attributes of the result are decoded."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = query.level_name
    for element in identifier:
        if element.tag in (Tag(0x0008, 0x0052), Tag(0x0008, 0x0005)) or element.tag.group == 0x0002:
            continue
        if element.tag == Tag(0x0008, 0x0054):
            ds.RetrieveAETitle = ae_title
            continue
        attribute = found.get(f"{int(element.tag):08X}")
        if attribute is not None and element.VR != "SQ":
            ds[element.tag] = _json_element(f"{int(element.tag):08X}", attribute)
        else:
            ds.add_new(element.tag, element.VR, [] if element.VR == "SQ" else None)
    return ds


def _patient(found: dict[str, Any]) -> tuple[str, str]:
    """PatientID and PatientName of a result, as they tell patients apart."""
    patient_id, patient_name = (json.dumps(found.get(key, {}).get("Value")) for key in _PATIENT_KEYS)
    return patient_id, patient_name


class ArchiveFind:
    """The EVT_C_FIND handler of the archive face."""

    def __init__(self, listener: Listener, archive: Archive) -> None:
        self._listener = listener
        self._archive = archive
        self._extra = resolve_extra_tags(archive.settings.extra_query_tags)

    def __call__(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        caller = self._listener.caller(event)
        if not caller.allows("find"):
            yield NOT_AUTHORIZED, None
            return
        try:
            identifier = event.identifier
            query = identifier_query(identifier, self._extra)
        except UsageError as exc:
            yield _failure(IDENTIFIER_MISMATCH, str(exc))
            return
        seen: set[tuple[str, str]] = set()
        ae_title = self._listener.settings.ae_title
        sender = PendingSender.for_event(event)
        assoc = event.assoc
        try:
            results = search_pages(self._listener, self._archive, caller.tenant, query, only_returned=True)
            for result in results:
                if event.is_cancelled:
                    yield CANCELLED, None
                    return
                if query.level == "patient":
                    patient = _patient(result)
                    if patient in seen:
                        continue
                    seen.add(patient)
                if sender is not None:
                    # Sent here, not yielded: pynetdicom's checks between responses are done alike.
                    if (
                        not assoc.is_established
                        or assoc.acse.is_aborted()
                        or assoc.acse.is_release_requested()
                    ):
                        return
                    try:
                        encoded = identifier_bytes(
                            identifier, result, query.level_name, ae_title, implicit=sender.implicit
                        )
                    except NotEncodable:
                        yield PENDING, response(identifier, result, query, ae_title)
                        continue
                    sender.send(encoded)
                    continue
                yield PENDING, response(identifier, result, query, ae_title)
        except UsageError as exc:
            yield _failure(UNABLE_TO_PROCESS, str(exc))
            return
        except DicomCloudError as exc:
            log.error("C-FIND failed", extra={"calling_ae": caller.ae_title, "error": type(exc).__name__})
            yield _failure(UNABLE_TO_PROCESS, "the archive could not run the query")
            return
        yield 0x0000, None


def _failure(code: int, comment: str) -> tuple[Dataset, None]:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds, None
