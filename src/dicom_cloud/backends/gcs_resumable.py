"""GCS resumable upload sessions kept across processes (JSON API, ``uploadType=resumable``).

A session is a URI that accepts the object's bytes in order, in chunks that are multiples of
256 KiB (except the last). Asked with ``Content-Range: bytes */SIZE``, it says how many bytes it
holds, so a resumed run continues from the last whole part it kept. GCS reports no checksum per
chunk: the object's CRC32C, computed by the server once the last chunk arrives, is compared with
the file's; a mismatch deletes the object. The session URI itself authorises the upload (no
credentials needed to continue it) and lives one week: it is a secret (docs/resume.md).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote, urlencode

import requests

from ..errors import (
    AuthenticationError,
    BucketNotFoundError,
    CorruptedInTransitError,
    DicomCloudError,
    IntegrityError,
    NetworkError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    UsageError,
)
from ..resumable import IncompleteUpload, PartRecord, part_range
from ..store import CHECKSUM_METADATA_KEY, ObjectInfo, PutOptions
from .rest import Request, RestClient

#: Chunks other than the last must be multiples of this (a GCS rule).
CHUNK_QUANTUM = 256 * 1024
_SESSION_GONE = frozenset({404, 410})


class GCSResumableUploads:
    """Resumable sessions into one GCS bucket; ``authorize`` gives the headers of one request
    (a bearer token; nothing for the emulator) and may block (it refreshes tokens)."""

    min_part_size = CHUNK_QUANTUM
    max_parts = 1_000_000
    sequential = True

    def __init__(
        self,
        *,
        bucket: str,
        endpoint: str,
        authorize: Callable[[], dict[str, str]],
        kms_key_name: str | None = None,
        status_query: bool = True,
        max_retries: int = 4,
        timeout: tuple[float, float] = (10.0, 300.0),
    ) -> None:
        self.bucket = bucket
        self._endpoint = endpoint.rstrip("/")
        self._authorize = authorize
        self._kms_key_name = kms_key_name
        #: fake-gcs-server takes a status query (an empty PUT with ``bytes */SIZE``) for the end of
        #: the upload and finalises a truncated object: against it, sessions are not resumed.
        self._status_query = status_query
        self._http = RestClient(what=f"GCS at {self._endpoint}", max_retries=max_retries, timeout=timeout)

    def _url(self, key: str) -> str:
        return f"gs://{self.bucket}/{key}"

    def _object_api(self, key: str) -> str:
        return f"{self._endpoint}/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(key, safe='')}"

    def _error(self, response: requests.Response, what: str) -> DicomCloudError:
        try:
            reason = str(response.json()["error"]["message"])[:200]
        except Exception:
            reason = ""
        detail = f": {reason}" if reason else f": HTTP {response.status_code}"
        status = response.status_code
        if status == 401:
            return AuthenticationError(f"Google refused the credentials for {what}{detail}")
        if status == 403:
            return PermissionDeniedError(f"permission denied on {what}{detail}")
        if status == 404 and "bucket" in reason.lower():
            return BucketNotFoundError(f"bucket gs://{self.bucket} does not exist")
        if status in _SESSION_GONE:
            return NotFoundError(f"{what}: not found (or the upload session expired)")
        if status == 400:
            return UsageError(f"GCS rejected the request for {what}{detail}")
        return DicomCloudError(f"GCS answered HTTP {status} for {what}{detail}")

    # -- ResumableUploads ----------------------------------------------------------------------

    async def begin(
        self,
        key: str,
        size: int,
        part_size: int,
        options: PutOptions,
        *,
        origin: str | None = None,
    ) -> dict[str, Any]:
        """Start a session for ``size`` bytes. ``origin``: the browser origin that will send the
        chunks (GCS answers the session's requests with CORS headers for the initiating origin)."""
        if part_size % CHUNK_QUANTUM and part_size < size:
            raise UsageError(f"GCS resumable uploads need a part size multiple of {CHUNK_QUANTUM} bytes")
        if options.tags:
            raise NotSupportedError(f"{self._url(key)}: GCS has no object tags", hint="use metadata instead")
        query = {"uploadType": "resumable", "name": key}
        if self._kms_key_name:
            query["kmsKeyName"] = self._kms_key_name
        url = f"{self._endpoint}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o?{urlencode(query)}"
        content_type = options.content_type or "application/octet-stream"
        resource: dict[str, Any] = {
            "name": key,
            "contentType": content_type,
            "metadata": dict(options.metadata),
        }
        crc = options.metadata.get(CHECKSUM_METADATA_KEY)
        if crc:
            # Declared up front, the CRC32C is checked by the server when the last chunk arrives:
            # an object with other bytes is never finalised.
            resource["crc32c"] = base64.b64encode(bytes.fromhex(crc)).decode()
        body = json.dumps(resource).encode()

        def build() -> Request:
            headers = {
                **self._authorize(),
                "Content-Type": "application/json; charset=UTF-8",
                "X-Upload-Content-Type": content_type,
                "X-Upload-Content-Length": str(size),
            }
            if origin:
                headers["Origin"] = origin
            return Request("POST", url, headers, body)

        response = await self._http.send(build)
        location = response.headers.get("Location")
        if response.status_code >= 300 or not location:
            raise self._error(response, self._url(key))
        return {
            "provider": "gcs",
            "bucket": self.bucket,
            "key": key,
            "size": size,
            "session_uri": location,
        }

    async def _status(self, state: dict[str, Any]) -> int:
        """Bytes the session holds (its size once the object is complete)."""
        size = int(state["size"])

        def build() -> Request:
            return Request(
                "PUT", state["session_uri"], {"Content-Range": f"bytes */{size}", "Content-Length": "0"}
            )

        response = await self._http.send(build, ok=lambda s: s in (200, 201, 308))
        if response.status_code in (200, 201):
            return size
        if response.status_code == 308:
            held = response.headers.get("Range", "")  # "bytes=0-N", absent when nothing is held
            return int(held.rsplit("-", 1)[1]) + 1 if held else 0
        raise self._error(response, f"the upload session of {self._url(state['key'])}")

    async def uploaded_parts(self, state: dict[str, Any]) -> dict[int, PartRecord]:
        if not self._status_query:
            await self.abort(state)
            raise NotFoundError(f"the storage emulator cannot resume the upload of {self._url(state['key'])}")
        size, part_size = int(state["size"]), int(state["part_size"])
        held = await self._status(state)
        parts: dict[int, PartRecord] = {}
        number = 1
        while True:
            start, end = part_range(number, size, part_size)
            if start >= size or end > held:
                return parts
            parts[number] = PartRecord(number, end - start)
            number += 1

    async def upload_part(self, state: dict[str, Any], number: int, data: bytes | memoryview) -> PartRecord:
        size, part_size = int(state["size"]), int(state["part_size"])
        start, end = part_range(number, size, part_size)
        if end - start != len(data):
            raise IntegrityError(f"part {number} of {self._url(state['key'])} has the wrong size")
        headers = {"Content-Range": f"bytes {start}-{end - 1}/{size}", "Content-Length": str(len(data))}
        response = await self._http.send(
            lambda: Request("PUT", state["session_uri"], headers, data), ok=lambda s: s in (200, 201, 308)
        )
        what = f"chunk {number} of {self._url(state['key'])}"
        if response.status_code == 308:
            held = response.headers.get("Range", "")
            if not held or int(held.rsplit("-", 1)[1]) + 1 < end:
                # The server kept less than was sent: a later attempt continues from what it holds.
                raise NetworkError(f"GCS kept only part of {what}")
        elif response.status_code not in (200, 201):
            error = self._error(response, what)
            if type(error) is not NotFoundError:
                raise error
            # The session is gone. The last chunk may have been sent again after its answer was
            # lost: the first one finalised the object, and a server may forget a finished
            # session. The object says whether it did; otherwise a later attempt begins anew.
            if end < size or not await self._holds(state):
                raise NetworkError(f"{what}: the upload session was lost") from None
        return PartRecord(number, len(data))

    async def _holds(self, state: dict[str, Any]) -> bool:
        """Whether the bucket holds the object this session was writing: its size and CRC32C."""
        response = await self._object(state["key"])
        if response.status_code >= 300:
            return False
        resource = response.json()
        reported = _reported_crc32c(resource)
        return (
            int(resource.get("size", -1)) == int(state["size"])
            and reported is not None
            and reported == state.get("crc32c")
        )

    async def _object(self, key: str) -> requests.Response:
        """The answer to a GET of the object's resource (JSON API metadata)."""
        url = self._object_api(key)
        return await self._http.send(lambda: Request("GET", url, self._authorize()))

    async def complete(self, state: dict[str, Any], parts: list[PartRecord]) -> ObjectInfo:
        # The last chunk finalised the object; what remains is to check it.
        key = state["key"]
        response = await self._object(key)
        if response.status_code >= 300:
            raise self._error(response, self._url(key))
        resource = response.json()
        expected = state.get("crc32c")
        reported = _reported_crc32c(resource)
        if expected and reported and reported != expected:
            url = self._object_api(key)
            await self._http.send(lambda: Request("DELETE", url, self._authorize()))
            raise CorruptedInTransitError(
                f"{self._url(key)}: the uploaded object's CRC32C differs from the file's; it was deleted"
            )
        return ObjectInfo(
            key=key,
            size=int(resource.get("size", 0)),
            etag=resource.get("etag"),
            metadata=dict(resource.get("metadata") or {}),
            content_type=resource.get("contentType"),
        )

    async def abort(self, state: dict[str, Any]) -> None:
        # GCS answers 499 to a cancelled session; anything else means it was gone already.
        await self._http.send(lambda: Request("DELETE", state["session_uri"], {"Content-Length": "0"}))

    def incomplete(self, prefix: str = "") -> AsyncIterator[IncompleteUpload]:
        raise NotSupportedError(
            f"gs://{self.bucket}: resumable upload sessions cannot be listed",
            hint="GCS discards unfinished sessions by itself after one week",
        )

    async def abort_incomplete(self, upload: IncompleteUpload) -> None:
        raise NotSupportedError(f"gs://{self.bucket}: resumable upload sessions cannot be listed")

    async def close(self) -> None:
        self._http.close()


def _reported_crc32c(resource: dict[str, Any]) -> str | None:
    """The CRC32C an object resource reports, as hex (GCS gives it in base64), if any."""
    reported = resource.get("crc32c")
    return base64.b64decode(reported).hex() if reported else None


def authorization_from(credentials: Any, refresh: Callable[[], None]) -> dict[str, str]:
    """Bearer header from google-auth credentials, refreshed when needed (blocking)."""
    try:
        if not credentials.valid:
            refresh()
    except Exception as exc:
        raise AuthenticationError(f"cannot obtain a Google access token: {type(exc).__name__}") from None
    return {"Authorization": f"Bearer {credentials.token}"}
