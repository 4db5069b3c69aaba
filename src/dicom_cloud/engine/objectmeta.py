"""What is checked of the bytes read and what is written with the bytes written: CRC32C and MD5
checks against what the source said, the metadata (CRC32C, markers, carried-over metadata) and the
content type of each object written."""

from __future__ import annotations

import hashlib
import mimetypes
import posixpath
from dataclasses import replace

from ..checksum import crc32c_hex, md5_etag
from ..crypto.envelope import FORMAT_METADATA_KEY, KEY_ID_METADATA_KEY
from ..errors import IntegrityError
from ..store import CHECKSUM_METADATA_KEY, ObjectInfo, PutOptions
from .model import DICOM_CONTENT_TYPE, OCTET_STREAM


class EtagMismatch(IntegrityError):
    """The bytes' MD5 differs from an ETag that looks like one. Either the bytes were damaged, or the
    ETag is not an MD5 at all (SSE-KMS and SSE-C objects written by other tools): a second read tells."""


def verify(data: bytes | memoryview, info: ObjectInfo, where: str, *, etag_is_md5: bool = False) -> str:
    """Check whole-object bytes against what the store said of them; return their CRC32C."""
    if len(data) != info.size:
        raise IntegrityError(f"{where}: got {len(data)} bytes, expected {info.size}")
    checksum = crc32c_hex(data)
    if info.metadata.get(CHECKSUM_METADATA_KEY):
        check_checksum(checksum, info, where)
    elif checks_md5(info, etag_is_md5=etag_is_md5) and _md5_hex(data) != md5_etag(info.etag):
        raise EtagMismatch(f"{where}: MD5 does not match the ETag")
    return checksum


def checks_md5(info: ObjectInfo, *, etag_is_md5: bool) -> bool:
    """Whether :func:`verify` hashes the bytes with MD5: an object without our CRC32C, whose ETag is
    an MD5 (objects written by other tools: a plain single-part S3 ETag is the MD5 of the bytes)."""
    return not info.metadata.get(CHECKSUM_METADATA_KEY) and etag_is_md5 and md5_etag(info.etag) is not None


def _md5_hex(data: bytes | memoryview) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def check_checksum(actual: str, info: ObjectInfo, where: str) -> None:
    stored = info.metadata.get(CHECKSUM_METADATA_KEY)
    if stored and stored.lower() != actual:
        raise IntegrityError(f"{where}: CRC32C mismatch (stored {stored}, got {actual})")


#: Metadata dicom-cloud computes for each write; never carried over from the source object.
_OWN_METADATA = (CHECKSUM_METADATA_KEY, FORMAT_METADATA_KEY, KEY_ID_METADATA_KEY)


def markers(info: ObjectInfo) -> dict[str, str]:
    """The encryption markers of an object, to carry along when its ciphertext is copied as is."""
    return {k: v for k, v in info.metadata.items() if k in (FORMAT_METADATA_KEY, KEY_ID_METADATA_KEY)}


def with_checksum(
    put: PutOptions,
    source: ObjectInfo | None,
    checksum: str | None,
    *,
    keep: dict[str, str] | None = None,
    content_type: str | None = None,
) -> PutOptions:
    """What to write with an object: the source's own metadata carried over (a copy or a rekey keeps
    it), the user's additions, the encryption markers, the CRC32C of the bytes written when it is
    known, and the content type (the user's, else the one found for these bytes)."""
    carried = {k: v for k, v in (source.metadata if source else {}).items() if k not in _OWN_METADATA}
    metadata = {**carried, **put.metadata, **(keep or {})}
    if checksum:
        metadata[CHECKSUM_METADATA_KEY] = checksum
    chosen = put.content_type or content_type or (source.content_type if source else None) or OCTET_STREAM
    return replace(put, metadata=metadata, content_type=chosen)


def has_metadata(existing: ObjectInfo, put: PutOptions) -> bool:
    """Whether an object already carries what ``put`` would write with it (object tags cannot be read
    back everywhere: with tags, it is written again)."""
    if put.tags:
        return False
    if put.content_type and existing.content_type and existing.content_type != put.content_type:
        return False
    return all(existing.metadata.get(key) == value for key, value in put.metadata.items())


def content_type(
    key: str,
    source: ObjectInfo | None,
    head: bytes | memoryview | None,
    *,
    encrypted: bool,
    is_dicom: bool = False,
) -> str:
    """The Content-Type of what is written from ``key``: application/dicom only for what is known
    to be DICOM (read as DICOM by the policy: ``is_dicom``, or a Part 10 file), octet-stream for
    ciphertext, else the source's own type or one guessed from the name."""
    if encrypted:
        return OCTET_STREAM
    if is_dicom or (head is not None and bytes(head[128:132]) == b"DICM"):
        return DICOM_CONTENT_TYPE
    if source is not None and source.content_type and source.content_type != DICOM_CONTENT_TYPE:
        return source.content_type
    guessed = mimetypes.guess_type(posixpath.basename(key))[0]
    # A name ending in .dcm does not make DICOM (the system's tables map it to application/dicom).
    return guessed if guessed and guessed != DICOM_CONTENT_TYPE else OCTET_STREAM
