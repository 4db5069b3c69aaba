"""DICOMweb studies/series/instances: STOW-RS, QIDO-RS, WADO-RS (instances, metadata, frames,
rendered, thumbnail) and DELETE. Every call is scoped to the caller's tenant; a share link's
principal reaches its own study only.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from ...archive import InstanceRecord, QueryParams
from ...archive.imaging import Viewport, Window
from ...errors import NotSupportedError
from ..auth import Principal
from ..deps import ArchiveDep, MetricsDep, Reader, SettingsDep, Writer
from ..dicomjson import (
    DICOM,
    DICOM_JSON,
    FAILURE_PROCESSING,
    OCTET_STREAM,
    UID_MAX,
    UID_PATTERN,
    StowResponse,
    check_accepts,
    choose_rendered_type,
    parse_frame_list,
    service_root,
    warning_header,
)
from ..http_errors import NotAcceptableError
from ..memory import RequestMemory
from ..multipart import (
    RelatedReader,
    body_chunks,
    new_boundary,
    related_body,
    related_boundary,
    related_content_type,
    related_length,
    write_related,
)
from ..negotiation import frame_plan, instance_part_type, instance_syntax
from ..stow import StowReceiver, memory_share
from ..stow_queue import is_queued, queue_stow

router = APIRouter(tags=["DICOMweb"])
log = logging.getLogger("dicom_cloud.service")

#: Instances read ahead while a multipart answer streams (memory: this many + 1 instances).
RETRIEVE_PREFETCH = 4
#: A single instance up to this size is answered whole (Content-Length) rather than streamed.
WHOLE_ANSWER_LIMIT = 64 * 1024 * 1024

Uid = Annotated[str, Path(pattern=UID_PATTERN, max_length=UID_MAX, description="a DICOM UID")]
FrameList = Annotated[str, Path(pattern=r"^[0-9]+(,[0-9]+)*$", max_length=2000, description="e.g. 1,2,3")]
Quality = Annotated[int, Query(ge=1, le=100, description="JPEG quality")]


@dataclass(frozen=True)
class RenderQuery:
    """The query parameters of rendered resources (PS3.18 §8.3.5.1)."""

    quality: int
    window: Window | None
    viewport: Viewport | None


def render_query(
    quality: Quality = 90,
    window: Annotated[
        str | None, Query(max_length=200, description="center,width[,linear|linear_exact|sigmoid]")
    ] = None,
    viewport: Annotated[
        str | None, Query(max_length=200, description="vw,vh[,sx,sy,sw,sh]: size and source region")
    ] = None,
) -> RenderQuery:
    """Malformed values are 400 (UsageError)."""
    return RenderQuery(
        quality,
        Window.parse(window) if window is not None else None,
        Viewport.parse(viewport) if viewport is not None else None,
    )


Rendering = Annotated[RenderQuery, Depends(render_query)]

_JSON_LIST = {"content": {DICOM_JSON: {"schema": {"type": "array", "items": {"type": "object"}}}}}
_MULTIPART = {"content": {"multipart/related": {"schema": {"type": "string", "format": "binary"}}}}
_IMAGE: dict[str, Any] = {"content": {"image/jpeg": {}, "image/png": {}}}
_STOW_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}
        },
    }
}


def dicom_json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON, headers=headers)


#: The query parameters of rendered resources; WADO-RS retrieval takes none.
_RENDER_PARAMETERS = ("quality", "window", "viewport")


def ignored_parameters(request: Request, known: tuple[str, ...] = ()) -> dict[str, str]:
    """A Warning header naming the query parameters this resource does not take (a cache
    buster such as ``_=123``): they are ignored, not refused."""
    texts = [
        f"'{key[:64]}' is not a parameter of this resource: ignored"
        for key in dict.fromkeys(request.query_params)
        if key not in known
    ]
    return warning_header(request, texts)


# -- STOW-RS ------------------------------------------------------------------------------


async def _stow(
    request: Request,
    principal: Principal,
    archive: ArchiveDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    study: str | None,
) -> JSONResponse:
    """Parts are stored as they arrive (``service/stow.py``). A body whose framing fails after
    some parts were stored answers 400 and the instances this request created are removed
    again: a malformed request leaves nothing stored."""
    accept = request.headers.get("accept")
    if accept and not any(t in accept for t in (DICOM_JSON, "application/json", "*/*")):
        raise NotAcceptableError("STOW-RS answers are application/dicom+json")
    boundary, root = related_boundary(request.headers.get("content-type"), expected_types=(DICOM,))
    queue = is_queued(request, settings, study)
    if queue is not None:
        return await queue_stow(request, queue, principal, archive, settings, boundary, root)
    memory: RequestMemory = request.app.state.request_memory
    share = memory_share(settings.stow_part_memory_bytes, request.headers.get("content-length"))
    base = service_root(request, settings)
    response = StowResponse(retrieve_url=f"{base}/studies/{study}" if study else None)
    counts = {"stored": 0, "duplicate": 0, "refused": 0}
    created: list[InstanceRecord] = []
    stored_study: str | None = None
    async with memory.reserve(share):
        reader = RelatedReader(body_chunks(request, settings.stow_max_bytes), boundary, root)
        receiver = StowReceiver(archive, principal.tenant, study, settings.stow_part_memory_bytes)
        try:
            async for outcome in receiver.outcomes(reader):
                if outcome.stored is None:
                    identity = outcome.identity
                    response.failure(
                        identity.sop_class_uid if identity else None,
                        identity.sop_instance_uid if identity else None,
                        outcome.failure or FAILURE_PROCESSING,
                        outcome.comment,
                    )
                    counts["refused"] += 1
                    continue
                record = outcome.stored.record
                if outcome.stored.created:
                    created.append(record)
                response.stored(
                    record.sop_class_uid,
                    record.sop_instance_uid,
                    f"{base}/studies/{record.study_instance_uid}/series/{record.series_instance_uid}"
                    f"/instances/{record.sop_instance_uid}",
                    outcome.stored.warnings,
                )
                counts["stored" if outcome.stored.created else "duplicate"] += 1
                stored_study = record.study_instance_uid
        except BaseException:
            await _remove_created(archive, principal.tenant, created)
            raise
    if response.retrieve_url is None and reader.parts == 1 and stored_study is not None:
        response.retrieve_url = f"{base}/studies/{stored_study}"
    for outcome_name, count in counts.items():
        if count:
            metrics.instances_stored.labels(outcome_name).inc(count)
    return dicom_json(response.as_json(), response.status, response.headers)


async def _remove_created(archive: ArchiveDep, tenant: str, created: list[InstanceRecord]) -> None:
    """Undo the instances a failed STOW-RS request created (best effort: it is failing anyway)."""
    for record in created:
        try:
            await archive.delete(
                tenant, record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid
            )
        except Exception:
            log.warning("an instance of a failed STOW-RS request could not be removed")


_STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every instance stored", "content": {DICOM_JSON: {}}},
    202: {
        "description": "some instances stored, others failed (FailedSOPSequence); or, with the ingest"
        " queue and a body above stow_queue_bytes, queued: JSON with status_url, and Location"
    },
    409: {"description": "no instance stored"},
}


@router.post("/studies", responses=_STOW_RESPONSES, openapi_extra=_STOW_BODY, summary="STOW-RS")
async def store_instances(
    request: Request, principal: Writer, archive: ArchiveDep, settings: SettingsDep, metrics: MetricsDep
) -> JSONResponse:
    """Store the instances of a multipart/related body (``type="application/dicom"``)."""
    return await _stow(request, principal, archive, settings, metrics, None)


@router.post("/studies/{study}", responses=_STOW_RESPONSES, openapi_extra=_STOW_BODY, summary="STOW-RS")
async def store_study_instances(
    request: Request,
    study: Uid,
    principal: Writer,
    archive: ArchiveDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> JSONResponse:
    """Store instances into one study; instances of another study fail with reason 0xA900."""
    return await _stow(request, principal, archive, settings, metrics, study)


# -- QIDO-RS ------------------------------------------------------------------------------


def _query(request: Request) -> QueryParams:
    params: dict[str, str | list[str]] = {}
    for key, value in request.query_params.multi_items():
        if key in params:
            previous = params[key]
            params[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            params[key] = value
    return params


def _shared_query(principal: Principal, params: QueryParams) -> QueryParams:
    """A share link's principal searches its own study only, whatever it asks for."""
    if principal.study is None:
        return params
    restricted = dict(params)
    restricted["StudyInstanceUID"] = principal.study
    restricted.pop("0020000D", None)
    return restricted


