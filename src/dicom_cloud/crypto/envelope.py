"""Client-side encryption during transfers: which objects to encrypt or decrypt, in which format.

The rules, as the transfer engine applies them:

- Writing with ``encrypt_as`` set: every object written is encrypted under the ring's current
  master key, and marked in metadata (format and key id, never key material).
- Reading: an object is encrypted when its metadata says so, or when its name ends in ``.enc``
  (Orthanc's plugins name their encrypted objects so). It is decrypted when the bytes go to local
  disk (download) or are re-encrypted (copy or rekey with ``encrypt_as``); otherwise ciphertext is
  copied as it is, so that a copy never turns protected data into plaintext by accident.
- Local copies are written encrypted only when ``encrypt_as`` is set for them: the command line
  sets it on a download only with ``--keep-encrypted`` (``--encrypt client-side`` given to a
  download names the data as encrypted, so the download decrypts, as it does with a key alone).
- An encrypted object that must be decrypted under a key id the ring lacks (or with no ring at
  all) is refused with :class:`~dicom_cloud.errors.KeyMissingError` naming the id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from ..errors import DicomCloudError, KeyMissingError, NotSupportedError
from . import a1
from .keys import KeyRing

Format = Literal["A1", "DC2"]

#: Metadata keys marking an encrypted object (identifiers: Azure requires them).
FORMAT_METADATA_KEY = "dicom_cloud_encryption"
KEY_ID_METADATA_KEY = "dicom_cloud_key_id"
#: Suffix Orthanc's object-storage plugins give encrypted objects.
ORTHANC_SUFFIX = ".enc"


class Encryptor(Protocol):
    header: bytes

    def update(self, chunk: bytes | memoryview) -> bytes: ...
    def finalize(self) -> bytes: ...


class Decryptor(Protocol):
    """``update`` returns plaintext (A1: not yet authenticated); ``finalize`` checks the tag(s)
    and returns any plaintext still held back (DC2's last chunk; nothing for A1)."""

    def update(self, chunk: bytes | memoryview) -> bytes: ...
    def finalize(self) -> bytes: ...


def recorded_key_id(metadata: Mapping[str, str]) -> int | None:
    """The key id in an object's metadata, if it is a plain decimal number."""
    text = metadata.get(KEY_ID_METADATA_KEY, "")
    return int(text) if text.isascii() and text.isdigit() else None


def _key_id(fmt: Format, metadata: Mapping[str, str], head: bytes | memoryview) -> int | None:
    recorded = recorded_key_id(metadata)
    if recorded is not None or not head:
        return recorded
    try:
        if fmt == "DC2":
            from .chunked import read_header

            return read_header(head).key_id
        return a1.header_key_id(head)
    except (DicomCloudError, ValueError):
        return None  # too short or not of this format: the decryption will say so


class _A1Decryptor:
    """A1's streaming decryptor with the common ``finalize`` that returns the remaining plaintext."""

    def __init__(self, ring: KeyRing) -> None:
        self._inner = a1.A1Decryptor(ring)

    def update(self, chunk: bytes | memoryview) -> bytes:
        return self._inner.update(chunk)

    def finalize(self) -> bytes:
        self._inner.finalize()
        return b""


@dataclass(frozen=True)
class ClientEncryption:
    """Master keys for reading, and the format to write in (``None``: write plaintext)."""

    ring: KeyRing | None = None
    encrypt_as: Format | None = None

    def __post_init__(self) -> None:
        if self.encrypt_as and self.ring is None:
            raise KeyMissingError(
                "client-side encryption needs a master key", hint="pass --master-key ID:PATH"
            )

    # -- writing -------------------------------------------------------------------------

    @property
    def writes_encrypted(self) -> bool:
        return self.encrypt_as is not None

    def marker(self) -> dict[str, str]:
        """Metadata recording how a written object is encrypted."""
        assert self.ring is not None and self.encrypt_as is not None
        return {FORMAT_METADATA_KEY: self.encrypt_as, KEY_ID_METADATA_KEY: str(self.ring.current.id)}

    def encrypt(self, plaintext: bytes | memoryview) -> bytes:
        encryptor = self.encryptor()
        return b"".join((encryptor.header, encryptor.update(plaintext), encryptor.finalize()))

    def encryptor(self) -> Encryptor:
        assert self.ring is not None
        if self.encrypt_as == "DC2":
            from .chunked import DC2Encryptor

            return DC2Encryptor(self.ring)
        return a1.A1Encryptor(self.ring)

    def encrypted_size(self, plaintext_size: int) -> int:
        """The stored size of an object of ``plaintext_size`` bytes written by ``encrypt``."""
        if self.encrypt_as == "DC2":
            from .chunked import encrypted_size

            return encrypted_size(plaintext_size)
        return plaintext_size + a1.OVERHEAD

    # -- reading -------------------------------------------------------------------------

    def detect(self, key: str, metadata: Mapping[str, str]) -> Format | None:
        """The format ``key`` is encrypted in, from its metadata or its name; None for plaintext."""
        recorded = metadata.get(FORMAT_METADATA_KEY)
        if recorded in ("A1", "DC2"):
            return recorded  # type: ignore[return-value]
        if recorded is not None:
            # Marked encrypted, in a format this version does not know: never pass it off as plaintext.
            raise NotSupportedError(
                f"{key} is encrypted in an unknown format '{recorded}'",
                hint="a newer dicom-cloud may read it",
            )
        if key.endswith(ORTHANC_SUFFIX):
            return "A1"
        return None

    def require_key(
        self, url: str, fmt: Format, metadata: Mapping[str, str], head: bytes | memoryview = b""
    ) -> KeyRing:
        """The ring, checked to hold the object's key. The key id comes from the metadata, or from
        the object's first bytes (``head``) for objects written by Orthanc, which have no metadata."""
        key_id = _key_id(fmt, metadata, head)
        if self.ring is None:
            which = f" under master key id {key_id}" if key_id is not None else ""
            raise KeyMissingError(
                f"{url} is client-side encrypted ({fmt}){which}",
                key_id=key_id,
                hint=f"pass --master-key {key_id if key_id is not None else 'ID'}:PATH to decrypt it",
            )
        if key_id is not None:
            self.ring.lookup(key_id)
        return self.ring

    def decrypt(self, url: str, fmt: Format, metadata: Mapping[str, str], blob: bytes | memoryview) -> bytes:
        ring = self.require_key(url, fmt, metadata, blob[:16])
        if fmt == "DC2":
            from .chunked import decrypt as dc2_decrypt

            return dc2_decrypt(blob, ring)
        return a1.decrypt(blob, ring)

    def decryptor(
        self, url: str, fmt: Format, metadata: Mapping[str, str], head: bytes | memoryview = b""
    ) -> Decryptor:
        ring = self.require_key(url, fmt, metadata, head)
        if fmt == "DC2":
            from .chunked import DC2Decryptor

            return DC2Decryptor(ring)
        return _A1Decryptor(ring)
