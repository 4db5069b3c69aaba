"""Client-side encryption rules (crypto/envelope.py) and the transfer engine applying them, on memory:// and
local stores: what is encrypted or decrypted, with which key, and what happens without one.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import struct
from pathlib import Path

import pytest

from dicom_cloud import api
from dicom_cloud.backends import open_store
from dicom_cloud.checksum import crc32c_hex
from dicom_cloud.crypto import a1
from dicom_cloud.crypto.envelope import (
    FORMAT_METADATA_KEY,
    KEY_ID_METADATA_KEY,
    ORTHANC_SUFFIX,
    ClientEncryption,
)
from dicom_cloud.crypto.keys import KeyRing, MasterKey
from dicom_cloud.errors import IntegrityError, KeyMissingError, UsageError
from dicom_cloud.localio import PARTIAL_SUFFIX
from dicom_cloud.store import CHECKSUM_METADATA_KEY, PutOptions
from dicom_cloud.transfer import MiB, TransferOptions

HAS_DC2 = importlib.util.find_spec("dicom_cloud.crypto.chunked") is not None
NEEDS_DC2 = pytest.mark.skipif(
    not HAS_DC2, reason="format DC2 (src/dicom_cloud/crypto/chunked.py) not written yet"
)
FORMATS = ["A1", pytest.param("DC2", marks=NEEDS_DC2)]

K6 = MasterKey(6, bytes(range(32)))
K7 = MasterKey(7, os.urandom(32))
K8 = MasterKey(8, os.urandom(32))
SECRET = b"Patient^Secret^Name"
TREE = {
    "small.dcm": b"\0" * 128 + b"DICM" + SECRET + os.urandom(1000),
    "sub/empty.dcm": b"",
    "sub/big.dcm": SECRET + os.urandom(6 * MiB + 123) + SECRET,  # above the 5 MiB threshold
}
BIG = "sub/big.dcm"


def ring(current: MasterKey, *previous: MasterKey) -> KeyRing:
    return KeyRing(current, previous)


def options(crypt: ClientEncryption | None = None, **kwargs: object) -> TransferOptions:
    return TransferOptions(multipart_threshold=5 * MiB, part_size=5 * MiB, encryption=crypt, **kwargs)  # type: ignore[arg-type]


def encrypted_size(size: int, fmt: str) -> int:
    if fmt == "A1":
        return size + a1.OVERHEAD
    from dicom_cloud.crypto.chunked import encrypted_size as dc2_size

    return dc2_size(size)


def header_id(blob: bytes, fmt: str) -> int:
    if fmt == "A1":
        assert blob[:2] == b"A1"
        return int(struct.unpack_from("<I", blob, 2)[0])
    assert blob[:5] == b"DC2\n\x01"
    return int(struct.unpack_from("<I", blob, 5)[0])


def mem_objects(bucket: str) -> dict[str, tuple[bytes, dict[str, str]]]:
    store = open_store(f"memory://{bucket}")

    async def collect() -> dict[str, tuple[bytes, dict[str, str]]]:
        out = {}
        async for info in store.list(""):
            full, data = await store.read(info.key)
            out[info.key] = (bytes(data), dict(full.metadata))
        return out

    return asyncio.run(collect())


def mem_put(bucket: str, key: str, data: bytes, metadata: dict[str, str]) -> None:
    asyncio.run(open_store(f"memory://{bucket}").put(key, data, PutOptions(metadata=metadata)))


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for rel, data in TREE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def assert_stored_encrypted(
    objects: dict[str, tuple[bytes, dict[str, str]]], prefix: str, key_id: int, fmt: str
) -> None:
    for rel, plain in TREE.items():
        blob, metadata = objects[prefix + rel]
        assert header_id(blob, fmt) == key_id, rel
        assert len(blob) == encrypted_size(len(plain), fmt), rel
        assert SECRET not in blob and b"DICM" not in blob[:200], rel
        assert metadata[FORMAT_METADATA_KEY] == fmt, rel
        assert metadata[KEY_ID_METADATA_KEY] == str(key_id), rel
        # No key material, IV or plaintext checksum in the metadata.
        assert crc32c_hex(plain) not in metadata.values() or not plain, rel
        for value in metadata.values():
            assert K7.key.hex() not in value and K8.key.hex() not in value


# ---------------------------------------------------------------------------------------------------------
# The rules


def test_no_encryption_by_default() -> None:
    crypt = ClientEncryption()
    assert crypt.ring is None and not crypt.writes_encrypted
    assert not ClientEncryption(ring(K7)).writes_encrypted


@pytest.mark.parametrize("fmt", FORMATS)
def test_writing_encrypted_needs_a_ring(fmt: str) -> None:
    with pytest.raises(KeyMissingError) as caught:
        ClientEncryption(None, fmt)  # type: ignore[arg-type]
    assert caught.value.exit_code == 11
    assert "--master-key" in (caught.value.hint or "")


@pytest.mark.parametrize("fmt", FORMATS)
def test_marker_names_format_and_current_key_only(fmt: str) -> None:
    crypt = ClientEncryption(ring(K8, K7), fmt)  # type: ignore[arg-type]
    assert crypt.writes_encrypted
    assert crypt.marker() == {FORMAT_METADATA_KEY: fmt, KEY_ID_METADATA_KEY: "8"}
    # Identifiers (Azure metadata names must be).
    assert all(name.isidentifier() for name in crypt.marker())


@pytest.mark.parametrize(
    ("key", "metadata", "expected"),
    [
        ("a/b.dcm", {}, None),
        ("a/b.dcm", {"source": "PACS", CHECKSUM_METADATA_KEY: "00000000"}, None),
        ("a/b.dcm", {FORMAT_METADATA_KEY: "A1", KEY_ID_METADATA_KEY: "7"}, "A1"),
        ("a/b.dcm", {FORMAT_METADATA_KEY: "DC2", KEY_ID_METADATA_KEY: "7"}, "DC2"),
        ("a/b.dcm", {FORMAT_METADATA_KEY: "A1"}, "A1"),
        ("a/b.dcm.enc", {}, "A1"),  # Orthanc's objects: no metadata of ours
        ("b.enc", {"other": "x"}, "A1"),
        ("a/b.dcm.enc", {FORMAT_METADATA_KEY: "DC2"}, "DC2"),  # the metadata wins over the name
        ("a/b.enc.dcm", {}, None),
        ("a/enc", {}, None),
        ("a/b.dcm.enc/", {}, None),
    ],
)
def test_detect(key: str, metadata: dict[str, str], expected: str | None) -> None:
    for crypt in (ClientEncryption(), ClientEncryption(ring(K7)), ClientEncryption(ring(K7), "A1")):
        assert crypt.detect(key, metadata) == expected
    assert ORTHANC_SUFFIX == ".enc"


def test_require_key_without_any_ring_names_the_id() -> None:
    with pytest.raises(KeyMissingError) as caught:
        ClientEncryption().require_key(
            "s3://b/x.dcm", "A1", {FORMAT_METADATA_KEY: "A1", KEY_ID_METADATA_KEY: "7"}
        )
    error = caught.value
    assert error.key_id == 7 and error.exit_code == 11
    assert "s3://b/x.dcm" in str(error) and "key id 7" in str(error) and "A1" in str(error)
    assert "--master-key 7:PATH" in (error.hint or "")


def test_require_key_without_ring_or_recorded_id() -> None:
    with pytest.raises(KeyMissingError) as caught:
        ClientEncryption().require_key("s3://b/x.dcm.enc", "A1", {})
    assert caught.value.key_id is None
    assert "s3://b/x.dcm.enc" in str(caught.value)
    assert "--master-key ID:PATH" in (caught.value.hint or "")


def test_require_key_with_a_ring_lacking_the_id() -> None:
    crypt = ClientEncryption(ring(K8, K6))
    with pytest.raises(KeyMissingError) as caught:
        crypt.require_key("s3://b/x.dcm", "DC2", {KEY_ID_METADATA_KEY: "7"})
    assert caught.value.key_id == 7
    assert "7" in str(caught.value) and "8, 6" in str(caught.value)
    assert "--previous-key 7:PATH" in (caught.value.hint or "")


def test_require_key_with_the_id() -> None:
    keys = ring(K8, K7)
    crypt = ClientEncryption(keys)
    assert crypt.require_key("u", "A1", {KEY_ID_METADATA_KEY: "7"}) is keys
    assert crypt.require_key("u", "A1", {KEY_ID_METADATA_KEY: "8"}) is keys
    # No usable recorded id: the header decides later.
    assert crypt.require_key("u", "A1", {}) is keys
    assert crypt.require_key("u", "A1", {KEY_ID_METADATA_KEY: "seven"}) is keys
    assert crypt.require_key("u", "A1", {KEY_ID_METADATA_KEY: "-7"}) is keys


def test_require_key_with_a_hostile_recorded_id() -> None:
    crypt = ClientEncryption(ring(K7))
    crypt.require_key("u", "A1", {KEY_ID_METADATA_KEY: "²"})


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 65535, 65536, 65537, 200_000])
def test_encrypt_then_decrypt(fmt: str, size: int) -> None:
    plain = os.urandom(size)
    writer = ClientEncryption(ring(K7), fmt)  # type: ignore[arg-type]
    blob = writer.encrypt(plain)
    assert len(blob) == writer.encrypted_size(size) == encrypted_size(size, fmt)
    assert header_id(blob, fmt) == 7
    metadata = writer.marker()
    # A reader holding the key as a previous one.
    reader = ClientEncryption(ring(K8, K7))
    assert reader.detect("x", metadata) == fmt
    assert reader.decrypt("u", fmt, metadata, blob) == plain  # type: ignore[arg-type]
    # Streaming, fed in odd pieces: updates then finalize give the plaintext.
    decryptor = reader.decryptor("u", fmt, metadata)  # type: ignore[arg-type]
    out = b"".join(decryptor.update(blob[i : i + 7777]) for i in range(0, len(blob), 7777))
    rest = decryptor.finalize()
    assert isinstance(rest, bytes)
    assert out + rest == plain
    # Streaming encryption gives an object the whole-object decryption reads.
    encryptor = writer.encryptor()
    streamed = encryptor.header + b"".join(
        encryptor.update(plain[i : i + 5000]) for i in range(0, size, 5000)
    )
    streamed += encryptor.finalize()
    assert len(streamed) == len(blob)
    assert streamed != blob  # a fresh IV and data key (A1) or salt (DC2) for every object
    assert reader.decrypt("u", fmt, metadata, streamed) == plain  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", FORMATS)
def test_decrypt_errors(fmt: str) -> None:
    writer = ClientEncryption(ring(K7), fmt)  # type: ignore[arg-type]
    blob = writer.encrypt(b"x" * 100_000)
    marker = writer.marker()
    reader = ClientEncryption(ring(K7))
    for bad in (
        blob[:-1],
        blob[: len(blob) // 2],
        blob[:50] + bytes([blob[50] ^ 1]) + blob[51:],
        blob + b"\0",
    ):
        with pytest.raises(IntegrityError):
            reader.decrypt("u", fmt, marker, bad)  # type: ignore[arg-type]
    # Metadata naming no id: the header's id is looked up, and missing.
    with pytest.raises(KeyMissingError) as caught:
        ClientEncryption(ring(K8)).decrypt("u", fmt, {}, blob)  # type: ignore[arg-type]
    assert caught.value.key_id == 7
    with pytest.raises(KeyMissingError):
        ClientEncryption().decrypt("u", fmt, marker, blob)  # type: ignore[arg-type]
    # The same id under other key material: authentication fails.
    impostor = ClientEncryption(ring(MasterKey(7, os.urandom(32))))
    with pytest.raises(IntegrityError):
        impostor.decrypt("u", fmt, marker, blob)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# The engine on memory:// and local stores


@pytest.mark.parametrize("fmt", FORMATS)
def test_upload_encrypts_download_decrypts(tree: Path, tmp_path: Path, mem_bucket: str, fmt: str) -> None:
    url = f"memory://{mem_bucket}/enc/"
    summary = api.upload(str(tree), url, recursive=True, options=options(ClientEncryption(ring(K7), fmt)))  # type: ignore[arg-type]
    assert summary.ok and summary.files == len(TREE)
    assert_stored_encrypted(mem_objects(mem_bucket), "enc/", 7, fmt)

    for crypt in (None, ClientEncryption(ring(K8))):
        dest = tmp_path / f"fail-{crypt is None}"
        with pytest.raises(KeyMissingError) as caught:
            api.download(url, str(dest), recursive=True, options=options(crypt))
        assert caught.value.key_id == 7 and "7" in str(caught.value)
        assert not dest.exists() or read_tree(dest) == {}
    # The large object alone: streamed path.
    with pytest.raises(KeyMissingError):
        api.download(url + BIG, str(tmp_path / "big"), options=options())
    assert not (tmp_path / "big").exists()

    dest = tmp_path / "plain"
    summary = api.download(url, str(dest), recursive=True, options=options(ClientEncryption(ring(K8, K7))))
    assert summary.ok
    assert read_tree(dest) == TREE
    # Default thresholds: the large object goes through the small path.
    dest = tmp_path / "plain-default"
    api.download(
        url, str(dest), recursive=True, options=TransferOptions(encryption=ClientEncryption(ring(K7)))
    )
    assert read_tree(dest) == TREE


@pytest.mark.parametrize("fmt", FORMATS)
def test_copy_without_keys_keeps_ciphertext_and_markers(tree: Path, mem_bucket: str, fmt: str) -> None:
    api.upload(
        str(tree),
        f"memory://{mem_bucket}/src/",
        recursive=True,
        options=options(ClientEncryption(ring(K7), fmt)),
    )  # type: ignore[arg-type]
    other = mem_bucket + "-dst"
    summary = api.copy(
        f"memory://{mem_bucket}/src/", f"memory://{other}/dst/", recursive=True, options=options()
    )
    assert summary.ok and summary.files == len(TREE)
    # A reader with keys but no --encrypt copies as is too.
    api.copy(
        f"memory://{mem_bucket}/src/",
        f"memory://{other}/keys/",
        recursive=True,
        options=options(ClientEncryption(ring(K7))),
    )
    source = mem_objects(mem_bucket)
    copied = mem_objects(other)
    for rel in TREE:
        for prefix in ("dst/", "keys/"):
            blob, metadata = copied[prefix + rel]
            assert blob == source["src/" + rel][0], rel
            assert metadata[FORMAT_METADATA_KEY] == fmt and metadata[KEY_ID_METADATA_KEY] == "7"


@pytest.mark.parametrize("fmt", FORMATS)
def test_copy_with_encrypt_reencrypts(tree: Path, tmp_path: Path, mem_bucket: str, fmt: str) -> None:
    source = options(ClientEncryption(ring(K7), "A1"))
    api.upload(str(tree), f"memory://{mem_bucket}/src/", recursive=True, options=source)
    other = mem_bucket + "-dst"
    wrong = ClientEncryption(ring(K8), fmt)  # type: ignore[arg-type]
    with pytest.raises(KeyMissingError):
        api.copy(
            f"memory://{mem_bucket}/src/", f"memory://{other}/dst/", recursive=True, options=options(wrong)
        )
    crypt = ClientEncryption(ring(K8, K7), fmt)  # type: ignore[arg-type]
    summary = api.copy(
        f"memory://{mem_bucket}/src/", f"memory://{other}/dst/", recursive=True, options=options(crypt)
    )
    assert summary.ok and summary.files == len(TREE)
    assert_stored_encrypted(mem_objects(other), "dst/", 8, fmt)
    dest = tmp_path / "out"
    api.download(
        f"memory://{other}/dst/", str(dest), recursive=True, options=options(ClientEncryption(ring(K8)))
    )
    assert read_tree(dest) == TREE


def test_copy_of_plaintext_with_encrypt_encrypts(tree: Path, mem_bucket: str) -> None:
    api.upload(str(tree), f"memory://{mem_bucket}/plain/", recursive=True, options=options())
    api.copy(f"memory://{mem_bucket}/plain/", f"memory://{mem_bucket}/enc/", recursive=True,
             options=options(ClientEncryption(ring(K7), "A1")))  # fmt: skip
    objects = mem_objects(mem_bucket)
    assert_stored_encrypted(objects, "enc/", 7, "A1")
    assert {k: v[0] for k, v in objects.items() if k.startswith("plain/")} == {
        "plain/" + k: v for k, v in TREE.items()
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_rekey(tree: Path, tmp_path: Path, mem_bucket: str, fmt: str) -> None:
    url = f"memory://{mem_bucket}/p/"
    api.upload(str(tree), url + "enc/", recursive=True, options=options(ClientEncryption(ring(K7), "A1")))
    api.upload(str(tree), url + "plain/", recursive=True, options=options())
    mem_put(mem_bucket, "p/orthanc.dcm.enc", a1.encrypt(TREE["small.dcm"], ring(K7)), {})
    plain_before = {k: v for k, v in mem_objects(mem_bucket).items() if k.startswith("p/plain/")}

    with pytest.raises(UsageError, match="rekey"):
        options(ClientEncryption(ring(K8, K7)), rekey=True)
    with pytest.raises(KeyMissingError):
        api.copy(url, url, recursive=True, options=options(ClientEncryption(ring(K8), fmt), rekey=True))  # type: ignore[arg-type]

    rekey = options(ClientEncryption(ring(K8, K7), fmt), rekey=True)  # type: ignore[arg-type]
    summary = api.copy(url, url, recursive=True, options=rekey)
    assert summary.ok
    assert (summary.files, summary.skipped) == (len(TREE) + 1, len(TREE))
    objects = mem_objects(mem_bucket)
    assert_stored_encrypted(objects, "p/enc/", 8, fmt)
    blob, metadata = objects["p/orthanc.dcm.enc"]
    assert header_id(blob, fmt) == 8 and metadata[KEY_ID_METADATA_KEY] == "8"
    assert {k: v for k, v in objects.items() if k.startswith("p/plain/")} == plain_before

    again = api.copy(url, url, recursive=True, options=rekey)
    assert (again.files, again.skipped, again.ok) == (0, 2 * len(TREE) + 1, True)

    dest = tmp_path / "out"
    api.download(url, str(dest), recursive=True, options=options(ClientEncryption(ring(K8))))
    expected = {f"enc/{k}": v for k, v in TREE.items()} | {f"plain/{k}": v for k, v in TREE.items()}
    assert read_tree(dest) == expected | {"orthanc.dcm.enc": TREE["small.dcm"]}


def test_rekey_to_another_format_under_the_same_key(tree: Path, mem_bucket: str) -> None:
    if not HAS_DC2:
        pytest.skip("format DC2 (src/dicom_cloud/crypto/chunked.py) not written yet")
    url = f"memory://{mem_bucket}/p/"
    api.upload(str(tree), url, recursive=True, options=options(ClientEncryption(ring(K7), "A1")))
    summary = api.copy(
        url, url, recursive=True, options=options(ClientEncryption(ring(K7), "DC2"), rekey=True)
    )
    assert summary.files == len(TREE)
    assert_stored_encrypted(mem_objects(mem_bucket), "p/", 7, "DC2")


@pytest.mark.parametrize("size", [len(TREE["small.dcm"]), len(TREE[BIG])], ids=["small", "large"])
def test_orthanc_style_object(tmp_path: Path, mem_bucket: str, size: int) -> None:
    plain = (TREE["small.dcm"] + TREE[BIG])[:size]
    mem_put(mem_bucket, "o/x.dcm.enc", a1.encrypt(plain, ring(K7)), {})
    url = f"memory://{mem_bucket}/o/x.dcm.enc"
    with pytest.raises(KeyMissingError):
        api.download(url, str(tmp_path / "a"), options=options())
    with pytest.raises(KeyMissingError) as caught:
        api.download(url, str(tmp_path / "b"), options=options(ClientEncryption(ring(K8))))
    assert caught.value.key_id == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    api.download(url, str(tmp_path / "c"), options=options(ClientEncryption(ring(K7))))
    assert (tmp_path / "c").read_bytes() == plain


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
@pytest.mark.parametrize("which", ["small.dcm", BIG])
def test_damaged_objects_are_integrity_errors(
    tree: Path, tmp_path: Path, mem_bucket: str, fmt: str, damage: str, which: str
) -> None:
    api.upload(
        str(tree / which), f"memory://{mem_bucket}/x", options=options(ClientEncryption(ring(K7), fmt))
    )  # type: ignore[arg-type]
    blob, metadata = mem_objects(mem_bucket)["x"]
    if damage == "flip":
        at = len(blob) // 2
        blob = blob[:at] + bytes([blob[at] ^ 0x80]) + blob[at + 1 :]
    elif damage == "truncate":
        blob = blob[:-5]
    else:
        blob = blob + b"\0" * 5
    markers = {k: v for k, v in metadata.items() if k != CHECKSUM_METADATA_KEY}
    mem_put(mem_bucket, "x", blob, markers | {CHECKSUM_METADATA_KEY: crc32c_hex(blob)})
    dest = tmp_path / "out"
    dest.mkdir()
    summary = api.download(f"memory://{mem_bucket}/x", str(dest), options=options(ClientEncryption(ring(K7))))
    assert len(summary.failed) == 1 and isinstance(summary.failed[0][1], IntegrityError), summary.failed
    leftovers = [p.name for p in dest.iterdir()]
    assert leftovers == [], leftovers  # no file, no partial file
    assert not any(name.endswith(PARTIAL_SUFFIX) for name in leftovers)


def test_local_bucket_round_trip(tree: Path, tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    summary = api.upload(
        str(tree), f"file://{bucket}/enc/", recursive=True, options=options(ClientEncryption(ring(K7), "A1"))
    )
    assert summary.ok
    for rel, plain in TREE.items():
        blob = (bucket / "enc" / rel).read_bytes()
        assert header_id(blob, "A1") == 7 and len(blob) == len(plain) + 86 and SECRET not in blob
        metadata = api.stat(str(bucket / "enc" / rel)).metadata
        assert metadata[FORMAT_METADATA_KEY] == "A1" and metadata[KEY_ID_METADATA_KEY] == "7"
    with pytest.raises(KeyMissingError):
        api.download(f"file://{bucket}/enc/", str(tmp_path / "nokey"), recursive=True, options=options())
    dest = tmp_path / "out"
    api.download(
        f"file://{bucket}/enc/", str(dest), recursive=True, options=options(ClientEncryption(ring(K7)))
    )
    assert read_tree(dest) == TREE
