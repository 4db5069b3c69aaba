"""multipart/related (RFC 2387) as DICOMweb uses it: parsing STOW-RS bodies, streaming WADO-RS answers.

Parsing takes the whole body (already read under a size cap by :func:`read_body`) and returns the
parts' media types and contents as views into it, without copies. Every framing fault is a
:class:`MalformedRequestError` (400) saying what is wrong; nothing here ever raises anything else
on malformed input.

Writing is a generator of chunks: the boundary, the part headers, then the part's own chunks as
they come, so a study is streamed one instance at a time.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass

from starlette.requests import Request

from .http_errors import MalformedRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

#: RFC 2046: 1 to 70 characters from this set, not ending with a space.
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
_HEADER_END = b"\r\n\r\n"
#: ``; name=value`` or ``; name="quoted value"`` (RFC 9110 parameters).
_PARAMETER = re.compile(r';?\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


@dataclass(frozen=True)
class MediaType:
    """A parsed ``Content-Type``: ``type/subtype`` in lower case and its parameters (names lower case)."""

    value: str
    params: dict[str, str]

    @classmethod
    def parse(cls, header: str) -> MediaType:
        value, _, rest = header.partition(";")
        params: dict[str, str] = {}
        for match in _PARAMETER.finditer(rest):
            raw = match.group(2).strip()
            if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            params[match.group(1).lower()] = raw
        return cls(value.strip().lower(), params)


@dataclass(frozen=True)
class Part:
    content_type: str
    content: memoryview


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (whatever it declared)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(
            f"the request body is {declared} bytes; this service takes at most {limit}"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the request body is larger than the maximum of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def related_boundary(content_type: str | None, *, expected_types: tuple[str, ...]) -> tuple[str, str]:
    """Check a ``multipart/related`` Content-Type; return its boundary and its ``type`` (root type).

    A ``type`` parameter outside ``expected_types`` is 415; no boundary is 400.
    """
    if not content_type:
        raise UnsupportedMediaTypeError(
            "missing Content-Type", hint='send multipart/related; type="application/dicom"; boundary=...'
        )
    media = MediaType.parse(content_type)
    if media.value != "multipart/related":
        raise UnsupportedMediaTypeError(
            f"this route takes multipart/related bodies, not {media.value or 'an empty media type'}",
            hint='send multipart/related; type="application/dicom"; boundary=...',
        )
    root = media.params.get("type", expected_types[0]).lower()
    if root not in expected_types:
        raise UnsupportedMediaTypeError(
            f"multipart/related of type {root!r} is not supported here; expected {', '.join(expected_types)}"
        )
    boundary = media.params.get("boundary", "")
    if not boundary:
        raise MalformedRequestError("multipart/related without a boundary parameter")
    if not _BOUNDARY.match(boundary):
        raise MalformedRequestError("the multipart boundary is not valid (RFC 2046: 1-70 safe characters)")
    return boundary, root


def parse_related(body: bytes, boundary: str, default_type: str) -> list[Part]:
    """Split a multipart body into its parts. Parts without Content-Type take ``default_type``."""
    view = memoryview(body)
    delimiter = b"--" + boundary.encode("ascii")
    # The first delimiter may be at the very start or after a preamble line.
    if body.startswith(delimiter):
        position = 0
    else:
        position = body.find(b"\r\n" + delimiter)
        if position < 0:
            raise MalformedRequestError("the body holds no part: its boundary never appears")
        position += 2
    parts: list[Part] = []
    separator = b"\r\n" + delimiter
    while True:
        position += len(delimiter)
        tail = body[position : position + 2]
        if tail == b"--":
            break  # the close delimiter
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            raise MalformedRequestError("the body ends inside a boundary line (truncated?)")
        if body[position:line_end].strip(b" \t"):
            raise MalformedRequestError("a boundary line is followed by unexpected characters")
        header_start = line_end + 2
        if body.startswith(b"\r\n", header_start):
            headers_raw, content_start = b"", header_start + 2
        else:
            header_end = body.find(_HEADER_END, header_start)
            if header_end < 0:
                raise MalformedRequestError(f"part {len(parts) + 1} has no blank line after its headers")
            headers_raw, content_start = body[header_start:header_end], header_end + 4
        next_delimiter = body.find(separator, content_start)
        if next_delimiter < 0:
            raise MalformedRequestError(
                f"part {len(parts) + 1} is not closed by a boundary (truncated body?)",
                hint="the body must end with --BOUNDARY--",
            )
        content_type = _part_content_type(headers_raw, len(parts) + 1) or default_type
        parts.append(Part(content_type, view[content_start:next_delimiter]))
        position = next_delimiter + 2
    if not parts:
        raise MalformedRequestError("the multipart body holds no part")
    return parts


def _part_content_type(headers_raw: bytes, number: int) -> str | None:
    try:
        text = headers_raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedRequestError(f"part {number} has headers that are not ASCII") from None
    content_type = None
    for line in text.split("\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise MalformedRequestError(f"part {number} has a header line without a colon")
        if name.strip().lower() == "content-type":
            content_type = MediaType.parse(value.strip()).value
    return content_type


def new_boundary() -> str:
    return "dicom-cloud-" + secrets.token_hex(12)


def related_content_type(boundary: str, root_type: str, **params: str) -> str:
    extra = "".join(f"; {name.replace('_', '-')}={value}" for name, value in params.items())
    return f'multipart/related; type="{root_type}"; boundary={boundary}{extra}'


async def write_related(
    parts: AsyncIterable[tuple[str, bytes | memoryview]], boundary: str
) -> AsyncIterator[bytes | memoryview]:
    """The chunks of a multipart/related body, one part at a time (``(content_type, content)``).

    Two chunks per part: the small framing (the previous part's closing CRLF, the delimiter, the
    headers) and the content itself, passed on as given (no copy)."""
    delimiter = b"--" + boundary.encode("ascii")
    separator = b""
    async for content_type, content in parts:
        yield separator + delimiter + b"\r\nContent-Type: " + content_type.encode("ascii") + b"\r\n\r\n"
        yield content
        separator = b"\r\n"
    yield separator + delimiter + b"--\r\n"


def related_body(parts: Sequence[tuple[str, bytes | memoryview]], boundary: str) -> bytes:
    """A whole multipart/related body at once (what :func:`write_related` streams), for answers
    small enough to send with a Content-Length."""
    delimiter = b"--" + boundary.encode("ascii")
    pieces: list[bytes | memoryview] = []
    for content_type, content in parts:
        pieces += [
            delimiter,
            b"\r\nContent-Type: ",
            content_type.encode("ascii"),
            b"\r\n\r\n",
            content,
            b"\r\n",
        ]
    pieces.append(delimiter + b"--\r\n")
    return b"".join(pieces)
