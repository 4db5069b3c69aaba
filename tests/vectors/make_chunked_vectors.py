"""Write tests/vectors/chunked.json: deterministic DC2 objects, for other implementations to check against.

Run from the repository root: ``python tests/vectors/make_chunked_vectors.py``.

Real objects use a fresh random salt each; here it is fixed (through a testing-only constructor) so
the output is reproducible. tests/unit/test_crypto_chunked.py re-derives every field of every vector
from the raw primitives (HMAC-SHA256 for HKDF-Expand, AES-GCM) without this package, so the file is
checked against the specification, not against the code that wrote it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from dicom_cloud.crypto.chunked import (
    DEK_SIZE,
    HEADER,
    KDF_LABEL,
    NONCE_PREFIX_SIZE,
    TAG,
    DC2Encryptor,
)
from dicom_cloud.crypto.keys import KeyRing, MasterKey

OUT = Path(__file__).with_name("chunked.json")

# Recognisable, distinct byte patterns, the same master key as the A1 vectors.
MASTER = bytes(range(0x00, 0x20))
SALT = bytes(range(0x20, 0x40))
# 258 is 02 01 00 00 little-endian: a swapped byte order cannot go unnoticed.
KEY_ID = 258

CASES: list[tuple[str, int, bytes, bytes, int, bytes]] = [
    ("empty", KEY_ID, MASTER, SALT, 64, b""),
    ("one byte", KEY_ID, MASTER, SALT, 64, b"P"),
    # 18 bytes in 16-byte chunks: one full chunk and a 2-byte last chunk.
    ("18 bytes, 16-byte chunks", KEY_ID, MASTER, SALT, 16, b"Plain text message"),
    # An exact multiple of the chunk size ends with an empty last chunk.
    ("32 bytes, 16-byte chunks", KEY_ID, MASTER, SALT, 16, bytes(range(32))),
    ("100 bytes, 64 KiB chunks", KEY_ID, MASTER, SALT, 65536, bytes(i % 251 for i in range(100))),
    (
        "largest key id, other secrets",
        2**32 - 1,
        bytes(0xFF - i for i in range(32)),
        bytes(range(0x60, 0x80)),
        7,
        b"DICM" * 5 + b"!",
    ),
]


def build() -> dict[str, object]:
    vectors = []
    for name, key_id, master, salt, chunk_size, plaintext in CASES:
        enc = DC2Encryptor._with_salt(KeyRing(MasterKey(key_id, master)), salt, chunk_size)
        obj = enc.header + enc.update(plaintext) + enc.finalize()
        okm = HKDFExpand(hashes.SHA256(), DEK_SIZE + NONCE_PREFIX_SIZE, KDF_LABEL + enc.header).derive(master)
        stride = chunk_size + TAG
        body = obj[HEADER:]
        count = len(plaintext) // chunk_size + 1  # the last chunk holds the remainder, maybe nothing
        chunks = []
        for index in range(count):
            sealed = body[index * stride : (index + 1) * stride]
            chunks.append(
                {
                    "index": index,
                    "last": index == count - 1,
                    "plaintext": plaintext[index * chunk_size : (index + 1) * chunk_size].hex(),
                    "ciphertext": sealed[:-TAG].hex(),
                    "tag": sealed[-TAG:].hex(),
                }
            )
        vectors.append(
            {
                "name": name,
                "master_key_id": key_id,
                "master_key": master.hex(),
                "master_key_file": base64.b64encode(master).decode() + "\n",
                "salt": salt.hex(),
                "chunk_size": chunk_size,
                "plaintext": plaintext.hex(),
                "header": enc.header.hex(),
                "dek": okm[:DEK_SIZE].hex(),
                "nonce_prefix": okm[DEK_SIZE:].hex(),
                "chunks": chunks,
                "object": obj.hex(),
            }
        )
    return {
        "format": "DC2",
        "version": 1,
        "spec": "docs/encryption.md (Format DC2)",
        "generator": "tests/vectors/make_chunked_vectors.py",
        "note": (
            "All binary fields are lower-case hex; master_key_file is the key file's text (base64). "
            "dek and nonce_prefix are HKDF-SHA256-Expand(master_key, info = KDF label || header, 40 bytes); "
            "chunk i uses nonce nonce_prefix || LE32(i) and associated data header || LE32(i) || last flag."
        ),
        "vectors": vectors,
    }


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {OUT.name}")


if __name__ == "__main__":
    main()
