"""Write tests/vectors/a1.json: deterministic A1 objects, for other implementations to check against.

Run from the repository root: ``python tests/vectors/make_a1_vectors.py``.

Real objects use a fresh random IV and data key each; here they are fixed (through a testing-only
constructor) so the output is reproducible. tests/unit/test_crypto_a1.py re-derives every field
of every vector from the raw primitives (AES-CTR, AES-GCM) without this package, so the file is
checked against the specification, not against the code that wrote it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from dicom_cloud.crypto.a1 import TAG, A1Encryptor
from dicom_cloud.crypto.keys import KeyRing, MasterKey

OUT = Path(__file__).with_name("a1.json")

# Recognisable, distinct byte patterns: a field put in the wrong place shows at a glance.
MASTER = bytes(range(0x00, 0x20))
IV = bytes(range(0x20, 0x40))
DEK = bytes(range(0x40, 0x60))
# 258 is 02 01 00 00 little-endian: a swapped byte order cannot go unnoticed.
KEY_ID = 258

CASES: list[tuple[str, int, bytes, bytes, bytes, bytes]] = [
    ("empty", KEY_ID, MASTER, IV, DEK, b""),
    ("one byte", KEY_ID, MASTER, IV, DEK, b"P"),
    # 18 bytes, not a multiple of the AES block; the message Orthanc's own unit tests encrypt.
    ("18 bytes", KEY_ID, MASTER, IV, DEK, b"Plain text message"),
    ("1000 bytes", KEY_ID, MASTER, IV, DEK, bytes(i % 251 for i in range(1000))),
    (
        "largest key id, other secrets",
        2**32 - 1,
        bytes(0xFF - i for i in range(32)),
        bytes(range(0x60, 0x80)),
        bytes(range(0x80, 0xA0)),
        b"DICM" * 25 + b"!",
    ),
]


def build() -> dict[str, object]:
    vectors = []
    for name, key_id, master, iv, dek, plaintext in CASES:
        enc = A1Encryptor._with_iv_and_dek(KeyRing(MasterKey(key_id, master)), iv, dek)
        obj = enc.header + enc.update(plaintext) + enc.finalize()
        vectors.append(
            {
                "name": name,
                "master_key_id": key_id,
                "master_key": master.hex(),
                "master_key_file": base64.b64encode(master).decode() + "\n",
                "iv": iv.hex(),
                "dek": dek.hex(),
                "eiv": obj[6:38].hex(),
                "edek": obj[38:70].hex(),
                "plaintext": plaintext.hex(),
                "tag": obj[-TAG:].hex(),
                "object": obj.hex(),
            }
        )
    return {
        "format": "A1",
        "spec": "docs/encryption.md",
        "generator": "tests/vectors/make_a1_vectors.py",
        "note": "All binary fields are lower-case hex; master_key_file is the key file's text (base64).",
        "vectors": vectors,
    }


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {OUT.name}")


if __name__ == "__main__":
    main()
