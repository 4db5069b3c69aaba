"""Both CRC32C implementations give the same values, on every kind of buffer the engine hashes."""

from __future__ import annotations

import os

import crc32c
import pytest

from dicom_cloud import checksum


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_google_crc32c_and_crc32c_agree(kind: type) -> None:
    data = os.urandom(200_000)
    buffer = kind(data)
    assert checksum._google_extend(0, b"123456789") == 0xE3069283  # the CRC32C check value
    assert checksum._google_extend(0, buffer) == crc32c.crc32c(data)
    head = checksum._google_extend(0, memoryview(data)[:1000])
    assert checksum._google_extend(head, memoryview(data)[1000:]) == crc32c.crc32c(data)


def test_the_preferred_implementation_is_the_one_installed() -> None:
    assert checksum.IMPLEMENTATION == "crc32c"  # the test environment installs the fast-crc32c extra
    assert checksum.crc32c_hex(memoryview(b"123456789")) == "e3069283"
