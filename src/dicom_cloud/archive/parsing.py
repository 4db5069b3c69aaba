"""What the archive reads out of one instance's bytes: validation, preamble sanitising, the
attributes it indexes, and the DICOM JSON sidecar.

The policy for what is accepted is :mod:`dicom_cloud.dicom.header`'s ``strict`` one: a Part 10
object (preamble, ``DICM``, file meta) with valid SOP Class, SOP Instance, Study and Series
UIDs. Everything else is refused with a :class:`DicomFormatError` whose ``reason`` is stable
and free of patient data.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    if isinstance(value, MultiValue):
        text = "\\".join(str(v) for v in value)
    elif isinstance(value, bytes):
        return None
    else:
        text = str(value)
    # NUL cannot be stored in PostgreSQL text; inside a value it is padding gone wrong.
    text = text.replace("\x00", "").strip()
    return text or None


def _int(value: Any) -> int | None:
    if isinstance(value, MultiValue):
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
    pixel_tag = None
    if end + 4 <= len(data):
        fmt = "<HH" if ds.is_little_endian or ds.is_little_endian is None else ">HH"
        group, element = struct.unpack(fmt, data[end : end + 4])
        tag = (group << 16) | element
        if tag in _PIXEL_TAGS:
            pixel_tag = tag
            _check_pixel_length(data, end, ds, fmt[0], len(data) if total_size is None else total_size)
    return pixel_tag


def _check_pixel_length(data: bytes, start: int, ds: Dataset, order: str, total_size: int) -> None:
    """Refuse an instance whose pixel data element runs past the end of the data."""
    vr = data[start + 4 : start + 6]
    if ds.is_implicit_VR or not (vr.isalpha() and vr.isupper()):  # some writers mix encodings here
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
    if pixel_tag is not None:
        vr = _PIXEL_TAGS[pixel_tag]
        if pixel_tag == 0x7FE00010:
            syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
            native = syntax.is_transfer_syntax and not syntax.is_compressed
            vr = "OW" if native and (_int(_value(ds, "BitsAllocated")) or 8) > 8 else "OB"
        out[f"{pixel_tag:08X}"] = {"vr": vr, "BulkDataURI": f"bulkdata/{pixel_tag:08X}"}
    return out


def index_attributes(ds: Dataset, identity: DicomIdentity, extra_tags: Sequence[int]) -> IndexedAttributes:
    def text(keyword: str, limit: int = 256) -> str | None:
        value = _text(_value(ds, keyword))
        return value[:limit] if value is not None else None  # the column's length (malformed data)

    def number(keyword: str) -> int | None:
        return _int(_value(ds, keyword))

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
        extra=tuple(extra),
    )


def parse_instance(data: bytes, extra_tags: Sequence[int] = ()) -> ParsedInstance:
    """Validate a whole Part 10 instance (``strict`` policy) and read what the archive keeps of it."""
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
