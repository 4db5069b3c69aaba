"""The command line at its edges: typo'd URLs, unsafe names, decrypting downloads, bucket listings."""

from __future__ import annotations

from pathlib import Path

from test_cli import cli_env, run_cli

from servers import S3Server


def test_scheme_with_the_colon_missing_writes_nothing(
    seaweedfs: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """`upload f s3//bucket/x/` used to write ./s3/bucket/x/f and exit 0."""
    env = cli_env(seaweedfs.env())
    source = tmp_path / "f.dcm"
    source.write_bytes(b"not really DICOM")
    work = tmp_path / "work"
    work.mkdir()
    for args in (
        ["upload", source, f"s3//{s3_bucket}/x/"],
        ["download", f"s3//{s3_bucket}/x/f.dcm", "out/"],
        ["copy", f"gs//{s3_bucket}/x/", f"s3://{s3_bucket}/y/"],
    ):
        result = run_cli(*args, env=env, cwd=work).fails(2).one_line()
        assert "did you mean" in result.stderr and "./" in result.stderr, str(result)
    assert list(work.iterdir()) == []
    # The local path is still reachable, spelled as one.
    run_cli("upload", source, f"./s3//{s3_bucket}/x/", env=env, cwd=work).ok()
    assert (work / "s3" / s3_bucket / "x" / "f.dcm").read_bytes() == source.read_bytes()
