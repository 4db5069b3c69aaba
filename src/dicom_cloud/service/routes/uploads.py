"""Direct uploads: the client declares files, PUTs each to its own short-lived URL, then completes.

The bytes go straight to the bucket (presigned PUT URLs into the archive's staging prefix) when
the store can presign. Stores that cannot (local disk, memory) get URLs of this service's own
signed route ``PUT /uploads/{id}/files/{index}``: the signature (HMAC with ``signing_secret``)
binds tenant, session, file, content type, size and expiry, so that URL works like a presigned
one and needs no other credential.

Declared sizes over ``upload_max_bytes`` are refused before any URL is made; the actual size
(and CRC32C when declared) is checked by the archive when the session is completed, and a file
that differs is rejected and quarantined.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ...archive import DeclaredFile, UploadOutcome, UploadSession
from ...errors import NotSupportedError
from ..auth import Principal
from ..deps import ArchiveDep, MetricsDep, SettingsDep, Writer
from ..dicomjson import service_root
from ..http_errors import (
    MalformedRequestError,
    PayloadTooLargeError,
    UnauthenticatedError,
)
from ..memory import RequestMemory
from ..multipart import MediaType, body_chunks
from ..presign import MAX_PARTS, S3PutSigner
from ..presign_clouds import CloudPutSigner

if TYPE_CHECKING:
    from ...archive.queue import IngestQueue

router = APIRouter(tags=["uploads"])

#: Memory a service-signed PUT holds while its body is written to staging.
STREAMED_PUT_MEMORY = 3 * 8 * 1024 * 1024

UploadContentType = Literal["application/dicom", "application/octet-stream"]
SessionId = Annotated[str, Path(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_-]+$")]


class FileIn(BaseModel):
    name: str = Field(..., min_length=1, max_length=500, description="the client's name for the file")
    size: int = Field(..., ge=1, description="bytes the client will PUT")
    content_type: UploadContentType = "application/dicom"
    crc32c: str | None = Field(None, pattern=r"^[0-9a-fA-F]{8}$", description="CRC32C as 8 hex digits")


class UploadIn(BaseModel):
    files: list[FileIn] = Field(..., min_length=1)


class PartUrl(BaseModel):
    number: int
    size: int
    url: str
    headers: dict[str, str]


class MultipartUrls(BaseModel):
    upload_id: str = Field(..., description="send it back at completion with the parts' ETags")
    part_size: int
    parts: list[PartUrl]
    in_order: bool = Field(default=False, description="send the parts one after another, in order")
    etags_required: bool = Field(
        default=True, description="send each part's ETag back at completion (otherwise completing is enough)"
    )


class FileUrl(BaseModel):
    index: int
    name: str
    size: int
    method: Literal["PUT"] = "PUT"
    url: str | None = Field(..., description="one PUT of the whole file; None when sent in parts")
    headers: dict[str, str] = Field(
        ..., description="headers the PUT must carry exactly as given (some are signed)"
    )
    multipart: MultipartUrls | None = Field(None, description="for large files: one PUT per part")


class CompletedParts(BaseModel):
    index: int = Field(..., ge=0)
    upload_id: str = Field(..., min_length=1, max_length=1024)
    #: Null where a part's answer had no ETag header (Azure blocks, GCS chunks: not needed there).
    etags: list[str | None] = Field(..., min_length=1, max_length=10_000)


class CompleteIn(BaseModel):
    """For files sent in parts: the ETag answered to each part's PUT, in part order."""

    parts: list[CompletedParts] = Field(default_factory=list)


class UploadOut(BaseModel):
    id: str
    state: str
    expires: datetime
    url_expires: datetime
    files: list[FileUrl]


#: What ``GET /uploads/{id}`` reports of a session's state: where its ingest stands.
UploadStatusName = Literal["pending", "queued", "running", "done", "failed", "expired"]
_STATUS_OF_STATE: dict[str, UploadStatusName] = {
    "pending": "pending",
    "queued": "queued",
    "completing": "running",
    "completed": "done",
    "failed": "failed",
    "expired": "expired",
}


def upload_status(state: str) -> UploadStatusName:
    """The status a session's state is reported as (``completing`` is ``running``: a request or
    a worker is ingesting it; ``completed`` is ``done``)."""
    return _STATUS_OF_STATE[state]


class FileOutcome(BaseModel):
    index: int
    name: str
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    created: bool | None = None
    reason: str | None = None
    #: Caveats of an accepted file (e.g. its file meta names another SOP Instance UID).
    warnings: list[str] = []


class UploadResult(BaseModel):
    id: str
    accepted: list[FileOutcome]
    rejected: list[FileOutcome]


