"""Reading the identity of a DICOM Part 10 object from its header only, never its pixels.

One explicit policy decides what malformed input is accepted (the pydicom way, with one
switch instead of scattered try/excepts):

``strict``
    The object must be Part 10: a 128-byte preamble followed by ``DICM`` and a file meta
    group; the four identity UIDs (SOP Class, SOP Instance, Study, Series) must be present
    and valid UIDs; a requested element cut short by the end of the data is an error; the
    file meta and the dataset must agree on the SOP Instance UID.
``lenient`` (default)
    Also accepts a bare dataset without preamble or file meta (read as pydicom's
    ``force=True``), as long as it still yields a SOP Instance UID. Missing Study/Series UIDs
    become ``None``; an unreadable or truncated optional element becomes ``None``.

Failures raise :class:`DicomFormatError`, whose ``reason`` is one of the ``REASON_*`` strings
below. Messages never contain element values: identities carry patient data (PHI).

Only the head of an object is read. Elements are stored in ascending tag order, so reading
stops at the first top-level element after the last wanted tag, or at the pixel data;
:func:`read_identity_from_store` and :func:`read_identity_from_file` read ``first_read`` bytes
and double that only while the parser runs out of data before such a stopping point.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from io import BytesIO
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID

from ..errors import DicomFormatError, NotFoundError, UsageError
from ..store import Store

__all__ = [
    "DicomFormatError",
    "DicomIdentity",
    "Policy",
    "read_header_strict",
    "read_identity",
    "read_identity_from_file",
    "read_identity_from_store",
]

Policy = Literal["strict", "lenient"]

REASON_EMPTY: Final = "not DICOM (empty)"
REASON_NO_DICM: Final = "not DICOM (no DICM marker)"
REASON_TRUNCATED: Final = "truncated in the header"
REASON_UNREADABLE: Final = "unreadable header"
REASON_TOO_LONG: Final = "header longer than the read limit"
REASON_NO_SOP_INSTANCE: Final = "missing SOP Instance UID"
REASON_NO_SOP_CLASS: Final = "missing SOP Class UID"
REASON_NO_STUDY: Final = "missing Study Instance UID"
REASON_NO_SERIES: Final = "missing Series Instance UID"
REASON_BAD_UID: Final = "invalid UID"
REASON_BAD_NUMBER: Final = "invalid integer string"
REASON_META_MISMATCH: Final = "file meta and dataset disagree on the SOP Instance UID"


_PHI_FIELDS: Final = frozenset({"patient_id", "accession_number"})


@dataclass(frozen=True)
class DicomIdentity:
    """Who and what one DICOM instance is, as read from its header.

    ``patient_id`` and ``accession_number`` are patient data: ``repr`` hides them, and the
    values of ``extra``, which may be anything the caller asked for.
    """

    sop_instance_uid: str
    sop_class_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    transfer_syntax_uid: str
    modality: str | None = None
    study_date: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    #: Values of the ``extra_tags`` asked for, keyed as asked; absent tags are left out.
    extra: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _PHI_FIELDS and value is not None:
                shown.append(f"{f.name}=<hidden>")
            elif f.name == "extra":
                shown.append(f"extra=<{len(value)} hidden: {', '.join(sorted(value))}>")
            else:
                shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"


# --- tags -------------------------------------------------------------------------------

_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_STUDY_DATE = 0x00080020
_ACCESSION = 0x00080050
_MODALITY = 0x00080060
_PATIENT_ID = 0x00100020
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_SERIES_NUMBER = 0x00200011
_INSTANCE_NUMBER = 0x00200013
_IDENTITY_TAGS: Final = (
    _SOP_CLASS, _SOP_INSTANCE, _STUDY_DATE, _ACCESSION, _MODALITY, _PATIENT_ID,
    _STUDY_UID, _SERIES_UID, _SERIES_NUMBER, _INSTANCE_NUMBER,
)  # fmt: skip
_PIXEL_TAGS: Final = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_HEX_TAG = re.compile(r"\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?")

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"


def _resolve_tag(name: str) -> int:
    """A keyword (``PatientName``) or hex tag (``0010,0010``, ``(0010,0010)``, ``00100010``)."""
    tag = tag_for_keyword(name)
    if tag is None:
        match = _HEX_TAG.fullmatch(name.strip())
        if match is None:
            raise UsageError(
                f"'{name}' is not a DICOM keyword or tag",
                hint="use a keyword such as PatientName or a tag such as 0010,0010",
            )
        tag = int(match[1] + match[2], 16)
    if tag >> 16 in (0x0002, 0x7FE0) or tag >> 16 == 0xFFFE:
        raise UsageError(f"'{name}' is not an element of the dataset header")
    try:
        if dictionary_VR(tag) == "SQ":
            raise UsageError(f"'{name}' is a sequence; only single-valued elements can be read")
    except KeyError:
        pass  # private or unknown: read as found
    return tag


# --- parsing ----------------------------------------------------------------------------


class _NeedMore(Exception):
    """The data ended before the header did; read more of the object."""


def _first_group_plausible(buf: bytes) -> bool:
    """Whether data without a DICM marker may still begin a dataset or a file meta group.

    Every composite instance has a SOP Class UID (0008,0016), so its first group is at most
    0008 (command 0000, file meta 0002, directory 0004, identifying 0008), in either byte order.
    """
    if len(buf) < 8:
        return False
    little, big = struct.unpack("<H", buf[:2])[0], struct.unpack(">H", buf[:2])[0]
    return little in (0, 2, 4, 8) or big in (0, 2, 4, 8)


def _text(value: Any) -> str:
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _parse(buf: bytes, *, complete: bool, tags: Sequence[tuple[str, int]], policy: Policy) -> DicomIdentity:
    """The identity in ``buf``; ``complete`` tells whether ``buf`` is the whole object.

    Raises _NeedMore when ``buf`` is only a head and ended before the header did.
    """
    return _parse_guarded(buf, complete=complete, tags=tags, policy=policy, whole=False)[0]


def _parse_guarded(
    buf: bytes, *, complete: bool, tags: Sequence[tuple[str, int]], policy: Policy, whole: bool
) -> tuple[DicomIdentity, Dataset, int]:
    try:
        return _parse_header(buf, complete=complete, tags=tags, policy=policy, whole=whole)
    except (DicomFormatError, _NeedMore):
        raise
    except Exception as exc:
        # pydicom converts raw elements lazily: garbage can still fail after the read, in any way
        # (NotImplementedError on a corrupt file meta, for one). The message may hold values: dropped.
        raise DicomFormatError(REASON_UNREADABLE, detail=type(exc).__name__) from None


def _parse_header(
    buf: bytes, *, complete: bool, tags: Sequence[tuple[str, int]], policy: Policy, whole: bool
) -> tuple[DicomIdentity, Dataset, int]:
    """The identity, the dataset read and the offset where reading stopped. ``whole``: read every
    element up to the pixel data (for a caller that needs the whole header), not only the wanted ones."""
    strict = policy == "strict"
    if not buf:
        raise DicomFormatError(REASON_EMPTY)
    part10 = len(buf) >= 132 and buf[128:132] == b"DICM"
    if not part10:
        if len(buf) < 132 and not complete:
            raise _NeedMore
        if strict or not _first_group_plausible(buf):
            raise DicomFormatError(
                REASON_NO_DICM, hint="a Part 10 file starts with a 128-byte preamble and 'DICM'"
            )

    wanted = {t for _, t in tags} | set(_IDENTITY_TAGS)
    last_wanted = max(wanted)

    last_seen = [0]  # the highest top-level tag met: tells "ended early" from "absent"

    def stop_when(tag: BaseTag, vr: str | None, length: int) -> bool:
        t = int(tag)  # BaseTag compares in Python: plain ints keep this hot path cheap
        if t > last_seen[0]:
            last_seen[0] = t
        return (t > last_wanted and not whole) or t in _PIXEL_TAGS

    fp = BytesIO(buf)
    try:
        ds = read_partial(fp, stop_when, force=not part10, specific_tags=None if whole else sorted(wanted))
    except (EOFError, struct.error, zlib.error) as exc:
        if not complete:
            raise _NeedMore from None
        reason = REASON_TRUNCATED if part10 else REASON_NO_DICM
        raise DicomFormatError(reason, detail=type(exc).__name__) from None
    except InvalidDicomError:
        raise DicomFormatError(REASON_NO_DICM) from None
    except Exception as exc:  # pydicom's many ways of failing on garbage; messages may hold values
        if not complete:
            raise _NeedMore from None
        reason = REASON_UNREADABLE if part10 else REASON_NO_DICM
        raise DicomFormatError(reason, detail=type(exc).__name__) from None

    end = fp.tell()
    stopped = end < len(buf)  # rewound to the element that ended the header
    if not stopped and not complete:
        raise _NeedMore
    truncated = fp.tell() > len(buf)  # an element that was skipped ran past the end
    meta_length = ds.file_meta.get("FileMetaInformationGroupLength")
    if part10 and isinstance(meta_length, int) and 132 + 12 + meta_length > len(buf):
        raise DicomFormatError(REASON_TRUNCATED, detail="in the file meta")
    if not stopped and last_seen[0] < _SERIES_UID:
        # The data ended before the identity elements were passed: cut, not merely incomplete.
        raise DicomFormatError(REASON_TRUNCATED if part10 else REASON_NO_DICM)

    def raw_ok(tag: int) -> bool:
        if tag not in ds:
            return False
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement) and elem.length != 0xFFFFFFFF:
            value = elem.value or b""
            if len(value) < elem.length:
                return False
        return True

    cut = [truncated]  # set when a wanted element turns out cut short

    def get(tag: int) -> Any:
        if tag not in ds:
            return None
        if not raw_ok(tag):
            cut[0] = True
            return None
        try:
            return ds[tag].value
        except Exception as exc:  # a value pydicom cannot convert
            if strict:
                raise DicomFormatError(
                    REASON_UNREADABLE, detail=f"element {BaseTag(tag)}: {type(exc).__name__}"
                ) from None
            return None

    def text(tag: int) -> str | None:
        value = get(tag)
        if value is None or value == "":
            return None
        return _text(value).strip() or None

    def number(tag: int, name: str) -> int | None:
        value = get(tag)
        if value is None or value == "":
            return None
        if isinstance(value, MultiValue):
            value = value[0] if len(value) else None
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            if strict:
                raise DicomFormatError(REASON_BAD_NUMBER, detail=name) from None
            return None

    meta = ds.file_meta
    meta_sop = meta.get("MediaStorageSOPInstanceUID")
    meta_class = meta.get("MediaStorageSOPClassUID")
    sop_instance = text(_SOP_INSTANCE)
    sop_class = text(_SOP_CLASS)
    study = text(_STUDY_UID)
    series = text(_SERIES_UID)
    if not strict:
        sop_instance = sop_instance or (str(meta_sop).strip() or None if meta_sop else None)
        sop_class = sop_class or (str(meta_class).strip() or None if meta_class else None)

    if strict and cut[0]:
        raise DicomFormatError(REASON_TRUNCATED)
    if sop_instance is None:
        if not part10:
            raise DicomFormatError(REASON_NO_DICM, detail="and no SOP Instance UID in the data")
        if cut[0]:
            raise DicomFormatError(REASON_TRUNCATED)
        raise DicomFormatError(REASON_NO_SOP_INSTANCE)
    if strict:
        for value, reason in (
            (sop_class, REASON_NO_SOP_CLASS),
            (study, REASON_NO_STUDY),
            (series, REASON_NO_SERIES),
        ):
            if value is None:
                raise DicomFormatError(reason)
        for value, name in (
            (sop_instance, "SOP Instance UID"),
            (sop_class, "SOP Class UID"),
            (study, "Study Instance UID"),
            (series, "Series Instance UID"),
        ):
            if value is not None and not UID(value).is_valid:
                raise DicomFormatError(REASON_BAD_UID, detail=name)
        if meta_sop is not None and str(meta_sop).strip() != sop_instance:
            raise DicomFormatError(REASON_META_MISMATCH)

    syntax = meta.get("TransferSyntaxUID")
    if syntax:
        transfer_syntax = str(syntax).strip()
    elif ds.is_implicit_VR:  # no file meta: the encoding pydicom found
        transfer_syntax = _IMPLICIT_LE
    else:
        transfer_syntax = _EXPLICIT_LE if ds.is_little_endian else _EXPLICIT_BE

    extra: dict[str, str] = {}
    for name, tag in tags:
        value = get(tag)
        if value is not None:
            extra[name] = _text(value)
    if strict and cut[0]:
        raise DicomFormatError(REASON_TRUNCATED)

    identity = DicomIdentity(
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid=transfer_syntax,
        modality=text(_MODALITY),
        study_date=text(_STUDY_DATE),
        patient_id=text(_PATIENT_ID),
        accession_number=text(_ACCESSION),
        series_number=number(_SERIES_NUMBER, "Series Number"),
        instance_number=number(_INSTANCE_NUMBER, "Instance Number"),
        extra=MappingProxyType(extra),
    )
    return identity, ds, end


def _check_policy(policy: str) -> None:
    if policy not in ("strict", "lenient"):
        raise UsageError(f"unknown DICOM reading policy '{policy}'", hint="use strict or lenient")


def _check_sizes(first_read: int, max_read: int) -> None:
    if first_read < 256 or max_read < first_read:
        raise UsageError("first_read must be at least 256 bytes and max_read at least first_read")


def _tags(extra_tags: Sequence[str]) -> list[tuple[str, int]]:
    if isinstance(extra_tags, str):
        raise UsageError("extra_tags is a sequence of keywords or tags, not one string")
    return [(name, _resolve_tag(name)) for name in extra_tags]


# --- public API -------------------------------------------------------------------------


def read_identity(
    data: bytes | bytearray | memoryview,
    *,
    extra_tags: Sequence[str] = (),
    policy: Policy = "lenient",
) -> DicomIdentity:
    """The identity of the DICOM object whose bytes (or whose whole header) are ``data``.

    ``data`` is taken as the complete object: a header cut short is ``REASON_TRUNCATED``.
    Raises DicomFormatError per ``policy`` (see the module docs), UsageError for bad arguments.
    """
    _check_policy(policy)
    return _parse(bytes(data), complete=True, tags=_tags(extra_tags), policy=policy)


def read_header_strict(data: bytes) -> tuple[DicomIdentity, Dataset, int]:
    """One read of a whole Part 10 instance's header, under the ``strict`` policy: its identity,
    the dataset up to the pixel data (file meta included), and the offset of the element that
    stopped the reading (the pixel data, or the end). For callers that need both the identity and
    the whole header without parsing the object twice."""
    return _parse_guarded(data, complete=True, tags=(), policy="strict", whole=True)


def _grow(size: int, first_read: int, max_read: int) -> list[int]:
    """The successive read lengths: ``first_read`` doubling up to ``max_read`` or ``size``."""
    lengths, n = [], min(first_read, size)
    while True:
        lengths.append(n)
        if n >= size or n >= max_read:
            return lengths
        n = min(n * 2, max_read, size)


async def read_identity_from_store(
    store: Store,
    key: str,
    *,
    extra_tags: Sequence[str] = (),
    policy: Policy = "lenient",
    first_read: int = 64 * 1024,
    max_read: int = 8 * 1024 * 1024,
    size: int | None = None,
) -> DicomIdentity:
    """The identity of the object at ``key``, from ranged reads of its head.

    Reads ``first_read`` bytes (the whole object when smaller), and only if the header runs
    past them reads again twice as much, up to ``max_read``. ``size`` saves a ``stat`` when the
    caller knows it from a listing. A header longer than ``max_read`` is ``REASON_TOO_LONG``.
    """
    _check_policy(policy)
    _check_sizes(first_read, max_read)
    tags = _tags(extra_tags)
    if size is None:
        size = (await store.stat(key)).size
    for n in _grow(size, first_read, max_read):
        buf = bytes(await store.get_range(key, 0, n)) if n else b""
        try:
            return _parse(buf, complete=n >= size, tags=tags, policy=policy)
        except _NeedMore:
            continue
    raise DicomFormatError(
        REASON_TOO_LONG, detail=f"{max_read} bytes", hint="raise max_read if such headers are expected"
    )


def read_identity_from_file(
    path: str | Path,
    *,
    extra_tags: Sequence[str] = (),
    policy: Policy = "lenient",
    first_read: int = 64 * 1024,
    max_read: int = 8 * 1024 * 1024,
) -> DicomIdentity:
    """The identity of a local file, reading only its head (as :func:`read_identity_from_store`)."""
    _check_policy(policy)
    _check_sizes(first_read, max_read)
    tags = _tags(extra_tags)
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            for n in _grow(size, first_read, max_read):
                f.seek(0)
                buf = f.read(n)
                try:
                    return _parse(buf, complete=len(buf) >= size, tags=tags, policy=policy)
                except _NeedMore:
                    continue
    except FileNotFoundError as exc:
        raise NotFoundError(f"no such file: {path}") from exc
    raise DicomFormatError(
        REASON_TOO_LONG, detail=f"{max_read} bytes", hint="raise max_read if such headers are expected"
    )
