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


def test_name_with_a_newline_is_an_unsafe_name(seaweedfs: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    """Used to fail with "unexpected error: ValueError"; object stores cannot hold such names faithfully."""
    env = cli_env(seaweedfs.env())
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "line\nfeed.dcm").write_bytes(b"one")
    (tree / "fine.dcm").write_bytes(b"two")
    single = run_cli("upload", tree / "line\nfeed.dcm", f"s3://{s3_bucket}/one/", env=env).fails(9)
    assert "unexpected" not in single.stderr and "ValueError" not in single.stderr, str(single)
    assert "control character" in single.stderr and "line\\nfeed.dcm" in single.stderr, str(single)
    # In a recursive run it fails alone; the rest is uploaded, exit 1.
    result = run_cli("upload", tree, f"s3://{s3_bucket}/tree/", "-r", "--no-journal", env=env)
    assert result.code == 1, str(result)
    assert "unexpected" not in result.stderr and "ValueError" not in result.stderr, str(result)
    assert "control character" in result.stderr, str(result)
    assert not [line for line in result.stderr.splitlines() if line.startswith("feed.dcm")], str(result)
    listing = run_cli("list", f"s3://{s3_bucket}/tree/", "--json", env=env).ok().json_lines()
    assert [row["key"] for row in listing] == ["tree/fine.dcm"]
    # A local destination keeps such names (the file system allows them).
    run_cli("upload", tree, tmp_path / "copy", "-r", "--no-journal", env=env).ok()
    assert (tmp_path / "copy" / "line\nfeed.dcm").read_bytes() == b"one"


def test_pydicom_warnings_only_at_verbose(tmp_path: Path) -> None:
    """pydicom's raw UserWarning lines used to print even with -q."""
    from pydicom.data import get_testdata_file

    source = Path(str(get_testdata_file("SC_rgb_jpeg.dcm")))  # pydicom warns about its VR
    env = cli_env()
    for flag in ("-q", None):
        args = ["upload", source, tmp_path / f"out{flag}/", "--layout", "uid", "--no-journal"]
        result = run_cli(*args, *([flag] if flag else []), env=env).ok()
        assert "Warning" not in result.stderr and "pydicom" not in result.stderr, str(result)
        if flag == "-q":
            assert result.stderr == "", str(result)
    verbose = run_cli(
        "upload", source, tmp_path / "outv/", "--layout", "uid", "--no-journal", "-v", env=env
    ).ok()
    assert f"{source}: pydicom: Expected explicit VR" in verbose.stderr, str(verbose)
    assert "UserWarning" not in verbose.stderr, str(verbose)
