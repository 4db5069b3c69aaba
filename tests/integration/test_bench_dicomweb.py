"""bench/dicomweb.py end to end at a tiny scale: ``dicom-cloud serve`` and a real Orthanc with its DICOMweb
plugin, the same data into both, retrievals verified, QIDO counts compared, the report written; and
bench/service_ab.py, two trees of the service side by side. Figures at this scale mean nothing; the
tests keep the benchmarks runnable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
_saved_path = list(sys.path)
sys.path.insert(0, str(BENCH))
try:
    import dicomweb
    import service_ab
    from service import STOW_HEADERS, multipart
finally:
    sys.path[:] = _saved_path  # bench/ holds top-level modules (orthanc.py, sync.py) that must not shadow

pytestmark = pytest.mark.integration


def test_split_multipart_reads_what_multipart_writes() -> None:
    parts = [b"first\r\n--not-a-boundary", b"", b"\x00" * 300]
    body = multipart(parts)
    content_type = STOW_HEADERS["Content-Type"]
    assert dicomweb.split_multipart(content_type, body) == parts


def test_query_values_keep_dicom_wildcards_and_escape_the_rest() -> None:
    text = dicomweb.query_string({"PatientName": "Bench^0*", "StudyDate": "20200301-20200310", "X": "a b&c"})
    assert text == "?PatientName=Bench^0*&StudyDate=20200301-20200310&X=a%20b%26c"
    assert dicomweb.query_string({}) == ""


def test_one_small_run_measures_both_servers_and_writes_the_report(tmp_path: Path) -> None:
    results = tmp_path / "results"
    scale = ["--instances", "4", "--batch", "2", "--clients", "2", "--repeat", "2", "--qido-instances", "500"]
    code = dicomweb.main(
        [*scale, "--queries", "2", "--data-dir", str(tmp_path / "data"), "--results", str(results)]
    )
    assert code == 0
    report = json.loads((results / "dicomweb.json").read_text())
    assert set(report["results"]) == {"dicom-cloud", "orthanc"}
    assert report["qido_counts"]["instances_by_patient_id"] == 50
    assert report["qido_counts"]["studies_by_name_wildcard"] == 10
    for figures in report["results"].values():
        assert figures["stow_instances_per_s"] > 0 and figures["wado_instances_per_s"] > 0
        assert set(figures["qido_ms"]) == set(report["qido_counts"])
    text = (results / "dicomweb.md").read_text()
    assert "| STOW-RS study | instances/s |" in text and "Orthanc 1.10" in text
    # Creating files costs many times more on some file systems: the report names the data's.
    assert report["data_file_system"] not in ("", "unknown")
    assert f"Both servers' data on {report['data_file_system']}." in text
    assert str(tmp_path) not in text
    assert not (tmp_path / "data" / "dicomweb-run").exists()


def test_two_trees_of_the_service_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """This checkout's src as its own base: both servers store, answer and pass the comparison with
    the files, and the table has every measure."""
    src = BENCH.parent / "src"
    scale = ["--rounds", "2", "--instances", "4", "--batch", "2", "--clients", "2", "--stow"]
    assert service_ab.main(["--base-src", str(src), *scale, "--data-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    for measure in ("STOW-RS study", "whole study, parsed", "whole study, raw"):
        assert f"| {measure} | " in table
    assert not (tmp_path / "service-ab-run").exists()
    with pytest.raises(SystemExit) as refused:  # a directory without the package: a usage error
        service_ab.main(["--base-src", str(tmp_path)])
    assert refused.value.code == 2
