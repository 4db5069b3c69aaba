"""bench/dimse.py end to end at a tiny scale: ``dicom-cloud serve --dicom-port`` and a real Orthanc,
C-STORE by storescu, both fills (STOW-RS and storescu), C-FIND counts compared, the report written.
Figures at this scale mean nothing; the test keeps the benchmark runnable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
_saved_path = list(sys.path)
sys.path.insert(0, str(BENCH))
try:
    import dimse
finally:
    sys.path[:] = _saved_path  # bench/ holds top-level modules that must not shadow others

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("fill", ["stow", "cstore"])
def test_one_small_run_fills_both_and_writes_the_report(tmp_path: Path, fill: str) -> None:
    results = tmp_path / "results"
    code = dimse.main(
        [
            "--instances", "4", "--find-instances", "500", "--queries", "2", "--fill", fill,
            "--fill-batch", "50", "--fill-clients", "2",
            "--data-dir", str(tmp_path / "data"), "--results", str(results),
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((results / "dimse.json").read_text())
    assert set(report["results"]) == {"dicom-cloud", "orthanc"}
    # 500 small instances: 10 studies, Bench^000000 to Bench^000009, one dated in March.
    assert report["find_counts"]["dicom-cloud"] == report["find_counts"]["orthanc"]
    assert report["find_counts"]["orthanc"] == {"patient_id": 1, "date_month": 1, "name_wildcard": 10}
    for figures in report["results"].values():
        assert figures["fill"] > 0 and figures["store_1"] > 0
    assert report["server_cpu_seconds"]["dicom-cloud"]["fill"] > 0
    text = (results / "dimse.md").read_text()
    assert ("STOW-RS" if fill == "stow" else "C-STORE") in text
    assert str(tmp_path) not in text
