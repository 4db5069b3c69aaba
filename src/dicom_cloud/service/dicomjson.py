"""DICOMweb vocabulary the routes share: media types, the STOW-RS response (PS3.18 §10.5.3),
transfer syntaxes of frames, Accept negotiation, and the service root that fills RetrieveURL.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from .http_errors import MalformedRequestError, NotAcceptableError
from .multipart import MediaType
from .settings import ServiceSettings

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"

#: A DICOM UID (PS3.5 §9.1): digits and dots, at most 64 characters. Used on every path parameter.
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
UID_MAX = 64

# PS3.18 Table I.2-1 / PS3.4 Annex GG failure reasons used in FailedSOPSequence.
FAILURE_PROCESSING = 0x0110
FAILURE_DUPLICATE = 0x0111
FAILURE_NOT_AUTHORIZED = 0x0124
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_STUDY_MISMATCH = 0xA900
FAILURE_CANNOT_UNDERSTAND = 0xC000
#: PS3.4 C.4.2.1.4 / PS3.18 Table I.2-2 warning reason in ReferencedSOPSequence, the closest
#: standard code for an instance stored with a caveat about its content (its file meta naming
#: another SOP Instance UID than its dataset): "Data Set does not match SOP Class".
WARNING_DATA_SET_MISMATCH = 0xB007
#: Longest ErrorComment (0000,0902): its VR is LO, 64 characters.
_COMMENT_MAX = 64

#: Compressed transfer syntaxes and the media type of their frames (PS3.18 Table 8.7.3-2).
_FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


def frame_media_type(transfer_syntax_uid: str, encapsulated: bool) -> str:
    if not encapsulated:
        return OCTET_STREAM
    return _FRAME_MEDIA_TYPES.get(transfer_syntax_uid, OCTET_STREAM)


def service_root(request: Request, settings: ServiceSettings) -> str:
    """The DICOMweb root clients reach us at: ``public_url``, else the request's own base URL."""
    return settings.public_url or str(request.base_url).rstrip("/")


#: One media range of an Accept header: everything up to a comma outside a quoted string
#: (``type="application/dicom"; transfer-syntax="1.2, odd"`` stays one range).
_MEDIA_RANGE = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*"?)+')


def parse_accept(header: str) -> list[MediaType]:
    """The media ranges of an Accept header (or a WADO-URI ``contentType`` list), best first:
    by q-value, then by the order given (RFC 9110 §12.5.1; PS3.18 §8.7.1 lets the client give
    several ranges). Ranges with q=0 are dropped; a malformed q counts as 1. The ranges are
    shared between calls with the same header: read them, never change them."""
    return list(_cached_accept(header) if len(header) <= _CACHED_ACCEPT else _parse_accept(header))


#: Accept headers up to this length are parsed once: a client sends the same one on every
#: request, and a request reads it more than once (negotiation, then the answer's type).
_CACHED_ACCEPT = 512


def _parse_accept(header: str) -> tuple[MediaType, ...]:
    ranges: list[tuple[float, int, MediaType]] = []
    for position, match in enumerate(_MEDIA_RANGE.finditer(header)):
        item = match.group(0).strip()
        if not item:
            continue
        media = MediaType.parse(item)
        try:
            quality = float(media.params.pop("q", "1"))
        except ValueError:
            quality = 1.0
        if quality > 0:
            ranges.append((-min(quality, 1.0), position, media))
    return tuple(media for _, _, media in sorted(ranges, key=lambda entry: (entry[0], entry[1])))


_cached_accept = functools.lru_cache(maxsize=128)(_parse_accept)


