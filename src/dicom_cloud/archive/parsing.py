"""What the archive reads out of one instance's bytes: validation, preamble sanitising, the
attributes it indexes, and the DICOM JSON sidecar.

The policy for what is accepted is :mod:`dicom_cloud.dicom.header`'s ``strict`` one: a Part 10
object (preamble, ``DICM``, file meta) with valid SOP Class, SOP Instance, Study and Series
UIDs. Everything else is refused with a :class:`DicomFormatError` whose ``reason`` is stable
and free of patient data.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from typing import Any, Final

import orjson
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from ..dicom.header import REASON_NO_DICM, REASON_UNREADABLE, DicomIdentity, read_header_strict
from ..errors import DicomCloudError, DicomFormatError
from .plainread import read_plain

PREAMBLE_LENGTH: Final = 128
REASON_PIXELS_TRUNCATED: Final = "truncated in the pixel data"
#: Binary values longer than this go to bulk data (a BulkDataURI in the sidecar).
BULK_DATA_THRESHOLD: Final = 1024
_PIXEL_TAGS: Final = {0x7FE00008: "OF", 0x7FE00009: "OD", 0x7FE00010: "OB"}


def sanitise_preamble(data: bytes | memoryview) -> tuple[bytes, bool]:
    """``data`` with its 128-byte preamble zeroed, and whether anything changed.

    A preamble can hold another file format's header (a PE executable, a TIFF), making a
    DICOM/executable polyglot (CVE-2019-11687); nothing in DICOM reads it, so it is cleared.
    Raises DicomFormatError when ``data`` is not Part 10 (no ``DICM`` after the preamble).
    """
    if len(data) < PREAMBLE_LENGTH + 4 or bytes(data[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4]) != b"DICM":
        raise DicomFormatError(REASON_NO_DICM, hint="send DICOM Part 10 files (preamble, 'DICM', file meta)")
    if not any(data[:PREAMBLE_LENGTH]):
        return bytes(data), False
    return bytes(PREAMBLE_LENGTH) + bytes(data[PREAMBLE_LENGTH:]), True


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, MultiValue | list):
        text = "\\".join(str(v) for v in value)
    elif isinstance(value, bytes):
        return None
    else:
        text = str(value)
    # NUL cannot be stored in PostgreSQL text; inside a value it is padding gone wrong.
    text = text.replace("\x00", "").strip()
    return text or None


def _int(value: Any) -> int | None:
    if isinstance(value, MultiValue | list):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def normalise_date(value: str | None) -> str | None:
    """``YYYYMMDD`` from DA values, also the old ``YYYY.MM.DD`` form; None when not a date."""
    if value is None:
        return None
    digits = value.replace(".", "").replace("-", "").strip()
    return digits if len(digits) == 8 and digits.isdigit() else None


def normalise_time(value: str | None) -> str | None:
    """``HHMMSS[.ffffff]`` from TM values (``HH``, ``HHMM``, old ``HH:MM:SS``), so that string
    comparison orders times; None when not a time."""
    if value is None:
        return None
    text = value.replace(":", "").strip()
    whole, _, fraction = text.partition(".")
    if not whole.isdigit() or len(whole) not in (2, 4, 6) or (fraction and not fraction.isdigit()):
        return None
    whole = whole.ljust(6, "0")
    return f"{whole}.{fraction}" if fraction else whole


@dataclass(frozen=True)
class IndexedAttributes:
    """The attributes of one instance that the index stores (values may be patient data)."""

    patient_id: str
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    study_instance_uid: str
    study_date: str | None
    study_time: str | None
    accession_number: str | None
    study_description: str | None
    referring_physician_name: str | None
    study_id: str | None
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    sop_instance_uid: str
    sop_class_uid: str | None
    instance_number: int | None
    transfer_syntax_uid: str
    number_of_frames: int | None
    rows: int | None
    columns: int | None
    bits_allocated: int | None
    #: Configured extra attributes: (tag as 8 hex digits, VR, value as text).
    extra: tuple[tuple[str, str, str], ...]


@dataclass(frozen=True)
class ParsedInstance:
    identity: DicomIdentity
    attributes: IndexedAttributes
    #: The DICOM JSON sidecar: the dataset without bulk data (see :func:`sidecar_json`).
    sidecar: dict[str, Any]

    def sidecar_bytes(self) -> bytes:
        """The sidecar as stored: compact UTF-8 JSON."""
        return orjson.dumps(self.sidecar, default=_json_fallback)


def _json_fallback(value: Any) -> Any:
    """What orjson does not take as is (a float subclass, say): as the json module would write it."""
    for kind in (float, int, str):
        if isinstance(value, kind):
            return kind(value)
    raise TypeError(f"{type(value).__name__} in a sidecar")


def _value(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:  # a malformed value: index it as absent, the sidecar keeps the raw one
        return None


def read_header(data: bytes, total_size: int | None = None) -> tuple[Dataset, int | None]:
    """The dataset before the pixel data, and the tag of the pixel data element (None if absent).

    ``data`` is the whole instance, or its head when ``total_size`` (the whole size) is given.
    """
    fp = BytesIO(data)
    try:
        ds = dcmread(fp, stop_before_pixels=True)
        end = fp.tell()
    except Exception as exc:  # pydicom's many failures on garbage; messages may hold values
        raise DicomFormatError(REASON_UNREADABLE, detail=type(exc).__name__) from None
    return ds, _pixel_tag(data, ds, end, total_size)


def _pixel_tag(data: bytes, ds: Dataset, end: int, total_size: int | None) -> int | None:
    """The tag of the pixel data element found at ``end`` (where reading the header stopped), or
    None; an element running past ``total_size`` (default: the data's length) is refused."""
    little_endian = ds.is_little_endian or ds.is_little_endian is None
    return _pixel_tag_at(data, end, total_size, little_endian=little_endian, implicit=bool(ds.is_implicit_VR))


def _pixel_tag_at(
    data: bytes, end: int, total_size: int | None, *, little_endian: bool, implicit: bool
) -> int | None:
    pixel_tag = None
    if end + 4 <= len(data):
        fmt = "<HH" if little_endian else ">HH"
        group, element = struct.unpack(fmt, data[end : end + 4])
        tag = (group << 16) | element
        if tag in _PIXEL_TAGS:
            pixel_tag = tag
            total = len(data) if total_size is None else total_size
            _check_pixel_length(data, end, implicit, fmt[0], total)
    return pixel_tag


def _check_pixel_length(data: bytes, start: int, implicit: bool, order: str, total_size: int) -> None:
    """Refuse an instance whose pixel data element runs past the end of the data."""
    vr = data[start + 4 : start + 6]
    if implicit or not (vr.isalpha() and vr.isupper()):  # some writers mix encodings here
        header, raw = 8, data[start + 4 : start + 8]
    else:
        header, raw = 12, data[start + 8 : start + 12]
    if len(raw) < 4:
        raise DicomFormatError(REASON_PIXELS_TRUNCATED)
    (length,) = struct.unpack(order + "L", raw)
    if length != 0xFFFFFFFF and start + header + length > total_size:
        raise DicomFormatError(REASON_PIXELS_TRUNCATED)


def _bulk_uri(element: DataElement) -> str:
    return f"bulkdata/{int(element.tag):08X}"


def sidecar_json(ds: Dataset, pixel_tag: int | None) -> dict[str, Any]:
    """The dataset as DICOM JSON (PS3.18 F.2) without bulk data: binary values longer than
    :data:`BULK_DATA_THRESHOLD` and the pixel data become ``BulkDataURI`` relative to the
    instance (``bulkdata/7FE00010``). File meta (group 0002) is not part of it."""
    out = ds.to_json_dict(
        bulk_data_threshold=BULK_DATA_THRESHOLD,
        bulk_data_element_handler=_bulk_uri,
        suppress_invalid_tags=True,
    )
    _add_pixel_entry(
        out, pixel_tag, str(ds.file_meta.get("TransferSyntaxUID", "")), lambda: _value(ds, "BitsAllocated")
    )
    return out


def _add_pixel_entry(
    out: dict[str, Any], pixel_tag: int | None, transfer_syntax: str, bits_allocated: Callable[[], Any]
) -> None:
    """The pixel data's entry of a sidecar: its VR and BulkDataURI."""
    if pixel_tag is None:
        return
    vr = _PIXEL_TAGS[pixel_tag]
    if pixel_tag == 0x7FE00010:
        syntax = _syntax(transfer_syntax)
        native = syntax.is_transfer_syntax and not syntax.is_compressed
        vr = "OW" if native and (_int(bits_allocated()) or 8) > 8 else "OB"
    out[f"{pixel_tag:08X}"] = {"vr": vr, "BulkDataURI": f"bulkdata/{pixel_tag:08X}"}


@lru_cache(maxsize=64)
def _syntax(uid: str) -> UID:
    return UID(uid)


def index_attributes(ds: Dataset, identity: DicomIdentity, extra_tags: Sequence[int]) -> IndexedAttributes:
    extra: list[tuple[str, str, str]] = []
    for tag in extra_tags:
        try:
            element = ds.get(tag)
        except Exception:
            element = None
        if element is None:
            continue
        try:
            value = _text(element.value)
        except Exception:
            value = None
        if value is not None:
            extra.append((f"{tag:08X}", str(element.VR), value[:1024]))
    return _attributes(lambda keyword: _value(ds, keyword), identity, tuple(extra))


def _attributes(
    value_of: Callable[[str], Any], identity: DicomIdentity, extra: tuple[tuple[str, str, str], ...]
) -> IndexedAttributes:
    """The index's values from ``value_of(keyword)`` (an element's value as pydicom gives it)."""

    def text(keyword: str, limit: int = 256) -> str | None:
        value = _text(value_of(keyword))
        return value[:limit] if value is not None else None  # the column's length (malformed data)

    def number(keyword: str) -> int | None:
        return _int(value_of(keyword))

    assert identity.study_instance_uid is not None and identity.series_instance_uid is not None
    return IndexedAttributes(
        patient_id=text("PatientID") or "",  # LO: 64 characters, malformed data cut to 256
        patient_name=text("PatientName"),
        patient_birth_date=normalise_date(text("PatientBirthDate")),
        patient_sex=text("PatientSex", 16),
        study_instance_uid=identity.study_instance_uid,
        study_date=normalise_date(text("StudyDate")),
        study_time=normalise_time(text("StudyTime")),
        accession_number=text("AccessionNumber"),
        study_description=text("StudyDescription"),
        referring_physician_name=text("ReferringPhysicianName"),
        study_id=text("StudyID"),
        series_instance_uid=identity.series_instance_uid,
        modality=text("Modality", 16),
        series_number=number("SeriesNumber"),
        series_description=text("SeriesDescription"),
        sop_instance_uid=identity.sop_instance_uid,
        sop_class_uid=identity.sop_class_uid,
        instance_number=number("InstanceNumber"),
        transfer_syntax_uid=identity.transfer_syntax_uid,
        number_of_frames=number("NumberOfFrames"),
        rows=number("Rows"),
        columns=number("Columns"),
        bits_allocated=number("BitsAllocated"),
        extra=extra,
    )


#: The tags of the keywords the index reads, for :func:`_parse_plain`.
_INDEX_TAGS: Final[dict[str, int]] = {
    "PatientID": 0x00100020, "PatientName": 0x00100010, "PatientBirthDate": 0x00100030,
    "PatientSex": 0x00100040, "StudyDate": 0x00080020, "StudyTime": 0x00080030,
    "AccessionNumber": 0x00080050, "StudyDescription": 0x00081030,
    "ReferringPhysicianName": 0x00080090, "StudyID": 0x00200010, "Modality": 0x00080060,
    "SeriesNumber": 0x00200011, "SeriesDescription": 0x0008103E, "InstanceNumber": 0x00200013,
    "NumberOfFrames": 0x00280008, "Rows": 0x00280010, "Columns": 0x00280011,
    "BitsAllocated": 0x00280100,
}  # fmt: skip
#: Those read as numbers (the others as text).
_INDEX_NUMBERS: Final = frozenset(
    {"SeriesNumber", "InstanceNumber", "NumberOfFrames", "Rows", "Columns", "BitsAllocated"}
)
_SOP_CLASS, _SOP_INSTANCE, _STUDY_UID, _SERIES_UID = 0x00080016, 0x00080018, 0x0020000D, 0x0020000E
_STUDY_DATE, _ACCESSION, _MODALITY, _PATIENT_ID = 0x00080020, 0x00080050, 0x00080060, 0x00100020
_SERIES_NUMBER, _INSTANCE_NUMBER = 0x00200011, 0x00200013
#: VRs whose value pydicom gives as text (or a list of texts) that reads the same from either reader.
_PLAIN_TEXT_VRS: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_INTEGER_VRS: Final = frozenset({"IS", "US", "SS", "UL", "SL", "UV", "SV"})


def _parse_plain(data: bytes, extra_tags: Sequence[int]) -> ParsedInstance | None:
    """:func:`parse_instance` by :mod:`.plainread`, for an instance of the plain shape that the
    ``strict`` policy accepts; None leaves it to pydicom (refusals included), so the outcome is
    the same either way."""
    plain = read_plain(data)
    if plain is None:
        return None
    elements = plain.elements

    def identity_text(tag: int) -> str | None:
        item = elements.get(tag)
        if item is None or item[1] is None or item[1] == "":
            return None
        value = item[1]
        if item[0] not in _PLAIN_TEXT_VRS:
            raise _Unsure
        return ("\\".join(value) if isinstance(value, list) else str(value)).strip() or None

    def identity_number(tag: int) -> int | None:
        item = elements.get(tag)
        if item is None or item[1] is None or item[1] == "":
            return None
        if item[0] not in _INTEGER_VRS:
            raise _Unsure
        value = item[1]
        return int(value[0] if isinstance(value, list) else value)

    try:
        uids = [identity_text(tag) for tag in (_SOP_INSTANCE, _SOP_CLASS, _STUDY_UID, _SERIES_UID)]
        sop_instance, sop_class, study, series = uids
        if sop_instance is None or sop_class is None or study is None or series is None:
            return None
        if not all(_valid_uid(uid) for uid in (sop_instance, sop_class, study, series)):
            return None
        media_sop = plain.media_sop_instance_uid
        identity = DicomIdentity(
            sop_instance_uid=sop_instance,
            sop_class_uid=sop_class,
            study_instance_uid=study,
            series_instance_uid=series,
            transfer_syntax_uid=plain.transfer_syntax_uid,
            modality=identity_text(_MODALITY),
            study_date=identity_text(_STUDY_DATE),
            patient_id=identity_text(_PATIENT_ID),
            accession_number=identity_text(_ACCESSION),
            series_number=identity_number(_SERIES_NUMBER),
            instance_number=identity_number(_INSTANCE_NUMBER),
            meta_mismatch=bool(media_sop) and str(media_sop).strip("\0 ") != sop_instance,
        )
        extra: list[tuple[str, str, str]] = []
        for tag in extra_tags:
            item = elements.get(tag)
            if item is None:
                continue
            if item[0] not in _PLAIN_TEXT_VRS:
                return None
            value = _text(item[1])
            if value is not None:
                extra.append((f"{tag:08X}", item[0], value[:1024]))
    except _Unsure:
        return None

    def value_of(keyword: str) -> Any:
        item = elements.get(_INDEX_TAGS[keyword])
        return None if item is None else item[1]

    for keyword, tag in _INDEX_TAGS.items():
        item = elements.get(tag)
        if item is not None and item[0] not in (
            _INTEGER_VRS if keyword in _INDEX_NUMBERS else _PLAIN_TEXT_VRS
        ):
            return None  # an index value of an unexpected VR: its text is pydicom's to give

    try:
        pixel_tag = _pixel_tag_at(data, plain.end, None, little_endian=True, implicit=False)
    except DicomFormatError:
        return None  # refused: by the pydicom path, with its reason
    sidecar = plain.json
    _add_pixel_entry(sidecar, pixel_tag, plain.transfer_syntax_uid, lambda: value_of("BitsAllocated"))
    return ParsedInstance(
        identity=identity, attributes=_attributes(value_of, identity, tuple(extra)), sidecar=sidecar
    )


class _Unsure(Exception):
    """A value the plain reader's caller cannot read as pydicom would: pydicom reads the instance."""


_UID_FORM: Final = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _valid_uid(uid: str) -> bool:
    """pydicom's ``UID.is_valid``, or stricter (no trailing newline)."""
    return len(uid) <= 64 and _UID_FORM.fullmatch(uid) is not None


def parse_instance(data: bytes, extra_tags: Sequence[int] = ()) -> ParsedInstance:
    """Validate a whole Part 10 instance (``strict`` policy) and read what the archive keeps of it."""
    plain = _parse_plain(data, extra_tags)
    return plain if plain is not None else parse_instance_with_pydicom(data, extra_tags)


def parse_instance_with_pydicom(data: bytes, extra_tags: Sequence[int] = ()) -> ParsedInstance:
    """:func:`parse_instance` by pydicom alone, whatever the instance's shape."""
    try:
        # One pydicom read serves the policy's checks, the index and the sidecar.
        identity, ds, end = read_header_strict(data)
        pixel_tag = _pixel_tag(data, ds, end, None)
        return ParsedInstance(
            identity=identity,
            attributes=index_attributes(ds, identity, extra_tags),
            sidecar=sidecar_json(ds, pixel_tag),
        )
    except DicomCloudError:
        raise
    except Exception as exc:  # pydicom converting a malformed value late (e.g. an unknown VR)
        raise DicomFormatError(REASON_UNREADABLE, detail=type(exc).__name__) from None


def parse_head(
    head: bytes, total_size: int, identity: DicomIdentity, extra_tags: Sequence[int] = ()
) -> ParsedInstance | None:
    """As :func:`parse_instance` for an instance too large to hold, from its first bytes ``head``
    (the preamble already zeroed) and its ``identity`` read by a ranged read. None when ``head``
    ends before the pixel data: read more. Deflated instances cannot be parsed from a head."""
    try:
        ds, pixel_tag = read_header(head, total_size)
    except DicomFormatError:
        if len(head) < total_size:
            return None  # cut inside an element: read more
        raise
    if pixel_tag is None and len(head) < total_size:
        return None
    try:
        return ParsedInstance(
            identity=identity,
            attributes=index_attributes(ds, identity, extra_tags),
            sidecar=sidecar_json(ds, pixel_tag),
        )
    except Exception as exc:
        raise DicomFormatError(REASON_UNREADABLE, detail=type(exc).__name__) from None


def json_value_text(element: Mapping[str, Any]) -> str | None:
    """The text the index keeps for a DICOM JSON element (as :func:`index_attributes` does for a
    dataset element): values joined by ``\\``, person names by their alphabetic group."""
    values = element.get("Value")
    if not isinstance(values, list) or not values:
        return None
    parts = []
    for value in values:
        if isinstance(value, dict):
            if "Alphabetic" not in value:
                return None  # a sequence item: not a single-valued attribute
            value = value["Alphabetic"]
        parts.append("" if value is None else str(value))
    text = "\\".join(parts).strip("\x00 ")
    return text[:1024] or None
