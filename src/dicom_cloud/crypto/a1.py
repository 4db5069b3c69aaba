"""Format "A1": client-side envelope encryption, byte for byte as Orthanc's object-storage plugins.

Layout of an encrypted object (see docs/encryption.md for the full specification)::

    offset  size  content
    0       2     b"A1"                       the format version
    2       4     master key id               uint32, little-endian
    6       32    EIV                         the GCM IV, AES-256-CTR-encrypted under the master key
    38      32    EDEK                        the data key, AES-256-CTR-encrypted under the master key
    70      n     ciphertext                  AES-256-GCM of the plaintext under the data key
    70+n    16    tag                         GCM tag; the 70-byte header is the additional data

Every object gets a fresh random 32-byte IV and 32-byte data key. Whole-object `encrypt` and
`decrypt` suit small objects; `A1Encryptor` and `A1Decryptor` stream large ones holding no more
than one chunk. GCM authenticates only at the end, so streamed plaintext must not be used until
`A1Decryptor.finalize` has returned.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, TypeAlias

from dicom_cloud.crypto.keys import KeyRing, MasterKey
from dicom_cloud.errors import IntegrityError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers import AEADDecryptionContext, Cipher, modes

Buffer: TypeAlias = bytes | bytearray | memoryview

MAGIC = b"A1"
KEY_ID_SIZE = 4
IV_SIZE = 32
DEK_SIZE = 32
#: Bytes before the ciphertext: version, key id, EIV, EDEK. All of it is authenticated.
HEADER = len(MAGIC) + KEY_ID_SIZE + IV_SIZE + DEK_SIZE
TAG = 16
#: Encrypted size = plaintext size + OVERHEAD.
OVERHEAD = HEADER + TAG

# Orthanc copies the uint32 from memory: little-endian on every platform it ships on.
_KEY_ID = struct.Struct("<I")
_ID_END = len(MAGIC) + KEY_ID_SIZE
_EIV_END = _ID_END + IV_SIZE
# Orthanc encrypts EIV and EDEK with AES-CTR from an all-zero 16-byte counter block, each from
# counter 0 (so under the same keystream): kept as is, or Orthanc could not read our objects.
_ZERO_COUNTER = bytes(16)

assert (HEADER, OVERHEAD) == (70, 86)


# cryptography is imported at the first encryption or decryption: it takes about 10 ms to load,
# which every command that never encrypts (most transfers) would otherwise pay at start-up.
def _aes_ctr(key: bytes, counter: bytes) -> Cipher[modes.CTR]:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher(algorithms.AES(key), modes.CTR(counter))


def _aes_gcm(key: bytes, iv: bytes, tag: bytes | None = None) -> Cipher[modes.GCM]:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher(algorithms.AES(key), modes.GCM(iv, tag))


def _invalid_tag() -> type[Exception]:
    from cryptography.exceptions import InvalidTag

    return InvalidTag


def _ctr(master: MasterKey, data: bytes) -> bytes:
    # CTR is its own inverse: the same call wraps and unwraps.
    ctx = _aes_ctr(master.key, _ZERO_COUNTER).encryptor()
    return ctx.update(data) + ctx.finalize()


def _check_magic(prefix: Buffer) -> None:
    found = bytes(prefix[: len(MAGIC)])
    if found != MAGIC:
        printable = found.isascii() and found.decode().isprintable()
        shown = repr(found.decode()) if printable else f"bytes {found.hex()}"
        raise IntegrityError(
            f"not an A1-encrypted object: it starts with {shown}, not 'A1'",
            hint="Only objects written with encryption on (here or by Orthanc's plugins) can be decrypted.",
        )


def _truncated(size: int) -> IntegrityError:
    return IntegrityError(
        f"truncated A1 object: {size} bytes, less than the {OVERHEAD} bytes of header and tag",
        hint="The object was cut short in storage or in transit; fetch it again or restore it.",
    )


def _bad_tag() -> IntegrityError:
    return IntegrityError(
        "A1 object failed authentication: it was modified or truncated, or the master key with its id "
        "is not the one it was encrypted with",
        hint="Do not use any plaintext already produced from this object.",
    )


def header_key_id(prefix: Buffer) -> int:
    """The master key id of an object, from its first 6 bytes (or more).

    Enough to tell which key an object is under from a ranged read, without fetching it all.
    """
    if len(prefix) < len(MAGIC):
        raise _truncated(len(prefix))
    _check_magic(prefix)
    if len(prefix) < _ID_END:
        raise _truncated(len(prefix))
    key_id: int = _KEY_ID.unpack_from(prefix, len(MAGIC))[0]
    return key_id


def _unwrap(header: bytes, master: MasterKey) -> tuple[bytes, bytes]:
    """The IV and data key from a 70-byte header."""
    return _ctr(master, header[_ID_END:_EIV_END]), _ctr(master, header[_EIV_END:HEADER])


class A1Encryptor:
    """Streaming encryption under the ring's current key.

    Write `header` first, then what each `update` returns, then the 16 bytes of `finalize`.
    """

    def __init__(self, ring: KeyRing) -> None:
        self._start(ring.current, os.urandom(IV_SIZE), os.urandom(DEK_SIZE))

    @classmethod
    def _with_iv_and_dek(cls, ring: KeyRing, iv: bytes, dek: bytes) -> A1Encryptor:
        """For test vectors only: fixed secrets make the output reproducible, and reusing them is fatal."""
        if len(iv) != IV_SIZE or len(dek) != DEK_SIZE:
            raise ValueError("IV and data key must be 32 bytes each")
        self = cls.__new__(cls)
        self._start(ring.current, iv, dek)
        return self

    def _start(self, master: MasterKey, iv: bytes, dek: bytes) -> None:
        self.key_id = master.id
        self.header: bytes = MAGIC + _KEY_ID.pack(master.id) + _ctr(master, iv) + _ctr(master, dek)
        self._ctx = _aes_gcm(dek, iv).encryptor()
        self._ctx.authenticate_additional_data(self.header)

    def update(self, chunk: Buffer) -> bytes:
        """The ciphertext of ``chunk`` (same length)."""
        return self._ctx.update(chunk)

    def finalize(self) -> bytes:
        """The 16-byte tag that ends the object."""
        self._ctx.finalize()  # GCM is a stream mode: nothing is left to flush
        return self._ctx.tag


def _seal(enc: A1Encryptor, plaintext: Buffer) -> bytes:
    return b"".join((enc.header, enc.update(plaintext), enc.finalize()))


def encrypt(plaintext: Buffer, ring: KeyRing) -> bytes:
    """The whole A1 object for ``plaintext``, under the ring's current key."""
    return _seal(A1Encryptor(ring), plaintext)