_WARN_AGENT = re.compile(r"[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


def warning_header(request: Request, texts: Sequence[str]) -> dict[str, str]:
    """``Warning: 299 <host> "<text>"`` for each text, once (PS3.18 §8.1.4 / RFC 7234 §5.5):
    what a request asked for and did not get, the rest of the answer being valid. The agent is
    the host the client addressed (``dicom-cloud`` when its Host header is not a plain host)."""
    if not texts:
        return {}
    host = request.headers.get("host", "")
    agent = host if _WARN_AGENT.fullmatch(host) else "dicom-cloud"
    quoted = [
        '299 {} "{}"'.format(agent, "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "?" for c in t))
        for t in dict.fromkeys(texts)
    ]
    return {"Warning": ", ".join(quoted)}


def accepted_types(request: Request) -> list[MediaType]:
    """The request's Accept media ranges, best first (:func:`parse_accept`)."""
    return parse_accept(request.headers.get("accept", ""))


def choose_rendered_type(request: Request) -> str:
    """image/jpeg (default) or image/png, by Accept; 406 when neither is acceptable. A
    ``multipart/related`` range counts by its ``type`` (study and series rendered answers)."""
    ranges = accepted_types(request)
    if not ranges:
        return "image/jpeg"
    for media in ranges:
        value = media.params.get("type", "*/*").lower() if media.value == "multipart/related" else media.value
        if value in ("image/jpeg", "image/png"):
            return value
        if value in ("*/*", "image/*"):
            return "image/jpeg"
    raise NotAcceptableError("rendered resources are available as image/jpeg or image/png")


def check_accepts(request: Request, *, media_type: str, related_type: str | None = None) -> None:
    """406 unless Accept (absent means anything) allows ``media_type`` — for multipart answers,
    ``multipart/related`` whose ``type`` (absent means any) is ``related_type``."""
    ranges = accepted_types(request)
    if not ranges:
        return
    for media in ranges:
        type_matches = media.value in ("*/*", media_type, media_type.split("/")[0] + "/*")
        root = media.params.get("type", "*/*").lower()
        if type_matches and (related_type is None or _covers(root, related_type)):
            return
        if related_type is not None and media.value == related_type:
            return  # single-part request of the root type: answered as multipart with one part
    raise NotAcceptableError(
        f"this resource is available as {media_type}"
        + (f'; type="{related_type}"' if related_type else "")
        + f", not {request.headers.get('accept')}"
    )


def _covers(media_range: str, media_type: str) -> bool:
    """Whether a media range (``*/*``, ``image/*``, ``image/jpeg``) includes ``media_type``."""
    return media_range in ("*/*", media_type, media_type.split("/")[0] + "/*")


def parse_frame_list(text: str) -> list[int]:
    """``1,3,5`` -> [1, 3, 5]; anything else is 400."""
    if not re.fullmatch(r"[0-9]{1,9}(,[0-9]{1,9}){0,1023}", text):
        raise MalformedRequestError("frames must be a comma-separated list of frame numbers (1-based)")
    numbers = [int(n) for n in text.split(",")]
    if min(numbers) < 1:
        raise MalformedRequestError("frame numbers start at 1")
    return numbers


def _ui(value: str | None) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def error_comment(text: str) -> dict[str, Any]:
    """An ErrorComment (0000,0902) element: ``text`` as a valid LO (one line, no backslash, at
    most 64 characters, cut at a word with ``...`` when longer)."""
    line = " ".join(text.replace("\\", "/").split())
    if len(line) > _COMMENT_MAX:
        line = line[: _COMMENT_MAX - 3].rsplit(" ", 1)[0] + "..."
    return {"vr": "LO", "Value": [line]}


@dataclass
class StowResponse:
    """The body of a STOW-RS answer, built part by part."""

    retrieve_url: str | None = None
    referenced: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    #: Texts of the warnings given, in order, once each (for the Warning header).
    warnings: list[str] = field(default_factory=list)

    def stored(
        self,
        sop_class_uid: str | None,
        sop_instance_uid: str,
        retrieve_url: str,
        warnings: Sequence[str] = (),
    ) -> None:
        """An instance stored; with ``warnings`` (texts) it carries WarningReason 0xB007 and
        the texts in ErrorComment."""
        item: dict[str, Any] = {
            "00081150": _ui(sop_class_uid),
            "00081155": _ui(sop_instance_uid),
            "00081190": {"vr": "UR", "Value": [retrieve_url]},
        }
        if warnings:
            item["00081196"] = {"vr": "US", "Value": [WARNING_DATA_SET_MISMATCH]}
            item["00000902"] = error_comment("; ".join(warnings))
            self.warnings.extend(w for w in warnings if w not in self.warnings)
        self.referenced.append(item)

    def failure(
        self, sop_class_uid: str | None, sop_instance_uid: str | None, reason: int, comment: str
    ) -> None:
        """An instance refused: FailureReason ``reason`` and ``comment``, a readable reason free
        of patient data, in ErrorComment."""
        self.failed.append(
            {
                "00081150": _ui(sop_class_uid),
                "00081155": _ui(sop_instance_uid),
                "00081197": {"vr": "US", "Value": [reason]},
                "00000902": error_comment(comment),
            }
        )

    @property
    def status(self) -> int:
        """200 all stored without warnings, 409 none stored, 202 some stored or stored with
        warnings (PS3.18 Table 10.5.3-1)."""
        if not self.failed:
            return 202 if self.warnings else 200
        return 202 if self.referenced else 409

    @property
    def headers(self) -> dict[str, str]:
        """The Warning header of PS3.18 §8.10.3 (code 299) when instances were stored with warnings."""
        if not self.warnings:
            return {}
        return {"Warning": ", ".join(f'299 dicom-cloud "{w}"' for w in self.warnings)}

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.retrieve_url:
            body["00081190"] = {"vr": "UR", "Value": [self.retrieve_url]}
        if self.failed:
            body["00081198"] = {"vr": "SQ", "Value": self.failed}
        if self.referenced:
            body["00081199"] = {"vr": "SQ", "Value": self.referenced}
        return body
