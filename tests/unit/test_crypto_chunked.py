"""Format DC2: the published vectors checked from first principles, round trips, ranged reads, tampering."""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dicom_cloud.crypto import a1
from dicom_cloud.crypto.chunked import (
    DEFAULT_CHUNK_SIZE,
    HEADER,
    MAGIC,
    MAX_CHUNK_SIZE,
    TAG,
    VERSION,
    DC2Decryptor,
    DC2Encryptor,
    HeaderInfo,
    decrypt,
    decrypt_range,
    encrypt,
    encrypted_size,
    plaintext_range_to_ciphertext,
    plaintext_size,
    read_header,
    sniff,
)
from dicom_cloud.crypto.keys import KeyRing, MasterKey
from dicom_cloud.errors import IntegrityError, UsageError

VECTORS_DIR = Path(__file__).parents[1] / "vectors"
VECTORS_FILE = VECTORS_DIR / "chunked.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text())["vectors"]

KEY_A = MasterKey(1, bytes([0x11]) * 32)
KEY_B = MasterKey(2, bytes([0x22]) * 32)
RING = KeyRing(KEY_A)
SMALL = 64  # chunk size for the exhaustive tests: a few chunks in a few hundred bytes

# The specification's constants, written out here rather than imported, so the tests check the spec.
SPEC_MAGIC = b"DC2\n"
SPEC_KDF_LABEL = b"dicom-cloud DC2 keys\x00"


def _vector_id(v: dict[str, Any]) -> str:
    return str(v["name"])


