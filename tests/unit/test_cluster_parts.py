"""The cluster's client side without a cluster: --cluster values, the partitioner (key ranges,
evenness, flat memory over a long listing), the results' way back, and the refusals."""

from __future__ import annotations

import asyncio
import itertools
import sys
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dicom_cloud.cli.main import main
from dicom_cloud.cluster.partition import Partition, partitions
from dicom_cloud.cluster.portable import PortableError, PortableEvent, PortableSummary
from dicom_cloud.cluster.spec import parse_cluster
from dicom_cloud.engine.model import TransferEvent, TransferItem, TransferSummary
from dicom_cloud.errors import ConflictError, DicomFormatError, MissingExtraError, NetworkError, UsageError


async def fake_listing(count: int, size: int = 1000) -> AsyncIterator[TransferItem]:
    """``count`` items in key order, made as they are asked for (a lister that holds nothing)."""
    for n in range(count):
        key = f"src/{n:09d}.dcm"
        yield TransferItem(key, "dst/" + key[4:], size, key[4:], f"etag:{n}")


async def collect(count: int, **limits: int) -> list[Partition]:
    return [part async for part in partitions(fake_listing(count), **limits)]


def test_cluster_values() -> None:
    assert parse_cluster("local:4").local_workers == 4
    assert parse_cluster("tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    assert not parse_cluster("tcp://scheduler:8786").is_local
    for bad in ("local:0", "local:x", "local:", "10.0.0.5:8786", "http://h:8786", "tcp://h", "tcp://h:port"):
        with pytest.raises(UsageError):
            parse_cluster(bad)


def test_partitions_are_consecutive_key_ranges_covering_the_listing() -> None:
    parts = asyncio.run(collect(10_250, max_items=500))
    assert [p.index for p in parts] == list(range(21))
    assert [len(p.items) for p in parts] == [500] * 20 + [250]
    keys = [item.src_key for p in parts for item in p.items]
    assert keys == [f"src/{n:09d}.dcm" for n in range(10_250)]  # each once, in order
    for before, after in itertools.pairwise(parts):
        assert before.last_key < after.first_key  # disjoint ranges


def test_partitions_are_cut_by_bytes_too() -> None:
    # 10 objects of 1000 bytes, at most 2500 bytes a partition: 2 objects each.
    parts = asyncio.run(collect(10, max_items=500, max_bytes=2500))
    assert [len(p.items) for p in parts] == [2] * 5
    # An object larger than the limit still travels, alone.
    parts = asyncio.run(collect(3, max_items=500, max_bytes=10))
    assert [len(p.items) for p in parts] == [1, 1, 1]


def test_partitioner_memory_stays_flat_over_a_long_listing() -> None:
    """The client holds one partition being filled, whatever the length of the listing (the
    10-million-key run is bench/partition_sim.py; docs/benchmarks.md)."""

    async def drain(count: int) -> int:
        seen = 0
        async for part in partitions(fake_listing(count), max_items=500):
            seen += len(part.items)
        return seen

    peaks = []
    for count in (20_000, 200_000):
        tracemalloc.start()
        assert asyncio.run(drain(count)) == count
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # Ten times the keys, not ten times the memory (one partition of 500 items is ~0.2 MB).
    assert peaks[1] < 1.5 * peaks[0], peaks
    assert peaks[1] < 2 * 1024 * 1024, peaks


def test_errors_come_back_as_their_own_class() -> None:
    conflict = ConflictError("s3://b/k holds other bytes", hint="choose --on-conflict")
    back = PortableError.of(conflict).restore()
    assert type(back) is ConflictError and back.exit_code == 8
    assert str(back) == "s3://b/k holds other bytes" and back.hint == "choose --on-conflict"
    rejected = PortableError.of(DicomFormatError("not-dicom", detail="no preamble")).restore()
    assert isinstance(rejected, DicomFormatError) and rejected.reason == "not-dicom"
    assert str(rejected) == "not-dicom (no preamble)"


def test_summaries_add_up() -> None:
    one = TransferSummary(files=3, bytes=300, skipped=1, identical=1, lowest_concurrency=16)
    one.failed.append(("s3://b/x", NetworkError("timed out")))
    two = TransferSummary(files=2, bytes=20, resumed=4, skipped=4, lowest_concurrency=32)
    total = TransferSummary()
    for part in (one, two):
        PortableSummary.of(part).add_to(total)
    assert (total.files, total.bytes, total.skipped, total.identical, total.resumed) == (5, 320, 5, 1, 4)
    assert total.lowest_concurrency == 16
    assert [(url, type(error)) for url, error in total.failed] == [("s3://b/x", NetworkError)]


def test_events_come_back() -> None:
    event = TransferEvent("failed", "s3://a/k", "s3://b/k", 10, error=NetworkError("reset"))
    back = PortableEvent.of(event).restore()
    assert (back.kind, back.src, back.dst, back.size) == ("failed", "s3://a/k", "s3://b/k", 10)
    assert isinstance(back.error, NetworkError)


def test_cluster_needs_recursive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["copy", str(tmp_path), str(tmp_path / "out"), "--cluster", "local:2"])
    assert code == 2
    assert "--cluster runs a recursive transfer" in capsys.readouterr().err


def test_cluster_refuses_a_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["copy", str(tmp_path), str(tmp_path / "out"), "-r", "--cluster", "local:2"]
    assert main([*argv, "--manifest", str(tmp_path / "m.jsonl")]) == 2
    assert "--manifest is not available with --cluster" in capsys.readouterr().err


def test_missing_cluster_extra_names_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A None entry in sys.modules makes the import fail as if distributed were not installed.
    monkeypatch.setitem(sys.modules, "distributed", None)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_bytes(b"a")
    argv = [
        "copy",
        str(tmp_path / "src"),
        str(tmp_path / "out"),
        "-r",
        "--cluster",
        "local:2",
        "--no-journal",
    ]
    code = main(argv)
    assert code == MissingExtraError.exit_code == 15
    assert "pip install 'dicom-cloud[cluster]'" in capsys.readouterr().err
