"""C-FIND pending responses encoded straight from the index's results and handed to the
association as P-DATA, without pynetdicom's per-message path.

Why: for every pending response pynetdicom builds a pydicom Dataset of the identifier (here from
DICOM JSON), encodes it, builds and encodes a command set Dataset, cuts both into P-DATA
primitives and fires an event; profiled (py-spy) on a C-FIND answering 100 studies, that was
about 70% of the C-FIND thread's samples, the index search about 10%. The pending responses of
one C-FIND differ only in their identifier: the command set is encoded once per request, and each
identifier is written element by element from the result's values.

The identifier bytes are those pynetdicom would send (a unit test compares both encodings); the
command and its identifier travel in one P-DATA-TF PDU when both fit in the peer's maximum PDU
length (PS3.8 9.3.5: a PDU holds one or more PDVs), else in fragments as pynetdicom cuts them.
What this encoder does not cover falls back to pydicom: transfer syntaxes other than Implicit
and Explicit VR Little Endian (:meth:`PendingSender.for_event` answers None), and values of VRs
other than text and binary integers (:class:`NotEncodable`, caught per response).
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any, Final

from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA

IMPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1"
PENDING: Final = 0xFF00
_TEXT_VRS: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_INTEGER_VRS: Final = {"US": "<H", "SS": "<h", "UL": "<I", "SL": "<i"}
#: Explicit VR: these have two reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_LENGTH_VRS: Final = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
)
_VALUE_KEYS: Final = ("Value", "InlineBinary", "BulkDataURI")
_SKIPPED: Final = (0x00080005, 0x00080052)  # written first, from the query, whatever the identifier says
_RETRIEVE_AE_TITLE: Final = 0x00080054


class NotEncodable(Exception):
    """An identifier this encoder leaves to pydicom (an uncovered VR or value)."""


def _element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", len(value)) + value
    if vr in _LONG_LENGTH_VRS:
        return head + vr.encode() + b"\x00\x00" + struct.pack("<I", len(value)) + value
    if len(value) > 0xFFFF:
        raise NotEncodable(f"a {vr} value of {len(value)} bytes")
    return head + vr.encode() + struct.pack("<H", len(value)) + value


def _person_name(value: Any) -> str:
    if not isinstance(value, dict):
        raise NotEncodable("a person name that is not a DICOM JSON object")
    groups = [str(value.get(k) or "") for k in ("Alphabetic", "Ideographic", "Phonetic")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _value(vr: str, attribute: dict[str, Any]) -> bytes:
    """The value bytes of one DICOM JSON attribute (text as UTF-8: ISO_IR 192)."""
    if any(k in attribute for k in _VALUE_KEYS[1:]):
        raise NotEncodable("binary or bulk data")
    values = attribute.get("Value")
    if not values:
        return b""
    if vr in _INTEGER_VRS:
        try:
            return b"".join(struct.pack(_INTEGER_VRS[vr], int(v)) for v in values)
        except (struct.error, TypeError, ValueError):
            raise NotEncodable(f"a {vr} value out of range") from None
    if vr not in _TEXT_VRS:
        raise NotEncodable(f"VR {vr}")
    text = _person_name if vr == "PN" else (lambda v: "" if v is None else str(v))
    return "\\".join(map(text, values)).encode("utf-8")


def identifier_bytes(
    identifier: Dataset, found: dict[str, Any], level_name: str, ae_title: str, *, implicit: bool
) -> bytes:
    """The encoded identifier of a pending C-FIND response: the Specific Character Set (UTF-8)
    and the query level, then every key of the request's ``identifier``, with the value the
    result ``found`` (DICOM JSON) has for it, empty otherwise. The same elements and bytes as
    ``find.response`` encoded by pynetdicom."""
    elements = [
        (0x00080005, _element(0x00080005, "CS", b"ISO_IR 192", implicit)),
        (0x00080052, _element(0x00080052, "CS", level_name.encode("ascii"), implicit)),
    ]
    for element in identifier:
        tag = int(element.tag)
        if tag in _SKIPPED or tag >> 16 == 0x0002:
            continue
        if tag == _RETRIEVE_AE_TITLE:
            elements.append((tag, _element(tag, "AE", ae_title.encode("ascii"), implicit)))
            continue
        vr = str(element.VR)
        attribute = found.get(f"{tag:08X}")
        if attribute is not None and vr != "SQ":
            found_vr = str(attribute.get("vr", ""))
            elements.append((tag, _element(tag, found_vr, _value(found_vr, attribute), implicit)))
        elif vr in _TEXT_VRS or vr in _INTEGER_VRS:
            elements.append((tag, _element(tag, vr, b"", implicit)))
        else:
            raise NotEncodable(f"an empty {vr} key")  # sequences among them: left to pydicom
    elements.sort(key=lambda item: item[0])
    return b"".join(encoded for _, encoded in elements)


class PendingSender:
    """Sends the pending responses of one C-FIND request on its association."""

    def __init__(self, assoc: Any, request: C_FIND, context_id: int, implicit: bool) -> None:
        self.implicit = implicit
        self._dul = assoc.dul
        self._context_id = context_id
        self._max_pdu = int(assoc.dimse.maximum_pdu_size or 0)
        if 0 < self._max_pdu < 7:
            raise NotEncodable("a maximum PDU length too small for a PDV item")  # pynetdicom refuses it too
        # The command set of every pending response to this request, encoded once (by pynetdicom).
        primitive = C_FIND()
        primitive.MessageID = request.MessageID
        primitive.MessageIDBeingRespondedTo = request.MessageID
        primitive.AffectedSOPClassUID = request.AffectedSOPClassUID
        primitive.Status = PENDING
        primitive.Identifier = BytesIO(b"\x00\x00")  # any: it marks a data set as present
        message = C_FIND_RSP()
        message.primitive_to_message(primitive)
        self._command = bytes(encode(message.command_set, True, True) or b"")
        if not self._command:
            raise NotEncodable("the C-FIND response command set")

    @classmethod
    def for_event(cls, event: Any) -> PendingSender | None:
        """A sender for an EVT_C_FIND event, or None where pynetdicom's path must send (transfer
        syntaxes other than Implicit and Explicit VR Little Endian)."""
        context = event.context
        syntax = str(context.transfer_syntax)
        if syntax not in (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN):
            return None
        try:
            return cls(
                event.assoc, event.request, int(context.context_id), syntax == IMPLICIT_VR_LITTLE_ENDIAN
            )
        except NotEncodable:
            return None

    def send(self, identifier: bytes) -> None:
        """Queue one pending response (command set, then ``identifier``) for the DUL to send."""
        context_id, limit = self._context_id, self._max_pdu
        if limit == 0 or len(self._command) + len(identifier) + 12 <= limit:
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, b"\x03" + self._command))
            pdata.presentation_data_value_list.append((context_id, b"\x02" + identifier))
            self._dul.send_pdu(pdata)
            return
        # As pynetdicom fragments: PDV items of at most the peer's maximum PDU length.
        for data, more, last in ((self._command, b"\x01", b"\x03"), (identifier, b"\x00", b"\x02")):
            size = limit - 6
            pieces = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
            for index, piece in enumerate(pieces):
                pdata = P_DATA()
                header = last if index == len(pieces) - 1 else more
                pdata.presentation_data_value_list.append((context_id, header + piece))
                self._dul.send_pdu(pdata)