_QIDO_DOC = (
    "Query parameters are attribute keywords or tags (``PatientID=X``, ``00100020=X``, wildcards ``*``/``?``,"
    " date ranges), ``limit``, ``offset``, ``includefield``, ``fuzzymatching``, and the study labels"
    " ``label`` and ``labeldescription``."
)


@router.get("/studies", responses={200: _JSON_LIST}, summary="QIDO-RS: search studies", description=_QIDO_DOC)
async def search_studies(
    request: Request, principal: Reader, archive: ArchiveDep, settings: SettingsDep
) -> JSONResponse:
    params = _shared_query(principal, _query(request))
    warnings: list[str] = []
    found = await archive.search_studies(
        principal.tenant, params, base_url=service_root(request, settings), warnings=warnings
    )
    return dicom_json(found, headers=warning_header(request, warnings))


@router.get("/series", responses={200: _JSON_LIST}, summary="QIDO-RS: search series", description=_QIDO_DOC)
async def search_all_series(
    request: Request, principal: Reader, archive: ArchiveDep, settings: SettingsDep
) -> JSONResponse:
    warnings: list[str] = []
    found = await archive.search_series(
        principal.tenant,
        _query(request),
        study_instance_uid=principal.study,
        base_url=service_root(request, settings),
        warnings=warnings,
    )
    return dicom_json(found, headers=warning_header(request, warnings))


