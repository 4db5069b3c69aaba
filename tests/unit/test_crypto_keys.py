"""Master keys, key files and key rings: validation, and key material never shown."""

from __future__ import annotations

import base64
import traceback
from pathlib import Path

import pytest

from dicom_cloud.crypto.keys import KEY_SIZE, KeyRing, MasterKey, parse_key_spec
from dicom_cloud.errors import UsageError

SECRET = bytes(range(0xA0, 0xC0))
SECRET_B64 = base64.b64encode(SECRET).decode()


def _key(key_id: int, fill: int | None = None) -> MasterKey:
    return MasterKey(key_id, SECRET if fill is None else bytes([fill]) * KEY_SIZE)


def _write(tmp_path: Path, content: bytes | str, name: str = "master.key") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return path


def _everything_shown(exc: BaseException) -> str:
    """What a user or a log could see: message, hint, repr, and the messages of the exception chain
    as a traceback prints it (source lines left out: they would quote this test's own literals)."""
    shown = [str(exc), getattr(exc, "hint", None) or "", repr(exc)]
    current: BaseException | None = exc
    while current is not None:
        shown += traceback.format_exception_only(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return "\n".join(shown)


def _assert_no_secret(text: str, *secrets: str) -> None:
    for secret in (SECRET.hex(), SECRET_B64, repr(SECRET), *secrets):
        assert secret not in text


# --- MasterKey ------------------------------------------------------------------------------------


def test_master_key_holds_id_and_key() -> None:
    key = MasterKey(7, SECRET)
    assert (key.id, key.key) == (7, SECRET)


def test_master_key_repr_and_str_show_no_key_bytes() -> None:
    key = MasterKey(7, SECRET)
    for text in (repr(key), str(key), f"{key}", f"{[key]}"):
        assert "7" in text
        _assert_no_secret(text)


@pytest.mark.parametrize("key_id", [-1, 2**32, True, 1.0, "3"])
def test_master_key_id_must_be_a_uint32(key_id: object) -> None:
    with pytest.raises(UsageError, match="uint32"):
        MasterKey(key_id, SECRET)  # type: ignore[arg-type]


def test_master_key_id_bounds_accepted() -> None:
    assert MasterKey(0, SECRET).id == 0
    assert MasterKey(2**32 - 1, SECRET).id == 2**32 - 1


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_master_key_must_be_32_bytes(size: int) -> None:
    material = bytes(range(size))
    with pytest.raises(UsageError, match=f"{size} bytes") as info:
        MasterKey(1, material)
    _assert_no_secret(_everything_shown(info.value), material.hex() if material else "unused-marker")


# --- key files ------------------------------------------------------------------------------------


def test_key_file_as_made_by_openssl(tmp_path: Path) -> None:
    # `openssl rand -base64 32` writes 44 characters and a newline.
    path = _write(tmp_path, SECRET_B64 + "\n")
    assert MasterKey.from_file(3, path) == MasterKey(3, SECRET)


def test_key_file_whitespace_anywhere_is_ignored(tmp_path: Path) -> None:
    path = _write(tmp_path, f"  {SECRET_B64[:20]}\r\n{SECRET_B64[20:]}\n\n")
    assert MasterKey.from_file(3, str(path)).key == SECRET


@pytest.mark.parametrize("size", [0, 16, 31, 33, 48, 64])
def test_key_file_of_wrong_length(tmp_path: Path, size: int) -> None:
    material = bytes(0x5A ^ i for i in range(size))
    encoded = base64.b64encode(material).decode()
    path = _write(tmp_path, encoded + "\n")
    with pytest.raises(UsageError) as info:
        MasterKey.from_file(1, path)
    shown = _everything_shown(info.value)
    assert str(path) in str(info.value)
    assert f"holds {size} bytes" in str(info.value)
    assert "openssl rand -base64 32" in (info.value.hint or "")
    if size:
        _assert_no_secret(shown, encoded, material.hex())


@pytest.mark.parametrize(
    "content",
    [
        "this is not base64 at all: sekret!",
        SECRET_B64.replace("=", "") + "\n",  # padding removed: still not valid base64
        SECRET_B64[:-4] + "*" + SECRET_B64[-3:],
        b"\xff\xfe" + SECRET_B64.encode(),  # not even text
        "é" * 44,
    ],
)
def test_key_file_not_base64(tmp_path: Path, content: str | bytes) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(UsageError, match="does not hold a base64-encoded key") as info:
        MasterKey.from_file(1, path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is None  # the decoder's message could quote the input
    text = content if isinstance(content, str) else content.decode("latin-1")
    shown = _everything_shown(info.value)
    _assert_no_secret(shown, text.strip(), "sekret")


def test_key_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.key"
    with pytest.raises(UsageError, match="cannot read master key file") as info:
        MasterKey.from_file(1, path)
    assert str(path) in str(info.value)


def test_key_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read master key file"):
        MasterKey.from_file(1, tmp_path)


# --- environment ----------------------------------------------------------------------------------


def test_key_from_environment() -> None:
    env = {"DICOM_CLOUD_MASTER_KEY": SECRET_B64 + "\n"}
    assert MasterKey.from_env(5, "DICOM_CLOUD_MASTER_KEY", env) == MasterKey(5, SECRET)


def test_key_from_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DC_TEST_KEY", SECRET_B64)
    assert MasterKey.from_env(5, "DC_TEST_KEY").key == SECRET


@pytest.mark.parametrize("env", [{}, {"K": ""}, {"K": "  \n"}])
def test_key_from_environment_missing(env: dict[str, str]) -> None:
    with pytest.raises(UsageError, match="environment variable K is not set"):
        MasterKey.from_env(5, "K", env)


def test_key_from_environment_wrong_length_names_the_variable() -> None:
    short = base64.b64encode(SECRET[:16]).decode()
    with pytest.raises(UsageError, match="environment variable K holds 16 bytes") as info:
        MasterKey.from_env(5, "K", {"K": short})
    _assert_no_secret(_everything_shown(info.value), short)


def test_key_from_environment_not_base64() -> None:
    with pytest.raises(UsageError, match="environment variable K does not hold") as info:
        MasterKey.from_env(5, "K", {"K": "hunter2!"})
    assert "hunter2" not in _everything_shown(info.value)


# --- ID:PATH specs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "key_id", "path"),
    [
        ("3:keys/master.key", 3, "keys/master.key"),
        ("0:k", 0, "k"),
        ("4294967295:k", 2**32 - 1, "k"),
        ("007:k", 7, "k"),
        ("3:C:\\keys\\k", 3, "C:\\keys\\k"),  # only the first colon separates
        ("12:a b:c", 12, "a b:c"),
    ],
)
def test_parse_key_spec(spec: str, key_id: int, path: str) -> None:
    assert parse_key_spec(spec) == (key_id, Path(path))


@pytest.mark.parametrize(
    "spec", ["", "3", "3:", ":k", "x:k", "-1:k", "+3:k", " 3:k", "3.0:k", "0x3:k", "٣:k"]
)
def test_parse_key_spec_rejects(spec: str) -> None:
    with pytest.raises(UsageError, match="ID:PATH"):
        parse_key_spec(spec)


def test_parse_key_spec_id_too_large() -> None:
    with pytest.raises(UsageError, match=r"4294967296 .* uint32"):
        parse_key_spec("4294967296:k")


def test_master_key_from_spec(tmp_path: Path) -> None:
    path = _write(tmp_path, SECRET_B64)
    assert MasterKey.from_spec(f"9:{path}") == MasterKey(9, SECRET)


# --- KeyRing --------------------------------------------------------------------------------------


def test_ring_lookup_current_and_previous() -> None:
    current, old1, old2 = _key(3, 3), _key(1, 1), _key(2, 2)
    ring = KeyRing(current, [old1, old2])
    assert ring.current is current
    assert ring.lookup(3) is current
    assert ring.lookup(1) is old1
    assert ring.lookup(2) is old2
    assert ring.ids == [3, 1, 2]
    assert 2 in ring
    assert 4 not in ring


def test_ring_without_previous_keys() -> None:
    ring = KeyRing(_key(3))
    assert ring.previous == ()
    assert ring.ids == [3]


def test_ring_unknown_id_names_it_and_the_known_ids() -> None:
    ring = KeyRing(_key(3, 3), [_key(1, 1)])
    with pytest.raises(UsageError) as info:
        ring.lookup(258)
    assert "258" in str(info.value)
    assert "known ids: 3, 1" in str(info.value)
    assert "258" in (info.value.hint or "")


def test_ring_ids_must_be_unique() -> None:
    with pytest.raises(UsageError, match="id 1 is given twice"):
        KeyRing(_key(1, 1), [_key(2, 2), _key(1, 3)])


def test_ring_may_hold_the_same_material_under_two_ids() -> None:
    # Only ids must be unique: they are what an object names.
    ring = KeyRing(_key(1), [_key(2)])
    assert ring.lookup(1).key == ring.lookup(2).key


def test_ring_repr_shows_ids_only() -> None:
    ring = KeyRing(_key(3), [_key(1), _key(2)])
    assert repr(ring) == "KeyRing(current=3, previous=[1, 2])"
    for text in (repr(ring), str(ring)):
        _assert_no_secret(text)


def test_ring_from_specs(tmp_path: Path) -> None:
    cur = _write(tmp_path, base64.b64encode(bytes([1]) * 32).decode(), "cur.key")
    old = _write(tmp_path, base64.b64encode(bytes([2]) * 32).decode(), "old.key")
    ring = KeyRing.from_specs(f"10:{cur}", [f"9:{old}"])
    assert ring.ids == [10, 9]
    assert ring.lookup(9).key == bytes([2]) * 32


def test_master_key_must_be_bytes() -> None:
    with pytest.raises(UsageError, match="must be given as bytes, not bytearray") as info:
        MasterKey(1, bytearray(SECRET))  # type: ignore[arg-type]
    _assert_no_secret(_everything_shown(info.value))
