"""The engine's per-object outcomes: what is at a destination name, local files that change under
it, and the Content-Type of what it writes (memory stores and local directories)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file

from dicom_cloud.backends import open_store
from dicom_cloud.backends.local import LocalStore
from dicom_cloud.crypto.envelope import ClientEncryption
from dicom_cloud.crypto.keys import KeyRing, MasterKey
from dicom_cloud.dicom.layout import Layout
from dicom_cloud.dicom.upload import DicomPolicy
from dicom_cloud.errors import ConflictError, NotFoundError, SourceChangedError, UnreadableFileError
from dicom_cloud.location import LocationOpener
from dicom_cloud.store import ObjectInfo, PutOptions
from dicom_cloud.transfer import Transfer, TransferItem, TransferOptions, TransferSummary

CT = Path(str(get_testdata_file("CT_small.dcm")))
MR = Path(str(get_testdata_file("MR_small.dcm")))
MR_OTHER_BYTES = Path(str(get_testdata_file("MR_truncated.dcm")))  # the same UIDs as MR_small.dcm


def _run(src: str, dst: str, options: TransferOptions | None = None, **kwargs: Any) -> TransferSummary:
    async def go() -> TransferSummary:
        opener = LocationOpener()
        try:
            transfer = Transfer(opener.open(src), opener.open(dst), recursive=True, options=options, **kwargs)
            return await transfer.run()
        finally:
            await opener.close()

    return asyncio.run(go())


def _objects(bucket: str) -> dict[str, ObjectInfo]:
    store = open_store(f"memory://{bucket}")

    async def collect() -> dict[str, ObjectInfo]:
        return {info.key: await store.stat(info.key) async for info in store.list("")}

    return asyncio.run(collect())


def _uid_layout(on_conflict: Any = None, **kwargs: Any) -> TransferOptions:
    return TransferOptions(
        dicom=DicomPolicy(layout=Layout.from_spec("uid")), on_conflict=on_conflict, **kwargs
    )


# -- what is at the destination name -------------------------------------------------------------


def test_conflict_policy_defaults_to_fail_under_a_dicom_layout() -> None:
    assert TransferOptions().conflict_policy == "overwrite"
    assert TransferOptions(dicom=DicomPolicy(metadata_tags=("Modality",))).conflict_policy == "overwrite"
    assert _uid_layout().conflict_policy == "fail"
    assert TransferOptions(dicom=DicomPolicy(orthanc_structure="flat")).conflict_policy == "fail"
    assert _uid_layout("keep-both").conflict_policy == "keep-both"


@pytest.mark.parametrize("parallel", [1, 16])
def test_many_sources_one_name_in_one_run(tmp_path: Path, mem_bucket: str, parallel: int) -> None:
    """Copies of one instance and another instance under its UID, all at once: one object is
    written, copies are identical, the other bytes are a conflict; nothing is counted twice."""
    src = tmp_path / "src"
    src.mkdir()
    for index in range(12):
        shutil.copy(MR, src / f"copy{index:02d}.dcm")
    shutil.copy(MR_OTHER_BYTES, src / "other.dcm")
    summary = _run(str(src) + "/", f"memory://{mem_bucket}/u/", _uid_layout(parallel=parallel))
    assert len(_objects(mem_bucket)) == summary.files == 1
    assert summary.identical + len(summary.conflicts) == 12
    assert [type(error) for _, error in summary.failed] == [ConflictError] * len(summary.conflicts)
    assert summary.replaced == summary.kept_both == 0


def test_overwrite_in_one_run_reports_replacements(tmp_path: Path, mem_bucket: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(MR, src / "a.dcm")
    shutil.copy(MR_OTHER_BYTES, src / "b.dcm")
    summary = _run(str(src) + "/", f"memory://{mem_bucket}/u/", _uid_layout("overwrite", parallel=8))
    assert summary.files == 2 and summary.replaced == 1 and not summary.failed
    (only,) = _objects(mem_bucket).values()
    # The one written last is the one there: the name was held by one writer at a time.
    assert only.size in (MR.stat().st_size, MR_OTHER_BYTES.stat().st_size)


def test_keep_both_then_identical(tmp_path: Path, mem_bucket: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(MR, src / "a.dcm")
    shutil.copy(MR_OTHER_BYTES, src / "b.dcm")
    url = f"memory://{mem_bucket}/u/"
    first = _run(str(src) + "/", url, _uid_layout("keep-both"))
    assert first.files == 2 and first.kept_both == 1 and not first.failed
    names = sorted(_objects(mem_bucket))
    assert len(names) == 2 and "~" in names[1]
    again = _run(str(src) + "/", url, _uid_layout())  # the default (fail): both are there already
    assert again.files == 0 and again.identical == 2 and not again.failed


def test_encrypted_objects_compare_by_plaintext(tmp_path: Path, mem_bucket: str) -> None:
    """Each envelope is unique: an encrypted re-upload of the same instance is identical, not a conflict."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(MR, src / "a.dcm")
    ring = KeyRing(MasterKey(7, os.urandom(32)))
    options = _uid_layout(encryption=ClientEncryption(ring=ring, encrypt_as="A1"))
    url = f"memory://{mem_bucket}/u/"
    assert _run(str(src) + "/", url, options).files == 1
    again = _run(str(src) + "/", url, options)
    assert again.identical == 1 and not again.failed
    shutil.copy(MR_OTHER_BYTES, src / "a.dcm")
    assert [type(e) for _, e in _run(str(src) + "/", url, options).failed] == [ConflictError]