def _hkdf_expand_sha256(prk: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-Expand, from HMAC alone."""
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _chunks(data: bytes, sizes: Iterable[int]) -> Iterator[bytes]:
    pos, i, sizes = 0, 0, list(sizes)
    while pos < len(data):
        size = sizes[i % len(sizes)]
        yield data[pos : pos + size]
        pos += size
        i += 1


def _stream_encrypt(enc: DC2Encryptor, pieces: Iterable[bytes]) -> bytes:
    return b"".join([enc.header, *(enc.update(p) for p in pieces), enc.finalize()])


def _stream_decrypt(blob: bytes, ring: KeyRing, sizes: Iterable[int]) -> bytes:
    dec = DC2Decryptor(ring)
    out = b"".join(dec.update(c) for c in _chunks(blob, sizes))
    return out + dec.finalize()


def _stream_until_error(blob: bytes, ring: KeyRing, sizes: Iterable[int]) -> tuple[bytes, Exception | None]:
    """What a streaming reader released before it failed, and the error (None if it did not)."""
    dec = DC2Decryptor(ring)
    released = bytearray()
    try:
        for piece in _chunks(blob, sizes):
            released += dec.update(piece)
        released += dec.finalize()
    except (IntegrityError, UsageError) as e:
        return bytes(released), e
    return bytes(released), None


def _salted(chunk_size: int, salt: bytes = bytes(range(32)), ring: KeyRing = RING) -> DC2Encryptor:
    return DC2Encryptor._with_salt(ring, salt, chunk_size)


def _object(plaintext: bytes, chunk_size: int = SMALL, ring: KeyRing = RING) -> bytes:
    return encrypt(plaintext, ring, chunk_size)


def _ring_with_every_neighbour_id(master: MasterKey) -> KeyRing:
    # A flipped key-id bit then names a configured key (the wrong one), so decryption reaches the
    # chunk tags, which must catch it: this proves the key id is authenticated.
    neighbours = [MasterKey(master.id ^ (1 << bit), master.key) for bit in range(32)]
    return KeyRing(master, neighbours)


def _ranged(blob: bytes, start: int, end: int, ring: KeyRing = RING) -> bytes:
    """A ranged read as a remote client does it: the header, then only the chunks it needs."""
    header = blob[:HEADER]
    info = read_header(header)
    cipher_start, cipher_end, first = plaintext_range_to_ciphertext(info, start, end)
    # Slicing past the end stops at the end, as an HTTP range request does.
    return decrypt_range(header, blob[cipher_start:cipher_end], first, start, end, ring)


# --- the format's constants and vectors ------------------------------------------------------------


def test_constants() -> None:
    assert (MAGIC, VERSION, HEADER, TAG, DEFAULT_CHUNK_SIZE) == (SPEC_MAGIC, 1, 45, 16, 65536)


def test_vectors_cover_the_required_cases() -> None:
    sizes = {(len(bytes.fromhex(v["plaintext"])), v["chunk_size"]) for v in VECTORS}
    assert (0, 64) in sizes  # empty: one empty last chunk
    assert any(n > 0 and n % c == 0 for n, c in sizes)  # exact multiple: ends with an empty chunk
    assert any(n > c for n, c in sizes)  # several chunks
    assert any(v["master_key_id"] == 2**32 - 1 for v in VECTORS)


@pytest.mark.parametrize("v", VECTORS, ids=_vector_id)
def test_vector_from_first_principles(v: dict[str, Any]) -> None:
    """Rebuild each vector from the specification with HMAC and raw AES-GCM only."""
    master = bytes.fromhex(v["master_key"])
    salt = bytes.fromhex(v["salt"])
    chunk_size = v["chunk_size"]
    plaintext = bytes.fromhex(v["plaintext"])
    assert base64.b64decode(v["master_key_file"]) == master

    header = (
        SPEC_MAGIC + bytes([1]) + v["master_key_id"].to_bytes(4, "little") + chunk_size.to_bytes(4, "little")
    ) + salt
    assert len(header) == 45
    assert v["header"] == header.hex()

    okm = _hkdf_expand_sha256(master, SPEC_KDF_LABEL + header, 40)
    dek, prefix = okm[:32], okm[32:]
    assert (v["dek"], v["nonce_prefix"]) == (dek.hex(), prefix.hex())

    count = len(plaintext) // chunk_size + 1
    assert len(v["chunks"]) == count
    aead = AESGCM(dek)
    body = b""
    for i, chunk in enumerate(v["chunks"]):
        last = i == count - 1
        piece = plaintext[i * chunk_size : (i + 1) * chunk_size]
        assert (chunk["index"], chunk["last"], chunk["plaintext"]) == (i, last, piece.hex())
        assert len(piece) == (len(plaintext) % chunk_size if last else chunk_size)
        nonce = prefix + i.to_bytes(4, "little")
        aad = header + i.to_bytes(4, "little") + (b"\x01" if last else b"\x00")
        sealed = aead.encrypt(nonce, piece, aad)
        assert (chunk["ciphertext"], chunk["tag"]) == (sealed[:-16].hex(), sealed[-16:].hex())
        body += sealed
    assert v["object"] == (header + body).hex()
    assert len(header + body) == 45 + len(plaintext) + 16 * count


@pytest.mark.parametrize("v", VECTORS, ids=_vector_id)
def test_vector_reproduced_and_read_by_the_module(v: dict[str, Any]) -> None:
    master = MasterKey(v["master_key_id"], bytes.fromhex(v["master_key"]))
    ring = KeyRing(master)
    plaintext = bytes.fromhex(v["plaintext"])
    obj = bytes.fromhex(v["object"])
    enc = DC2Encryptor._with_salt(ring, bytes.fromhex(v["salt"]), v["chunk_size"])
    assert _stream_encrypt(enc, [plaintext]) == obj
    assert decrypt(obj, ring) == plaintext
    assert _stream_decrypt(obj, ring, [1]) == plaintext
    assert len(obj) == encrypted_size(len(plaintext), v["chunk_size"])


def test_vector_file_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location(
        "make_chunked_vectors", VECTORS_DIR / "make_chunked_vectors.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build() == json.loads(VECTORS_FILE.read_text())


def test_integers_are_little_endian() -> None:
    info = read_header(_salted(0x01020304 & 0xFFFFFF).header)
    blob = _salted(65536, ring=KeyRing(MasterKey(258, KEY_A.key))).header
    assert blob[5:9] == bytes([2, 1, 0, 0]) and blob[9:13] == bytes([0, 0, 1, 0])
    assert info.chunk_size == 0x020304


# --- round trips and sizes -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 127, 128, 129, 200, 1000])
def test_round_trip_small_chunks(size: int) -> None:
    plaintext = os.urandom(size)
    blob = _object(plaintext)
    assert len(blob) == encrypted_size(size, SMALL) == HEADER + size + TAG * (size // SMALL + 1)
    assert decrypt(blob, RING) == plaintext
    assert _stream_decrypt(blob, RING, [7, 100]) == plaintext


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 65536, 3 * 65536 + 11])
def test_round_trip_default_chunks(size: int) -> None:
    plaintext = os.urandom(size)
    blob = encrypt(plaintext, RING)
    assert read_header(blob).chunk_size == DEFAULT_CHUNK_SIZE
    assert len(blob) == encrypted_size(size)
    assert decrypt(blob, RING) == plaintext


def test_empty_plaintext_is_one_authenticated_empty_chunk() -> None:
    blob = _object(b"")
    assert len(blob) == HEADER + TAG
    assert decrypt(blob, RING) == b""
    with pytest.raises(IntegrityError, match="last chunk"):
        decrypt(blob[:HEADER], RING)  # the header alone is not an empty object


def test_exact_multiple_ends_with_an_empty_last_chunk() -> None:
    blob = _object(bytes(2 * SMALL))
    assert len(blob) == HEADER + 2 * (SMALL + TAG) + TAG


def test_sizes_invert() -> None:
    valid = set()
    for chunk_size in (1, 7, SMALL):
        for size in range(300):
            n = encrypted_size(size, chunk_size)
            assert plaintext_size(n, chunk_size) == size
            valid.add((n, chunk_size))
        for n in range(HEADER + 300):
            if (n, chunk_size) not in valid and n < encrypted_size(299, chunk_size):
                with pytest.raises(IntegrityError):
                    plaintext_size(n, chunk_size)


def test_each_object_gets_a_fresh_salt() -> None:
    one, two = _object(b"same"), _object(b"same")
    assert one[13:HEADER] != two[13:HEADER] and one[HEADER:] != two[HEADER:]


def test_streaming_5_mib_in_odd_pieces() -> None:
    plaintext = random.Random(5).randbytes(5 * 1024 * 1024 + 3)
    salt = os.urandom(32)
    streamed = _stream_encrypt(
        _salted(DEFAULT_CHUNK_SIZE, salt), _chunks(plaintext, [1, 7919, 65537, 100003, 3])
    )
    whole = _stream_encrypt(_salted(DEFAULT_CHUNK_SIZE, salt), [plaintext])
    assert streamed == whole
    assert len(streamed) == encrypted_size(len(plaintext))
    assert _stream_decrypt(streamed, RING, [65551, 13, 99991, 1]) == plaintext
    assert decrypt(streamed, RING) == plaintext


def test_encryptor_emits_whole_chunks_as_they_fill() -> None:
    enc = _salted(SMALL)
    stride = SMALL + TAG
    assert enc.update(b"a" * (SMALL - 1)) == b""
    assert len(enc.update(b"a")) == stride  # a full chunk is released at once: it is never the last
    assert len(enc.update(b"a" * (3 * SMALL + 5))) == 3 * stride
    assert len(enc.update(b"")) == 0
    assert len(enc.finalize()) == 5 + TAG


def test_decryptor_releases_each_chunk_once_verified() -> None:
    plaintext = os.urandom(3 * SMALL + 5)
    blob = _object(plaintext)
    dec = DC2Decryptor(RING)
    released = b""
    for fed in range(1, len(blob) + 1):
        out = dec.update(blob[fed - 1 : fed])
        if out:
            # Output appears exactly when a whole chunk has arrived, and is the next chunk's plaintext.
            assert (fed - HEADER) % (SMALL + TAG) == 0
            assert out == plaintext[len(released) : len(released) + SMALL]
        released += out
        if fed == 9:
            assert dec.key_id == KEY_A.id
    assert released == plaintext[: 3 * SMALL]
    assert dec.header_info == read_header(blob)
    assert dec.finalize() == plaintext[3 * SMALL :]


def test_streaming_decrypt_split_anywhere() -> None:
    plaintext = os.urandom(2 * SMALL + 9)
    blob = _object(plaintext)
    for cut in range(len(blob) + 1):
        dec = DC2Decryptor(RING)
        assert dec.update(blob[:cut]) + dec.update(blob[cut:]) + dec.finalize() == plaintext


def test_encryptor_and_decryptor_cannot_be_reused() -> None:
    enc = _salted(SMALL)
    enc.finalize()
    with pytest.raises(ValueError, match="finalized"):
        enc.update(b"x")
    with pytest.raises(ValueError, match="finalized"):
        enc.finalize()
    dec = DC2Decryptor(RING)
    dec.update(_object(b"x"))
    dec.finalize()
    with pytest.raises(ValueError, match="finalized"):
        dec.update(b"")
    with pytest.raises(ValueError, match="finalized"):
        dec.finalize()


@pytest.mark.parametrize("chunk_size", [0, -1, MAX_CHUNK_SIZE + 1, True, 1.5])
def test_bad_chunk_sizes_are_refused(chunk_size: Any) -> None:
    with pytest.raises(UsageError, match="chunk size"):
        DC2Encryptor(RING, chunk_size)


# --- keys ------------------------------------------------------------------------------------------


def test_previous_keys_still_decrypt() -> None:
    old = _object(b"written under key 1")
    rotated = KeyRing(KEY_B, [KEY_A])
    assert decrypt(old, rotated) == b"written under key 1"
    assert _stream_decrypt(old, rotated, [5]) == b"written under key 1"
    assert _ranged(old, 3, 10, rotated) == b"tten un"
    assert read_header(_object(b"new", ring=rotated)).key_id == KEY_B.id


def test_unknown_key_id_names_it() -> None:
    blob = _object(b"secret" * 30)
    ring = KeyRing(KEY_B)
    with pytest.raises(UsageError, match=r"master key id 1 is not configured \(known ids: 2\)"):
        decrypt(blob, ring)
    dec = DC2Decryptor(ring)
    assert dec.update(blob[:8]) == b""
    with pytest.raises(UsageError, match="master key id 1 "):
        dec.update(blob[8:9])  # looked up as soon as the id is complete
    with pytest.raises(UsageError, match="master key id 1 "):
        _ranged(blob, 0, 10, ring)


def test_wrong_master_key_with_the_right_id() -> None:
    blob = _object(b"secret")
    impostor = KeyRing(MasterKey(KEY_A.id, KEY_B.key))
    with pytest.raises(IntegrityError, match="chunk 0"):
        decrypt(blob, impostor)
    with pytest.raises(IntegrityError):
        _stream_decrypt(blob, impostor, [1000])


# --- ranged reads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 15, 16, 17, 48, 53])
def test_every_range_of_small_objects(size: int) -> None:
    plaintext = os.urandom(size)
    blob = _object(plaintext, 16)
    info = read_header(blob)
    for start in range(size):
        for end in range(start + 1, size + 20):
            assert _ranged(blob, start, end) == plaintext[start:end], (start, end)
            cipher_start, cipher_end, first = plaintext_range_to_ciphertext(
                info, start, end, object_size=len(blob)
            )
            assert cipher_end <= len(blob)
            assert (
                decrypt_range(blob, blob[cipher_start:cipher_end], first, start, end, RING)
                == (plaintext[start:end])
            )


def test_ranges_at_chunk_boundaries() -> None:
    size = 4 * SMALL + 10
    plaintext = os.urandom(size)
    blob = _object(plaintext)
    points = sorted(
        {p for k in range(6) for p in (k * SMALL - 1, k * SMALL, k * SMALL + 1) if 0 <= p <= size}
    )
    points += [size - 1, size, size + 1]
    for start in points:
        for end in points:
            if start < end and start < size:
                assert _ranged(blob, start, end) == plaintext[start:end], (start, end)
    assert _ranged(blob, 0, 1) == plaintext[:1]  # first byte
    assert _ranged(blob, size - 1, size) == plaintext[-1:]  # last byte
    assert _ranged(blob, SMALL - 1, 3 * SMALL + 1) == plaintext[SMALL - 1 : 3 * SMALL + 1]  # spanning chunks
    assert _ranged(blob, 0, size) == plaintext  # whole object


def test_range_maps_to_whole_chunks() -> None:
    info = read_header(_object(b""))
    stride = SMALL + TAG
    assert plaintext_range_to_ciphertext(info, 0, 1) == (HEADER, HEADER + stride, 0)
    assert plaintext_range_to_ciphertext(info, SMALL, 2 * SMALL) == (HEADER + stride, HEADER + 2 * stride, 1)
    assert plaintext_range_to_ciphertext(info, SMALL - 1, SMALL + 1) == (HEADER, HEADER + 2 * stride, 0)
    assert plaintext_range_to_ciphertext(info, 0, 10, object_size=HEADER + TAG) == (HEADER, HEADER + TAG, 0)
    assert info == HeaderInfo(1, KEY_A.id, SMALL, info.salt)
    for start, end in [(0, 0), (5, 4), (-1, 3)]:
        with pytest.raises(ValueError, match="range"):
            plaintext_range_to_ciphertext(info, start, end)


def test_ranged_read_of_a_large_object_fetches_only_its_chunks() -> None:
    plaintext = os.urandom(10 * DEFAULT_CHUNK_SIZE + 123)
    blob = encrypt(plaintext, RING)
    start, end = 3 * DEFAULT_CHUNK_SIZE + 100, 4 * DEFAULT_CHUNK_SIZE + 5
    cipher_start, cipher_end, first = plaintext_range_to_ciphertext(read_header(blob), start, end)
    assert cipher_end - cipher_start == 2 * (DEFAULT_CHUNK_SIZE + TAG)
    assert (
        decrypt_range(blob[:HEADER], blob[cipher_start:cipher_end], first, start, end, RING)
        == (plaintext[start:end])
    )


def test_truncated_span_is_detected_at_every_length() -> None:
    size = 3 * SMALL + 10
    plaintext = os.urandom(size)
    blob = _object(plaintext)
    info = read_header(blob)
    for start, end in [
        (0, 1),
        (SMALL, 2 * SMALL),
        (10, size),
        (2 * SMALL + 3, size + 50),
        (SMALL + 1, 3 * SMALL),
    ]:
        cipher_start, cipher_end, first = plaintext_range_to_ciphertext(info, start, end)
        span = blob[cipher_start:cipher_end]
        assert decrypt_range(blob, span, first, start, end, RING) == plaintext[start:end]
        for cut in range(len(span)):
            with pytest.raises(IntegrityError):
                decrypt_range(blob, span[:cut], first, start, end, RING)


def test_span_truncated_at_a_chunk_boundary_says_so() -> None:
    blob = _object(bytes(3 * SMALL + 10))
    span = blob[HEADER : HEADER + SMALL + TAG]  # chunk 0 alone, for a range that reaches chunk 1
    with pytest.raises(IntegrityError, match="truncated"):
        decrypt_range(blob, span, 0, 0, SMALL + 1, RING)


def test_tampered_ranges_are_detected() -> None:
    ring = _ring_with_every_neighbour_id(KEY_A)
    plaintext = os.urandom(2 * SMALL + 10)
    blob = encrypt(plaintext, ring, SMALL)
    start, end = SMALL - 2, SMALL + 3  # chunks 0 and 1
    cipher_start, cipher_end, first = plaintext_range_to_ciphertext(read_header(blob), start, end)
    for pos in [*range(HEADER), *range(cipher_start, cipher_end)]:
        for bit in range(8):
            tampered = bytearray(blob)
            tampered[pos] ^= 1 << bit
            with pytest.raises(IntegrityError):
                decrypt_range(tampered[:HEADER], tampered[cipher_start:cipher_end], first, start, end, ring)


def test_ranged_read_rejects_chunks_from_elsewhere() -> None:
    plaintext = os.urandom(4 * SMALL)
    blob, other = _object(plaintext), _object(plaintext)
    stride = SMALL + TAG

    def chunk(obj: bytes, i: int) -> bytes:
        return obj[HEADER + i * stride : HEADER + (i + 1) * stride]

    with pytest.raises(IntegrityError, match="chunk 1"):
        decrypt_range(blob, chunk(blob, 2), 1, SMALL, SMALL + 1, RING)  # chunk 2 served as chunk 1
    with pytest.raises(IntegrityError, match="chunk 2"):
        decrypt_range(blob, chunk(blob, 1) + chunk(blob, 1), 1, SMALL, 3 * SMALL, RING)  # repeated
    with pytest.raises(IntegrityError, match="chunk 1"):
        decrypt_range(other, chunk(blob, 1), 1, SMALL, SMALL + 1, RING)  # another object's header
    with pytest.raises(IntegrityError, match="chunk 1"):
        # A full chunk cut to look like the last one: the last-chunk flag does not match.
        decrypt_range(blob, chunk(blob, 1)[:-1], 1, SMALL, SMALL + 1, RING)
    with pytest.raises(ValueError, match="first_chunk_index"):
        decrypt_range(blob, chunk(blob, 1), 0, SMALL, SMALL + 1, RING)


def test_range_past_the_end_needs_the_last_chunk() -> None:
    plaintext = os.urandom(SMALL + 10)
    blob = _object(plaintext)
    # The last chunk is in the span: its authentication proves the object ends before byte 80.
    assert decrypt_range(blob, blob[HEADER + SMALL + TAG :], 1, SMALL + 16, SMALL + 40, RING) == b""
    # Nothing at all: it cannot be told from a server withholding the rest.
    with pytest.raises(IntegrityError, match="truncated"):
        decrypt_range(blob, b"", 2, 2 * SMALL, 2 * SMALL + 1, RING)


# --- tampering and truncation ----------------------------------------------------------------------


def test_every_single_bit_flip_is_detected() -> None:
    ring = _ring_with_every_neighbour_id(KEY_A)
    plaintext = os.urandom(3 * SMALL + 10)
    blob = encrypt(plaintext, ring, SMALL)
    for pos in range(len(blob)):
        for bit in range(8):
            tampered = bytearray(blob)
            tampered[pos] ^= 1 << bit
            with pytest.raises(IntegrityError):
                decrypt(tampered, ring)  # raises: no plaintext is ever returned
            released, error = _stream_until_error(bytes(tampered), ring, [37])
            assert isinstance(error, IntegrityError), (pos, bit)
            # Whatever was released before the damaged chunk is genuine plaintext, in place.
            assert plaintext.startswith(released)
            assert len(released) <= max(0, (pos - HEADER) // (SMALL + TAG)) * SMALL


def test_flipped_key_id_without_neighbours_is_an_unknown_key() -> None:
    blob = bytearray(_object(b"x"))
    blob[5] ^= 0x80
    with pytest.raises(UsageError, match="master key id 129 is not configured"):
        decrypt(blob, RING)


@pytest.mark.parametrize("size", [3 * SMALL + 10, 3 * SMALL])
def test_truncation_at_every_length_is_detected(size: int) -> None:
    plaintext = os.urandom(size)
    blob = _object(plaintext)
    boundaries = {HEADER + k * (SMALL + TAG) for k in range(5)}
    for cut in range(len(blob)):
        with pytest.raises(IntegrityError):
            decrypt(blob[:cut], RING)
        released, error = _stream_until_error(blob[:cut], RING, [29])
        assert isinstance(error, IntegrityError), cut
        assert plaintext.startswith(released)
        if cut in boundaries:
            # Every chunk so far verified: only the missing last chunk gives it away.
            assert "without its last chunk" in str(error)
            assert len(released) == (cut - HEADER) // (SMALL + TAG) * SMALL


@pytest.mark.parametrize("size", [0, 1, 4, 5, 9, 13, 44])
def test_short_objects_say_truncated(size: int) -> None:
    blob = _object(b"")
    with pytest.raises(IntegrityError, match="truncated"):
        decrypt(blob[:size], RING)


def test_extension_is_detected() -> None:
    blob = _object(bytes(2 * SMALL + 5))
    stride = SMALL + TAG
    for extra in (b"\x00", b"TAMPER", blob[HEADER : HEADER + stride], blob[-TAG:]):
        with pytest.raises(IntegrityError):
            decrypt(blob + extra, RING)
        with pytest.raises(IntegrityError):
            _stream_decrypt(blob + extra, RING, [50])


def test_reordered_dropped_and_repeated_chunks_are_detected() -> None:
    stride = SMALL + TAG
    blob = _object(os.urandom(3 * SMALL + 10))
    header, body = blob[:HEADER], blob[HEADER:]
    c = [body[i * stride : (i + 1) * stride] for i in range(4)]
    for chunks in {
        "swap 0 and 1": [c[1], c[0], c[2], c[3]],
        "swap 1 and 2": [c[0], c[2], c[1], c[3]],
        "drop 1": [c[0], c[2], c[3]],
        "repeat 0": [c[0], c[0], c[1], c[2], c[3]],
        "last moved first": [c[3], c[0], c[1], c[2]],
    }.values():
        with pytest.raises(IntegrityError):
            decrypt(header + b"".join(chunks), RING)
        with pytest.raises(IntegrityError):
            _stream_decrypt(header + b"".join(chunks), RING, [stride])


def test_header_of_another_object_is_detected() -> None:
    plaintext = os.urandom(2 * SMALL)
    one, two = _object(plaintext), _object(plaintext)
    with pytest.raises(IntegrityError, match="chunk 0"):
        decrypt(two[:HEADER] + one[HEADER:], RING)


def test_random_garbage_never_decrypts() -> None:
    rng = random.Random(2)
    header = _object(b"")[:HEADER]
    for size in (0, 16, 17, 80, 200):
        with pytest.raises(IntegrityError):
            decrypt(header + rng.randbytes(size), RING)


# --- telling formats apart, reading headers ---------------------------------------------------------


def test_sniff_tells_a1_from_dc2() -> None:
    assert sniff(_object(b"x")) == "DC2"
    assert sniff(a1.encrypt(b"x", RING)) == "A1"
    assert sniff(SPEC_MAGIC) == "DC2"
    assert sniff(b"A1") == "A1"
    assert sniff(bytes(128) + b"DICM") is None  # a plain DICOM file
    for prefix in (b"", b"D", b"DC2", b"DC3\n", b"A", b"a1"):
        assert sniff(prefix) is None
    assert sniff(memoryview(_object(b""))[:4]) == "DC2"


def test_read_header_fields() -> None:
    blob = _salted(1000, bytes(range(32))).header
    info = read_header(blob + b"more bytes")
    assert info == HeaderInfo(
        version=1, key_id=KEY_A.id, chunk_size=1000, salt=bytes(range(32)), header_length=45
    )
    assert info.chunk_stride == 1016


def test_unknown_version_is_refused() -> None:
    blob = bytearray(_object(b"x"))
    blob[4] = 2
    with pytest.raises(IntegrityError, match="version 2; this reader knows only version 1"):
        decrypt(blob, RING)
    with pytest.raises(IntegrityError, match="version 2"):
        read_header(blob)
    with pytest.raises(IntegrityError, match="version 2"):
        DC2Decryptor(RING).update(blob[:5])  # refused as soon as the version byte arrives
    assert sniff(blob) == "DC2"


@pytest.mark.parametrize("chunk_size", [0, MAX_CHUNK_SIZE + 1, 2**32 - 1])
def test_impossible_chunk_size_in_a_header(chunk_size: int) -> None:
    blob = bytearray(_object(b"x"))
    blob[9:13] = chunk_size.to_bytes(4, "little")
    with pytest.raises(IntegrityError, match="chunk size"):
        read_header(blob)
    with pytest.raises(IntegrityError, match="chunk size"):
        DC2Decryptor(RING).update(blob[:13])


def test_not_dc2_names_what_was_found() -> None:
    with pytest.raises(IntegrityError, match="not a DC2-encrypted object") as info:
        decrypt(a1.encrypt(b"x", RING), RING)
    assert info.value.hint is not None and "A1 object" in info.value.hint
    with pytest.raises(IntegrityError, match="bytes 00000000"):
        read_header(bytes(200))
    with pytest.raises(IntegrityError, match="not a DC2"):
        DC2Decryptor(RING).update(b"X")
