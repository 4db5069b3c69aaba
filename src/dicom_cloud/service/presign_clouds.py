"""Presigned direct uploads into Azure Blob and Google Cloud Storage, bound as tightly as each
provider's signature allows (docs/service.md, "What the URL binds, per provider").

Azure (service SAS signed with the account key; without one, the service's own route): a whole file
is one Put Blob under a SAS of permission ``c`` (create only: no read, no list, no overwrite of a
blob that exists) for the exact blob, with an expiry and ``spr=https`` (``https,http`` only when
the configured endpoint is plain HTTP, as an emulator's). A SAS cannot bind size or content
type: both are checked at completion. Large files go in blocks: one URL per block (``comp=block``
with its block id, SAS of permission ``w`` on the exact blob); the service commits the blocks
(Put Block List, its own key) when the upload is completed, so a client needs no commit right.

GCS (V4 signed URLs): a whole file is one XML-API PUT whose signature covers ``Content-Type``
and ``x-goog-content-length-range: N,N``, so GCS refuses another type or size. Large files go
through a resumable session the service starts (JSON API, ``X-Upload-Content-Length`` and the
content type bound by GCS, the declared CRC32C checked by GCS when the last chunk arrives); the
client PUTs the chunks in order to the session URI with ``Content-Range``. The session URI is
itself the credential, valid for a week: the service checks size, type and write time at
completion like everything else.
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

from ..backends.azure_sas import blob_sas_url
from ..backends.gcs import GCSStore
from ..backends.gcs_resumable import CHUNK_QUANTUM, GCSResumableUploads
from ..backends.http_errors import status_error
from ..backends.rest import Request, RestClient
from ..credentials import azure_settings
from ..errors import UsageError
from ..store import CHECKSUM_METADATA_KEY, PutOptions, Store
from ..url import parse_url
from .presign import ScopedPut

#: A service version that knows Put Block, Get Block List and Put Block List with SAS.
_AZURE_VERSION = "2021-08-06"
#: Block ids of direct uploads: ``dicom-cloud-upload:NNNNNN`` in base64 (Azure wants every id of
#: a blob to have the same length).
_BLOCK_ID = re.compile(r"dicom-cloud-upload:(\d{6})")
#: Lifetime of the SAS the service signs for its own requests (Get/Put Block List).
_OWN_SAS = timedelta(minutes=15)


@dataclass(frozen=True)
class PartsPlan:
    """A file sent in parts: one URL per part, and how the parts must be sent."""

    upload_id: str
    part_size: int
    parts: list[ScopedPut]
    #: The parts must be sent one after another, in order (a GCS resumable session).
    in_order: bool
    #: The ETag answered to each part must be sent back at completion (S3).
    etags_required: bool


class CloudPutSigner(Protocol):
    """Direct-upload URLs of one Azure container or GCS bucket (keys are store keys)."""

    #: ``azure`` or ``gcs``: for messages and docs only; the routes never branch on it.
    provider: str
    #: True when the client's last request creates the object (so its write time is the
    #: client's and can be checked against the URL's expiry at completion).
    client_finalises_parts: bool

    async def put(self, key: str, content_type: str, size: int, ttl: timedelta) -> ScopedPut: ...

    async def start_parts(
        self,
        key: str,
        content_type: str,
        size: int,
        part_size: int,
        ttl: timedelta,
        *,
        crc32c: str | None,
        origin: str | None,
    ) -> PartsPlan: ...

    async def finish_parts(self, key: str, content_type: str) -> None: ...

    async def close(self) -> None: ...


def cloud_put_signer(storage_url: str, store: Callable[[], Store]) -> CloudPutSigner | None:
    """The signer for ``azure://`` (with an account key) or ``gs://`` storage (``store()``: the
    archive's opened store, asked for only then); None otherwise (S3 has its own signer, local
    stores the service's signed route)."""
    scheme = parse_url(storage_url).scheme
    if scheme == "azure":
        return AzurePutSigner.for_storage(storage_url)
    if scheme == "gs":
        opened = store()
        return GCSPutSigner(opened) if isinstance(opened, GCSStore) else None
    return None


def _part_ranges(size: int, part_size: int) -> list[tuple[int, int]]:
    return [(start, min(part_size, size - start)) for start in range(0, size, part_size)]


# -- Azure ------------------------------------------------------------------------------------------


def azure_block_id(number: int) -> str:
    return base64.b64encode(f"dicom-cloud-upload:{number:06d}".encode()).decode()


