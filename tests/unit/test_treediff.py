"""The one content comparison of sync and verify (treediff.py) and the checksums it rests on
(checksum.py): multipart ETags recomputed from local files, part sizes inferred."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from pathlib import Path

from dicom_cloud import api
from dicom_cloud.checksum import file_digests, multipart_etag_parts, part_size_guesses
from dicom_cloud.sync import SyncOptions
from dicom_cloud.treediff import Difference

MIB = 1024 * 1024


def _by_hand(data: bytes, part: int) -> str:
    digests = [hashlib.md5(data[i : i + part]).digest() for i in range(0, len(data), part)]  # noqa: S324
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"  # noqa: S324


def test_file_digests_give_crc_md5_and_multipart_etags_in_one_read(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(10_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    got = file_digests(path, md5=True, part_sizes=[1000, 3000, 10_000], chunk_size=777)
    assert got.md5 == hashlib.md5(data).hexdigest()  # noqa: S324
    assert got.multipart_etags == {p: _by_hand(data, p) for p in (1000, 3000, 10_000)}
    assert multipart_etag_parts(got.multipart_etags[3000]) == 4
    empty = tmp_path / "e"
    empty.write_bytes(b"")
    one_empty_part = hashlib.md5(hashlib.md5(b"").digest()).hexdigest() + "-1"  # noqa: S324
    assert file_digests(empty, part_sizes=[5 * MIB]).multipart_etags == {5 * MIB: one_empty_part}


def test_multipart_etags_are_told_from_md5_etags() -> None:
    assert multipart_etag_parts("0123456789abcdef0123456789abcdef-12") == 12
    assert multipart_etag_parts("0123456789ABCDEF0123456789ABCDEF-3") == 3
    assert multipart_etag_parts("0123456789abcdef0123456789abcdef") is None
    assert multipart_etag_parts("0123456789abcdef0123456789abcdef-0") is None
    assert multipart_etag_parts(None) is None


def test_part_size_guesses_put_the_tools_sizes_first() -> None:
    assert part_size_guesses(17 * MIB + 5, 3)[0] == 8 * MIB  # aws-cli
    assert 5 * MIB in part_size_guesses(11 * MIB, 3)  # rclone, S3's minimum
    assert 50 * MIB in part_size_guesses(200 * 1000 * 1000, 4)  # s5cmd
    # aws-cli doubles its 8 MiB part until the file fits in 10,000 parts.
    assert 16 * MIB in part_size_guesses(100_000 * MIB, 6250)
    assert part_size_guesses(123, 1) == [123]
    assert part_size_guesses(10, 11) == []
    for size, parts in ((17 * MIB + 5, 3), (200 * 1000 * 1000, 4), (1_000_003, 7)):
        guesses = part_size_guesses(size, parts)
        assert guesses and len(guesses) <= 6
        assert all(-(-size // part) == parts for part in guesses)


def test_sync_checksum_finds_a_destination_changed_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    a, b, state = tmp_path / "a", tmp_path / "b", tmp_path / "state"
    (a / "x").mkdir(parents=True)
    (a / "x/1.dcm").write_bytes(b"one")
    (a / "2.dcm").write_bytes(b"two")
    state.mkdir()
    job = api.JobRequest(options={}, directory=str(state))
    asyncio.run(api.sync_async(str(a), str(b), job=job))
    changed = b / "x/1.dcm"
    before = changed.stat()
    changed.write_bytes(b"ONE")
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))

    found: list[Difference] = []
    asyncio.run(api.verify_async(str(a), str(b), on_difference=found.append))
    assert [(d.kind, d.rel) for d in found] == [("content", "x/1.dcm")]
    trusted = asyncio.run(api.sync_async(str(a), str(b), job=job))
    assert (trusted.updated, trusted.unchanged) == (0, 2), "the journal's fast path was not taken"
    checked = asyncio.run(api.sync_async(str(a), str(b), sync=SyncOptions(checksum=True), job=job))
    assert (checked.updated, checked.unchanged) == (1, 1)
    assert changed.read_bytes() == b"one"
    found.clear()
    asyncio.run(api.verify_async(str(a), str(b), on_difference=found.append))
    assert found == []


def test_bidirectional_checksum_turns_an_unseen_change_into_a_conflict(tmp_path: Path) -> None:
    a, b, state = tmp_path / "a", tmp_path / "b", tmp_path / "state"
    a.mkdir()
    b.mkdir()
    state.mkdir()
    (a / "scan.dcm").write_bytes(b"first")
    (a / "kept.dcm").write_bytes(b"kept")
    job = api.JobRequest(options={}, directory=str(state))
    both = SyncOptions(bidirectional=True)
    asyncio.run(api.sync_async(str(a), str(b), sync=both, job=job))
    changed = b / "scan.dcm"
    before = changed.stat()
    # A new file put in its place (as editors save), with the old modification time.
    (b / "scan.new").write_bytes(b"FIRST")
    os.replace(b / "scan.new", changed)
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))

    trusted = asyncio.run(api.sync_async(str(a), str(b), sync=both, job=job))
    assert (trusted.conflicts, trusted.unchanged) == (0, 2)
    checked = asyncio.run(
        api.sync_async(str(a), str(b), sync=SyncOptions(bidirectional=True, checksum=True), job=job)
    )
    assert (checked.conflicts, checked.unchanged) == (1, 1)
    # keep-both: one version keeps the name on both sides, the other is kept beside it; nothing lost.
    assert (a / "scan.dcm").read_bytes() == (b / "scan.dcm").read_bytes()
    kept = {p.read_bytes() for p in (*a.iterdir(), *b.iterdir()) if p.name.startswith("scan.conflict-")}
    assert kept | {(a / "scan.dcm").read_bytes()} == {b"first", b"FIRST"}
