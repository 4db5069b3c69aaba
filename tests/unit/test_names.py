"""Names that cannot be written faithfully (names.py) and how the engine refuses them."""

from __future__ import annotations

import asyncio
import unicodedata
from pathlib import Path

import pytest
from test_transfer_engine import FakeSource
from test_transfer_engine import _location as fake_location

from dicom_cloud import names
from dicom_cloud.backends import open_store
from dicom_cloud.errors import UnsafeNameError
from dicom_cloud.location import Location
from dicom_cloud.transfer import Transfer
from dicom_cloud.url import parse_url

NFC = unicodedata.normalize("NFC", "séance/é.dcm")
NFD = unicodedata.normalize("NFD", "séance/é.dcm")


def _location(url: str) -> Location:
    parsed = parse_url(url)
    return Location(url=parsed, store=open_store(parsed), key=parsed.key.lstrip("/"))


def _memory_keys(bucket: str) -> dict[str, bytes]:
    async def read() -> dict[str, bytes]:
        store = open_store(f"memory://{bucket}/")
        return {info.key: bytes(await store.get(info.key)) async for info in store.list("")}

    return asyncio.run(read())


def test_object_key_limit() -> None:
    names.check_object_key("a/" + "x" * 1022, "s3://b/k")
    with pytest.raises(UnsafeNameError, match="1025 bytes long"):
        names.check_object_key("a/" + "x" * 1023, "s3://b/k")
    with pytest.raises(UnsafeNameError):
        names.check_object_key("é" * 513, "s3://b/k")  # 1026 bytes in UTF-8


def test_nfc_twin_found_only_for_the_other_spelling(tmp_path: Path) -> None:
    for name in (NFC, NFD):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    assert names.nfc_twin(str(tmp_path), NFC) is None  # the NFC spelling is the one uploaded
    assert names.nfc_twin(str(tmp_path), NFD) is not None
    assert names.nfc_twin(str(tmp_path), "plain/ascii.dcm") is None


def test_upload_refuses_the_non_nfc_twin_and_keeps_the_other(tmp_path: Path, mem_bucket: str) -> None:
    src = tmp_path / "src"
    for name, data in ((NFC, b"composed"), (NFD, b"decomposed"), ("zero.dcm", b"")):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    transfer = Transfer(_location(f"{src}/"), _location(f"memory://{mem_bucket}/up/"), recursive=True)
    summary = asyncio.run(transfer.run())
    assert summary.files == 2  # the NFC file and the empty one
    assert len(summary.failed) == 1 and isinstance(summary.failed[0][1], UnsafeNameError)
    assert "NFC" in str(summary.failed[0][1])
    assert _memory_keys(mem_bucket) == {f"up/{NFC}": b"composed", "up/zero.dcm": b""}


def test_upload_refuses_keys_past_1024_bytes(tmp_path: Path, mem_bucket: str) -> None:
    src = tmp_path / "src"
    deep = src.joinpath(*(["d" * 200] * 6))
    deep.mkdir(parents=True)
    (deep / "long.dcm").write_bytes(b"x")
    (src / "short.dcm").write_bytes(b"y")
    summary = asyncio.run(
        Transfer(_location(f"{src}/"), _location(f"memory://{mem_bucket}/"), recursive=True).run()
    )
    assert summary.files == 1 and len(summary.failed) == 1
    assert "at most 1024" in str(summary.failed[0][1])


def test_download_of_a_segment_past_255_bytes_is_a_clear_error(tmp_path: Path, mem_bucket: str) -> None:
    async def seed() -> None:
        store = open_store(f"memory://{mem_bucket}/")
        await store.put("p/" + "n" * 300 + ".dcm", b"long")
        await store.put("p/ok.dcm", b"ok")

    asyncio.run(seed())
    dest = tmp_path / "dest"
    summary = asyncio.run(
        Transfer(_location(f"memory://{mem_bucket}/p/"), _location(f"{dest}/"), recursive=True).run()
    )
    assert summary.files == 1 and len(summary.failed) == 1
    assert isinstance(summary.failed[0][1], UnsafeNameError)
    assert (dest / "ok.dcm").read_bytes() == b"ok"


def test_other_spelling_on_a_folding_file_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On Linux both spellings are distinct files; a folding file system (APFS) is simulated by
    making the NFD path appear to exist while only the NFC name is listed."""
    nfc, nfd = unicodedata.normalize("NFC", "é.dcm"), unicodedata.normalize("NFD", "é.dcm")
    (tmp_path / nfc).write_bytes(b"first")
    assert names.other_spelling_on_disk(str(tmp_path / nfc)) is None  # same spelling: overwrite
    assert names.other_spelling_on_disk(str(tmp_path / nfd)) is None  # Linux: no such file
    original = Path.exists
    monkeypatch.setattr(Path, "exists", lambda p: original(p) or p.name == nfd)
    assert names.other_spelling_on_disk(str(tmp_path / nfd)) == str(tmp_path / nfc)


def test_symlink_loop_on_upload_is_skipped_with_a_warning(
    tmp_path: Path, mem_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.dcm").write_bytes(b"a")
    (src / "sub" / "loop").symlink_to(src)
    summary = asyncio.run(
        Transfer(_location(f"{src}/"), _location(f"memory://{mem_bucket}/"), recursive=True).run()
    )
    assert summary.files == 1 and not summary.failed
    assert "symbolic link loop" in caplog.text
    assert list(_memory_keys(mem_bucket)) == ["sub/a.dcm"]


@pytest.mark.parametrize("hostile", ["a\x00b.dcm", "x\\..\\..\\evil.dcm", "/abs.dcm", "../up.dcm"])
def test_hostile_download_names_fail_alone_and_stay_inside(tmp_path: Path, hostile: str) -> None:
    """NUL cannot be tested against the servers: SeaweedFS and fake-gcs-server refuse such names,
    Azurite accepts the write but does not list the blob."""
    source = FakeSource({f"p/{hostile}": b"evil", "p/ok.dcm": b"ok"})
    dest = tmp_path / "jail" / "dest"
    summary = asyncio.run(Transfer(fake_location(source, "p/"), _location(f"{dest}/"), recursive=True).run())
    assert summary.files == 1 and len(summary.failed) == 1
    assert isinstance(summary.failed[0][1], UnsafeNameError)
    assert [p.name for p in (tmp_path / "jail").rglob("*") if p.is_file()] == ["ok.dcm"]


@pytest.mark.parametrize("key", ["a\nb.dcm", "dir/a\rb", "tab\there", "esc\x1b[31m", "del\x7f"])
def test_control_characters_are_refused_in_object_names(key: str) -> None:
    with pytest.raises(UnsafeNameError, match="control character") as refused:
        names.check_object_key(key, f"s3://b/{key}")
    message = str(refused.value)
    assert "\n" not in message and "\r" not in message and "\x1b" not in message


def test_printable_escapes_controls_only() -> None:
    assert names.printable("a\nb\tc\x1b\x7f é 漢") == "a\\nb\\tc\\x1b\\x7f é 漢"
    assert names.printable("plain/name.dcm") == "plain/name.dcm"