@router.get(
    "/studies/{study}/series",
    responses={200: _JSON_LIST},
    summary="QIDO-RS: search the series of a study",
    description=_QIDO_DOC,
)
async def search_study_series(
    request: Request, study: Uid, principal: Reader, archive: ArchiveDep, settings: SettingsDep
) -> JSONResponse:
    principal.require_study(study)
    warnings: list[str] = []
    found = await archive.search_series(
        principal.tenant,
        _query(request),
        study_instance_uid=study,
        base_url=service_root(request, settings),
        warnings=warnings,
    )
    return dicom_json(found, headers=warning_header(request, warnings))


@router.get(
    "/instances", responses={200: _JSON_LIST}, summary="QIDO-RS: search instances", description=_QIDO_DOC
)
async def search_all_instances(
    request: Request, principal: Reader, archive: ArchiveDep, settings: SettingsDep
) -> JSONResponse:
    warnings: list[str] = []
    found = await archive.search_instances(
        principal.tenant,
        _query(request),
        study_instance_uid=principal.study,
        base_url=service_root(request, settings),
        warnings=warnings,
    )
    return dicom_json(found, headers=warning_header(request, warnings))


@router.get(
    "/studies/{study}/instances",
    responses={200: _JSON_LIST},
    summary="QIDO-RS: search the instances of a study",
    description=_QIDO_DOC,
)
async def search_study_instances(
    request: Request, study: Uid, principal: Reader, archive: ArchiveDep, settings: SettingsDep
) -> JSONResponse:
    principal.require_study(study)
    warnings: list[str] = []
    found = await archive.search_instances(
        principal.tenant,
        _query(request),
        study_instance_uid=study,
        base_url=service_root(request, settings),
        warnings=warnings,
    )
    return dicom_json(found, headers=warning_header(request, warnings))


@router.get(
    "/studies/{study}/series/{series}/instances",
    responses={200: _JSON_LIST},
    summary="QIDO-RS: search the instances of a series",
    description=_QIDO_DOC,
)
async def search_series_instances(
    request: Request, study: Uid, series: Uid, principal: Reader, archive: ArchiveDep, settings: SettingsDep
) -> JSONResponse:
    principal.require_study(study)
    warnings: list[str] = []
    found = await archive.search_instances(
        principal.tenant,
        _query(request),
        study_instance_uid=study,
        series_instance_uid=series,
        base_url=service_root(request, settings),
        warnings=warnings,
    )
    return dicom_json(found, headers=warning_header(request, warnings))


# -- WADO-RS: instances ---------------------------------------------------------------------


