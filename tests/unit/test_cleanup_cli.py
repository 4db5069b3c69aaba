"""The cleanup command's parsing and local-directory path, in process."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from dicom_cloud.cli.main import main
from dicom_cloud.localio import PARTIAL_SUFFIX, PartialFile


def test_bad_age_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cleanup", str(tmp_path), "--older-than", "soon"]) == 2
    assert "--older-than" in capsys.readouterr().err


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cleanup", "--help"]) == 0
    out = capsys.readouterr().out
    assert "dicom-cloud cleanup s3://archive/ --dry-run" in out and "exit codes" in out


def test_json_dry_run_of_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    partial = tmp_path / f".x.dcm.00000000{PARTIAL_SUFFIX}"
    partial.write_bytes(b"abc")
    past = time.time() - 7200
    os.utime(partial, (past, past))
    assert main(["cleanup", str(tmp_path), "--older-than", "1h", "--dry-run", "--json"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["event"] == "would_remove" and record["kind"] == "partial-file"
    assert record["size"] == 3 and record["url"] == str(partial)
    assert partial.exists()


def test_memory_store_has_nothing_to_clean(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cleanup", "memory://mem-cleanup/", "--older-than", "0"]) == 0
    assert "Removed 0 leftovers" in capsys.readouterr().err


def test_a_partial_file_being_written_is_not_a_leftover(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    writing = PartialFile(tmp_path / "big.dcm")  # a download in progress, however long it has run
    stale = tmp_path / f".old.dcm.00000001{PARTIAL_SUFFIX}"
    stale.write_bytes(b"abc")
    past = time.time() - 7200
    for path in (writing.path, stale):
        os.utime(path, (past, past))
    assert main(["cleanup", str(tmp_path), "--older-than", "1h", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["url"] for r in records] == [str(stale)]
    assert writing.path.exists() and not stale.exists()
    writing.release()
