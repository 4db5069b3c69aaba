"""Which transfer syntax a WADO answer is sent in: the Accept header's media ranges (PS3.18
§8.7.3), best first, against what is stored and what the archive can transcode
(``archive/transcode.py`` decides that).

Instances (``application/dicom``):

- ``transfer-syntax=*``, or no ``transfer-syntax``: as stored. (PS3.18 names Explicit VR Little
  Endian as the default; sending what is stored spares a decode a client did not ask for, as
  other archives do; ask for ``1.2.840.10008.1.2.1`` to get it.)
- a named syntax: as stored when it is the stored one, transcoded when it is an uncompressed
  syntax the archive can produce from every instance of the answer; otherwise the next range.

Frames (``application/octet-stream``, or the compressed media type of the stored syntax such as
``image/jpeg``, ``image/jls``, ``image/jp2``, ``image/dicom-rle``):

- ``transfer-syntax=*``: as stored, labelled ``application/octet-stream`` when that was the type
  asked for (OHIF's default), else the stored syntax's media type.
- no ``transfer-syntax``: ``application/octet-stream`` means Explicit VR Little Endian (transcoded
  if need be); a compressed media type means the stored bytes when they are of that type; a range
  such as ``*/*`` means as stored.
- a named syntax: as for instances.

No range satisfied: 406 naming what can be sent.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from fastapi import Request
from pydicom.uid import UID

from ..archive.transcode import UNCOMPRESSED_TARGETS, can_decode, can_transcode, frames_syntax
from .dicomjson import DICOM, OCTET_STREAM, accepted_types, frame_media_type
from .http_errors import NotAcceptableError

_MULTIPART_RANGES = ("multipart/related", "multipart/*", "*/*")


def _covers(media_range: str, media_type: str) -> bool:
    """Whether a media range (``*/*``, ``image/*``, ``image/jpeg``) includes ``media_type``."""
    return media_range in ("*/*", media_type, media_type.split("/")[0] + "/*")


def _alternatives(stored: Collection[str]) -> str:
    decodable = all(can_decode(s) for s in stored)
    extra = f", or transfer-syntax={' or '.join(UNCOMPRESSED_TARGETS)}" if decodable else ""
    return f"stored as {', '.join(sorted(set(stored)))}: ask for transfer-syntax=* (as stored){extra}"


def instance_part_type(transfer_syntax_uid: str) -> str:
    """The Content-Type of a multipart part holding an instance in this transfer syntax."""
    return f"{DICOM}; transfer-syntax={transfer_syntax_uid}"


def instance_syntax(request: Request, stored: Collection[str]) -> str | None:
    """The transfer syntax to send instances stored in ``stored`` in: None for as stored, else a
    syntax every one of them can be sent in (the stored one or a transcoding). 406 when no media
    range of Accept can be satisfied."""
    ranges = accepted_types(request)
    if not ranges:
        return None
    for media in ranges:
        if media.value in _MULTIPART_RANGES:
            if not _covers(media.params.get("type", DICOM).lower(), DICOM):
                continue
        elif media.value != DICOM:  # a single-part application/dicom: answered as one part
            continue
        syntax = media.params.get("transfer-syntax", "*").strip()
        if syntax == "*" or all(s == syntax for s in stored):
            return None
        if all(can_transcode(s, syntax) for s in stored):
            return syntax
    raise NotAcceptableError(
        f'instances are sent as multipart/related; type="{DICOM}", not {request.headers.get("accept")}',
        hint=_alternatives(stored),
    )


@dataclass(frozen=True)
class FramePlan:
    """How frames are sent: the parts' media type, their transfer syntax, and whether the stored
    pixel data is decoded to get there."""

    media_type: str
    transfer_syntax: str
    decode: bool

    @property
    def part_type(self) -> str:
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"


def frame_plan(request: Request, stored: str) -> FramePlan:
    """The plan for frames of an instance stored in ``stored`` (see the module docs); 406 when
    no media range of Accept can be satisfied."""
    syntax = frames_syntax(stored)
    native = frame_media_type(syntax, encapsulated=UID(stored).is_encapsulated)
    as_stored = FramePlan(native, syntax, decode=False)
    ranges = accepted_types(request)
    if not ranges:
        return as_stored
    for media in ranges:
        asked = media.params.get("type", "*/*").lower() if media.value in _MULTIPART_RANGES else media.value
        wanted = media.params.get("transfer-syntax")
        if wanted is not None:
            wanted = wanted.strip()
        if wanted == "*" or (wanted is None and asked == "*/*"):
            if asked == OCTET_STREAM:
                return FramePlan(OCTET_STREAM, syntax, decode=False)
            if _covers(asked, native):
                return as_stored
            continue
        if wanted is None:
            if asked == OCTET_STREAM or asked == "application/*":
                wanted = UNCOMPRESSED_TARGETS[0]  # the default syntax of octet-stream frames
            elif _covers(asked, native):
                return as_stored
            else:
                continue
        if wanted == syntax and (asked == OCTET_STREAM or _covers(asked, native)):
            return FramePlan(OCTET_STREAM if asked == OCTET_STREAM else native, syntax, decode=False)
        if wanted in UNCOMPRESSED_TARGETS and _covers(asked, OCTET_STREAM) and can_transcode(stored, wanted):
            # Native little endian frames are the same bytes in either uncompressed syntax.
            decode = syntax not in UNCOMPRESSED_TARGETS
            return FramePlan(OCTET_STREAM, wanted, decode=decode)
    raise NotAcceptableError(
        f"frames are sent as multipart/related; type={native} or {OCTET_STREAM},"
        f" not {request.headers.get('accept')}",
        hint=_alternatives([stored]),
    )
