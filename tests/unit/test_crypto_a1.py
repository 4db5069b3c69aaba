"""Format A1: the published vectors checked from first principles, round trips, and tampering."""

from __future__ import annotations

import base64
import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import dicom_cloud.crypto as crypto_pkg
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
from dicom_cloud.crypto.keys import KeyRing, MasterKey
from dicom_cloud.errors import IntegrityError, UsageError

VECTORS_FILE = Path(__file__).parents[1] / "vectors" / "a1.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text())["vectors"]

KEY_A = MasterKey(1, bytes([0x11]) * 32)
KEY_B = MasterKey(2, bytes([0x22]) * 32)
RING = KeyRing(KEY_A)


def _vector_id(v: dict[str, Any]) -> str:
    return str(v["name"])


def _ctr_zero(key: bytes, data: bytes) -> bytes:
    ctx = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return ctx.update(data) + ctx.finalize()


def _chunks(data: bytes, sizes: Iterable[int]) -> Iterator[bytes]:
    pos = 0
    sizes = list(sizes)
    i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        yield data[pos : pos + size]
        pos += size
        i += 1


def _stream_encrypt(enc: A1Encryptor, chunks: Iterable[bytes]) -> bytes:
    return b"".join([enc.header, *(enc.update(c) for c in chunks), enc.finalize()])


def _stream_decrypt(blob: bytes, ring: KeyRing, sizes: Iterable[int]) -> bytes:
    dec = A1Decryptor(ring)
    out = b"".join(dec.update(c) for c in _chunks(blob, sizes))
    dec.finalize()
    return out


# --- the format's constants -----------------------------------------------------------------------


def test_constants() -> None:
    assert (MAGIC, HEADER, TAG, OVERHEAD) == (b"A1", 70, 16, 86)


def test_package_exports_exist() -> None:
    for name in crypto_pkg.__all__:
        assert hasattr(crypto_pkg, name), name


# --- the vectors, re-derived without dicom_cloud.crypto -------------------------------------------


def test_vectors_cover_the_required_sizes() -> None:
    sizes = {len(bytes.fromhex(v["plaintext"])) for v in VECTORS}
    assert {0, 1, 1000} <= sizes
    assert any(s % 16 for s in sizes)


@pytest.mark.parametrize("v", VECTORS, ids=_vector_id)
def test_vector_from_first_principles(v: dict[str, Any]) -> None:
    master, iv, dek = (bytes.fromhex(v[k]) for k in ("master_key", "iv", "dek"))
    plaintext, obj = bytes.fromhex(v["plaintext"]), bytes.fromhex(v["object"])
    assert base64.b64decode(v["master_key_file"]) == master
    assert len(obj) == len(plaintext) + 86
    # Header: version, little-endian id, then IV and data key each AES-256-CTR'd from a zero counter.
    assert obj[0:2] == b"A1"
    assert obj[2:6] == v["master_key_id"].to_bytes(4, "little")
    assert obj[6:38] == bytes.fromhex(v["eiv"]) == _ctr_zero(master, iv)
    assert obj[38:70] == bytes.fromhex(v["edek"]) == _ctr_zero(master, dek)
    # Body: AES-256-GCM, 32-byte IV, the whole 70-byte header as associated data, 16-byte tag last.
    assert obj[70:] == AESGCM(dek).encrypt(iv, plaintext, obj[:70])
    assert obj[-16:] == bytes.fromhex(v["tag"])


@pytest.mark.parametrize("v", VECTORS, ids=_vector_id)
def test_vector_reproduced_and_read_by_the_module(v: dict[str, Any]) -> None:
    ring = KeyRing(MasterKey(v["master_key_id"], bytes.fromhex(v["master_key"])))
    plaintext, obj = bytes.fromhex(v["plaintext"]), bytes.fromhex(v["object"])
    enc = A1Encryptor._with_iv_and_dek(ring, bytes.fromhex(v["iv"]), bytes.fromhex(v["dek"]))
    assert _stream_encrypt(enc, _chunks(plaintext, [7, 100])) == obj
    assert decrypt(obj, ring) == plaintext
    assert _stream_decrypt(obj, ring, [5, 33, 1]) == plaintext
    assert header_key_id(obj[:6]) == v["master_key_id"]


