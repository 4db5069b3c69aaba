"""The upload manifest: three formats round-trip, atomic commit, flat memory, no patient data."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import tracemalloc
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from dicom_cloud.dicom import manifest as m
from dicom_cloud.dicom.header import DicomIdentity
from dicom_cloud.dicom.manifest import FIELDS, ManifestRow, ManifestWriter
from dicom_cloud.errors import MissingExtraError, UsageError

HAVE_PYARROW = importlib.util.find_spec("pyarrow") is not None

IDENTITY = DicomIdentity(
    sop_instance_uid="1.2.3.4",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    study_instance_uid="1.2.3",
    series_instance_uid="1.2.3.1",
    transfer_syntax_uid="1.2.840.10008.1.2.1",
    modality="CT",
    patient_id="PAT-SECRET-42",
    accession_number="ACC-SECRET-7",
    study_date="20240102",
)


def rows() -> list[ManifestRow]:
    return [
        ManifestRow.from_identity(
            IDENTITY, source="/data/a b/1.dcm", key="s3://bkt/x/1.dcm", size=1234,
            crc32c="0a1b2c3d", status="uploaded",
        ),
        ManifestRow.from_identity(
            IDENTITY, source="/data/患者,\"q\"\n.dcm", key="s3://bkt/x/2.dcm", size=0,
            crc32c=None, status="skipped", reason="exists with the same checksum",
        ),
        ManifestRow.from_identity(
            None, source="https://h/x.bin", key="", size=7, crc32c=None,
            status="rejected", reason="not DICOM (no DICM marker)",
        ),
    ]  # fmt: skip


def read_back(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            assert tuple(reader.fieldnames or ()) == FIELDS
            out: list[dict[str, Any]] = []
            for r in reader:
                d: dict[str, Any] = {k: (v if v != "" else None) for k, v in r.items()}
                d["size"] = int(d["size"])
                d["reason"] = d["reason"] or ""
                out.append(d)
            return out
    import pyarrow.parquet as pq  # type: ignore[import-not-found]

    table = pq.read_table(path)
    assert tuple(table.column_names) == FIELDS
    return list(table.to_pylist())


def expected(row: ManifestRow, fmt: str) -> dict[str, Any]:
    d = asdict(row)
    if fmt == "csv":  # CSV cannot tell None from ""
        d = {k: (None if v == "" else v) for k, v in d.items()}
        d["reason"] = d["reason"] or ""
    return d


FORMATS = [
    "jsonl",
    "csv",
    pytest.param("parquet", marks=pytest.mark.skipif(not HAVE_PYARROW, reason="pyarrow is not installed")),
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"manifest.{fmt}"
    with ManifestWriter.open(path) as w:
        for row in rows():
            w.write(row)
        assert not path.exists()  # nothing under the final name until closed
        assert w.partial_path.exists()
    assert path.exists() and not w.partial_path.exists()
    assert w.rows == 3
    assert read_back(path) == [expected(r, fmt) for r in rows()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_patient_data_written(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"m.{fmt}"
    with ManifestWriter.open(path) as w:
        w.write(rows()[0])
    raw = path.read_bytes()
    assert b"SECRET" not in raw and b"20240102" not in raw
    assert not {"patient_id", "accession_number", "study_date"} & set(FIELDS)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_interrupted_run_leaves_only_partial(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"manifest.{fmt}"
    with pytest.raises(KeyboardInterrupt), ManifestWriter.open(path) as w:
        w.write(rows()[0])
        raise KeyboardInterrupt
    assert not path.exists()
    partial = tmp_path / f"manifest.{fmt}.partial"
    assert partial.exists()
    text = partial.read_text(encoding="utf-8")
    assert "s3://bkt/x/1.dcm" in text  # kept, closed, for inspection


def test_rerun_replaces_old_manifest(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("old\n")
    (tmp_path / "m.jsonl.partial").write_text("stale\n")
    with ManifestWriter.open(path) as w:
        w.write(rows()[2])
    assert len(read_back(path)) == 1
    assert not (tmp_path / "m.jsonl.partial").exists()


def test_close_twice_and_write_after_close(tmp_path: Path) -> None:
    w = ManifestWriter.open(tmp_path / "m.csv")
    w.close()
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write(rows()[0])
    assert read_back(tmp_path / "m.csv") == []


@pytest.mark.parametrize("name", ["m.json", "m.txt", "manifest", "m.jsonl.gz"])
def test_unknown_extension(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError, match="manifest format") as info:
        ManifestWriter.open(tmp_path / name)
    assert info.value.hint and ".jsonl" in info.value.hint
    assert list(tmp_path.iterdir()) == []


def test_extension_case_insensitive(tmp_path: Path) -> None:
    with ManifestWriter.open(tmp_path / "M.JSONL") as w:
        w.write(rows()[0])
    assert (tmp_path / "M.JSONL").exists()


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if pyarrow were not installed.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingExtraError) as info:
        ManifestWriter.open(tmp_path / "m.parquet")
    assert info.value.exit_code == 15
    assert "pip install 'dicom-cloud[parquet]'" in (info.value.hint or "")
    assert list(tmp_path.iterdir()) == []


def test_bad_status() -> None:
    with pytest.raises(ValueError, match="status"):
        ManifestRow.from_identity(None, source="s", key="k", size=1, crc32c=None, status="done")  # type: ignore[arg-type]


def test_parquet_batch_size() -> None:
    assert m.PARQUET_BATCH_ROWS == 10_000


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_100k_rows_flat_memory(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"big.{fmt}"
    template = rows()[0]
    tracemalloc.start()
    try:
        with ManifestWriter.open(path) as w:
            for i in range(100_000):
                w.write(
                    ManifestRow.from_identity(
                        IDENTITY, source=f"/data/{i}.dcm", key=f"s3://bkt/{i}.dcm", size=i,
                        crc32c=template.crc32c, status="uploaded",
                    )
                )  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, peak
    with path.open(encoding="utf-8") as f:
        assert sum(1 for _ in f) == 100_000 + (fmt == "csv")


@pytest.mark.skipif(not HAVE_PYARROW, reason="pyarrow is not installed")
def test_parquet_abort_keeps_readable_partial(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    with pytest.raises(RuntimeError), ManifestWriter.open(path) as w:
        for row in rows():
            w.write(row)
        raise RuntimeError("upload failed")
    assert not path.exists()
    partial = tmp_path / "m.parquet.partial"
    assert read_back(partial.rename(tmp_path / "kept.parquet")) == [expected(r, "parquet") for r in rows()]


@pytest.mark.parametrize("status", ["uploaded", "replaced", "skipped", "conflict", "rejected", "failed"])
def test_every_outcome_is_a_status(tmp_path: Path, status: str) -> None:
    path = tmp_path / "m.jsonl"
    with ManifestWriter.open(path) as writer:
        writer.write(
            ManifestRow.from_identity(IDENTITY, source="s", key="k", size=1, crc32c=None, status=status)  # type: ignore[arg-type]
        )
    assert read_back(path)[0]["status"] == status
