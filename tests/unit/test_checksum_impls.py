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


def test_loading_the_crc_costs_no_package_metadata() -> None:
    """The crc32c package's ``__init__`` imports importlib.metadata (and email, zipfile) for a version
    string, a tenth of the command line's start-up: its compiled module is loaded without it, and
    google-crc32c is not loaded at all while crc32c is the implementation."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from dicom_cloud import checksum\n"
        "print(checksum.IMPLEMENTATION, checksum.crc32c_hex(memoryview(b'123456789')))\n"
        "print(','.join(sorted({'importlib.metadata', 'google_crc32c'} & set(sys.modules))))\n"
        "import crc32c\n"  # the package imported the ordinary way afterwards still works
        "print(crc32c.crc32c(b'123456789') == int(checksum.crc32c_hex(b'123456789'), 16))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == ["crc32c e3069283", "", "True"], out
