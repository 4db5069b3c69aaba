"""WADO-URI (PS3.18 §9, the URI service): ``GET /wado?requestType=WADO&studyUID=..&seriesUID=..
&objectUID=..`` for viewers and PACS integrations older than WADO-RS.

The same credentials, scopes and tenant rules as every other route (a share link reaches its own
study only). Parameters:

- ``contentType``: ``application/dicom``, ``image/jpeg`` or ``image/png``, a comma-separated list
  with optional q-values (the best one that can be produced wins; 406 when none). Absent:
  ``image/jpeg`` for an instance with pixel data, ``application/dicom`` otherwise.
- ``application/dicom``: ``transferSyntax`` (a UID, or ``*`` for as stored). Absent: Explicit VR
  Little Endian (the standard's default) when the archive can decode the instance, else as
  stored. A syntax it cannot produce: 406.
- images: ``frameNumber`` (default 1), ``rows``/``columns`` (the picture fits within them, its
  aspect ratio kept), ``windowCenter``/``windowWidth`` (both or neither; LINEAR),
  ``imageQuality`` (JPEG, 1-100).
- ``anonymize=yes``: 400 (this service does not de-identify on the fly; it never answers with
  patient data to a request that asked for none).
- ``charset``, ``region``, ``annotation``, ``presentationUID``, ``presentationSeriesUID``,
  rendering parameters with ``application/dicom``, and unknown parameters: ignored, each named in
  a ``Warning: 299`` header. Malformed values of known parameters: 400.
"""

from __future__ import annotations

import math
import re
from typing import Final

from fastapi import APIRouter, Request, Response
from starlette.datastructures import QueryParams

from ...archive.imaging import MAX_VIEWPORT, Viewport, Window
from ...archive.transcode import EXPLICIT_LE, can_transcode
from ...errors import NotSupportedError, UsageError
from ..deps import ArchiveDep, Reader
from ..dicomjson import DICOM, UID_PATTERN, parse_accept, warning_header
from ..http_errors import NotAcceptableError

router = APIRouter(tags=["WADO-URI"])

_UID: Final = re.compile(UID_PATTERN)
_IMAGES: Final = ("image/jpeg", "image/png")
_RENDERING: Final = ("frameNumber", "rows", "columns", "windowCenter", "windowWidth", "imageQuality")
_KNOWN: Final = frozenset(
    {"requestType", "studyUID", "seriesUID", "objectUID", "contentType", "transferSyntax", "anonymize"}
    | set(_RENDERING)
)
_IGNORED: Final = ("charset", "region", "annotation", "presentationUID", "presentationSeriesUID")


def _one(query: QueryParams, name: str) -> str | None:
    values = query.getlist(name)
    if len(values) > 1:
        raise UsageError(f"'{name}' is given more than once")
    return values[0] if values else None


def _uid(query: QueryParams, name: str) -> str:
    value = _one(query, name)
    if not value:
        raise UsageError(
            f"'{name}' is required", hint="requestType=WADO&studyUID=..&seriesUID=..&objectUID=.."
        )
    if len(value) > 64 or not _UID.fullmatch(value):
        raise UsageError(
            f"'{name}' is not a DICOM UID", hint="UIDs are digits and dots, at most 64 characters"
        )
    return value


def _integer(query: QueryParams, name: str, low: int, high: int) -> int | None:
    value = _one(query, name)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 9 and low <= int(value) <= high):
        raise UsageError(f"'{name}' must be an integer from {low} to {high}")
    return int(value)


def _decimal(query: QueryParams, name: str) -> float | None:
    value = _one(query, name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"'{name}' must be a number") from None
    if not math.isfinite(number):
        raise UsageError(f"'{name}' must be a finite number")
    return number


def _content_type(query: QueryParams, has_pixels: bool) -> str:
    """The best acceptable content type; 406 when none can be produced."""
    given = _one(query, "contentType")
    default = "image/jpeg" if has_pixels else DICOM
    if not given:
        return default
    for media in parse_accept(given):
        if media.value == DICOM or (media.value in _IMAGES and has_pixels):
            return media.value
        if media.value in ("*/*", "image/*") and (has_pixels or media.value == "*/*"):
            return default if media.value == "*/*" else "image/jpeg"
    if not has_pixels:
        raise NotAcceptableError(
            "the instance has no pixel data", hint="ask for contentType=application/dicom"
        )
    raise NotAcceptableError(
        "WADO-URI answers application/dicom, image/jpeg or image/png", hint="set contentType to one of them"
    )


def _parameter(name: str, description: str, required: bool = False) -> dict[str, object]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": {"type": "string"},
        "description": description,
    }