def test_key_id_is_little_endian() -> None:
    # The example of the reference: id 258 is stored as 02 01 00 00.
    blob = encrypt(b"", KeyRing(MasterKey(258, bytes(32))))
    assert blob[2:6] == bytes([0x02, 0x01, 0x00, 0x00])
    assert header_key_id(blob) == 258


def test_gcm_with_a_long_iv_follows_the_gcm_specification() -> None:
    # Test case 18 of McGrew & Viega's GCM specification: AES-256 with a 60-byte IV, the same
    # GHASH-derived counter path a 32-byte IV takes (in Crypto++, which Orthanc uses, as here).
    key = bytes.fromhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
    iv = bytes.fromhex(
        "9313225df88406e555909c5aff5269aa6a7a9538534f7da1e4c303d2a318a728"
        "c3c0c95156809539fcf0e2429a6b525416aedbf5a0de6a57a637b39b"
    )
    plaintext = bytes.fromhex(
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
        "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
    )
    aad = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    expected = bytes.fromhex(
        "5a8def2f0c9e53f1f75d7853659e2a20eeb2b22aafde6419a058ab4f6f746bf4"
        "0fc0c3b780f244452da3ebf1c5d82cdea2418997200ef82e44ae7e3f"
        "a44a8266ee1c8eb0c8b5d4cf5ae9f19a"
    )
    assert AESGCM(key).encrypt(iv, plaintext, aad) == expected
    ctx = Cipher(algorithms.AES(key), modes.GCM(iv)).encryptor()
    ctx.authenticate_additional_data(aad)
    assert ctx.update(plaintext) + ctx.finalize() + ctx.tag == expected


def test_gcm_cipher_context_equals_aesgcm_with_a_32_byte_iv() -> None:
    key, iv, aad, plaintext = os.urandom(32), os.urandom(32), os.urandom(70), os.urandom(1000)
    ctx = Cipher(algorithms.AES(key), modes.GCM(iv)).encryptor()
    ctx.authenticate_additional_data(aad)
    assert ctx.update(plaintext) + ctx.finalize() + ctx.tag == AESGCM(key).encrypt(iv, plaintext, aad)


def test_known_weakness_eiv_xor_edek_is_iv_xor_dek() -> None:
    # Kept for compatibility (docs/encryption.md, "Known weaknesses"): both fields share one keystream.
    iv, dek = os.urandom(32), os.urandom(32)
    enc = A1Encryptor._with_iv_and_dek(RING, iv, dek)
    eiv, edek = enc.header[6:38], enc.header[38:70]
    assert bytes(a ^ b for a, b in zip(eiv, edek, strict=True)) == bytes(
        a ^ b for a, b in zip(iv, dek, strict=True)
    )


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000, 65537])
def test_round_trip(size: int) -> None:
    plaintext = os.urandom(size)
    blob = encrypt(plaintext, RING)
    assert len(blob) == size + OVERHEAD
    assert blob[:2] == b"A1"
    assert decrypt(blob, RING) == plaintext
    assert decrypt(bytearray(blob), RING) == plaintext
    assert decrypt(memoryview(blob), RING) == plaintext


def test_each_object_gets_a_fresh_iv_and_data_key() -> None:
    one, two = encrypt(b"Plain text message", RING), encrypt(b"Plain text message", RING)
    assert one[6:38] != two[6:38]
    assert one[38:70] != two[38:70]
    assert one[70:] != two[70:]