class UploadState(BaseModel):
    id: str
    state: str
    status: UploadStatusName = Field(
        ..., description="pending, queued, running, done, failed (every attempt failed) or expired"
    )
    expires: datetime
    files: int
    result: dict[str, Any] | None
    outcome: UploadResult | None = Field(
        None,
        description="the files ingested so far (running, failed) or in all (done), as completing answers",
    )
    error: str | None = Field(None, description="why the last attempt failed (status failed)")


class UploadQueued(BaseModel):
    id: str
    status: UploadStatusName = "queued"
    status_url: str = Field(..., description="GET it (same credentials) until status is done or failed")


def upload_signature(
    secret: bytes, *, tenant: str, session: str, index: int, content_type: str, size: int, expires: int
) -> str:
    message = "\n".join(
        ["dicom-cloud-upload-v1", tenant, session, str(index), content_type, str(size), str(expires)]
    )
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


@router.post("/uploads", status_code=201, summary="Start a direct upload: one PUT URL per declared file")
async def create_upload(
    request: Request, body: UploadIn, principal: Writer, archive: ArchiveDep, settings: SettingsDep
) -> UploadOut:
    if len(body.files) > settings.upload_max_files:
        raise PayloadTooLargeError(f"at most {settings.upload_max_files} files per upload")
    for number, file in enumerate(body.files):
        if file.size > settings.upload_max_bytes:
            raise PayloadTooLargeError(
                f"file {number} declares {file.size} bytes; the maximum is {settings.upload_max_bytes}"
            )
    ttl = timedelta(seconds=settings.upload_url_ttl_seconds)
    url_expires = int(time.time() + ttl.total_seconds())
    signer: S3PutSigner | None = request.app.state.put_signer
    cloud: CloudPutSigner | None = getattr(request.app.state, "cloud_signer", None)
    in_parts = [
        (signer is not None or cloud is not None) and f.size > settings.upload_part_size for f in body.files
    ]
    # The completion refuses objects written after their URL expired, where the client's request
    # is what writes the object (not blocks or parts the service joins at completion).
    deadline = datetime.fromtimestamp(url_expires, UTC)
    declared = [
        DeclaredFile(
            f.name,
            f.size,
            f.crc32c.lower() if f.crc32c else None,
            content_type=f.content_type,
            put_by=None if parts and not (cloud and cloud.client_finalises_parts) else deadline,
        )
        for f, parts in zip(body.files, in_parts, strict=True)
    ]
    # The session outlives its URLs by an hour: time to finish the last PUT and complete.
    session = await archive.create_upload(principal.tenant, declared, expires_in=ttl + timedelta(hours=1))
    presigned: list[str] | None = None
    if signer is None and cloud is None:
        try:
            presigned = await archive.upload_urls(session, expires_in=ttl)
        except NotSupportedError:
            presigned = None  # local disk, memory: this service takes the bytes itself
    urls = []
    for index, (file, key) in enumerate(zip(body.files, session.staging_keys, strict=True)):
        headers: dict[str, str] = {"Content-Type": file.content_type}
        multipart = None
        url: str | None
        signed = None
        if cloud is not None:  # Azure, GCS: what each provider's signature can bind
            origin = request.headers.get("origin")
            signed = await _cloud_file(
                cloud, archive.store_key(key), file, in_parts[index], settings, ttl, origin
            )
            if signed is None:
                cloud = None  # credentials that cannot sign: the service takes the bytes itself
        if signed is not None:
            url, headers, multipart = signed
        elif signer is not None and in_parts[index]:
            url, multipart = None, await _multipart(signer, archive.store_key(key), file, settings, ttl)
        elif signer is not None:  # S3 with static keys: content type and exact size are signed
            scoped = signer.put(archive.store_key(key), file.content_type, file.size, ttl)
            url, headers = scoped.url, scoped.headers
        elif presigned is not None:
            url = presigned[index]
        else:
            url = _service_put_url(request, settings, principal, session, index, file, url_expires)
        urls.append(
            FileUrl(
                index=index, name=file.name, size=file.size, url=url, headers=headers, multipart=multipart
            )
        )
    return UploadOut(
        id=session.id,
        state=session.state,
        expires=session.expires,
        url_expires=datetime.fromtimestamp(url_expires).astimezone(),
        files=urls,
    )