# -- local files that cannot be read, vanish or change ---------------------------------------------


def test_unreadable_file_is_one_failure(
    tmp_path: Path, mem_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for index in range(40):
        (src / f"f{index:02d}").write_bytes(b"x" * index)
    real_open = os.open

    def refusing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("/f00"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    summary = _run(str(src) + "/", f"memory://{mem_bucket}/p/")
    assert summary.files == 39
    assert [(Path(s).name, type(e)) for s, e in summary.failed] == [("f00", UnreadableFileError)]


def test_vanished_and_grown_since_listed(tmp_path: Path, mem_bucket: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "grown").write_bytes(b"12345")
    (src / "fine").write_bytes(b"ok")
    root = str(src).lstrip("/")

    async def items() -> AsyncIterator[TransferItem]:
        yield TransferItem(f"{root}/gone", "p/gone", 10, "gone")
        yield TransferItem(f"{root}/grown", "p/grown", 3, "grown")  # listed at 3 bytes
        yield TransferItem(f"{root}/fine", "p/fine", 2, "fine")

    summary = _run(str(src) + "/", f"memory://{mem_bucket}/p/", items=items())
    failures = {Path(s).name: e for s, e in summary.failed}
    assert isinstance(failures["gone"], NotFoundError) and "vanished" in str(failures["gone"])
    assert isinstance(failures["grown"], SourceChangedError)
    assert list(_objects(mem_bucket)) == ["p/fine"]


def test_file_changed_while_read_is_not_written(
    tmp_path: Path, mem_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "busy.dcm").write_bytes(b"a" * 1000)
    (src / "calm.dcm").write_bytes(b"b" * 1000)
    real_read = LocalStore.read

    async def read_then_append(self: LocalStore, key: str) -> Any:
        result = await real_read(self, key)
        if key.endswith("busy.dcm"):
            with open("/" + key, "ab") as f:  # a writer still at work
                f.write(b"more")
        return result

    monkeypatch.setattr(LocalStore, "read", read_then_append)
    summary = _run(str(src) + "/", f"memory://{mem_bucket}/p/")
    assert [(Path(s).name, type(e)) for s, e in summary.failed] == [("busy.dcm", SourceChangedError)]
    assert list(_objects(mem_bucket)) == ["p/calm.dcm"]


def test_large_file_changed_during_upload_is_removed(
    tmp_path: Path, mem_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(300_000))
    store = open_store(f"memory://{mem_bucket}")
    real_put_file = type(store).put_file

    async def put_file_then_touch(self: Any, key: str, path: Path, *args: Any, **kwargs: Any) -> Any:
        result = await real_put_file(self, key, path, *args, **kwargs)
        with open(path, "ab") as f:
            f.write(b"appended during the upload")
        return result

    monkeypatch.setattr(type(store), "put_file", put_file_then_touch)
    summary = _run(str(src) + "/", f"memory://{mem_bucket}/p/", TransferOptions(multipart_threshold=1000))
    assert [type(e) for _, e in summary.failed] == [SourceChangedError]
    assert _objects(mem_bucket) == {}


# -- Content-Type --------------------------------------------------------------------------------


def test_content_type_follows_the_content(tmp_path: Path, mem_bucket: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(CT, src / "ct.dcm")
    shutil.copy(CT, src / "no-extension")
    (src / "blob.dcm").write_bytes(os.urandom(400))  # named .dcm, not DICOM
    (src / "README.txt").write_text("read me")
    (src / "data.json").write_text("{}")
    _run(str(src) + "/", f"memory://{mem_bucket}/p/")
    types = {key.rpartition("/")[2]: info.content_type for key, info in _objects(mem_bucket).items()}
    assert types == {
        "ct.dcm": "application/dicom",
        "no-extension": "application/dicom",
        "blob.dcm": "application/octet-stream",
        "README.txt": "text/plain",
        "data.json": "application/json",
    }
    ring = KeyRing(MasterKey(7, os.urandom(32)))
    encrypted = TransferOptions(encryption=ClientEncryption(ring=ring, encrypt_as="A1"))
    _run(str(src) + "/", f"memory://{mem_bucket}/enc/", encrypted)
    assert {i.content_type for k, i in _objects(mem_bucket).items() if k.startswith("enc/")} == {
        "application/octet-stream"
    }
    # Chosen by the user: kept.
    chosen = TransferOptions(put=PutOptions(content_type="image/x-custom"))
    _run(str(src / "README.txt"), f"memory://{mem_bucket}/chosen/", chosen)
    assert _objects(mem_bucket)["chosen/README.txt"].content_type == "image/x-custom"