def decrypt(blob: Buffer, ring: KeyRing) -> bytes:
    """The plaintext of a whole A1 object; `IntegrityError` (and no plaintext) unless it authenticates.

    An object under a key id the ring does not hold raises `UsageError` naming the id.
    """
    view = memoryview(blob)
    master = ring.lookup(header_key_id(view))
    if len(view) < OVERHEAD:
        raise _truncated(len(view))
    header = bytes(view[:HEADER])
    iv, dek = _unwrap(header, master)
    ctx = _aes_gcm(dek, iv, bytes(view[-TAG:])).decryptor()
    ctx.authenticate_additional_data(header)
    plaintext = ctx.update(view[HEADER:-TAG])
    try:
        ctx.finalize()
    except _invalid_tag() as e:
        # The unauthenticated plaintext is dropped here, never handed out.
        raise _bad_tag() from e
    return plaintext


class A1Decryptor:
    """Streaming decryption of an A1 object fed in chunks of any size, in order.

    The header may arrive split across chunks; the version is checked once 2 bytes have come and
    the key looked up once 6 have (`key_id`), so a wrong object fails early. The last 16 bytes
    are the tag, so `update` always holds back the latest 16 bytes. What `update` returns is NOT
    authenticated: write it somewhere provisional and only use it once `finalize` has returned.
    """

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring
        self._head = bytearray()
        self._master: MasterKey | None = None
        self._ctx: AEADDecryptionContext | None = None
        self._tail = b""
        self._finished = False
        #: The master key id, once the first 6 bytes have been seen.
        self.key_id: int | None = None

    def update(self, chunk: Buffer) -> bytes:
        """Plaintext for the bytes fed so far, minus the 16 held back: untrusted until `finalize`."""
        if self._finished:
            raise ValueError("A1Decryptor already finalized")
        data = memoryview(chunk)
        if self._ctx is None:
            take = HEADER - len(self._head)
            self._head += data[:take]
            data = data[take:]
            self._read_header()
            if self._ctx is None:
                return b""
        ctx = self._ctx
        if len(data) >= TAG:
            # Release the previous tail and all but the last 16 bytes of this chunk.
            out = ctx.update(self._tail) + ctx.update(data[:-TAG]) if self._tail else ctx.update(data[:-TAG])
            self._tail = bytes(data[-TAG:])
            return out
        pending = self._tail + data
        self._tail = pending[-TAG:]
        return ctx.update(pending[:-TAG])

    def _read_header(self) -> None:
        if self.key_id is None and len(self._head) >= len(MAGIC):
            _check_magic(self._head)
            if len(self._head) >= _ID_END:
                self.key_id = header_key_id(self._head)
                self._master = self._ring.lookup(self.key_id)
        if len(self._head) == HEADER and self._master is not None:
            header = bytes(self._head)
            iv, dek = _unwrap(header, self._master)
            # The tag is not known yet: it is checked in finalize with finalize_with_tag.
            self._ctx = _aes_gcm(dek, iv).decryptor()
            self._ctx.authenticate_additional_data(header)

    def finalize(self) -> None:
        """Check the tag: `IntegrityError` if the object was truncated, modified, or under another key."""
        if self._finished:
            raise ValueError("A1Decryptor already finalized")
        self._finished = True
        if self._ctx is None or len(self._tail) < TAG:
            raise _truncated(len(self._head) + len(self._tail))
        try:
            self._ctx.finalize_with_tag(self._tail)
        except _invalid_tag() as e:
            raise _bad_tag() from e
