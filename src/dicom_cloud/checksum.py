"""CRC32C (Castagnoli), the checksum dicom-cloud keeps with every object, and how to combine part checksums;
and the MD5 that S3 reports as a single-part object's ETag.

Parts of a large object are downloaded concurrently and out of order; each part's CRC is
computed as its bytes stream by, and the whole object's CRC is then combined from the
parts' CRCs and lengths (as zlib's ``crc32_combine`` does), so no byte is read twice.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path

import crc32c

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")

#: The reflected Castagnoli polynomial.
_POLY = 0x82F63B78


def crc32c_hex(data: bytes | memoryview) -> str:
    """The CRC32C of ``data`` as 8 lower-case hex digits (the form kept in metadata)."""
    return f"{crc32c.crc32c(data):08x}"


def crc32c_update(value: int, data: bytes | memoryview) -> int:
    """``value`` (the CRC32C of what came before) extended over ``data``."""
    return crc32c.crc32c(data, value)


class Crc32c:
    """An incremental CRC32C."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def update(self, data: bytes | memoryview) -> None:
        self.value = crc32c.crc32c(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def crc32c_file(path: Path, chunk_size: int = 8 * 1024 * 1024) -> str:
    """The CRC32C of a file, read in chunks."""
    crc = Crc32c()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            crc.update(chunk)
    return crc.hexdigest()


def md5_etag(etag: str | None) -> str | None:
    """The ETag, lower-cased, when it has the form of an MD5 (a plain single-part S3 upload's ETag
    is the MD5 of the bytes; multipart and some encrypted objects have other ETags); else None."""
    value = (etag or "").lower()
    return value if _MD5_ETAG.match(value) else None


def md5_file(path: Path, chunk_size: int = 8 * 1024 * 1024) -> str:
    """The hex MD5 of a file, read in chunks (to compare with an MD5 ETag)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def crc32c_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC32C of A+B from the CRC32C of A, the CRC32C of B and the length of B."""
    if length2 <= 0:
        return crc1
    return _apply(_shift_operator(length2), crc1) ^ crc2


def _apply(matrix: tuple[int, ...], vector: int) -> int:
    result = 0
    index = 0
    while vector:
        if vector & 1:
            result ^= matrix[index]
        vector >>= 1
        index += 1
    return result


def _square(matrix: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_apply(matrix, matrix[n]) for n in range(32))


@lru_cache(maxsize=64)
def _shift_operator(length: int) -> tuple[int, ...]:
    """The GF(2) matrix that advances a CRC over ``length`` zero bytes (cached: parts share lengths)."""
    # Operator for one zero bit, then squared up to one zero byte (8 bits).
    one_bit = (_POLY, *(1 << n for n in range(31)))
    operator = _square(_square(_square(one_bit)))  # 8 zero bits = one zero byte
    result: tuple[int, ...] | None = None
    while length:
        if length & 1:
            result = operator if result is None else tuple(_apply(operator, column) for column in result)
        length >>= 1
        if length:
            operator = _square(operator)
    assert result is not None
    return result
