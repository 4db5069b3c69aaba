"""Format "DC2": chunked authenticated encryption, with ranged reads, under the same master keys as A1.

Layout of an encrypted object (docs/encryption.md, "Format DC2", is the specification)::

    offset  size  content
    0       4     b"DC2\\n"                    magic
    4       1     1                           format version
    5       4     master key id               uint32, little-endian
    9       4     chunk size C                uint32, little-endian: plaintext bytes per full chunk
    13      32    salt                        random, fresh for each object
    45      ...   chunk 0, chunk 1, ...       each = AES-256-GCM ciphertext ‖ 16-byte tag

The data key and an 8-byte nonce prefix come from HKDF-SHA256-Expand of the master key with the
header as context; chunk i is sealed with nonce prefix ‖ LE32(i) and associated data
header ‖ LE32(i) ‖ last-flag. Every chunk holds exactly C plaintext bytes except the last, which holds
0 to C-1: an object always ends with a short (possibly empty) chunk flagged last, so truncation at
any byte, including a chunk boundary, is detected, and a chunk's length tells whether it is the last.

`encrypt`/`decrypt` handle whole objects; `DC2Encryptor`/`DC2Decryptor` stream, and unlike A1 the
decryptor releases only authenticated plaintext, one chunk at a time (only the end of the object is
unconfirmed until `DC2Decryptor.finalize`). `plaintext_range_to_ciphertext` and `decrypt_range` read
any byte range of a remote object from its header and the chunks that cover the range.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Literal, TypeAlias

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from dicom_cloud.crypto import a1
from dicom_cloud.crypto.keys import KeyRing, MasterKey
from dicom_cloud.errors import IntegrityError, UsageError

Buffer: TypeAlias = bytes | bytearray | memoryview
FormatName: TypeAlias = Literal["A1", "DC2"]

MAGIC = b"DC2\n"
#: The only version this module reads and writes; any other is refused.
VERSION = 1
SALT_SIZE = 32
#: Bytes before the first chunk: magic, version, key id, chunk size, salt. All of it is authenticated.
HEADER = 45
TAG = 16
DEFAULT_CHUNK_SIZE = 64 * 1024
MIN_CHUNK_SIZE = 1
#: Largest chunk a reader accepts: bounds what a streaming reader buffers for a hostile header.
MAX_CHUNK_SIZE = 16 * 1024 * 1024
#: Chunk indexes are uint32: an object has at most this many chunks.
MAX_CHUNKS = 2**32
DEK_SIZE = 32
NONCE_PREFIX_SIZE = 8
NONCE_SIZE = 12
#: HKDF info = KDF_LABEL ‖ header: separates DC2 keys from any other use of the master key.
KDF_LABEL = b"dicom-cloud DC2 keys\x00"
LAST = b"\x01"
NOT_LAST = b"\x00"

# magic, version, key id, chunk size: the fixed fields before the salt.
_FIXED = struct.Struct("<4sBII")
_U32 = struct.Struct("<I")
_VERSION_END = len(MAGIC) + 1
_ID_END = _VERSION_END + 4
_CHUNK_END = _ID_END + 4

assert _FIXED.size == _CHUNK_END == 13
assert HEADER == _CHUNK_END + SALT_SIZE
assert NONCE_PREFIX_SIZE + _U32.size == NONCE_SIZE


@dataclass(frozen=True)
class HeaderInfo:
    """The fields of a DC2 header, as read: NOT authenticated until a chunk decrypts under them."""

    version: int
    key_id: int
    chunk_size: int
    salt: bytes
    header_length: int = HEADER

    @property
    def chunk_stride(self) -> int:
        """Encrypted bytes of a full chunk: chunk size plus tag."""
        return self.chunk_size + TAG


# --- errors ----------------------------------------------------------------------------------------


def _shown(found: bytes) -> str:
    printable = found.isascii() and found.decode().isprintable()
    return repr(found.decode()) if printable else f"bytes {found.hex()}"


def _not_dc2(found: bytes) -> IntegrityError:
    if sniff(found) == "A1":
        hint = "It is an A1 object (Orthanc-compatible format): read it with dicom_cloud.crypto.a1."
    else:
        hint = "Only objects written with DC2 encryption on can be read as DC2."
    return IntegrityError(
        f"not a DC2-encrypted object: it starts with {_shown(found)}, not {MAGIC.decode()!r}", hint=hint
    )


def _truncated(detail: str) -> IntegrityError:
    return IntegrityError(
        f"truncated DC2 object: {detail}",
        hint="The object was cut short in storage or in transit; fetch it again or restore it.",
    )


def _bad_tag(index: int) -> IntegrityError:
    return IntegrityError(
        f"DC2 object failed authentication at chunk {index}: it was modified, truncated or reordered, "
        "or the master key with its id is not the one it was encrypted with",
        hint="Do not use any plaintext from this object beyond what was already verified.",
    )


def _check_prefix(prefix: Buffer) -> None:
    """Check the fixed fields present in ``prefix`` (any length): magic, version, chunk size."""
    head = bytes(prefix[:_CHUNK_END])
    magic = head[: len(MAGIC)]
    if magic != MAGIC[: len(magic)]:
        raise _not_dc2(magic)
    if len(head) > len(MAGIC) and head[len(MAGIC)] != VERSION:
        raise IntegrityError(
            f"DC2 object of format version {head[len(MAGIC)]}; this reader knows only version {VERSION}",
            hint="It was written by a newer dicom-cloud, or the header is damaged: upgrade to read it.",
        )
    if len(head) == _CHUNK_END:
        chunk_size: int = _U32.unpack_from(head, _ID_END)[0]
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise IntegrityError(
                f"DC2 header gives a chunk size of {chunk_size} bytes, outside {MIN_CHUNK_SIZE} to "
                f"{MAX_CHUNK_SIZE}: the header is damaged"
            )


def _check_chunk_size(chunk_size: object) -> int:
    if (
        not isinstance(chunk_size, int)
        or isinstance(chunk_size, bool)
        or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE
    ):
        raise UsageError(
            f"DC2 chunk size {chunk_size!r} is not an integer from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
        )
    return chunk_size


def _check_range(start: int, end: int) -> None:
    if not 0 <= start < end:
        raise ValueError(f"byte range {start}..{end} is not a non-empty range with 0 <= start < end")


# --- header ----------------------------------------------------------------------------------------


def sniff(prefix: Buffer) -> FormatName | None:
    """Which encrypted format an object is in, from its first bytes (4 are enough); None if neither.

    Only the magic is looked at: a DC2 object of an unknown version is still "DC2" (and its reader
    refuses it). Plain data could start with either magic by chance, so this tells formats apart
    among objects known to be encrypted; it does not tell encrypted from plain.
    """
    head = bytes(prefix[: len(MAGIC)])
    if head == MAGIC:
        return "DC2"
    if head[: len(a1.MAGIC)] == a1.MAGIC:
        return "A1"
    return None


def read_header(prefix: Buffer) -> HeaderInfo:
    """The fields of a DC2 header from the object's first `HEADER` bytes (or more).

    `IntegrityError` if it is not DC2, of another version, shorter than a header, or gives an
    impossible chunk size. The result is not authenticated: decrypting a chunk does that.
    """
    _check_prefix(prefix)
    if len(prefix) < HEADER:
        raise _truncated(f"{len(prefix)} bytes, less than the {HEADER}-byte header")
    head = bytes(prefix[:HEADER])
    _, version, key_id, chunk_size = _FIXED.unpack_from(head)
    return HeaderInfo(version, key_id, chunk_size, head[_CHUNK_END:])


def _header(master: MasterKey, chunk_size: int, salt: bytes) -> bytes:
    return _FIXED.pack(MAGIC, VERSION, master.id, chunk_size) + salt


class _Chunks:
    """The per-object data key and nonce prefix, sealing and opening chunk i."""

    def __init__(self, master: MasterKey, header: bytes) -> None:
        okm = HKDFExpand(hashes.SHA256(), DEK_SIZE + NONCE_PREFIX_SIZE, KDF_LABEL + header).derive(master.key)
        self._aead = AESGCM(okm[:DEK_SIZE])
        self._prefix = okm[DEK_SIZE:]
        self._header = header

    def _nonce_aad(self, index: int, last: bool) -> tuple[bytes, bytes]:
        counter = _U32.pack(index)
        return self._prefix + counter, self._header + counter + (LAST if last else NOT_LAST)

    def seal(self, index: int, last: bool, plaintext: Buffer) -> bytes:
        if index >= MAX_CHUNKS:
            raise UsageError(
                f"too much data for one DC2 object: more than {MAX_CHUNKS} chunks",
                hint="Use a larger chunk size.",
            )
        nonce, aad = self._nonce_aad(index, last)
        return self._aead.encrypt(nonce, plaintext, aad)

    def open(self, index: int, last: bool, chunk: Buffer) -> bytes:
        if index >= MAX_CHUNKS:
            raise _bad_tag(index)
        nonce, aad = self._nonce_aad(index, last)
        try:
            return self._aead.decrypt(nonce, chunk, aad)
        except InvalidTag as e:
            raise _bad_tag(index) from e


# --- sizes -----------------------------------------------------------------------------------------


def encrypted_size(plaintext_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Size of the DC2 object for ``plaintext_size`` bytes: header + plaintext + 16 per chunk.

    There are ``plaintext_size // chunk_size + 1`` chunks: the last holds the remainder, maybe 0 bytes.
    """
    _check_chunk_size(chunk_size)
    if plaintext_size < 0:
        raise ValueError(f"plaintext size {plaintext_size} is negative")
    return HEADER + plaintext_size + TAG * (plaintext_size // chunk_size + 1)


def plaintext_size(object_size: int, chunk_size: int) -> int:
    """The plaintext size of a DC2 object of ``object_size`` bytes; `IntegrityError` if none fits.

    With the chunk size from `read_header` and the object's size from a HEAD request, this is the
    size before any content is fetched (authenticated only once the last chunk decrypts).
    """
    _check_chunk_size(chunk_size)
    body = object_size - HEADER
    full, rest = divmod(body, chunk_size + TAG) if body >= 0 else (0, body)
    if rest < TAG:
        raise _truncated(
            f"{object_size} bytes is not the size of any DC2 object with {chunk_size}-byte chunks"
        )
    return full * chunk_size + rest - TAG


# --- whole objects ---------------------------------------------------------------------------------


class DC2Encryptor:
    """Streaming encryption under the ring's current key.

    Write `header` first, then what each `update` returns (whole encrypted chunks, as they fill),
    then what `finalize` returns (the last chunk, 16 to chunk size + 15 bytes). At most one chunk of
    plaintext is held.
    """

    def __init__(self, ring: KeyRing, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self._start(ring.current, os.urandom(SALT_SIZE), chunk_size)

    @classmethod
    def _with_salt(cls, ring: KeyRing, salt: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> DC2Encryptor:
        """For test vectors only: a fixed salt makes the output reproducible, and reusing it is fatal."""
        if len(salt) != SALT_SIZE:
            raise ValueError(f"salt must be {SALT_SIZE} bytes")
        self = cls.__new__(cls)
        self._start(ring.current, bytes(salt), chunk_size)
        return self

    def _start(self, master: MasterKey, salt: bytes, chunk_size: int) -> None:
        self.key_id = master.id
        self.chunk_size = _check_chunk_size(chunk_size)
        self.header: bytes = _header(master, chunk_size, salt)
        self._chunks = _Chunks(master, self.header)
        self._pending = bytearray()
        self._index = 0
        self._finished = False

    def _seal(self, plaintext: Buffer, last: bool) -> bytes:
        sealed = self._chunks.seal(self._index, last, plaintext)
        self._index += 1
        return sealed

    def update(self, data: Buffer) -> bytes:
        """The encrypted chunks completed by ``data`` (possibly none): a multiple of chunk size + 16."""
        if self._finished:
            raise ValueError("DC2Encryptor already finalized")
        size = self.chunk_size
        view = memoryview(data).cast("B")
        out: list[bytes] = []
        if self._pending:
            take = size - len(self._pending)
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < size:
                return b""
            # A full chunk is never the last: the last one always holds less than chunk size.
            out.append(self._seal(self._pending, last=False))
            self._pending = bytearray()
        while len(view) >= size:
            out.append(self._seal(view[:size], last=False))
            view = view[size:]
        self._pending += view
        return b"".join(out)

    def finalize(self) -> bytes:
        """The last chunk: what remains (0 to chunk size - 1 bytes), flagged last."""
        if self._finished:
            raise ValueError("DC2Encryptor already finalized")
        self._finished = True
        last = self._seal(self._pending, last=True)
        self._pending = bytearray()
        return last


def encrypt(plaintext: Buffer, ring: KeyRing, chunk_size: int = DEFAULT_CHUNK_SIZE) -> bytes:
    """The whole DC2 object for ``plaintext``, under the ring's current key."""
    enc = DC2Encryptor(ring, chunk_size)
    return b"".join((enc.header, enc.update(plaintext), enc.finalize()))


def decrypt(blob: Buffer, ring: KeyRing) -> bytes:
    """The plaintext of a whole DC2 object; `IntegrityError` (and no plaintext) unless all of it verifies.

    An object under a key id the ring does not hold raises `UsageError` naming the id.
    """
    view = memoryview(blob).cast("B")
    info = read_header(view)
    chunks = _Chunks(ring.lookup(info.key_id), bytes(view[:HEADER]))
    body = view[HEADER:]
    stride = info.chunk_stride
    full, rest = divmod(len(body), stride)
    if rest < TAG:
        raise _truncated(f"{len(view)} bytes, which end after {full} whole chunks, without its last chunk")
    out = [chunks.open(i, False, body[i * stride : (i + 1) * stride]) for i in range(full)]
    out.append(chunks.open(full, True, body[full * stride :]))
    return b"".join(out)


class DC2Decryptor:
    """Streaming decryption of a DC2 object fed in pieces of any size, in order.

    The header is checked as it arrives (magic at 4 bytes, version at 5, the key looked up at 9:
    `key_id`, chunk size at 13). Then each chunk is verified before its plaintext is released, so
    everything `update` returns is authentic and in place. What cannot be known before the end is
    that nothing follows: `finalize` verifies the last chunk and raises `IntegrityError` if the
    object stopped short, so an object is complete only once `finalize` has returned.
    """

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring
        self._head = bytearray()
        self._master: MasterKey | None = None
        self._chunks: _Chunks | None = None
        self._pending = bytearray()
        self._index = 0
        self._finished = False
        #: The master key id, once the first 9 bytes have been seen.
        self.key_id: int | None = None
        #: The header's fields, once all of it has been seen.
        self.header_info: HeaderInfo | None = None

    def update(self, data: Buffer) -> bytes:
        """Authenticated plaintext of the chunks completed by ``data`` (possibly none)."""
        if self._finished:
            raise ValueError("DC2Decryptor already finalized or failed")
        try:
            return self._update(memoryview(data).cast("B"))
        except BaseException:
            self._finished = True
            raise

    def _update(self, view: memoryview) -> bytes:
        if self._chunks is None:
            take = HEADER - len(self._head)
            self._head += view[:take]
            view = view[take:]
            self._read_header()
            if self._chunks is None:
                return b""
        chunks = self._chunks
        assert self.header_info is not None
        stride = self.header_info.chunk_stride
        out: list[bytes] = []
        if self._pending:
            take = stride - len(self._pending)
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < stride:
                return b""
            # A full-size chunk is never the last one, so it can be verified and released now.
            out.append(chunks.open(self._index, False, self._pending))
            self._index += 1
            self._pending = bytearray()
        while len(view) >= stride:
            out.append(chunks.open(self._index, False, view[:stride]))
            self._index += 1
            view = view[stride:]
        self._pending += view
        return b"".join(out)

    def _read_header(self) -> None:
        _check_prefix(self._head)
        if self.key_id is None and len(self._head) >= _ID_END:
            self.key_id = _U32.unpack_from(self._head, _VERSION_END)[0]
            self._master = self._ring.lookup(self.key_id)
        if len(self._head) == HEADER and self._master is not None:
            self.header_info = read_header(self._head)
            self._chunks = _Chunks(self._master, bytes(self._head))

    def finalize(self) -> bytes:
        """The plaintext of the last chunk; `IntegrityError` if it is missing, cut short or altered."""
        if self._finished:
            raise ValueError("DC2Decryptor already finalized or failed")
        self._finished = True
        if self._chunks is None:
            raise _truncated(f"{len(self._head)} bytes, less than the {HEADER}-byte header")
        if len(self._pending) < TAG:
            raise _truncated(f"it ends after {self._index} whole chunks, without its last chunk")
        last = self._chunks.open(self._index, True, self._pending)
        self._pending = bytearray()
        return last


# --- ranged reads ----------------------------------------------------------------------------------


def plaintext_range_to_ciphertext(
    header_info: HeaderInfo, start: int, end: int, *, object_size: int | None = None
) -> tuple[int, int, int]:
    """The ciphertext bytes to fetch for plaintext bytes ``start`` to ``end`` (end excluded).

    Returns ``(cipher_start, cipher_end, first_chunk_index)``, cipher_end excluded: the chunks that
    hold the range, whole. cipher_end may lie past the object's end when the range reaches its last
    chunk; a ranged GET stops at the end anyway, or give ``object_size`` to clamp it here.
    """
    _check_range(start, end)
    stride = header_info.chunk_stride
    first = start // header_info.chunk_size
    last = (end - 1) // header_info.chunk_size
    cipher_start = header_info.header_length + first * stride
    cipher_end = header_info.header_length + (last + 1) * stride
    if object_size is not None:
        cipher_end = min(cipher_end, object_size)
    return cipher_start, cipher_end, first


def decrypt_range(
    header_bytes: Buffer,
    ciphertext_span: Buffer,
    first_chunk_index: int,
    start: int,
    end: int,
    ring: KeyRing,
) -> bytes:
    """Plaintext bytes ``start`` to ``end`` (end excluded) of a DC2 object, every byte authenticated.

    ``header_bytes`` is the object's start (at least `HEADER` bytes) and ``ciphertext_span`` the bytes
    from the cipher_start that `plaintext_range_to_ciphertext` gave. Like a slice, the result stops
    at the object's end, but only where the span shows the (authenticated) last chunk: a span that
    stops at a chunk boundary before ``end`` without it raises `IntegrityError` (truncated). A range
    starting past the end cannot be proved empty; use `plaintext_size` to stay within the object.
    """
    _check_range(start, end)
    info = read_header(header_bytes)
    size = info.chunk_size
    if first_chunk_index != start // size:
        raise ValueError(
            f"first_chunk_index {first_chunk_index} is not the chunk holding byte {start} "
            f"({start // size} with {size}-byte chunks)"
        )
    chunks = _Chunks(ring.lookup(info.key_id), bytes(memoryview(header_bytes).cast("B")[:HEADER]))
    span = memoryview(ciphertext_span).cast("B")
    stride = info.chunk_stride
    needed = (end - 1) // size
    out: list[bytes] = []
    index, pos = first_chunk_index, 0
    while True:
        remaining = len(span) - pos
        if remaining >= stride:
            out.append(chunks.open(index, False, span[pos : pos + stride]))
            if index == needed:
                break
            index, pos = index + 1, pos + stride
        elif remaining >= TAG:
            # Shorter than a full chunk: it can only be the object's last chunk, and must verify so.
            out.append(chunks.open(index, True, span[pos:]))
            break
        else:
            raise _truncated(
                f"the ciphertext span ends {remaining} bytes into chunk {index}, before byte {end} "
                "and without the last chunk"
            )
    base = first_chunk_index * size
    return b"".join(out)[start - base : end - base]