async def _retrieve(
    request: Request,
    principal: Principal,
    archive: ArchiveDep,
    study: str,
    series: str | None = None,
    instance: str | None = None,
) -> Response:
    principal.require_study(study)
    check_accepts(request, media_type="multipart/related", related_type=DICOM)
    if series is not None and instance is not None:
        # One instance (the common per-instance retrieval): found and read in one step, sent as
        # one body with a Content-Length (a store fault is then a clean error status).
        record, data = await archive.instance_with_bytes(
            principal.tenant, study, series, instance, max_size=WHOLE_ANSWER_LIMIT
        )
        records = [record]
    else:
        records, data = await archive.instances(principal.tenant, study, series, instance), None
    # As stored (None), or one syntax every instance can be sent in; 406 before any part is sent.
    target = instance_syntax(request, {r.transfer_syntax_uid for r in records})

    async def encoded(record: InstanceRecord, data: bytes) -> tuple[str, bytes]:
        """One part: transcoded (one instance at a time, in a worker thread) when asked."""
        if target is None or record.transfer_syntax_uid == target:
            return instance_part_type(record.transfer_syntax_uid), data
        try:
            return instance_part_type(target), await archive.transcode(data, target)
        except NotSupportedError as exc:
            raise NotAcceptableError(exc.message, hint=exc.hint) from None

    boundary = new_boundary()
    media_type = related_content_type(boundary, DICOM)
    if data is not None:
        part = await encoded(records[0], data)
        return Response(
            related_body([part], boundary), media_type=media_type, headers=ignored_parameters(request)
        )
    reads = archive.read_instances(records, prefetch=RETRIEVE_PREFETCH)
    # The first instance is read (and transcoded) before the answer starts: a store fault
    # becomes a clean error status instead of a truncated 200.
    first = await encoded(*await anext(reads))

    async def parts() -> AsyncIterator[tuple[str, bytes]]:
        try:
            yield first
            async for record, data in reads:
                yield await encoded(record, data)
        finally:
            if isinstance(reads, AsyncGenerator):  # stops the reads ahead of a client that left
                await reads.aclose()

    headers = ignored_parameters(request)
    if target is None or all(r.transfer_syntax_uid == target for r in records):
        # Every part as stored: the body's length is known from the index before a byte is sent.
        sizes = [(instance_part_type(r.transfer_syntax_uid), r.size) for r in records]
        headers = {**headers, "Content-Length": str(related_length(sizes, boundary))}
    return StreamingResponse(write_related(parts(), boundary), media_type=media_type, headers=headers)


@router.get("/studies/{study}", responses={200: _MULTIPART}, summary="WADO-RS: retrieve a study")
async def retrieve_study(request: Request, study: Uid, principal: Reader, archive: ArchiveDep) -> Response:
    """Every instance of the study, as multipart/related; type="application/dicom"."""
    return await _retrieve(request, principal, archive, study)


@router.get(
    "/studies/{study}/series/{series}", responses={200: _MULTIPART}, summary="WADO-RS: retrieve a series"
)
async def retrieve_series(
    request: Request, study: Uid, series: Uid, principal: Reader, archive: ArchiveDep
) -> Response:
    return await _retrieve(request, principal, archive, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}",
    responses={200: _MULTIPART},
    summary="WADO-RS: retrieve an instance",
)
async def retrieve_instance(
    request: Request, study: Uid, series: Uid, instance: Uid, principal: Reader, archive: ArchiveDep
) -> Response:
    return await _retrieve(request, principal, archive, study, series, instance)


# -- WADO-RS: metadata ----------------------------------------------------------------------


async def _metadata(
    request: Request,
    principal: Principal,
    archive: ArchiveDep,
    settings: SettingsDep,
    study: str,
    series: str | None = None,
    instance: str | None = None,
) -> JSONResponse:
    principal.require_study(study)
    check_accepts(request, media_type=DICOM_JSON)
    found = await archive.metadata(
        principal.tenant, study, series, instance, base_url=service_root(request, settings)
    )
    return dicom_json(found, headers=ignored_parameters(request))


@router.get("/studies/{study}/metadata", responses={200: _JSON_LIST}, summary="WADO-RS: study metadata")
async def study_metadata(
    request: Request, study: Uid, principal: Reader, archive: ArchiveDep, settings: SettingsDep
) -> JSONResponse:
    return await _metadata(request, principal, archive, settings, study)


