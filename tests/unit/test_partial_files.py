"""Partial files: their names, the lock that marks them in use, and the removal of stale ones."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dicom_cloud import localio
from dicom_cloud.backends.local import LocalStore
from dicom_cloud.localio import (
    PARTIAL_SUFFIX,
    PartialFile,
    StalePartials,
    final_name_of,
    is_partial_name,
    partial_path,
    remove_if_stale,
)


def test_partial_names_are_recognised_and_name_their_file(tmp_path: Path) -> None:
    made = partial_path(tmp_path / "scan.1.dcm")
    assert is_partial_name(made.name) and final_name_of(made.name) == "scan.1.dcm"
    assert final_name_of(f".a.b.0123abcd{PARTIAL_SUFFIX}") == "a.b"
    for other in (f"x.0123abcd{PARTIAL_SUFFIX}", f".x.123{PARTIAL_SUFFIX}", ".x.0123abcd", "x.dcm"):
        assert not is_partial_name(other), other


def test_a_partial_file_being_written_is_never_taken_for_stale(tmp_path: Path) -> None:
    final = tmp_path / "a.dcm"
    held = PartialFile(final)
    held.path.write_bytes(b"in progress")
    assert not remove_if_stale(held.path)
    assert held.path.exists()
    held.release()  # what the kernel does when the writing process dies
    assert remove_if_stale(held.path)
    assert not held.path.exists()


def test_writing_a_file_removes_its_stale_partials_only(tmp_path: Path) -> None:
    stale = [tmp_path / f".a.dcm.{n}{PARTIAL_SUFFIX}" for n in ("0000000a", "0000000b")]
    other = tmp_path / f".b.dcm.0000000c{PARTIAL_SUFFIX}"
    for path in (*stale, other):
        path.write_bytes(b"left by a killed run")
    in_use = PartialFile(tmp_path / "a.dcm")  # another transfer writing a.dcm right now
    store = LocalStore(Path("/"))
    asyncio.run(store.put(str(tmp_path / "a.dcm").lstrip("/"), b"new"))
    assert (tmp_path / "a.dcm").read_bytes() == b"new"
    assert not any(p.exists() for p in stale)
    assert other.exists() and in_use.path.exists()
    in_use.release()


def test_ranged_writer_discards_stale_partials_before_writing(tmp_path: Path) -> None:
    stale = tmp_path / "d" / f".big.dcm.00000001{PARTIAL_SUFFIX}"
    stale.parent.mkdir()
    stale.write_bytes(b"\0" * 4096)
    writer = LocalStore(Path("/")).open_writer(str(tmp_path / "d" / "big.dcm").lstrip("/"), 3)
    assert not stale.exists()
    writer.write_at(0, b"abc")
    writer.commit()
    assert sorted(p.name for p in stale.parent.iterdir()) == ["big.dcm"]


def test_directories_are_read_once_and_remembered_within_bounds(tmp_path: Path) -> None:
    stale = StalePartials(directories=2)
    for index in range(4):
        directory = tmp_path / str(index)
        directory.mkdir()
        (directory / f".f.{index:08x}{PARTIAL_SUFFIX}").write_bytes(b"x")
        assert stale.remove_for(directory / "f") == 1
        assert stale.remove_for(directory / "f") == 0
    assert len(stale._found) == 2


def test_a_directory_made_for_a_write_is_not_read_for_stale_partials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It holds nothing of an earlier write; a directory that was there is read as before."""
    store = LocalStore(Path("/"))
    read: list[Path] = []
    real = localio._partials_by_final

    def counted(directory: Path) -> dict[str, list[str]]:
        read.append(directory)
        return real(directory)

    monkeypatch.setattr(localio, "_partials_by_final", counted)
    asyncio.run(store.put(str(tmp_path / "new" / "a.dcm").lstrip("/"), b"x"))
    assert read == [] and (tmp_path / "new" / "a.dcm").read_bytes() == b"x"
    asyncio.run(store.put(str(tmp_path / "new" / "b.dcm").lstrip("/"), b"y"))
    assert read == [tmp_path / "new"]


def test_a_partial_name_already_taken_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter([7, 7, 8])
    monkeypatch.setattr(localio._partial_names, "getrandbits", lambda bits: next(draws))
    first = PartialFile(tmp_path / "a.dcm")
    second = PartialFile(tmp_path / "a.dcm")  # 7 is taken: 8
    assert first.path.name.endswith(f".00000007{PARTIAL_SUFFIX}")
    assert second.path.name.endswith(f".00000008{PARTIAL_SUFFIX}")
    first.release()
    second.release()