def _block_number(encoded: str) -> int | None:
    try:
        match = _BLOCK_ID.fullmatch(base64.b64decode(encoded, validate=True).decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None
    return int(match.group(1)) if match else None


class AzurePutSigner:
    provider = "azure"
    client_finalises_parts = False

    def __init__(self, *, endpoint: str, account: str, account_key: str, container: str) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._account = account
        self._key = account_key
        self._container = container
        self._http = RestClient(what=f"Azure at {self._endpoint}", max_retries=2, timeout=(10.0, 120.0))

    @classmethod
    def for_storage(cls, storage_url: str) -> AzurePutSigner | None:
        location = parse_url(storage_url)
        az = azure_settings()
        if not az.account or not az.account_key:
            return None  # a SAS token or Entra ID cannot sign service SAS: no direct uploads
        endpoint = az.endpoint or f"https://{az.account}.blob.core.windows.net"
        return cls(
            endpoint=endpoint, account=az.account, account_key=az.account_key, container=location.bucket
        )

    def _url(self, key: str, permissions: str, ttl: timedelta, query: dict[str, str] | None = None) -> str:
        return blob_sas_url(
            endpoint=self._endpoint,
            account=self._account,
            account_key=self._key,
            container=self._container,
            blob=key,
            expires=ttl,
            permissions=permissions,
            operation=query,
        )

    async def put(self, key: str, content_type: str, size: int, ttl: timedelta) -> ScopedPut:
        # ``c`` alone: the URL creates the blob once and can neither read nor overwrite it.
        headers = {"x-ms-blob-type": "BlockBlob", "Content-Type": content_type}
        return ScopedPut(self._url(key, "c", ttl), headers)

    async def start_parts(
        self,
        key: str,
        content_type: str,
        size: int,
        part_size: int,
        ttl: timedelta,
        *,
        crc32c: str | None,
        origin: str | None,
    ) -> PartsPlan:
        # Nothing to open on the server: blocks are staged under the blob's name (``w`` is the
        # permission Put Block needs; the block list is committed by the service).
        parts = [
            ScopedPut(
                self._url(key, "w", ttl, {"comp": "block", "blockid": azure_block_id(number)}),
                {"Content-Length": str(length)},
            )
            for number, (_, length) in enumerate(_part_ranges(size, part_size), start=1)
        ]
        return PartsPlan("azure-blocks", part_size, parts, in_order=False, etags_required=False)

    async def finish_parts(self, key: str, content_type: str) -> None:
        """Commit the blocks the client staged, in number order. None staged: nothing to do (the
        completion then finds the blob or reports it not uploaded). A gap is a UsageError."""
        url = self._url(key, "r", _OWN_SAS, {"comp": "blocklist", "blocklisttype": "uncommitted"})
        headers = {"x-ms-version": _AZURE_VERSION}
        answer = await self._http.send(lambda: Request("GET", url, headers))
        if answer.status_code == 404:
            return
        if answer.status_code >= 300:
            raise status_error("Azure", answer.status_code, "the uploaded blocks", "")
        root = ET.fromstring(answer.content)  # noqa: S314 - from the configured endpoint, no entities
        numbers = sorted(
            n for n in (_block_number(b.findtext("Name") or "") for b in root.iter("Block")) if n is not None
        )
        if not numbers:
            return
        if numbers != list(range(1, len(numbers) + 1)):
            missing = next(n for n in range(1, numbers[-1] + 1) if n not in numbers)
            raise UsageError(
                f"part {missing} of a file sent in parts was not uploaded",
                hint="PUT every part's URL, then complete the upload again",
            )
        listed = "".join(f"<Latest>{escape(azure_block_id(n))}</Latest>" for n in numbers)
        body = f'<?xml version="1.0" encoding="utf-8"?><BlockList>{listed}</BlockList>'.encode()
        commit_url = self._url(key, "w", _OWN_SAS, {"comp": "blocklist"})
        commit_headers = {
            "x-ms-version": _AZURE_VERSION,
            "Content-Type": "application/xml",
            "x-ms-blob-content-type": content_type,
        }
        committed = await self._http.send(lambda: Request("PUT", commit_url, commit_headers, body))
        if committed.status_code >= 300:
            code = committed.headers.get("x-ms-error-code", "")
            raise status_error("Azure", committed.status_code, "joining the uploaded blocks", f": {code}")

    async def close(self) -> None:
        self._http.close()


# -- GCS --------------------------------------------------------------------------------------------


class GCSPutSigner:
    provider = "gcs"
    client_finalises_parts = True

    def __init__(self, store: GCSStore) -> None:
        self._store = store

    async def put(self, key: str, content_type: str, size: int, ttl: timedelta) -> ScopedPut:
        url = await self._store.sign_bound_put(key, ttl, content_type=content_type, size=size)
        headers = {"Content-Type": content_type, "x-goog-content-length-range": f"{size},{size}"}
        return ScopedPut(url, headers)

    async def start_parts(
        self,
        key: str,
        content_type: str,
        size: int,
        part_size: int,
        ttl: timedelta,
        *,
        crc32c: str | None,
        origin: str | None,
    ) -> PartsPlan:
        uploads = self._store.resumable_uploads()
        if not isinstance(uploads, GCSResumableUploads):
            raise UsageError(
                "files this large cannot be uploaded directly to a bucket with a customer-supplied key",
                hint="raise upload_part_size above the file size, or upload through STOW-RS",
            )
        # Chunks other than the last are multiples of 256 KiB (a GCS rule).
        part_size = -(-part_size // CHUNK_QUANTUM) * CHUNK_QUANTUM
        metadata = {CHECKSUM_METADATA_KEY: crc32c} if crc32c else {}
        state = await uploads.begin(
            key, size, part_size, PutOptions(content_type=content_type, metadata=metadata), origin=origin
        )
        session = str(state["session_uri"])
        parts = [
            ScopedPut(session, {"Content-Range": f"bytes {start}-{start + length - 1}/{size}"})
            for start, length in _part_ranges(size, part_size)
        ]
        upload_id = parse_qs(urlsplit(session).query).get("upload_id", ["gcs-resumable"])[0]
        return PartsPlan(upload_id, part_size, parts, in_order=True, etags_required=False)

    async def finish_parts(self, key: str, content_type: str) -> None:
        return None  # the session made the object when its last chunk arrived

    async def close(self) -> None:
        return None