@router.get(
    "/studies/{study}/series/{series}/metadata",
    responses={200: _JSON_LIST},
    summary="WADO-RS: series metadata",
)
async def series_metadata(
    request: Request, study: Uid, series: Uid, principal: Reader, archive: ArchiveDep, settings: SettingsDep
) -> JSONResponse:
    return await _metadata(request, principal, archive, settings, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    responses={200: _JSON_LIST},
    summary="WADO-RS: instance metadata",
)
async def instance_metadata(
    request: Request,
    study: Uid,
    series: Uid,
    instance: Uid,
    principal: Reader,
    archive: ArchiveDep,
    settings: SettingsDep,
) -> JSONResponse:
    return await _metadata(request, principal, archive, settings, study, series, instance)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}",
    responses={200: _MULTIPART},
    summary="WADO-RS: a bulk data value named by a BulkDataURI of the metadata",
)
async def retrieve_bulkdata(
    request: Request,
    study: Uid,
    series: Uid,
    instance: Uid,
    tag: Annotated[str, Path(pattern=r"^[0-9A-Fa-f]{8}$", description="ggggeeee")],
    principal: Reader,
    archive: ArchiveDep,
) -> StreamingResponse:
    """The value as stored (encapsulated pixel data stays encapsulated), as one
    ``application/octet-stream`` part."""
    principal.require_study(study)
    check_accepts(request, media_type="multipart/related", related_type=OCTET_STREAM)
    value = await archive.bulkdata(principal.tenant, study, series, instance, tag.upper())

    async def parts() -> AsyncIterator[tuple[str, bytes]]:
        yield OCTET_STREAM, value

    boundary = new_boundary()
    return StreamingResponse(
        write_related(parts(), boundary),
        media_type=related_content_type(boundary, OCTET_STREAM),
        headers=ignored_parameters(request),
    )


# -- WADO-RS: frames, rendered, thumbnail -------------------------------------------------------


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    responses={200: _MULTIPART},
    summary="WADO-RS: retrieve frames",
)
async def retrieve_frames(
    request: Request,
    study: Uid,
    series: Uid,
    instance: Uid,
    frames: FrameList,
    principal: Reader,
    archive: ArchiveDep,
) -> StreamingResponse:
    """Frames as multipart/related: as stored (``transfer-syntax=*``; ``application/octet-stream``
    for native pixel data, the compressed media type such as image/jpeg, image/jp2, image/jls,
    image/dicom-rle for encapsulated), or decoded to an uncompressed syntax (see
    ``service/negotiation.py``)."""
    principal.require_study(study)
    numbers = parse_frame_list(frames)
    record = (await archive.instances(principal.tenant, study, series, instance))[0]
    plan = frame_plan(request, record.transfer_syntax_uid)
    try:
        found = await archive.frames_of(
            record, numbers, transfer_syntax=plan.transfer_syntax if plan.decode else None
        )
    except NotSupportedError as exc:
        raise NotAcceptableError(exc.message, hint=exc.hint) from None

    async def parts() -> AsyncIterator[tuple[str, bytes]]:
        for frame in found.frames:
            yield plan.part_type, frame

    boundary = new_boundary()
    return StreamingResponse(
        write_related(parts(), boundary),
        media_type=related_content_type(boundary, plan.media_type),
        headers=ignored_parameters(request),
    )


async def _picture(
    request: Request,
    principal: Principal,
    archive: ArchiveDep,
    study: str,
    series: str | None,
    instance: str | None,
    *,
    frame: int = 1,
    thumbnail: bool,
    options: RenderQuery,
) -> Response:
    principal.require_study(study)
    media_type = choose_rendered_type(request)
    if series is None or instance is None:
        # Study and series thumbnails show their first instance (series, then instance order).
        first = (await archive.instances(principal.tenant, study, series))[0]
        series, instance = first.series_instance_uid, first.sop_instance_uid
    try:
        picture = await archive.rendered(
            principal.tenant,
            study,
            series,
            instance,
            frame=frame,
            media_type=media_type,
            thumbnail=thumbnail,
            quality=options.quality,
            window=options.window,
            viewport=options.viewport,
        )
    except NotSupportedError as exc:
        raise NotAcceptableError(exc.message, hint=exc.hint) from None
    return Response(
        picture.data,
        media_type=picture.media_type,
        headers={"Cache-Control": "private, max-age=300", **ignored_parameters(request, _RENDER_PARAMETERS)},
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/rendered",
    responses={200: _IMAGE},
    response_class=Response,
    summary="WADO-RS: rendered instance (first frame)",
)
async def rendered_instance(
    request: Request,
    study: Uid,
    series: Uid,
    instance: Uid,
    principal: Reader,
    archive: ArchiveDep,
    options: Rendering,
) -> Response:
    """A JPEG (default) or PNG by Accept, windowed to 8 bits."""
    return await _picture(
        request, principal, archive, study, series, instance, thumbnail=False, options=options
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
    responses={200: _IMAGE},
    response_class=Response,
    summary="WADO-RS: rendered frame",
)
async def rendered_frame(
    request: Request,
    study: Uid,
    series: Uid,
    instance: Uid,
    frame: Annotated[int, Path(ge=1, le=1_000_000)],
    principal: Reader,
    archive: ArchiveDep,
    options: Rendering,
) -> Response:
    return await _picture(
        request, principal, archive, study, series, instance, frame=frame, thumbnail=False, options=options
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
    responses={200: _IMAGE},
    response_class=Response,
    summary="WADO-RS: instance thumbnail",
)
async def instance_thumbnail(
    request: Request,
    study: Uid,
    series: Uid,
    instance: Uid,
    principal: Reader,
    archive: ArchiveDep,
    options: Rendering,
) -> Response:
    return await _picture(
        request, principal, archive, study, series, instance, thumbnail=True, options=options
    )


