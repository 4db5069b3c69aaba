"""Client-side envelope encryption compatible with Orthanc's object-storage plugins (format A1).

- `keys`: master keys, their files and the key ring that finds one by id;
- `a1`: the A1 object format, whole-object and streaming.

The format is specified in docs/encryption.md.
"""

from __future__ import annotations

from dicom_cloud.crypto.a1 import (
    HEADER,
    MAGIC,
    OVERHEAD,
    TAG,
    A1Decryptor,
    A1Encryptor,
    decrypt,
    encrypt,
    header_key_id,
)
from dicom_cloud.crypto.keys import KEY_SIZE, KeyRing, MasterKey, parse_key_spec

__all__ = [
    "HEADER",
    "KEY_SIZE",
    "MAGIC",
    "OVERHEAD",
    "TAG",
    "A1Decryptor",
    "A1Encryptor",
    "KeyRing",
    "MasterKey",
    "decrypt",
    "encrypt",
    "header_key_id",
    "parse_key_spec",
]