#: The parameters as the OpenAPI document shows them (parsed by hand below: a malformed value is a
#: 400 naming the parameter, and unknown ones are warnings, not validation errors).
_OPENAPI_PARAMETERS = [
    _parameter("requestType", "WADO", required=True),
    _parameter("studyUID", "Study Instance UID", required=True),
    _parameter("seriesUID", "Series Instance UID", required=True),
    _parameter("objectUID", "SOP Instance UID", required=True),
    _parameter("contentType", "application/dicom, image/jpeg or image/png (a list, q-values allowed)"),
    _parameter("transferSyntax", "with application/dicom: a transfer syntax UID, or * for as stored"),
    _parameter("frameNumber", "the frame rendered (default 1)"),
    _parameter("rows", "the picture fits within this many rows"),
    _parameter("columns", "the picture fits within this many columns"),
    _parameter("windowCenter", "with windowWidth: a linear window"),
    _parameter("windowWidth", "with windowCenter: a linear window"),
    _parameter("imageQuality", "JPEG quality, 1-100"),
]


@router.get(
    "/wado",
    response_class=Response,
    summary="WADO-URI: one instance as application/dicom, image/jpeg or image/png",
    description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    responses={200: {"content": {DICOM: {}, "image/jpeg": {}, "image/png": {}}}},
    openapi_extra={"parameters": _OPENAPI_PARAMETERS},
)
async def wado_uri(request: Request, principal: Reader, archive: ArchiveDep) -> Response:
    query = request.query_params
    warnings = [f"'{k}' is not supported: ignored" for k in _IGNORED if k in query]
    warnings += [
        f"'{k[:64]}' is not a WADO-URI parameter: ignored"
        for k in query
        if k not in _KNOWN and k not in _IGNORED
    ]
    if _one(query, "requestType") != "WADO":
        raise UsageError("requestType must be WADO")
    study, series, instance = _uid(query, "studyUID"), _uid(query, "seriesUID"), _uid(query, "objectUID")
    anonymize = _one(query, "anonymize")
    if anonymize is not None:
        raise UsageError(
            "anonymize is not supported: instances are sent as stored",
            hint="leave anonymize out, or share a copy made with 'dicom-cloud copy --deidentify'",
        )
    principal.require_study(study)
    record = (await archive.instances(principal.tenant, study, series, instance))[0]
    content_type = _content_type(query, has_pixels=record.rows is not None)
    if content_type == DICOM:
        warnings += [f"'{k}' applies to images only: ignored" for k in _RENDERING if k in query]
        data = await _dicom(query, archive, record.transfer_syntax_uid, await archive.read_instance(record))
        return Response(data, media_type=DICOM, headers=warning_header(request, warnings))
    if "transferSyntax" in query:
        warnings.append("'transferSyntax' applies to application/dicom only: ignored")
    frame = _integer(query, "frameNumber", 1, 1_000_000) or 1
    rows, columns = _integer(query, "rows", 1, MAX_VIEWPORT), _integer(query, "columns", 1, MAX_VIEWPORT)
    quality = _integer(query, "imageQuality", 1, 100) or 90
    center, width = _decimal(query, "windowCenter"), _decimal(query, "windowWidth")
    if (center is None) != (width is None):
        raise UsageError("windowCenter and windowWidth go together")
    window = Window(center, width) if center is not None and width is not None else None
    viewport = Viewport(columns or MAX_VIEWPORT, rows or MAX_VIEWPORT) if rows or columns else None
    try:
        picture = await archive.rendered(
            principal.tenant,
            study,
            series,
            instance,
            frame=frame,
            media_type=content_type,
            quality=quality,
            window=window,
            viewport=viewport,
        )
    except NotSupportedError as exc:
        raise NotAcceptableError(exc.message, hint=exc.hint) from None
    headers = {"Cache-Control": "private, max-age=300", **warning_header(request, warnings)}
    return Response(picture.data, media_type=picture.media_type, headers=headers)


async def _dicom(query: QueryParams, archive: ArchiveDep, stored: str, data: bytes) -> bytes:
    """The instance in the transfer syntax asked for (see the module docs)."""
    asked = _one(query, "transferSyntax")
    if asked is not None and asked != "*" and not _UID.fullmatch(asked):
        raise UsageError("'transferSyntax' is not a UID")
    if asked == "*" or (asked is None and not can_transcode(stored, EXPLICIT_LE)):
        return data
    target = asked or EXPLICIT_LE
    if not can_transcode(stored, target):
        raise NotAcceptableError(
            f"the instance is stored in {stored} and cannot be sent in {target}",
            hint="ask for transferSyntax=* (as stored) or 1.2.840.10008.1.2.1",
        )
    try:
        return await archive.transcode(data, target)
    except NotSupportedError as exc:
        raise NotAcceptableError(exc.message, hint=exc.hint) from None