@router.get(
    "/studies/{study}/series/{series}/thumbnail",
    responses={200: _IMAGE},
    response_class=Response,
    summary="WADO-RS: series thumbnail (its first instance)",
)
async def series_thumbnail(
    request: Request, study: Uid, series: Uid, principal: Reader, archive: ArchiveDep, options: Rendering
) -> Response:
    return await _picture(request, principal, archive, study, series, None, thumbnail=True, options=options)


@router.get(
    "/studies/{study}/thumbnail",
    responses={200: _IMAGE},
    response_class=Response,
    summary="WADO-RS: study thumbnail (its first instance)",
)
async def study_thumbnail(
    request: Request, study: Uid, principal: Reader, archive: ArchiveDep, options: Rendering
) -> Response:
    return await _picture(request, principal, archive, study, None, None, thumbnail=True, options=options)


async def _rendered_many(
    request: Request,
    principal: Principal,
    archive: ArchiveDep,
    study: str,
    series: str | None,
    options: RenderQuery,
) -> StreamingResponse:
    """Every instance's first frame rendered, one part each (PS3.18 study/series rendered)."""
    principal.require_study(study)
    media_type = choose_rendered_type(request)
    records = await archive.instances(principal.tenant, study, series)

    async def render(record: InstanceRecord) -> bytes:
        try:
            picture = await archive.rendered(
                principal.tenant,
                record.study_instance_uid,
                record.series_instance_uid,
                record.sop_instance_uid,
                media_type=media_type,
                quality=options.quality,
                window=options.window,
                viewport=options.viewport,
            )
        except NotSupportedError as exc:
            raise NotAcceptableError(exc.message, hint=exc.hint) from None
        return picture.data

    first = await render(records[0])  # errors before the answer starts are clean statuses

    async def parts() -> AsyncIterator[tuple[str, bytes]]:
        yield media_type, first
        for record in records[1:]:
            yield media_type, await render(record)

    boundary = new_boundary()
    return StreamingResponse(
        write_related(parts(), boundary),
        media_type=related_content_type(boundary, media_type),
        headers=ignored_parameters(request, _RENDER_PARAMETERS),
    )


@router.get(
    "/studies/{study}/series/{series}/rendered",
    responses={200: _MULTIPART},
    summary="WADO-RS: rendered series (each instance's first frame)",
)
async def rendered_series(
    request: Request, study: Uid, series: Uid, principal: Reader, archive: ArchiveDep, options: Rendering
) -> StreamingResponse:
    return await _rendered_many(request, principal, archive, study, series, options)


@router.get(
    "/studies/{study}/rendered",
    responses={200: _MULTIPART},
    summary="WADO-RS: rendered study (each instance's first frame)",
)
async def rendered_study(
    request: Request, study: Uid, principal: Reader, archive: ArchiveDep, options: Rendering
) -> StreamingResponse:
    return await _rendered_many(request, principal, archive, study, None, options)


# -- DELETE ---------------------------------------------------------------------------------------


def _deleted(result: Any) -> JSONResponse:
    return JSONResponse({"studies": result.studies, "series": result.series, "instances": result.instances})


@router.delete("/studies/{study}", summary="Delete a study")
async def delete_study(study: Uid, principal: Writer, archive: ArchiveDep) -> JSONResponse:
    """Index rows first, then objects. Answers the counts removed; 404 if the study is unknown."""
    return _deleted(await archive.delete(principal.tenant, study))


@router.delete("/studies/{study}/series/{series}", summary="Delete a series")
async def delete_series(study: Uid, series: Uid, principal: Writer, archive: ArchiveDep) -> JSONResponse:
    return _deleted(await archive.delete(principal.tenant, study, series))


@router.delete("/studies/{study}/series/{series}/instances/{instance}", summary="Delete an instance")
async def delete_instance(
    study: Uid, series: Uid, instance: Uid, principal: Writer, archive: ArchiveDep
) -> JSONResponse:
    return _deleted(await archive.delete(principal.tenant, study, series, instance))
