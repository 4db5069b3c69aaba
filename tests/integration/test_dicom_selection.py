"""DICOM selections (--study, --series, --modality, --sop-class) that match nothing say so and exit 3,
through the real console script against SeaweedFS and a local directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_cli import _pydicom_file, cli_env, make_backend, run_cli


@pytest.mark.parametrize("source", ["s3", "local"])
def test_a_dicom_selection_matching_nothing_exits_3(
    request: pytest.FixtureRequest, tmp_path: Path, source: str
) -> None:
    backend = make_backend(request, source)
    env = cli_env(backend.env)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(_pydicom_file(name), src / name)
    (src / "README.txt").write_text("not DICOM")
    run_cli("upload", src, backend.url("d/"), "-r", "-q", env=env).ok()

    out = tmp_path / "none"
    nothing = run_cli("download", backend.url("d/"), out, "-r", "--study", "1.2.3.999", env=env)
    nothing.fails(3)
    assert "no object matched --study 1.2.3.999" in nothing.stderr, str(nothing)
    assert not out.exists() or not any(out.rglob("*"))
    both = run_cli(
        "download", backend.url("d/"), out, "-r", "--modality", "XA", "--series", "9.9", "--json", env=env
    )
    both.fails(3)
    assert "no object matched --modality XA --series 9.9" in both.stderr, str(both)

    one = tmp_path / "ct"
    run_cli("download", backend.url("d/"), one, "-r", "--modality", "CT", env=env).ok()
    assert [p.name for p in one.rglob("*") if p.is_file()] == ["CT_small.dcm"]
    # Matched, but already there and kept: that is not "nothing matched".
    run_cli("download", backend.url("d/"), one, "-r", "--modality", "CT", "--no-overwrite", env=env).ok()