async def _multipart(
    signer: S3PutSigner, key: str, file: FileIn, settings: SettingsDep, ttl: timedelta
) -> MultipartUrls:
    part_size = max(settings.upload_part_size, -(-file.size // MAX_PARTS))
    upload_id = await signer.create_multipart(key, file.content_type)
    parts = signer.part_urls(key, upload_id, file.size, part_size, ttl)
    return MultipartUrls(
        upload_id=upload_id,
        part_size=part_size,
        parts=[
            PartUrl(
                number=number, size=int(part.headers["Content-Length"]), url=part.url, headers=part.headers
            )
            for number, part in enumerate(parts, start=1)
        ],
    )


async def _cloud_file(
    cloud: CloudPutSigner,
    key: str,
    file: FileIn,
    in_parts: bool,
    settings: SettingsDep,
    ttl: timedelta,
    origin: str | None,
) -> tuple[str | None, dict[str, str], MultipartUrls | None] | None:
    """URL, headers and parts of one file on Azure or GCS; None when the credentials cannot
    sign (GCS without a key or the right to sign blobs)."""
    try:
        if in_parts:
            parts = await _cloud_parts(cloud, key, file, settings, ttl, origin)
            return None, {"Content-Type": file.content_type}, parts
        scoped = await cloud.put(key, file.content_type, file.size, ttl)
    except NotSupportedError:
        return None
    return scoped.url, scoped.headers, None


async def _cloud_parts(
    cloud: CloudPutSigner, key: str, file: FileIn, settings: SettingsDep, ttl: timedelta, origin: str | None
) -> MultipartUrls:
    part_size = max(settings.upload_part_size, -(-file.size // MAX_PARTS))
    plan = await cloud.start_parts(
        key, file.content_type, file.size, part_size, ttl, crc32c=file.crc32c, origin=origin
    )
    parts, start = [], 0
    for number, part in enumerate(plan.parts, start=1):
        length = min(plan.part_size, file.size - start)
        parts.append(PartUrl(number=number, size=length, url=part.url, headers=part.headers))
        start += length
    return MultipartUrls(
        upload_id=plan.upload_id,
        part_size=plan.part_size,
        parts=parts,
        in_order=plan.in_order,
        etags_required=plan.etags_required,
    )


def _service_put_url(
    request: Request,
    settings: SettingsDep,
    principal: Principal,
    session: UploadSession,
    index: int,
    file: FileIn,
    expires: int,
) -> str:
    signature = upload_signature(
        settings.secret_bytes(),
        tenant=principal.tenant,
        session=session.id,
        index=index,
        content_type=file.content_type,
        size=file.size,
        expires=expires,
    )
    query = urlencode(
        {"tenant": principal.tenant, "size": file.size, "expires": expires, "signature": signature}
    )
    return f"{service_root(request, settings)}/uploads/{session.id}/files/{index}?{query}"


@router.put(
    "/uploads/{session_id}/files/{index}",
    status_code=204,
    response_class=Response,
    summary="Receive one declared file (stores that cannot presign; the signature is the credential)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/dicom": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def put_file(
    request: Request,
    session_id: SessionId,
    index: Annotated[int, Path(ge=0, le=1_000_000)],
    tenant: Annotated[str, Query(min_length=1, max_length=200)],
    size: Annotated[int, Query(ge=1)],
    expires: Annotated[int, Query(ge=0)],
    signature: Annotated[str, Query(min_length=64, max_length=64)],
    archive: ArchiveDep,
    settings: SettingsDep,
) -> Response:
    content_type = MediaType.parse(request.headers.get("content-type", "")).value
    expected = upload_signature(
        settings.secret_bytes(),
        tenant=tenant,
        session=session_id,
        index=index,
        content_type=content_type,
        size=size,
        expires=expires,
    )
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise UnauthenticatedError(
            "the upload URL's signature does not match (altered, or another content type)"
        )
    if expires < time.time():
        raise UnauthenticatedError("the upload URL has expired", hint="start a new upload")
    memory: RequestMemory = request.app.state.request_memory
    # The body goes to staging as it arrives: a few chunks in memory, and the store's write
    # buffers (one 8 MiB part in flight, about three parts held by object-store clients).
    async with memory.reserve(min(size, STREAMED_PUT_MEMORY)):
        await archive.write_staging(tenant, session_id, index, body_chunks(request, size))
    return Response(status_code=204)


@router.get("/uploads/{session_id}", summary="The state of an upload")
async def get_upload(session_id: SessionId, principal: Writer, archive: ArchiveDep) -> UploadState:
    """Where the upload stands; with the ingest queue, the status URL a completion answers."""
    session = await archive.get_upload(principal.tenant, session_id)
    result = dict(session.result) if session.result is not None else None
    # A failed session queued again keeps its last error until its new attempt records progress.
    error = result.get("error") if result and session.state == "failed" else None
    return UploadState(
        id=session.id,
        state=session.state,
        status=upload_status(session.state),
        expires=session.expires,
        files=len(session.files),
        result=result,
        outcome=_result(UploadOutcome.from_json(result)) if result else None,
        error=str(error) if error is not None else None,
    )


@router.post(
    "/uploads/{session_id}/complete",
    summary="Ingest the uploaded files",
    response_model=UploadResult,
    responses={
        202: {
            "model": UploadQueued,
            "description": "queued for an ingest worker (ingest_queue on): follow Location",
        }
    },
)
async def complete_upload(
    request: Request,
    session_id: SessionId,
    principal: Writer,
    archive: ArchiveDep,
    metrics: MetricsDep,
    settings: SettingsDep,
    body: CompleteIn | None = None,
) -> Any:
    """Each declared file is checked (size, CRC32C when declared, content type, write time,
    DICOM Part 10) and ingested;
    refused files are listed with their reason. Completing again answers the same outcome.
    Files sent in parts are joined first (body: their upload ids and the parts' ETags, when
    ``etags_required``; otherwise the service finds the parts itself and no body is needed).
    With the ingest queue the files are ingested by a worker: the answer is 202 with the
    status URL (``Location``), whose ``outcome`` has this answer's shape once ``done``."""
    cloud: CloudPutSigner | None = getattr(request.app.state, "cloud_signer", None)
    if cloud is not None:
        await _finish_cloud_parts(cloud, archive, principal, session_id, settings.upload_part_size)
    elif body is not None and body.parts:
        signer: S3PutSigner | None = request.app.state.put_signer
        session = await archive.get_upload(principal.tenant, session_id)
        if signer is None or session.state != "pending":
            raise MalformedRequestError("this upload has no parts to join")
        for completed in body.parts:
            if completed.index >= len(session.staging_keys):
                raise MalformedRequestError(f"the upload has no file {completed.index}")
            key = archive.store_key(session.staging_keys[completed.index])
            etags = [etag for etag in completed.etags if etag]
            if len(etags) != len(completed.etags):
                raise MalformedRequestError("every part's ETag is needed to join the parts")
            await signer.complete_multipart(key, completed.upload_id, etags)
    queue: IngestQueue | None = getattr(request.app.state, "ingest_queue", None)
    if queue is not None:
        return await queue_completion(request, queue, archive, principal.tenant, session_id, settings)
    outcome: UploadOutcome = await archive.complete_upload(principal.tenant, session_id)
    metrics.instances_stored.labels("stored").inc(len(outcome.accepted))
    metrics.instances_stored.labels("refused").inc(len(outcome.rejected))
    return _result(outcome)


async def queue_completion(
    request: Request,
    queue: IngestQueue,
    archive: ArchiveDep,
    tenant: str,
    session_id: str,
    settings: SettingsDep,
) -> UploadResult | JSONResponse:
    """Queue the session's ingest and answer 202 with its status URL; a session done already is
    answered its outcome (200), as completing twice is without the queue."""
    session, queued = await archive.queue_upload(tenant, session_id)
    if session.state == "completed" and session.result is not None:
        return _result(UploadOutcome.from_json(session.result))
    if queued:
        try:
            await queue.enqueue(tenant, session_id)
        except BaseException:
            await archive.unqueue_upload(tenant, session_id)  # to be completed again
            raise
    status_url = f"{service_root(request, settings)}/uploads/{session_id}"
    answer = UploadQueued(id=session_id, status=upload_status(session.state), status_url=status_url)
    return JSONResponse(answer.model_dump(), status_code=202, headers={"Location": status_url})


def _result(outcome: UploadOutcome) -> UploadResult:
    return UploadResult(
        id=outcome.session_id,
        accepted=[
            FileOutcome(
                index=a.index,
                name=a.name,
                sop_instance_uid=a.sop_instance_uid,
                study_instance_uid=a.study_instance_uid,
                series_instance_uid=a.series_instance_uid,
                created=a.created,
                warnings=list(a.warnings),
            )
            for a in outcome.accepted
        ],
        rejected=[FileOutcome(index=r.index, name=r.name, reason=r.reason) for r in outcome.rejected],
    )


async def _finish_cloud_parts(
    cloud: CloudPutSigner, archive: ArchiveDep, principal: Principal, session_id: str, part_size: int
) -> None:
    """Join the parts of files sent in parts (Azure blocks); a session no longer pending has
    nothing left to join (completing again answers its recorded outcome)."""
    session = await archive.get_upload(principal.tenant, session_id)
    if session.state != "pending":
        return
    for file, key in zip(session.files, session.staging_keys, strict=True):
        if file.size > part_size:
            await cloud.finish_parts(archive.store_key(key), file.content_type or "application/dicom")