def test_streaming_10_mib_in_odd_chunks() -> None:
    plaintext = os.urandom(10 * 1024 * 1024)
    iv, dek = os.urandom(32), os.urandom(32)
    sizes = [1, 7, 16, 17, 70, 4093, 65537, 1048573]
    enc = A1Encryptor._with_iv_and_dek(RING, iv, dek)
    streamed = _stream_encrypt(enc, _chunks(plaintext, sizes))
    whole = A1Encryptor._with_iv_and_dek(RING, iv, dek)
    assert streamed == whole.header + whole.update(plaintext) + whole.finalize()
    assert _stream_decrypt(streamed, RING, reversed(sizes)) == plaintext
    assert decrypt(streamed, RING) == plaintext


def test_encryptor_output_lengths() -> None:
    enc = A1Encryptor(RING)
    assert len(enc.header) == HEADER
    assert enc.key_id == KEY_A.id
    assert len(enc.update(b"x" * 33)) == 33
    assert len(enc.finalize()) == TAG


def test_streaming_decrypt_byte_by_byte() -> None:
    plaintext = os.urandom(100)
    assert _stream_decrypt(encrypt(plaintext, RING), RING, [1]) == plaintext


def test_streaming_decrypt_split_anywhere() -> None:
    plaintext = os.urandom(40)
    blob = encrypt(plaintext, RING)
    for cut in range(len(blob) + 1):
        dec = A1Decryptor(RING)
        out = dec.update(blob[:cut]) + dec.update(b"") + dec.update(blob[cut:])
        dec.finalize()
        assert out == plaintext, cut


def test_streaming_decrypt_holds_back_the_tag() -> None:
    blob = encrypt(b"z" * 50, RING)
    dec = A1Decryptor(RING)
    assert dec.update(blob[:HEADER]) == b""
    assert dec.key_id == KEY_A.id
    assert dec.update(blob[HEADER:]) == b"z" * 50  # everything but the 16 tag bytes
    dec.finalize()


def test_streaming_decrypt_cannot_be_reused() -> None:
    dec = A1Decryptor(RING)
    dec.update(encrypt(b"", RING))
    dec.finalize()
    with pytest.raises(ValueError, match="finalized"):
        dec.update(b"")
    with pytest.raises(ValueError, match="finalized"):
        dec.finalize()


# --- keys -----------------------------------------------------------------------------------------


def test_previous_keys_still_decrypt() -> None:
    old = encrypt(b"written under key 1", KeyRing(KEY_A))
    rotated = KeyRing(KEY_B, [KEY_A])
    new = encrypt(b"written under key 2", rotated)
    assert header_key_id(old) == 1
    assert header_key_id(new) == 2
    assert decrypt(old, rotated) == b"written under key 1"
    assert decrypt(new, rotated) == b"written under key 2"
    assert _stream_decrypt(old, rotated, [3]) == b"written under key 1"


def test_unknown_key_id_names_it() -> None:
    blob = encrypt(b"secret", KeyRing(MasterKey(258, bytes(32))))
    with pytest.raises(UsageError, match="master key id 258 is not configured") as info:
        decrypt(blob, RING)
    assert "known ids: 1" in str(info.value)
    with pytest.raises(UsageError, match="master key id 258 is not configured"):
        A1Decryptor(RING).update(blob[:6])  # fails as soon as the id is known


def test_wrong_master_key_with_the_right_id() -> None:
    blob = encrypt(b"secret", RING)
    impostor = KeyRing(MasterKey(KEY_A.id, bytes([0x12]) * 32))
    with pytest.raises(IntegrityError, match="failed authentication"):
        decrypt(blob, impostor)
    with pytest.raises(IntegrityError, match="failed authentication"):
        _stream_decrypt(blob, impostor, [10])


# --- tampering and truncation ---------------------------------------------------------------------


