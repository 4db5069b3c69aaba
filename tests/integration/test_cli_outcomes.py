"""What the CLI reports is what happened: every object accounted for, nothing replaced unseen.

The real console script against SeaweedFS and local directories: the bucket's objects are counted
and read back, and compared with the summary, the JSON summary record and the manifest rows.

- DICOM layouts map several of pydicom's test files (different images) to one SOP Instance UID:
  they are conflicts, never one silent winner; identical bytes are skipped and counted.
- Plain uploads over other bytes say "replaced".
- A local file that cannot be read fails alone (exit 1, listed) instead of stopping the run;
  files that change while they are read are never written as good.
- Content-Type: application/dicom only for DICOM.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest
from test_cli import CLI, Result, cli_env, run_cli

from servers import S3Server

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tree_hashes(root: Path) -> Counter[str]:
    return Counter(_sha(p.read_bytes()) for p in root.rglob("*") if p.is_file())


def _manifest(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _summary(result: Result) -> dict[str, Any]:
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return next(r for r in records if r.get("event") == "summary")


def _listed(url: str, env: dict[str, str]) -> list[dict[str, Any]]:
    return [
        r for r in run_cli("list", url, "-r", "--json", env=env).ok().json_lines() if r["type"] == "object"
    ]


def _source_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("layout", ["hashed", "uid", "{SOPInstanceUID}.dcm"])
def test_dicom_layout_never_replaces_other_bytes_silently(
    seaweedfs: S3Server, s3_bucket: str, tmp_path: Path, layout: str
) -> None:
    """pydicom's test files under a DICOM layout: several different images share one SOP Instance
    UID. Formerly "Uploaded 154 files" and 154 rows "uploaded" for 124 objects in the bucket."""
    env = cli_env(seaweedfs.env())
    url = f"s3://{s3_bucket}/h/"
    manifest = tmp_path / "m.jsonl"
    args = ["upload", TEST_FILES, url, "-r", "--layout", layout, "--validate", "--no-journal"]
    first = run_cli(*args, "--manifest", manifest, "--json", env=env)
    assert first.code == 1, str(first)  # the conflicts are listed and fail: nothing is lost
    rows = _manifest(manifest)
    sources = _source_files(TEST_FILES)
    assert len(rows) == len(sources)  # every file accounted for, once
    by_status = Counter(r["status"] for r in rows)
    listed = _listed(url, env)
    summary = _summary(first)
    # What the summary and the manifest say was written is what the bucket holds.
    written = [r for r in rows if r["status"] in ("uploaded", "replaced")]
    assert summary["files"] == len(written) == len(listed)
    assert {r["key"] for r in written} == {r["url"] for r in listed}
    assert by_status["replaced"] == 0  # nothing was in the bucket before
    assert by_status["conflict"] > 0 and summary["conflicts"] == by_status["conflict"]
    assert summary["failed"] == by_status["conflict"] and summary["identical"] >= 0
    identical = [r for r in rows if r["status"] == "skipped" and r["reason"].startswith("identical")]
    assert summary["identical"] == len(identical)
    failures = {f["src"] for f in summary["failures"]}
    assert failures == {r["source"] for r in rows if r["status"] == "conflict"}
    # Each conflict names a SOP Instance UID some written object also has, with other bytes.
    written_uids = Counter(r["sop_instance_uid"] for r in written)
    for row in rows:
        if row["status"] == "conflict":
            assert written_uids[row["sop_instance_uid"]] == 1, row
    # The bytes in the bucket are those of the rows that say "uploaded".
    back = tmp_path / "back"
    run_cli("download", url, back, "-r", env=env).ok()
    assert _tree_hashes(back) == Counter(_sha(Path(r["source"]).read_bytes()) for r in written)

    # The same run again: what is there is identical, the conflicts are the same ones.
    again = run_cli(*args, "--manifest", manifest, "--json", env=env)
    assert again.code == 1, str(again)
    assert _summary(again)["files"] == 0 and _summary(again)["conflicts"] == by_status["conflict"]
    assert Counter(r["status"] for r in _manifest(manifest))["skipped"] == len(written) + len(identical)

    # keep-both: every DICOM file's bytes end up in the bucket, the conflicting ones beside.
    kept = run_cli(*args, "--on-conflict", "keep-both", "--manifest", manifest, "--json", env=env).ok()
    assert _summary(kept)["kept_both"] > 0 and _summary(kept)["conflicts"] == 0
    everything = tmp_path / "everything"
    run_cli("download", url, everything, "-r", env=env).ok()
    dicom = {_sha(Path(r["source"]).read_bytes()) for r in rows if r["status"] != "rejected"}
    assert dicom <= set(_tree_hashes(everything))
    assert len(_listed(url, env)) == len(set(dicom))
    # And the default once more: the bytes kept beside count as there.
    run_cli(*args, "--manifest", manifest, env=env).ok()


def test_conflict_policies_on_one_file(seaweedfs: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    """One file at a time against an object of the same SOP Instance UID with other bytes."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(TEST_FILES / "MR_small.dcm", src / "a.dcm")
    shutil.copy(TEST_FILES / "MR_truncated.dcm", src / "b.dcm")  # same UIDs, other bytes
    env = cli_env(seaweedfs.env())
    url = f"s3://{s3_bucket}/c/"
    layout = ["--layout", "uid"]
    run_cli("upload", src / "a.dcm", url, *layout, env=env).ok()
    assert "1 identical (skipped)" in run_cli("upload", src / "a.dcm", url, *layout, env=env).ok().stderr
    failed = run_cli("upload", src / "b.dcm", url, *layout, env=env).fails(8)  # the default: fail
    assert "already holds other bytes" in failed.stderr and "--on-conflict" in failed.stderr
    left = run_cli("upload", src / "b.dcm", url, *layout, "--on-conflict", "skip", env=env).ok()
    assert "1 conflict" in left.stderr
    replaced = run_cli("upload", src / "b.dcm", url, *layout, "--on-conflict", "overwrite", env=env).ok()
    assert "Uploaded 1 file" in replaced.stderr and "1 replaced" in replaced.stderr
    back = tmp_path / "back"
    run_cli("download", url, back, "-r", env=env).ok()
    assert list(_tree_hashes(back)) == [_sha((src / "b.dcm").read_bytes())]


