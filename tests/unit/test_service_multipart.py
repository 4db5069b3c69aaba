"""multipart/related parsing (STOW-RS bodies) and writing (WADO-RS answers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dicom_cloud.service.http_errors import MalformedRequestError, UnsupportedMediaTypeError
from dicom_cloud.service.multipart import (
    MediaType,
    RelatedReader,
    related_body,
    related_boundary,
    related_content_type,
    related_length,
    write_related,
)

CT = 'multipart/related; type="application/dicom"; boundary=XyZ'
#: Chunk sizes the body arrives in: delimiters and header blocks split at every place.
CHUNK_SIZES = (1, 2, 3, 7, 64 * 1024)


def parse_related(
    raw: bytes, boundary: str, default_type: str, chunk_size: int = 64 * 1024
) -> list[tuple[str, bytes]]:
    """Every part (media type, content) of ``raw`` read as a stream of ``chunk_size`` chunks."""

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), chunk_size):
            yield raw[start : start + chunk_size]

    async def read() -> list[tuple[str, bytes]]:
        reader = RelatedReader(chunks(), boundary, default_type)
        parts = []
        while (content_type := await reader.next_part()) is not None:
            content = b""
            while chunk := await reader.read():
                content += chunk
            parts.append((content_type, content))
        return parts

    return asyncio.run(read())


def body(*parts: bytes, boundary: bytes = b"XyZ", typed: bool = True) -> bytes:
    out = b""
    for part in parts:
        out += b"--" + boundary + b"\r\n"
        if typed:
            out += b"Content-Type: application/dicom\r\n"
        out += b"\r\n" + part + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_parses_parts_in_order(chunk_size: int) -> None:
    boundary, root = related_boundary(CT, expected_types=("application/dicom",))
    parts = parse_related(body(b"one", b"two\r\n--Xy", b"", b"\r\n" * 5), boundary, root, chunk_size)
    assert [content for _, content in parts] == [b"one", b"two\r\n--Xy", b"", b"\r\n" * 5]
    assert {content_type for content_type, _ in parts} == {"application/dicom"}


def test_a_part_left_unread_is_skipped() -> None:
    async def read() -> list[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            yield body(b"x" * 100_000, b"second")

        reader = RelatedReader(chunks(), "XyZ", "application/dicom")
        assert await reader.next_part() == "application/dicom"
        first = await reader.read()
        assert await reader.next_part() == "application/dicom"
        second = await reader.read()
        assert await reader.read() == b""
        assert await reader.next_part() is None
        return [first, second]

    first, second = asyncio.run(read())
    assert first == b"x" * len(first) and second == b"second"


def test_parts_without_content_type_take_the_root_type() -> None:
    parts = parse_related(body(b"a", typed=False), "XyZ", "application/dicom")
    assert parts[0][0] == "application/dicom"


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_preamble_before_the_first_boundary_is_ignored(chunk_size: int) -> None:
    parts = parse_related(b"preamble text\r\n" + body(b"a"), "XyZ", "application/dicom", chunk_size)
    assert parts == [("application/dicom", b"a")]


def test_quoted_boundary_and_parameters() -> None:
    media = MediaType.parse('Multipart/Related; boundary="a b:c"; type=application/dicom')
    assert media.value == "multipart/related"
    assert media.params == {"boundary": "a b:c", "type": "application/dicom"}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"no boundary at all",
        b"--XyZ\r\nContent-Type: application/dicom\r\n\r\ntruncated",
        b"--XyZ\r\nContent-Type: application/dicom",
        b"--XyZ--\r\n",
        b"--XyZ junk\r\n\r\na\r\n--XyZ--",
        b"--XyZ\r\nbroken header\r\n\r\na\r\n--XyZ--",
        b"--XyZ\r\nContent-Type: \xff\r\n\r\na\r\n--XyZ--",
        b"--XyZ\r\n\r\na\r\n--XyZ",
        b"--XyZ\r\n" + b"X-Long: " + b"y" * 20_000 + b"\r\n\r\na\r\n--XyZ--",
    ],
)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_malformed_bodies_are_400(raw: bytes, chunk_size: int) -> None:
    with pytest.raises(MalformedRequestError) as caught:
        parse_related(raw, "XyZ", "application/dicom", chunk_size)
    assert caught.value.http_status == 400


@pytest.mark.parametrize(
    ("content_type", "error"),
    [
        (None, UnsupportedMediaTypeError),
        ("application/dicom", UnsupportedMediaTypeError),
        ('multipart/related; type="image/jpeg"; boundary=a', UnsupportedMediaTypeError),
        ('multipart/related; type="application/dicom"', MalformedRequestError),
        ('multipart/related; type="application/dicom"; boundary=' + "x" * 71, MalformedRequestError),
    ],
)
def test_bad_content_types(content_type: str | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        related_boundary(content_type, expected_types=("application/dicom",))


def test_written_body_parses_back() -> None:
    async def parts() -> AsyncIterator[tuple[str, bytes]]:
        for content in (b"first", b"", b"x" * 1000):
            yield "application/dicom", content

    async def collect() -> bytes:
        return b"".join([chunk async for chunk in write_related(parts(), "bnd")])

    raw = asyncio.run(collect())
    media = MediaType.parse(related_content_type("bnd", "application/dicom"))
    assert media.params["boundary"] == "bnd"
    parsed = parse_related(raw, "bnd", "x")
    assert [content for _, content in parsed] == [b"first", b"", b"x" * 1000]


def test_a_body_made_whole_equals_the_streamed_one() -> None:
    contents = [("application/dicom", b"first"), ("application/dicom; transfer-syntax=1.2", b"\r\n- x")]

    async def parts() -> AsyncIterator[tuple[str, bytes]]:
        for part in contents:
            yield part

    async def collect() -> bytes:
        return b"".join([bytes(chunk) async for chunk in write_related(parts(), "bnd")])

    whole = related_body(contents, "bnd")
    assert whole == asyncio.run(collect())
    assert related_length([(ct, len(content)) for ct, content in contents], "bnd") == len(whole)
    assert related_length([], "bnd") == len(related_body([], "bnd"))
    assert [content for _, content in parse_related(whole, "bnd", "x")] == [b"first", b"\r\n- x"]