def _ring_with_every_neighbour_id(master: MasterKey) -> KeyRing:
    # Every id one bit away from master.id, all with the same key material: a flipped id bit then
    # finds a key that unwraps the same IV and data key, so only the authenticated header can
    # catch it. This proves the key id is covered by the tag.
    neighbours = [MasterKey(master.id ^ (1 << bit), master.key) for bit in range(32)]
    return KeyRing(master, neighbours)


def test_every_single_bit_flip_is_detected() -> None:
    ring = _ring_with_every_neighbour_id(KEY_A)
    blob = encrypt(b"Plain text message", ring)
    for pos in range(len(blob)):
        for bit in range(8):
            tampered = bytearray(blob)
            tampered[pos] ^= 1 << bit
            with pytest.raises(IntegrityError):
                decrypt(tampered, ring)  # raises: no plaintext is ever returned
            with pytest.raises(IntegrityError):
                _stream_decrypt(bytes(tampered), ring, [37])


def test_flipped_key_id_without_neighbours_is_an_unknown_key() -> None:
    blob = bytearray(encrypt(b"x", RING))
    blob[2] ^= 0x80
    with pytest.raises(UsageError, match="master key id 129 is not configured"):
        decrypt(blob, RING)


def test_truncation_at_every_length_is_detected() -> None:
    blob = encrypt(b"Plain text message", RING)
    for size in range(len(blob)):
        with pytest.raises(IntegrityError):
            decrypt(blob[:size], RING)
        dec = A1Decryptor(RING)
        with pytest.raises(IntegrityError):
            dec.update(blob[:size])
            dec.finalize()


@pytest.mark.parametrize("size", [0, 1, 6, 69, 70, 85])
def test_short_objects_say_truncated(size: int) -> None:
    blob = encrypt(b"", RING)
    with pytest.raises(IntegrityError, match="truncated"):
        decrypt(blob[:size], RING)


def test_extension_is_detected() -> None:
    blob = encrypt(b"Plain text message", RING)
    with pytest.raises(IntegrityError):
        decrypt(blob + b"TAMPER", RING)


def test_reordered_chunks_are_detected() -> None:
    blob = encrypt(bytes(range(64)), RING)
    swapped = (
        blob[:HEADER] + blob[HEADER + 16 : HEADER + 32] + blob[HEADER : HEADER + 16] + blob[HEADER + 32 :]
    )
    with pytest.raises(IntegrityError):
        decrypt(swapped, RING)


@pytest.mark.parametrize(
    ("prefix", "shown"),
    [(b"A2", "'A2'"), (b"B1", "'B1'"), (b"\x00\x00", "bytes 0000"), (b"\xff\x01", "bytes ff01")],
)
def test_wrong_version_names_what_was_found(prefix: bytes, shown: str) -> None:
    blob = prefix + encrypt(b"hello", RING)[2:]
    with pytest.raises(IntegrityError, match="not an A1-encrypted object") as info:
        decrypt(blob, RING)
    assert shown in str(info.value)
    with pytest.raises(IntegrityError, match="not an A1-encrypted object"):
        A1Decryptor(RING).update(blob[:2])
    with pytest.raises(IntegrityError, match="not an A1-encrypted object"):
        header_key_id(blob)


def test_plain_dicom_is_not_an_a1_object() -> None:
    dicom = bytes(128) + b"DICM" + bytes(200)
    with pytest.raises(IntegrityError, match="not an A1-encrypted object"):
        decrypt(dicom, RING)


def test_header_key_id_needs_six_bytes() -> None:
    with pytest.raises(IntegrityError, match="truncated"):
        header_key_id(b"A1\x01\x00\x00")
    with pytest.raises(IntegrityError, match="truncated"):
        header_key_id(b"")


def test_random_garbage_never_decrypts() -> None:
    rng = random.Random(1)
    for _ in range(200):
        junk = b"A1" + KEY_A.id.to_bytes(4, "little") + rng.randbytes(rng.randrange(0, 200))
        with pytest.raises(IntegrityError):
            decrypt(junk, RING)
