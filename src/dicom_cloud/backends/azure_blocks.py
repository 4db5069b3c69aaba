"""Azure block blobs written block by block, so that a later process can finish them.

Put Block stores a block *uncommitted* under an id we choose; Put Block List makes the blob out
of the listed blocks. A block's id is derived from its part number and the MD5 of its bytes
(``dicom-cloud:NNNNN:<md5 hex>``, base64: every id of a blob has the same length, as Azure
requires), so a resumed run finds its blocks with Get Block List and knows what each holds
without reading it back; the server checks each block against its ``Content-MD5`` on arrival.

Azure has no "abort": it discards uncommitted blocks when the blob is committed, or after seven
days. To discard them now, a blob that has no committed version is committed empty (only if it
still does not exist) and deleted (only if it is still that empty blob). Requests carry
short-lived service SAS tokens signed with the account key; nothing signed is kept in the session
state.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlencode
from xml.sax.saxutils import escape

import requests

from ..errors import (
    AlreadyExistsError,
    AuthenticationError,
    BucketNotFoundError,
    DicomCloudError,
    IntegrityError,
)
from ..resumable import IncompleteUpload, PartRecord
from ..store import ObjectInfo, PutOptions
from .azure_sas import account_sas, blob_sas_url, service_sas
from .http_errors import status_error
from .rest import Request, RestClient, info_from_headers

#: A service version that knows every header used here.
_VERSION = "2021-08-06"
_BLOCK_ID = re.compile(r"dicom-cloud:(\d{5}):([0-9a-f]{32})")
#: Whole blobs above this size are hashed in a worker thread, off the event loop.
_HASH_IN_THREAD = 1024 * 1024
#: SAS tokens live just long enough for one request and its retries.
_SAS_LIFETIME = timedelta(hours=1)


def block_id(number: int, md5_hex: str) -> str:
    """The base64 block id of part ``number`` holding bytes whose MD5 is ``md5_hex``."""
    return base64.b64encode(f"dicom-cloud:{number:05d}:{md5_hex}".encode()).decode()


def parse_block_id(encoded: str) -> tuple[int, str] | None:
    try:
        match = _BLOCK_ID.fullmatch(base64.b64decode(encoded, validate=True).decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None
    return (int(match.group(1)), match.group(2)) if match else None


class AzureResumableUploads:
    """Resumable block uploads into one Azure container."""

    min_part_size = 1
    max_parts = 50_000
    sequential = False

    def __init__(
        self,
        *,
        container: str,
        endpoint: str,
        account: str,
        account_key: str,
        max_retries: int = 4,
        timeout: tuple[float, float] = (10.0, 300.0),
    ) -> None:
        self.container = container
        self._endpoint = endpoint.rstrip("/")
        self._account = account
        self._key = account_key
        self._http = RestClient(what=f"Azure at {self._endpoint}", max_retries=max_retries, timeout=timeout)

    def _blob(self, key: str, permissions: str, query: dict[str, str] | None = None) -> str:
        return blob_sas_url(
            endpoint=self._endpoint,
            account=self._account,
            account_key=self._key,
            container=self.container,
            blob=key,
            expires=_SAS_LIFETIME,
            permissions=permissions,
            operation=query,
        )

    async def _call(
        self,
        method: str,
        url: str,
        what: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | memoryview = b"",
        missing_ok: bool = False,
    ) -> requests.Response | None:
        all_headers = {"x-ms-version": _VERSION, **(headers or {})}
        response = await self._http.send(lambda: Request(method, url, all_headers, body))
        if response.status_code == 404 and missing_ok:
            code = response.headers.get("x-ms-error-code", "")
            if code != "ContainerNotFound":
                return None
        if response.status_code >= 300:
            raise self._error(response, what)
        return response

    def _error(self, response: requests.Response, what: str) -> DicomCloudError:
        code = response.headers.get("x-ms-error-code", "")
        detail = f": {code}" if code else f": HTTP {response.status_code}"
        # Azurite answers a bad SAS signature with AuthorizationFailure and this message.
        refused = "Server failed to authenticate the request" in response.text
        if (
            code in ("AuthenticationFailed", "InvalidAuthenticationInfo")
            or refused
            or response.status_code == 401
        ):
            return AuthenticationError(
                f"Azure refused the credentials for {what}{detail}",
                hint="check AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_KEY (docs/credentials.md)",
            )
        if code == "ContainerNotFound":
            return BucketNotFoundError(f"container azure://{self.container} does not exist")
        # Azure says Md5Mismatch; Azurite says InvalidOperation, "Provided contentMD5 doesn't match."
        md5_refused = code == "InvalidOperation" and "md5" in response.text.lower()
        if code in ("Md5Mismatch", "InvalidBlockList", "InvalidMd5") or md5_refused:
            return IntegrityError(f"{what}{detail}: the server's MD5 of the bytes differs from ours")
        return status_error("Azure", response.status_code, what, detail)

    def _url(self, key: str) -> str:
        return f"azure://{self.container}/{key}"

    # -- the container ------------------------------------------------------------------------

    async def create_container(self) -> bool:
        """Create the container unless it exists (Orthanc's ``CreateContainerIfNotExists``); True when
        this call created it. Needs an account SAS: a service SAS cannot create containers."""
        query = account_sas(
            account=self._account,
            account_key=self._key,
            permissions="c",
            resource_types="c",
            expiry=datetime.now(UTC) + _SAS_LIFETIME,
            plain_http=self._endpoint.startswith("http://"),
        )
        url = f"{self._endpoint}/{quote(self.container)}?restype=container&{query}"
        headers = {"x-ms-version": _VERSION}
        response = await self._http.send(lambda: Request("PUT", url, headers))
        code = response.headers.get("x-ms-error-code")
        if response.status_code == 409 and code == "ContainerAlreadyExists":
            return False
        if response.status_code >= 300:
            raise self._error(response, f"azure://{self.container}")
        return True

    # -- whole blobs, checked by the server -----------------------------------------------------

    async def put_whole(self, key: str, data: bytes | memoryview, options: PutOptions) -> str | None:
        """Put Blob in one request carrying ``Content-MD5``, which Azure checks on arrival (obstore
        sends none). Returns the ETag. AlreadyExistsError when ``if_absent`` and the blob exists."""
        if len(data) > _HASH_IN_THREAD:
            digest = await asyncio.to_thread(_md5, data)
        else:
            digest = _md5(data)
        headers = {"x-ms-blob-type": "BlockBlob", "Content-MD5": base64.b64encode(digest).decode()}
        if options.content_type:
            headers["x-ms-blob-content-type"] = options.content_type
        for name, value in options.metadata.items():
            headers[f"x-ms-meta-{name}"] = value
        if options.tags:
            headers["x-ms-tags"] = urlencode(dict(options.tags), quote_via=quote)
        if options.storage_class:
            headers["x-ms-access-tier"] = options.storage_class
        if options.if_absent:
            headers["If-None-Match"] = "*"
        url = self._blob(key, "cwt" if options.tags else "cw")
        all_headers = {"x-ms-version": _VERSION, **headers}
        response = await self._http.send(lambda: Request("PUT", url, all_headers, data))
        if options.if_absent and response.status_code in (409, 412):
            raise AlreadyExistsError(f"{self._url(key)} exists")
        if response.status_code >= 300:
            raise self._error(response, self._url(key))
        return response.headers.get("ETag", "").strip('"') or None

    # -- ResumableUploads ----------------------------------------------------------------------

    async def begin(self, key: str, size: int, part_size: int, options: PutOptions) -> dict[str, Any]:
        # Nothing to create on the server: blocks are staged under the blob's name directly.
        # What the commit needs (content type, metadata, tags) is kept in the state.
        return {
            "provider": "azure",
            "container": self.container,
            "key": key,
            "size": size,
            "content_type": options.content_type,
            "metadata": dict(options.metadata),
            "tags": dict(options.tags),
        }

    async def uploaded_parts(self, state: dict[str, Any]) -> dict[int, PartRecord]:
        key = state["key"]
        url = self._blob(key, "r", {"comp": "blocklist", "blocklisttype": "uncommitted"})
        response = await self._call("GET", url, self._url(key), missing_ok=True)
        if response is None:  # no blob and no block yet (or blocks garbage-collected)
            return {}
        parts: dict[int, PartRecord] = {}
        root = ET.fromstring(response.content)  # noqa: S314 - from the configured endpoint, no entities
        for block in root.iter("Block"):
            name, size = block.findtext("Name") or "", block.findtext("Size") or "0"
            parsed = parse_block_id(name)
            if parsed is not None:
                parts[parsed[0]] = PartRecord(parsed[0], int(size), etag=name, md5=parsed[1])
        return parts

    async def upload_part(self, state: dict[str, Any], number: int, data: bytes | memoryview) -> PartRecord:
        key = state["key"]
        digest = hashlib.md5(data, usedforsecurity=False).digest()
        ident = block_id(number, digest.hex())
        url = self._blob(key, "w", {"comp": "block", "blockid": ident})
        headers = {"Content-MD5": base64.b64encode(digest).decode(), "Content-Length": str(len(data))}
        await self._call("PUT", url, f"block {number} of {self._url(key)}", headers=headers, body=data)
        return PartRecord(number, len(data), etag=ident, md5=digest.hex())

    async def complete(self, state: dict[str, Any], parts: list[PartRecord]) -> ObjectInfo:
        key = state["key"]
        tags: dict[str, str] = state.get("tags") or {}
        listed = "".join(
            f"<Latest>{escape(p.etag or '')}</Latest>" for p in sorted(parts, key=lambda p: p.number)
        )
        body = f'<?xml version="1.0" encoding="utf-8"?><BlockList>{listed}</BlockList>'.encode()
        headers = {"Content-Type": "application/xml"}
        if state.get("content_type"):
            headers["x-ms-blob-content-type"] = state["content_type"]
        for name, value in (state.get("metadata") or {}).items():
            headers[f"x-ms-meta-{name}"] = value
        if tags:
            headers["x-ms-tags"] = urlencode(tags, quote_via=quote)
        url = self._blob(key, "rwt" if tags else "rw", {"comp": "blocklist"})
        await self._call("PUT", url, self._url(key), headers=headers, body=body)
        return await self.stat(key)

    async def abort(self, state: dict[str, Any]) -> None:
        await self.discard(state["key"])

    async def abort_incomplete(self, upload: IncompleteUpload) -> None:
        await self.discard(upload.key)

    async def discard(self, key: str) -> bool:
        """Drop the uncommitted blocks of a blob that has no committed version; False when the blob
        exists (its uncommitted blocks then expire by themselves after seven days)."""
        body = b'<?xml version="1.0" encoding="utf-8"?><BlockList></BlockList>'
        created = await self._http.send(
            lambda: Request(
                "PUT",
                self._blob(key, "cw", {"comp": "blocklist"}),
                {"x-ms-version": _VERSION, "If-None-Match": "*", "Content-Type": "application/xml"},
                body,
            )
        )
        if created.status_code in (409, 412):  # a committed blob exists: leave it alone
            return False
        if created.status_code >= 300:
            raise self._error(created, self._url(key))
        etag = created.headers.get("ETag", "")
        deleted = await self._http.send(
            lambda: Request("DELETE", self._blob(key, "d"), {"x-ms-version": _VERSION, "If-Match": etag})
        )
        if deleted.status_code >= 300 and deleted.status_code not in (404, 412):
            raise self._error(deleted, self._url(key))
        return True

    async def incomplete(self, prefix: str = "") -> AsyncIterator[IncompleteUpload]:
        """Blobs that have uncommitted blocks and no committed version (Azure lists those with
        ``include=uncommittedblobs``; blobs with both are not distinguishable and not listed)."""
        marker = ""
        while True:
            query = {"restype": "container", "comp": "list", "include": "uncommittedblobs", "prefix": prefix}
            if marker:
                query["marker"] = marker
            url = self._container_url("rl", query)
            response = await self._call("GET", url, f"azure://{self.container}/{prefix}")
            assert response is not None
            root = ET.fromstring(response.content)  # noqa: S314 - from the configured endpoint
            for blob in root.iter("Blob"):
                name = blob.findtext("Name") or ""
                props = blob.find("Properties")
                length = props.findtext("Content-Length") if props is not None else None
                # An uncommitted-only blob lists with length 0; an empty committed blob too, so
                # those are told apart by their block list.
                if length not in (None, "0") or not await self._only_uncommitted(name):
                    continue
                created = props.findtext("Creation-Time") if props is not None else None
                yield IncompleteUpload(
                    key=name,
                    upload_id="",
                    initiated=parsedate_to_datetime(created) if created else None,
                )
            marker = root.findtext("NextMarker") or ""
            if not marker:
                return

    async def _only_uncommitted(self, key: str) -> bool:
        url = self._blob(key, "r", {"comp": "blocklist", "blocklisttype": "all"})
        response = await self._call("GET", url, self._url(key), missing_ok=True)
        if response is None:
            return False
        root = ET.fromstring(response.content)  # noqa: S314 - from the configured endpoint
        committed = root.find("CommittedBlocks")
        uncommitted = root.find("UncommittedBlocks")
        return (committed is None or len(committed) == 0) and uncommitted is not None and len(uncommitted) > 0

    def _container_url(self, permissions: str, query: dict[str, str]) -> str:
        sas = service_sas(
            account=self._account,
            account_key=self._key,
            resource=self.container,
            kind="c",
            permissions=permissions,
            expiry=datetime.now(UTC) + _SAS_LIFETIME,
            plain_http=self._endpoint.startswith("http://"),
        )
        return f"{self._endpoint}/{quote(self.container)}?{urlencode(query, quote_via=quote)}&{sas}"

    async def stat(self, key: str) -> ObjectInfo:
        response = await self._call("HEAD", self._blob(key, "r"), self._url(key))
        assert response is not None
        return info_from_headers(key, response.headers, "x-ms-meta-")

    async def close(self) -> None:
        self._http.close()


def _md5(data: bytes | memoryview) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()
