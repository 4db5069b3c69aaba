"""How downloads write local files: the random-access writer (pieces, metadata on commit, the lock
held until the rename), whole objects checked and written in one worker-thread call, and partial
file names."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

import pytest
from test_local_store import _has_user_xattrs

from dicom_cloud import api
from dicom_cloud.backends import open_store
from dicom_cloud.backends.local import WRITE_PIECE, LocalStore
from dicom_cloud.checksum import crc32c_hex
from dicom_cloud.engine.model import ranged_part_size
from dicom_cloud.errors import AlreadyExistsError, IntegrityError
from dicom_cloud.localio import PARTIAL_SUFFIX, partial_path
from dicom_cloud.store import CHECKSUM_METADATA_KEY, PutOptions
from dicom_cloud.transfer import TransferOptions, TransferSummary
from dicom_cloud.url import parse_url


def _partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(PARTIAL_SUFFIX)]


def test_writes_larger_than_a_piece_land_whole_at_their_offsets(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    first = os.urandom(3 * WRITE_PIECE + 17)
    second = os.urandom(WRITE_PIECE - 5)
    writer = store.open_writer("big.bin", len(first) + len(second))
    writer.write_at(len(first), memoryview(second))
    writer.write_at(0, first)
    writer.commit()
    assert (tmp_path / "big.bin").read_bytes() == first + second


def test_commit_keeps_metadata_and_content_type(tmp_path: Path) -> None:
    if not _has_user_xattrs(tmp_path):
        pytest.skip("temporary filesystem has no user extended attributes")
    store = LocalStore(tmp_path)
    data = b"DICM" * 1000
    options = PutOptions(content_type="application/dicom", metadata={CHECKSUM_METADATA_KEY: crc32c_hex(data)})
    writer = store.open_writer("a/b/one.dcm", 0)
    writer.write_at(0, data)
    writer.commit(False, options)

    info = asyncio.run(store.stat("a/b/one.dcm"))
    assert info.metadata == {CHECKSUM_METADATA_KEY: crc32c_hex(data)}  # its stamp matches: not stale
    assert info.content_type == "application/dicom"
    assert info.size == len(data)


def test_partial_file_stays_locked_until_the_rename(tmp_path: Path) -> None:
    """The writer writes through the descriptor that holds the lock: until commit, another process
    (a cleanup) sees the partial file as being written."""
    store = LocalStore(tmp_path)
    writer = store.open_writer("x.bin", 4)
    writer.write_at(0, b"abcd")
    [partial] = _partials(tmp_path)
    fd = os.open(partial, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    writer.commit()
    assert (tmp_path / "x.bin").read_bytes() == b"abcd"
    assert _partials(tmp_path) == []


def test_create_only_commit_leaves_the_existing_file_and_no_partial(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"old")
    writer = store.open_writer("x.bin", 0)
    writer.write_at(0, b"new")
    with pytest.raises(AlreadyExistsError):
        writer.commit(True)
    writer.abort()  # what a route does after any failure: harmless after the failed commit
    assert (tmp_path / "x.bin").read_bytes() == b"old"
    assert _partials(tmp_path) == []


def test_no_write_after_abort(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    writer = store.open_writer("x.bin", 4)
    writer.abort()
    with pytest.raises(IntegrityError):
        writer.write_at(0, b"late")
    with pytest.raises(IntegrityError):
        writer.commit()
    assert list(tmp_path.iterdir()) == []


def test_partial_names_differ_in_a_forked_child(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next name, to the parent
        os.write(write_end, partial_path(tmp_path / "f").name.encode())
        os._exit(0)
    os.close(write_end)
    mine = partial_path(tmp_path / "f").name
    os.waitpid(pid, 0)
    child = os.read(read_end, 200).decode()
    os.close(read_end)
    assert child != mine


def _download(bucket: str, objects: dict[str, bytes], dst: Path, **options: object) -> TransferSummary:
    store = open_store(parse_url(f"memory://{bucket}/"))

    async def main() -> TransferSummary:
        for key, data in objects.items():
            await store.put("p/" + key, data)
        return await api.download_async(
            f"memory://{bucket}/p/",
            str(dst) + "/",
            recursive=True,
            options=TransferOptions(**options),  # type: ignore[arg-type]
        )

    return asyncio.run(main())


def test_whole_objects_into_local_disk_are_written_with_their_checksum(
    tmp_path: Path, mem_bucket: str
) -> None:
    """Small objects to a local destination are checked and written in one worker-thread call;
    what lands is the bytes, their CRC32C and content type, and no partial file."""
    if not _has_user_xattrs(tmp_path):
        pytest.skip("temporary filesystem has no user extended attributes")
    files = {"a.bin": os.urandom(1000), "s/b.bin": os.urandom(3 * WRITE_PIECE + 1), "empty.bin": b""}
    summary = _download(mem_bucket, files, tmp_path / "dst", parallel=4)
    assert summary.files == 3 and not summary.failed
    store = LocalStore(tmp_path / "dst")
    for name, data in files.items():
        assert (tmp_path / "dst" / name).read_bytes() == data
        info = asyncio.run(store.stat(name))
        assert info.metadata[CHECKSUM_METADATA_KEY] == crc32c_hex(data)
    assert _partials(tmp_path) == []


def test_whole_object_over_an_existing_file_goes_through_the_destination_check(
    tmp_path: Path, mem_bucket: str
) -> None:
    """The first write is create-only; a file already at the name is then left to the conflict
    policy (here: the default, which replaces different bytes), never half-replaced."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "a.bin").write_bytes(b"old")
    summary = _download(mem_bucket, {"a.bin": b"new bytes"}, dst)
    assert summary.files == 1 and not summary.failed
    assert (dst / "a.bin").read_bytes() == b"new bytes"
    assert _partials(dst) == []


def test_no_overwrite_keeps_the_existing_file(tmp_path: Path, mem_bucket: str) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "a.bin").write_bytes(b"old")
    summary = _download(mem_bucket, {"a.bin": b"new bytes", "b.bin": b"b"}, dst, no_overwrite=True)
    assert summary.skipped == 1 and summary.files == 1 and not summary.failed
    assert (dst / "a.bin").read_bytes() == b"old"
    assert (dst / "b.bin").read_bytes() == b"b"
    assert _partials(dst) == []


@pytest.mark.parametrize(
    ("size_mib", "part_mib", "expected_mib"),
    [
        (17, 8, 8),  # few parts: as many as part_size gives
        (100, 8, 13),  # part_concurrency parts cover it
        (1024, 8, 64),  # capped: more parts than part_concurrency, each at most 64 MiB
        (10240, 8, 64),
        (1024, 128, 128),  # never below --part-size
    ],
)
def test_ranged_download_part_size(size_mib: int, part_mib: int, expected_mib: int) -> None:
    MiB = 1024 * 1024
    assert ranged_part_size(size_mib * MiB, part_mib * MiB, 8) == expected_mib * MiB
