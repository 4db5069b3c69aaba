"""CRC32C (Castagnoli), the checksum dicom-cloud keeps with every object, and how to combine part checksums;
the MD5 that S3 reports as a single-part object's ETag, and the MD5-of-part-MD5s it reports for a
multipart object (``<hex>-<parts>``), recomputed from a local file once its part size is inferred.

Parts of a large object are downloaded concurrently and out of order; each part's CRC is
computed as its bytes stream by, and the whole object's CRC is then combined from the
parts' CRCs and lengths (as zlib's ``crc32_combine`` does), so no byte is read twice.

Two implementations of the CRC itself, the same values: ``google-crc32c`` (Apache-2.0, a core
dependency) and, when installed, the ``crc32c`` package (LGPL-2.1+, the ``fast-crc32c`` extra),
preferred because it hashes any buffer (memoryview, bytearray, obstore's ``Bytes``) in place and
releases the GIL from 32 KiB, where google-crc32c 1.x takes only ``bytes`` (other buffers are
copied first) and releases the GIL from 1 MiB. Figures: docs/benchmarks.md ("CRC32C").
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_ETAG = re.compile(r"^[0-9a-f]{32}-([1-9][0-9]{0,4})$")
_MIB = 1024 * 1024
#: Part sizes other tools upload with, most common first: aws-cli (8 MiB), rclone and S3's minimum
#: (5 MiB), dicom-cloud (16 MiB), s5cmd (50 MiB), and round sizes users pick.
_COMMON_PART_SIZES = tuple(n * _MIB for n in (8, 5, 16, 50, 10, 15, 32, 64, 100, 128, 256, 512, 1024))
#: At most this many part sizes are tried for one object (each costs an MD5 pass over the file,
#: all of them in one read).
MAX_PART_SIZE_GUESSES = 6

#: The reflected Castagnoli polynomial.
_POLY = 0x82F63B78


def _google_extend(value: int, data: bytes | memoryview) -> int:
    import google_crc32c  # imported where used: with the crc32c package it is not

    # google-crc32c 1.x parses its argument as read-only bytes: other buffers are copied.
    return int(google_crc32c.extend(value, data if isinstance(data, bytes) else bytes(data)))


def _crc32c_extension() -> Any:
    """The crc32c package's compiled module, without the package's ``__init__``: that one imports
    ``importlib.metadata`` (and through it ``email`` and ``zipfile``) for a version string, a
    tenth of the command line's start-up (docs/benchmarks.md, 2026-12-04)."""
    import importlib.machinery
    import importlib.util

    spec = importlib.util.find_spec("crc32c")  # finds the package without running it
    for directory in (spec.submodule_search_locations or []) if spec is not None else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(directory, "_crc32c" + suffix)  # noqa: PTH118 - start-up path
            if os.path.exists(path):  # noqa: PTH110
                loader = importlib.machinery.ExtensionFileLoader("crc32c._crc32c", path)
                module_spec = importlib.util.spec_from_loader("crc32c._crc32c", loader)
                if module_spec is not None:
                    module = importlib.util.module_from_spec(module_spec)
                    loader.exec_module(module)
                    return module
    import crc32c  # another layout of the package: the ordinary way

    return crc32c


def _pick_implementation() -> tuple[str, Any]:
    try:
        extension = _crc32c_extension()
    except ImportError:
        return "google-crc32c", _google_extend
    crc = extension.crc32c
    return "crc32c", lambda value, data: crc(data, value)


#: Which package computes the CRC ("crc32c" or "google-crc32c"), for --version and the benchmarks.
IMPLEMENTATION, _extend = _pick_implementation()


def crc32c_hex(data: bytes | memoryview) -> str:
    """The CRC32C of ``data`` as 8 lower-case hex digits (the form kept in metadata)."""
    return f"{_extend(0, data):08x}"


def crc32c_update(value: int, data: bytes | memoryview) -> int:
    """``value`` (the CRC32C of what came before) extended over ``data``."""
    return int(_extend(value, data))


class Crc32c:
    """An incremental CRC32C."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def update(self, data: bytes | memoryview) -> None:
        self.value = _extend(self.value, data)

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


def multipart_etag_parts(etag: str | None) -> int | None:
    """The number of parts of an S3 multipart ETag (``<md5 of the part MD5s>-<parts>``); else None."""
    match = _MULTIPART_ETAG.match((etag or "").lower())
    return int(match.group(1)) if match else None


def part_size_guesses(size: int, parts: int) -> list[int]:
    """Part sizes that cut ``size`` bytes into exactly ``parts`` parts, likeliest first: the common
    sizes of upload tools, their doublings (aws-cli doubles its part size until a file fits in 10,000
    parts), then the size split evenly and rounded up to a MiB or to a MB."""
    if parts < 1 or size < parts:
        return []
    if parts == 1:
        return [max(size, 1)]  # one part: any part size at least the object's size gives the same ETag

    def fits(part: int) -> bool:
        return part > 0 and -(-size // part) == parts

    guesses: list[int] = []
    doubled = [base << shift for shift in range(1, 8) for base in (8 * _MIB, 5 * _MIB, 16 * _MIB)]
    even = -(-size // parts)
    for part in (
        *_COMMON_PART_SIZES,
        *doubled,
        -(-even // _MIB) * _MIB,
        -(-even // 1_000_000) * 1_000_000,
        even,
    ):
        if fits(part) and part not in guesses:
            guesses.append(part)
        if len(guesses) >= MAX_PART_SIZE_GUESSES:
            break
    return guesses


@dataclass
class FileDigests:
    """Checksums of one local file, all computed in one read."""

    crc32c: str
    md5: str | None = None
    #: The file's multipart ETag (``<hex>-<parts>``) for each part size asked for.
    multipart_etags: dict[int, str] = field(default_factory=dict)


def file_digests(
    path: Path, *, md5: bool = False, part_sizes: Sequence[int] = (), chunk_size: int = 8 * 1024 * 1024
) -> FileDigests:
    """CRC32C of a file and, on request, its MD5 and its multipart ETag for each of ``part_sizes``,
    reading the file once."""
    crc = Crc32c()
    whole = hashlib.md5(usedforsecurity=False) if md5 else None
    # Per part size: the MD5s of the finished parts, the running one, and the bytes it has seen.
    cutters = {size: _PartHasher(size) for size in part_sizes}
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            crc.update(chunk)
            if whole is not None:
                whole.update(chunk)
            for cutter in cutters.values():
                cutter.update(memoryview(chunk))
    return FileDigests(
        crc.hexdigest(),
        whole.hexdigest() if whole is not None else None,
        {size: cutter.etag() for size, cutter in cutters.items()},
    )


class _PartHasher:
    """The S3 multipart ETag of a stream cut into parts of ``part_size`` bytes."""

    def __init__(self, part_size: int) -> None:
        self.part_size = part_size
        self.digests: list[bytes] = []
        self.current = hashlib.md5(usedforsecurity=False)
        self.filled = 0

    def update(self, data: memoryview) -> None:
        while data:
            take = min(len(data), self.part_size - self.filled)
            self.current.update(data[:take])
            self.filled += take
            data = data[take:]
            if self.filled == self.part_size:
                self.digests.append(self.current.digest())
                self.current = hashlib.md5(usedforsecurity=False)
                self.filled = 0

    def etag(self) -> str:
        digests = [*self.digests, self.current.digest()] if self.filled or not self.digests else self.digests
        combined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
        return f"{combined}-{len(digests)}"


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
