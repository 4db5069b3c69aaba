"""A reader of our own for the common shape of an instance's header, beside pydicom.

Reading a small instance with pydicom, checking it and building its DICOM JSON costs about a
millisecond of CPU, most of it pydicom's general machinery (element objects, lazy conversion,
validation hooks). Most instances that reach the archive are plain: explicit VR little endian
(or an encapsulated syntax), ASCII text, sequences of defined or undefined length.
:func:`read_plain` walks such a header once, checks each value as pydicom's strict reading
would, and gives the DICOM JSON and the values pydicom would give.

Its rule is to answer only when sure: anything outside that shape (another encoding, an
unknown or UN VR, a value pydicom would refuse or convert in its own way, a character outside
ASCII, sequences nested deeper than eight levels) makes it
return None, and the caller reads the instance with pydicom as before. So the outcome for an
instance (stored or refused, its sidecar, its index values) does not depend on which reader ran.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass
from struct import Struct, unpack_from
from typing import Any, Final

#: Element values: text as pydicom decodes it (``str``, or a list when multi-valued), numbers
#: as ``int``/``float`` (or a list), binary data as ``bytes``.
Value = str | int | float | bytes | list[Any] | None

_EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
#: Transfer syntaxes whose dataset is explicit VR little endian (the pixel data may be
#: encapsulated; it is never read here): explicit VR little endian and the compressed ones.
_PLAIN_SYNTAXES: Final = frozenset(
    {
        _EXPLICIT_LE,
        "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.5",
    }
)  # fmt: skip
_PIXEL_TAGS: Final = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_CHARACTER_SET: Final = 0x00080005
_ITEM_DELIMITATION: Final = 0xFFFEE00D
#: Character sets under which ASCII text decodes as ASCII (absent: the default repertoire).
_ASCII_COMPATIBLE_SETS: Final = frozenset({"ISO_IR 100", "ISO_IR 192"})

#: VRs with a 4-byte length in explicit VR (PS3.5 7.1.2).
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
#: VRs of file meta elements (PS3.10 7.1).
_META_VRS: Final = frozenset({b"UL", b"OB", b"UI", b"SH", b"AE", b"UR"})
#: Binary VRs: their JSON is InlineBinary or a BulkDataURI.
_BINARY_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
#: Numbers in binary: struct format of one value.
_NUMBER_VRS: Final = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "UV": "Q", "SV": "q", "FL": "f", "FD": "d"}
_ONE_NUMBER: Final = {vr: Struct("<" + code) for vr, code in _NUMBER_VRS.items()}
#: Text split at backslashes, the whole value stripped of trailing spaces and NULs first.
_SPLIT_VRS: Final = frozenset({"AS", "CS", "DA", "DT", "TM", "UI"})
#: Text split at backslashes, each value stripped of trailing spaces and NULs (and its length
#: checked before, as pydicom's reading does).
_SPLIT_EACH_VRS: Final = frozenset({"LO", "SH", "UC"})
#: Text never split (backslash is a character), stripped of trailing spaces and NULs.
_SINGLE_VRS: Final = frozenset({"LT", "ST", "UT"})
#: What pydicom's reading checks the length of (in characters, before stripping).
_MAX_LENGTHS: Final = {"LO": 64, "SH": 16, "LT": 10240, "ST": 1024, "DS": 16, "IS": 12}
_DS: Final = re.compile(r" *[+\-]?(\d+|\d+\.\d*|\.\d+)([eE][+\-]?\d+)? *")
_IS: Final = re.compile(r" *[+\-]?\d+ *")
_UID: Final = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
#: Bytes that send a value to pydicom: outside ASCII, or an ISO 2022 escape.
_NOT_PLAIN_TEXT: Final = re.compile(rb"[^\x00-\x1a\x1c-\x7f]")
#: Binary values longer than this (3/4 of the 1024-byte base64 threshold) go to bulk data.
_INLINE_LIMIT: Final = (1024 // 4) * 3


@dataclass(frozen=True)
class PlainHeader:
    """What :func:`read_plain` read: the file meta values it needs, the dataset's elements up to
    the pixel data, the DICOM JSON of those elements, and where the pixel data begins."""

    transfer_syntax_uid: str
    media_sop_instance_uid: str | None
    #: tag -> (VR, value as pydicom gives it)
    elements: dict[int, tuple[str, Value]]
    #: The dataset as DICOM JSON, without file meta and without the pixel data element.
    json: dict[str, Any]
    #: Offset of the element that ended the reading (the pixel data), or the data's length.
    end: int


def read_plain(data: bytes) -> PlainHeader | None:
    """The header of Part 10 instance ``data`` (preamble and ``DICM`` already checked), or None
    when it is not of the plain shape this reader answers for (see the module's docs)."""
    try:
        return _read(data)
    except (_NotPlain, UnicodeDecodeError, ValueError, OverflowError):
        return None


class _NotPlain(Exception):
    """The header leaves the shape read here: pydicom reads it."""


def _read(data: bytes) -> PlainHeader | None:
    size = len(data)
    # File meta: explicit VR little endian, opened by its group length.
    if size < 144 or data[132:138] != b"\x02\x00\x00\x00UL" or data[138:140] != b"\x04\x00":
        return None
    (meta_length,) = unpack_from("<L", data, 140)
    meta_end = 144 + meta_length
    if meta_end > size:
        return None
    position, syntax, media_sop = 144, None, None
    while position < meta_end:
        group, element = unpack_from("<HH", data, position)
        vr_bytes = data[position + 4 : position + 6]
        if group != 2 or vr_bytes not in _META_VRS:
            return None
        if vr_bytes in _LONG_VRS:
            (length,) = unpack_from("<L", data, position + 8)
            position += 12
        else:
            (length,) = unpack_from("<H", data, position + 6)
            position += 8
        if length == 0xFFFFFFFF or position + length > meta_end:
            return None
        if element in (0x0003, 0x0010):
            if vr_bytes != b"UI":
                return None
            text = data[position : position + length].decode("ascii").rstrip("\x00 ")
            if "\\" in text:
                return None
            if element == 0x0010:
                syntax = text
            else:
                media_sop = text
        position += length
    if position != meta_end or syntax is None or syntax.strip() not in _PLAIN_SYNTAXES:
        return None
    if position + 2 <= size and data[position : position + 2] == b"\x02\x00":
        return None  # file meta elements past its stated length: pydicom reads them on

    elements: dict[int, tuple[str, Value]] = {}
    out: dict[str, Any] = {}
    end = _dataset(data, position, size, elements, out, depth=0)
    return PlainHeader(syntax.strip(), media_sop, elements, out, end)


#: Deepest nesting of sequences read here (deeper ones are left to pydicom).
_MAX_DEPTH: Final = 8


def _dataset(
    data: bytes,
    position: int,
    end: int,
    elements: dict[int, tuple[str, Value]],
    out: dict[str, Any],
    *,
    depth: int,
) -> int:
    """Read the elements from ``position`` up to ``end``: the dataset's (``depth`` 0; stops at
    the pixel data) or an item's (stops at its delimitation item, if any); their values into
    ``elements``, their JSON into ``out``. Returns where the reading stopped: at the pixel data
    or ``end``, or, negated, past an item's delimitation item."""
    previous = -1
    while position < end:
        if position + 8 > end:
            raise _NotPlain
        group, number = unpack_from("<HH", data, position)
        tag = group << 16 | number
        if depth and tag == _ITEM_DELIMITATION:
            if unpack_from("<L", data, position + 4)[0] != 0:
                raise _NotPlain
            return -(position + 8)  # negative: ended by its delimitation item
        if not depth and tag in _PIXEL_TAGS:
            return position
        if tag <= previous or group < 0x0008 or group == 0xFFFE:
            raise _NotPlain
        previous = tag
        vr_bytes = data[position + 4 : position + 6]
        if vr_bytes in _LONG_VRS:
            if position + 12 > end:
                raise _NotPlain
            (length,) = unpack_from("<L", data, position + 8)
            start = position + 12
        else:
            (length,) = unpack_from("<H", data, position + 6)
            start = position + 8
        vr = vr_bytes.decode("ascii")
        if vr == "SQ":
            items, position = _sequence(data, start, length, end, depth + 1)
            value: Value = None
            entry: dict[str, Any] = {"vr": vr, "Value": items}
        else:
            if length == 0xFFFFFFFF or start + length > end:
                raise _NotPlain
            position = start + length
            value, entry = _element(tag, vr, data[start:position])
        elements[tag] = (vr, value)
        out[f"{tag:08X}"] = entry
        if tag == _CHARACTER_SET and (vr != "CS" or _character_sets(value) - _ASCII_COMPATIBLE_SETS):
            raise _NotPlain
    if position != end:
        raise _NotPlain
    return position


def _sequence(
    data: bytes, start: int, length: int, limit: int, depth: int
) -> tuple[list[dict[str, Any]], int]:
    """The JSON of the items of a sequence whose value begins at ``start``, and where it ends."""
    if depth > _MAX_DEPTH:
        raise _NotPlain
    undefined = length == 0xFFFFFFFF
    end = limit if undefined else start + length
    if end > limit:
        raise _NotPlain
    position = start
    items: list[dict[str, Any]] = []
    while position < end:
        if position + 8 > end:
            raise _NotPlain
        tag = unpack_from("<HH", data, position)
        (item_length,) = unpack_from("<L", data, position + 4)
        position += 8
        if tag == (0xFFFE, 0xE0DD) and undefined:  # the sequence's delimitation item
            if item_length != 0:
                raise _NotPlain
            return items, position
        if tag != (0xFFFE, 0xE000):
            raise _NotPlain
        item: dict[str, Any] = {}
        if item_length == 0xFFFFFFFF:
            stopped = _dataset(data, position, end, {}, item, depth=depth)
            if stopped >= 0:
                raise _NotPlain  # no delimitation item
            position = -stopped
        else:
            if position + item_length > end:
                raise _NotPlain
            position = _dataset(data, position, position + item_length, {}, item, depth=depth)
        items.append(item)
    if undefined or position != end:
        raise _NotPlain
    return items, position


def _character_sets(value: Value) -> set[str]:
    return {str(item) for item in value} if isinstance(value, list) else {str(value)} if value else set()


def _element(tag: int, vr: str, raw: bytes) -> tuple[Value, dict[str, Any]]:
    """One element's value as pydicom gives it and its DICOM JSON (PS3.18 F.2)."""
    if vr in _BINARY_VRS:
        if not raw:
            return raw, {"vr": vr}
        if len(raw) > _INLINE_LIMIT:
            return raw, {"vr": vr, "BulkDataURI": f"bulkdata/{tag:08X}"}
        return raw, {"vr": vr, "InlineBinary": base64.b64encode(raw).decode("ascii")}
    if vr in _NUMBER_VRS:
        return _numbers(vr, raw)
    if _NOT_PLAIN_TEXT.search(raw):
        raise _NotPlain
    text = raw.decode("ascii")
    if vr in _SPLIT_VRS:
        items = text.rstrip(" \x00").split("\\")
        if vr == "UI" and not all(len(item) <= 64 and _UID.fullmatch(item) for item in items):
            raise _NotPlain  # pydicom's strict reading leaves an invalid UID out of the JSON
        return _listed(vr, items)
    if vr in _SPLIT_EACH_VRS:
        limit = _MAX_LENGTHS.get(vr)
        items = text.split("\\")
        if limit is not None and any(len(item) > limit for item in items):
            raise _NotPlain  # pydicom's strict reading leaves such an element out of the JSON
        return _listed(vr, [item.rstrip("\x00 ") for item in items])
    if vr in _SINGLE_VRS:
        limit = _MAX_LENGTHS.get(vr)
        if limit is not None and len(text) > limit:
            raise _NotPlain
        single = text.rstrip("\x00 ")
        return single, ({"vr": vr, "Value": [single]} if single else {"vr": vr})
    if vr == "PN":
        return _person_names(text)
    if vr == "AE":
        if "\x00" in text:
            raise _NotPlain
        return _listed(vr, [item.strip() for item in text.split("\\")])
    if vr == "UR":
        single = text.rstrip()
        return single, ({"vr": vr, "Value": [single]} if single else {"vr": vr})
    if vr == "IS":
        return _integer_strings(text)
    if vr == "DS":
        return _decimal_strings(text)
    raise _NotPlain  # SQ, UN, AT and anything unknown


def _listed(vr: str, items: list[str]) -> tuple[Value, dict[str, Any]]:
    if len(items) == 1:
        single = items[0]
        return single, ({"vr": vr, "Value": [single]} if single else {"vr": vr})
    if not all(items):
        raise _NotPlain  # empty values inside a multi-valued element: left to pydicom
    return items, {"vr": vr, "Value": items}


def _numbers(vr: str, raw: bytes) -> tuple[Value, dict[str, Any]]:
    if not raw:
        return None, {"vr": vr}  # pydicom's empty value for numbers
    one = _ONE_NUMBER[vr]
    if len(raw) == one.size:  # the common case: one value
        (single,) = one.unpack(raw)
        return single, {"vr": vr, "Value": [single]}
    count, rest = divmod(len(raw), one.size)
    if rest:
        raise _NotPlain
    values = list(unpack_from(f"<{count}{_NUMBER_VRS[vr]}", raw))
    return values, {"vr": vr, "Value": values}


def _person_names(text: str) -> tuple[Value, dict[str, Any]]:
    names = text.rstrip("\x00 ").split("\\")
    if not names[0] and len(names) == 1:
        return "", {"vr": "PN"}
    for name in names:
        if not name or "=" in name or len(name) > 64 or name.count("^") > 4:
            raise _NotPlain  # component groups, empty or overlong names: pydicom's rules
    value: Value = names[0] if len(names) == 1 else names
    return value, {"vr": "PN", "Value": [{"Alphabetic": name} for name in names]}


def _integer_strings(text: str) -> tuple[Value, dict[str, Any]]:
    items = text.rstrip(" \x00").split("\\")
    if len(items) == 1 and not items[0]:
        return "", {"vr": "IS"}
    numbers = []
    for item in items:
        if len(item) > _MAX_LENGTHS["IS"] or not _IS.fullmatch(item):
            raise _NotPlain
        number = int(item)
        if not -(2**31) <= number < 2**31:
            raise _NotPlain
        numbers.append(number)
    return (numbers[0] if len(numbers) == 1 else numbers), {"vr": "IS", "Value": numbers}


def _decimal_strings(text: str) -> tuple[Value, dict[str, Any]]:
    items = text.strip().rstrip(" \x00").split("\\")
    if len(items) == 1 and not items[0]:
        return "", {"vr": "DS"}
    numbers = []
    for item in items:
        if len(item) > _MAX_LENGTHS["DS"] or not _DS.fullmatch(item):
            raise _NotPlain
        number = float(item)
        if not math.isfinite(number):
            raise _NotPlain
        numbers.append(number)
    # The index reads DS values as text (pydicom keeps the original string): kept as read.
    return (items[0] if len(items) == 1 else items), {"vr": "DS", "Value": numbers}
