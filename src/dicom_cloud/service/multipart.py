"""multipart/related (RFC 2387) as DICOMweb uses it: reading STOW-RS bodies, streaming WADO-RS answers.

Reading is a stream: :class:`RelatedReader` takes the body's chunks as they arrive and hands out
one part after the other, each part's content as chunks, never the whole body; request bodies
are counted against their size cap as they arrive (:func:`body_chunks`). Every framing fault is
a :class:`MalformedRequestError` (400) saying what is wrong; nothing here ever raises anything
else on malformed input.

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


async def body_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives, refused with 413 as soon as it passes ``limit`` bytes
    (whatever it declared)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(
            f"the request body is {declared} bytes; this service takes at most {limit}"
        )
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the request body is larger than the maximum of {limit} bytes")
        if chunk:
            yield chunk


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


class RelatedReader:
    """The parts of a multipart/related body, read from its chunks as they arrive.

    ``await next_part()`` reads up to the next part's headers and returns its media type (parts
    without Content-Type take ``default_type``), or None after the close delimiter; whatever
    was left of the previous part is skipped. ``await read()`` returns the next chunk of the
    current part's content, ``b""`` at its end. At most one chunk and a delimiter's length are
    buffered, however large the parts.
    """

    #: Longest boundary line tail and part header block accepted (a body that never ends them is 400).
    MAX_LINE = 1024
    MAX_HEADERS = 16 * 1024

    def __init__(self, chunks: AsyncIterator[bytes], boundary: str, default_type: str) -> None:
        self._chunks = chunks
        self._delimiter = b"--" + boundary.encode("ascii")
        self._separator = b"\r\n" + self._delimiter
        self._default_type = default_type
        self._buffer = bytearray()
        self._ended = False  # no more chunks
        self._state = "start"  # start | between (just after a delimiter) | content | done
        self.parts = 0  # parts begun so far

    async def _fill(self) -> bool:
        """One more chunk into the buffer; False when the body has ended."""
        if self._ended:
            return False
        chunk = await anext(self._chunks, None)
        if chunk is None:
            self._ended = True
            return False
        self._buffer += chunk
        return True

    async def next_part(self) -> str | None:
        if self._state == "content":
            while await self.read():
                pass  # the rest of the previous part
        if self._state == "done":
            return None
        if self._state == "start":
            await self._skip_preamble()
        while len(self._buffer) < 2:
            if not await self._fill():
                raise MalformedRequestError("the body ends inside a boundary line (truncated?)")
        if self._buffer.startswith(b"--"):
            self._state = "done"  # the close delimiter; what follows (an epilogue) is ignored
            if not self.parts:
                raise MalformedRequestError("the multipart body holds no part")
            return None
        line_end = await self._find(
            b"\r\n", self.MAX_LINE, "the body ends inside a boundary line (truncated?)"
        )
        if bytes(self._buffer[:line_end]).strip(b" \t"):
            raise MalformedRequestError("a boundary line is followed by unexpected characters")
        del self._buffer[: line_end + 2]
        self.parts += 1
        await self._have(2)  # the blank line of a part without headers
        if self._buffer.startswith(b"\r\n"):
            headers_raw = b""
            del self._buffer[:2]
        else:
            header_end = await self._find(
                b"\r\n\r\n", self.MAX_HEADERS, f"part {self.parts} has no blank line after its headers"
            )
            headers_raw = bytes(self._buffer[:header_end])
            del self._buffer[: header_end + 4]
        self._state = "content"
        return _part_content_type(headers_raw, self.parts) or self._default_type

    async def read(self) -> bytes:
        if self._state != "content":
            return b""
        keep = len(self._separator) - 1  # a separator may begin in the last bytes
        while True:
            at = self._buffer.find(self._separator)
            if at >= 0:
                out = self._take(at)
                del self._buffer[: len(self._separator)]
                self._state = "between"
                return out
            if len(self._buffer) > keep:
                return self._take(len(self._buffer) - keep)
            if not await self._fill():
                raise MalformedRequestError(
                    f"part {self.parts} is not closed by a boundary (truncated body?)",
                    hint="the body must end with --BOUNDARY--",
                )

    def _take(self, size: int) -> bytes:
        """The first ``size`` bytes of the buffer, removed from it: copied once (slicing the
        bytearray and then making bytes of the slice would copy them twice)."""
        with memoryview(self._buffer) as view:
            out = bytes(view[:size])
        del self._buffer[:size]
        return out

    async def _have(self, size: int) -> bool:
        while len(self._buffer) < size:
            if not await self._fill():
                return False
        return True

    async def _find(self, needle: bytes, limit: int, message: str) -> int:
        """Where ``needle`` begins in the buffer, reading on as needed (400 past ``limit`` bytes)."""
        while True:
            at = self._buffer.find(needle, 0, limit + len(needle))
            if at >= 0:
                return at
            if len(self._buffer) > limit or not await self._fill():
                raise MalformedRequestError(message)

    async def _skip_preamble(self) -> None:
        """Up to just after the first delimiter: at the very start, or after a preamble line."""
        await self._have(len(self._delimiter))
        if self._buffer.startswith(self._delimiter):
            del self._buffer[: len(self._delimiter)]
        else:
            keep = len(self._separator) - 1
            while (at := self._buffer.find(self._separator)) < 0:
                if len(self._buffer) > keep:
                    del self._buffer[:-keep]
                if not await self._fill():
                    raise MalformedRequestError("the body holds no part: its boundary never appears")
            del self._buffer[: at + len(self._separator)]
        self._state = "between"


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


def related_length(parts: Sequence[tuple[str, int]], boundary: str) -> int:
    """The length of the body :func:`write_related` streams for parts of these content types and
    sizes: an answer whose parts are sent as stored can carry a Content-Length (its client
    then reads it without the chunked framing, and a cut answer still shows as short)."""
    delimiter = len(boundary) + 2
    framing = sum(delimiter + len("\r\nContent-Type: ") + len(ct) + 4 for ct, _ in parts)
    separators = 2 * max(len(parts) - 1, 0) + (2 if parts else 0)
    return framing + sum(size for _, size in parts) + separators + delimiter + 4


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