def test_two_sources_one_name_in_one_run(seaweedfs: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    """Copies of one instance and different instances under one UID, uploaded together in parallel."""
    src = tmp_path / "src"
    src.mkdir()
    for index in range(8):
        shutil.copy(TEST_FILES / "MR_small.dcm", src / f"same{index}.dcm")
    shutil.copy(TEST_FILES / "MR_truncated.dcm", src / "other.dcm")
    env = cli_env(seaweedfs.env())
    url = f"s3://{s3_bucket}/one/"
    manifest = tmp_path / "m.jsonl"
    result = run_cli("upload", src, url, "-r", "--layout", "uid", "--manifest", manifest, "--json", env=env)
    assert result.code == 1, str(result)
    summary = _summary(result)
    statuses = Counter(r["status"] for r in _manifest(manifest))
    assert len(_listed(url, env)) == summary["files"] == 1
    # Whichever came first was written; the same bytes again are identical, the others conflict.
    assert (
        statuses["uploaded"] == 1 and statuses["uploaded"] + statuses["skipped"] + statuses["conflict"] == 9
    )
    assert summary["identical"] == statuses["skipped"] and summary["conflicts"] == statuses["conflict"] >= 1


def test_plain_upload_over_other_bytes_says_replaced(
    seaweedfs: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("first")
    (src / "same.txt").write_text("same")
    env = cli_env(seaweedfs.env())
    url = f"s3://{s3_bucket}/plain/"
    run_cli("upload", src, url, "-r", "--no-journal", env=env).ok()
    (src / "notes.txt").write_text("second version")
    manifest = tmp_path / "m.jsonl"
    result = run_cli("upload", src, url, "-r", "--no-journal", "--manifest", manifest, env=env).ok()
    assert "Uploaded 1 file " in result.stderr and "1 replaced" in result.stderr, str(result)
    assert "1 identical (skipped)" in result.stderr
    rows = {Path(r["source"]).name: r for r in _manifest(manifest)}
    assert rows["notes.txt"]["status"] == "replaced" and rows["same.txt"]["status"] == "skipped"
    assert rows["same.txt"]["reason"].startswith("identical")
    summary = _summary(run_cli("upload", src / "notes.txt", url, "--json", env=env).ok())
    assert (summary["files"], summary["replaced"], summary["identical"]) == (0, 0, 1)  # the same again
    summary = _summary(run_cli("upload", src / "notes.txt", url, "--json", "--tags", "k=v", env=env).ok())
    assert (summary["files"], summary["replaced"]) == (1, 0)  # the same bytes, new metadata: written


def test_content_type_is_dicom_only_for_dicom(seaweedfs: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(TEST_FILES / "CT_small.dcm", src / "ct.dcm")  # Part 10
    shutil.copy(TEST_FILES / "CT_small.dcm", src / "ct-no-extension")
    (src / "README.txt").write_text("read me")
    (src / "blob").write_bytes(os.urandom(300))
    env = cli_env(seaweedfs.env())
    run_cli("upload", src, f"s3://{s3_bucket}/ct/", "-r", env=env).ok()

    def content_type(key: str) -> str:
        status, headers = seaweedfs.s3_head(f"/{s3_bucket}/{urllib.parse.quote(key)}")
        assert status == 200, key
        return headers["content-type"]

    assert content_type("ct/ct.dcm") == "application/dicom"
    assert content_type("ct/ct-no-extension") == "application/dicom"
    assert content_type("ct/README.txt") == "text/plain"
    # (SeaweedFS guesses a type from the extension where it is told application/octet-stream, so
    # "blob.dcm" is checked on the engine: tests/unit/test_transfer_outcomes.py.)
    assert content_type("ct/blob") == "application/octet-stream"
    # Ciphertext is not DICOM, whatever it holds.
    key = tmp_path / "master.key"
    key.write_bytes(base64.b64encode(os.urandom(32)))
    run_cli("upload", src / "ct-no-extension", f"s3://{s3_bucket}/enc/", "--encrypt", "client-side",
            "--master-key", f"7:{key}", env=env).ok()  # fmt: skip
    assert content_type("enc/ct-no-extension") == "application/octet-stream"


# ---------------------------------------------------------------------------------------------------------
# Local files that cannot be read, vanish or change


def _without_root_override(*args: str | Path, env: dict[str, str]) -> Result:
    """Run the CLI as root without the capabilities that let root read any file: a file at mode
    000 is then unreadable, as it is for any other user."""
    argv = [str(a) for a in args]
    # Dropping capabilities needs them: other users cannot read a file at mode 000 anyway.
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    proc = subprocess.run(
        [*prefix, str(CLI), *argv],
        env=env,
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    return Result(argv, proc.returncode, proc.stdout.decode(), proc.stderr.decode(), 0.0)


def _sixty_files(root: Path) -> None:
    root.mkdir()
    for index in range(60):
        (root / f"f{index:02d}.bin").write_bytes(os.urandom(1000 + index))


@pytest.mark.parametrize("destination", ["local", "s3"])
def test_unreadable_file_fails_alone(
    seaweedfs: S3Server, s3_bucket: str, tmp_path: Path, destination: str
) -> None:
    """Formerly: stopped after 31 of 60 files with exit 5 and no summary."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop root's file-access override")
    src = tmp_path / "src"
    _sixty_files(src)
    (src / "f05.bin").chmod(0)
    env = cli_env(seaweedfs.env())
    url = f"s3://{s3_bucket}/sixty/" if destination == "s3" else str(tmp_path / "out") + "/"
    result = _without_root_override("upload", src, url, "-r", "--json", env=env)
    assert result.code == 1, str(result)
    summary = _summary(result)
    assert summary["files"] == 59 and summary["failed"] == 1
    assert [f["src"] for f in summary["failures"]] == [str(src / "f05.bin")]
    assert "permission denied" in summary["failures"][0]["error"]
    # The same once more: what is there is identical, the unreadable file fails again, named.
    plain = _without_root_override("upload", src, url, "-r", "--no-journal", env=env)
    assert plain.code == 1 and "59 identical (skipped), 1 failed" in plain.stderr, str(plain)
    assert f"{src / 'f05.bin'}: permission denied" in plain.stderr
    if destination == "s3":
        assert len(_listed(url, env)) == 59
    else:
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
            p.name for p in src.iterdir() if p.name != "f05.bin"
        )
