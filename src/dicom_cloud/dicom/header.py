"""Reading the identity of a DICOM Part 10 object from its header only, never its pixels.

One explicit policy decides what malformed input is accepted (the pydicom way, with one
switch instead of scattered try/excepts):

``strict``
    The object must be Part 10: a 128-byte preamble followed by ``DICM`` and a file meta
    group; the four identity UIDs (SOP Class, SOP Instance, Study, Series) must be present
    and valid UIDs; a requested element cut short by the end of the data is an error. A file
    meta whose Media Storage SOP Instance UID differs from the dataset's is reported
    (``DicomIdentity.meta_mismatch``), not refused: the dataset's UID is the instance's identity,
    as in every DICOM archive (pydicom's own ``rtplan.dcm`` is such a file).
``lenient`` (default)
    Also accepts a bare dataset without preamble or file meta (read as pydicom's
    ``force=True``), as long as it still yields a SOP Instance UID. Missing Study/Series UIDs
    become ``None``; an unreadable or truncated optional element becomes ``None``.

Failures raise :class:`DicomFormatError`, whose ``reason`` is one of the ``REASON_*`` strings
below. Messages never contain element values: identities carry patient data (PHI).

pydicom's own warnings about a header (a VR it had to guess, a value it finds invalid) are not
printed as raw ``UserWarning`` lines: each becomes a debug message of this module naming the file
or object, its quoted values masked (they may be patient data); ``-v`` shows them.

Only the head of an object is read. Elements are stored in ascending tag order, so reading
stops at the first top-level element after the last wanted tag, or at the pixel data, or at an
element out of order (the header has ended: what follows is not a header, e.g. a run of zero
bytes, which would otherwise parse as one 8-byte element after another at about a second per
megabyte). Every reader parses a prefix of ``first_read`` bytes and doubles it only while the
parser runs out of data before such a stopping point, never past ``max_read``: the cost of a
header read is bounded whatever the object's size.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
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
from ..names import printable
from ..store import Store

__all__ = [
    "DicomFormatError",
    "DicomIdentity",
    "Policy",
    "check_element_order",
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
#: Not a refusal: the text of the warning about ``DicomIdentity.meta_mismatch``.
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
    #: The file meta names another SOP Instance UID (Media Storage SOP Instance UID) than the
    #: dataset, whose UID is the one above.
    meta_mismatch: bool = False

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
_DEFLATED_LE = "1.2.840.10008.1.2.1.99"


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


#: Explicit VRs whose length field has 4 bytes (after 2 reserved ones), as in the file meta.
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


def _dataset_start(buf: bytes, part10: bool) -> int:
    """Where pydicom starts reading after the preamble and the file meta group (explicit VR LE)."""
    return _file_meta(buf, 132 if part10 else 0)[0]


def _file_meta(buf: bytes | memoryview, position: int) -> tuple[int, str | None]:
    """The end of the file meta group (explicit VR little endian) starting at ``position``, and
    the Transfer Syntax UID it names."""
    syntax = None
    while position + 8 <= len(buf) and buf[position : position + 2] == b"\x02\x00":
        if bytes(buf[position + 4 : position + 6]) in _LONG_VRS:
            if position + 12 > len(buf):
                break
            (length,) = struct.unpack_from("<L", buf, position + 8)
            header = 12
        else:
            (length,) = struct.unpack_from("<H", buf, position + 6)
            header = 8
        if buf[position + 2 : position + 4] == b"\x10\x00":  # (0002,0010) Transfer Syntax UID
            syntax = (
                bytes(buf[position + header : position + header + length])
                .strip(b"\x00 ")
                .decode("ascii", "replace")
            )
        position += header + length
    return position, syntax


def _check_command_group(buf: bytes, position: int, reason: str) -> None:
    """Refuse a command group (0000,eeee) with elements out of order where the dataset begins.

    pydicom reads such a group element by element before the dataset, out of reach of
    ``stop_when``; a run of zero bytes is one, of 8-byte elements (0000,0000), and used to cost
    about a second per megabyte. Command elements are implicit VR little endian, in order.
    """
    previous = -1
    while position + 8 <= len(buf):
        group, element, length = struct.unpack("<HHL", buf[position : position + 8])
        if group != 0:
            return
        if element <= previous:
            raise DicomFormatError(reason, detail="elements out of order")
        if length == 0xFFFFFFFF:
            return
        previous = element
        position += 8 + length


def check_element_order(data: bytes | bytearray | memoryview, *, max_read: int = 8 * 1024 * 1024) -> bool:
    """Refuse a Part 10 object whose top-level elements are out of order before its pixel data.

    Junk after a valid header (zero bytes, repeated elements) is read by pydicom element after
    element, at more than a second per megabyte; DICOM stores elements in ascending tag order
    (PS3.5 7.1), so such data is refused here first, at the cost of one step per top-level
    element of the first ``max_read`` bytes, no value read. Elements of undefined length, an
    unknown encoding and deflated datasets end the walk (nothing is refused then). Raises
    DicomFormatError (``REASON_UNREADABLE``); objects that are not Part 10 are left to the parser.
    Returns False when ``data`` ended before the walk did (given only a head: check more of it).
    """
    view = memoryview(data)[:max_read]
    if len(view) < 132 or bytes(view[128:132]) != b"DICM":
        return len(view) >= 132
    position, syntax = _file_meta(view, 132)
    if syntax == _DEFLATED_LE:
        return True  # the dataset is compressed: nothing to walk
    implicit = syntax == _IMPLICIT_LE
    order = ">" if syntax == _EXPLICIT_BE else "<"
    previous = -1
    while position + 8 <= len(view):
        group, element = struct.unpack_from(order + "HH", view, position)
        tag = group << 16 | element
        if tag in _PIXEL_TAGS:
            return True
        if tag <= previous:
            raise DicomFormatError(REASON_UNREADABLE, detail="elements out of order")
        previous = tag
        if implicit:
            (length,) = struct.unpack_from(order + "L", view, position + 4)
            header = 8
        else:
            vr = bytes(view[position + 4 : position + 6])
            if not (vr.isalpha() and vr.isupper()):
                return True  # some writers switch encodings: leave it to the parser
            if vr in _LONG_VRS:
                if position + 12 > len(view):
                    return False
                (length,) = struct.unpack_from(order + "L", view, position + 8)
                header = 12
            else:
                (length,) = struct.unpack_from(order + "H", view, position + 6)
                header = 8
        if length == 0xFFFFFFFF:
            return True
        position += header + length
    return False


def _text(value: Any) -> str:
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


_log = logging.getLogger(__name__)
#: The file or object whose header is being read in this thread or task, for pydicom's reports.
_reading: ContextVar[str | None] = ContextVar("dicom_header_reading", default=None)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


class _PydicomReports(logging.Filter):
    """pydicom reports each warning twice: a record of its "pydicom" logger and a ``UserWarning``
    (pydicom.misc.warn_and_log). While a header is read here, the record becomes a debug message
    of ours naming the file, and goes no further; the ``UserWarning`` copies are ignored."""

    def filter(self, record: logging.LogRecord) -> bool:
        source = _reading.get()
        if source is None:
            return True  # pydicom used elsewhere in the process: left as it is
        if record.levelno >= logging.WARNING:
            # Quoted parts are element values (names, dates...): never logged.
            _log.debug("%s: pydicom: %s", printable(source), _QUOTED.sub("'...'", record.getMessage()))
        return False


logging.getLogger("pydicom").addFilter(_PydicomReports())
# The UserWarning copy of each report (the record above carries the same message): not printed.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?")


@contextmanager
def _reporting_as(source: str) -> Iterator[None]:
    token = _reading.set(source)
    try:
        yield
    finally:
        _reading.reset(token)


def _parse(
    buf: bytes, *, complete: bool, tags: Sequence[tuple[str, int]], policy: Policy, source: str
) -> DicomIdentity:
    """The identity in ``buf``; ``complete`` tells whether ``buf`` is the whole object; ``source``
    names it in pydicom's reports.

    Raises _NeedMore when ``buf`` is only a head and ended before the header did.
    """
    return _parse_guarded(buf, complete=complete, tags=tags, policy=policy, whole=False, source=source)[0]


def _parse_guarded(
    buf: bytes,
    *,
    complete: bool,
    tags: Sequence[tuple[str, int]],
    policy: Policy,
    whole: bool,
    source: str,
) -> tuple[DicomIdentity, Dataset, int]:
    try:
        with _reporting_as(source):
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

    _check_command_group(buf, _dataset_start(buf, part10), REASON_UNREADABLE if part10 else REASON_NO_DICM)

    last_seen = [-1]  # the highest top-level tag met: tells "ended early" from "absent"
    repeats = [0]

    def stop_when(tag: BaseTag, vr: str | None, length: int) -> bool:
        t = int(tag)  # BaseTag compares in Python: plain ints keep this hot path cheap
        if t <= last_seen[0]:
            # pydicom asks twice about the first element when it checks the VR encoding; any
            # other repeat, or a smaller tag, means the header has ended and junk follows.
            repeats[0] += 1
            return t < last_seen[0] or repeats[0] > 1
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
        meta_mismatch=bool(meta_sop) and str(meta_sop).strip("\0 ") != sop_instance,
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
    source: str = "a DICOM instance in memory",
    first_read: int = 64 * 1024,
    max_read: int = 8 * 1024 * 1024,
    size: int | None = None,
) -> DicomIdentity:
    """The identity of the DICOM object whose bytes (or whose whole header) are ``data``.

    ``data`` is taken as the complete object (a header cut short is ``REASON_TRUNCATED``), or as
    the first bytes of an object of ``size`` bytes. Only a prefix is parsed, as by
    :func:`read_identity_from_store`: a header longer than ``max_read`` (or than ``data``, when
    only the head is given) is ``REASON_TOO_LONG``. CPU-bound (milliseconds for real headers, up
    to about half a second per megabyte of ``max_read`` for crafted ones): call it from a worker
    thread in async code.
    Raises DicomFormatError per ``policy`` (see the module docs), UsageError for bad arguments.
    ``source`` names the object in debug messages.
    """
    _check_policy(policy)
    _check_sizes(first_read, max_read)
    tags = _tags(extra_tags)
    view = memoryview(data)
    whole = len(view) if size is None else max(size, len(view))
    for n in _grow(len(view), first_read, max_read):
        try:
            return _parse(bytes(view[:n]), complete=n >= whole, tags=tags, policy=policy, source=source)
        except _NeedMore:
            continue
    raise DicomFormatError(
        REASON_TOO_LONG, detail=f"{max_read} bytes", hint="raise max_read if such headers are expected"
    )


def read_header_strict(
    data: bytes, source: str = "a DICOM instance in memory"
) -> tuple[DicomIdentity, Dataset, int]:
    """One read of a whole Part 10 instance's header, under the ``strict`` policy: its identity,
    the dataset up to the pixel data (file meta included), and the offset of the element that
    stopped the reading (the pixel data, or the end). For callers that need both the identity and
    the whole header without parsing the object twice. ``source`` names it in pydicom's reports."""
    return _parse_guarded(data, complete=True, tags=(), policy="strict", whole=True, source=source)


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
            # Parsing is CPU work: in a worker thread, so the event loop keeps answering.
            return await asyncio.to_thread(
                _parse, buf, complete=n >= size, tags=tags, policy=policy, source=store.url(key)
            )
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
                    return _parse(buf, complete=len(buf) >= size, tags=tags, policy=policy, source=str(path))
                except _NeedMore:
                    continue
    except FileNotFoundError as exc:
        raise NotFoundError(f"no such file: {path}") from exc
    raise DicomFormatError(
        REASON_TOO_LONG, detail=f"{max_read} bytes", hint="raise max_read if such headers are expected"
    )
