"""The command line at its edges: typo'd URLs, unsafe names, decrypting downloads, bucket listings."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import pytest
from test_cli import cli_env, run_cli

from servers import AzureServer, GCSServer, S3Server


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


@pytest.mark.parametrize("scheme", ["s3", "gs", "azure"])
def test_list_without_a_bucket_lists_buckets(request: pytest.FixtureRequest, scheme: str) -> None:
    """`list s3://` lists the account's buckets, as `aws s3 ls` and `s5cmd ls` do."""
    server: S3Server | AzureServer | GCSServer
    if scheme == "s3":
        server = request.getfixturevalue("seaweedfs")
        create = server.create_bucket
    elif scheme == "gs":
        server = request.getfixturevalue("fake_gcs")
        create = server.create_bucket
    else:
        server = request.getfixturevalue("azurite")
        create = server.create_container
    names = sorted(f"lb-{uuid.uuid4().hex[:12]}" for _ in range(2))
    for name in names:
        create(name)
    env = cli_env(server.env())
    alias = {"gs": "gcs", "azure": "az"}.get(scheme, scheme)
    for url in (f"{scheme}://", f"{alias}://"):
        plain = run_cli("list", url, env=env).ok().stdout.splitlines()
        assert set(names) <= set(plain), plain
        assert plain == sorted(plain)
        records = run_cli("list", url, "--json", env=env).ok().json_lines()
        by_name = {record["bucket"]: record for record in records}
        assert set(names) <= set(by_name)
        if scheme != "azure":  # Azure's listing gives no creation time
            assert all(by_name[name]["created"] for name in names), records
        detailed = run_cli("list", url, "-l", env=env).ok().stdout.splitlines()
        assert any(line.endswith(f"  {names[0]}") for line in detailed), detailed
    # Inside-a-bucket options do not apply; other commands still need a bucket.
    run_cli("list", f"{scheme}://", "-r", env=env).fails(2).one_line()
    run_cli("download", f"{scheme}://", "out/", env=env).fails(2)


def test_list_buckets_with_wrong_credentials(seaweedfs: S3Server, azurite: AzureServer) -> None:
    env = cli_env(seaweedfs.env(), AWS_SECRET_ACCESS_KEY="wrong-" + uuid.uuid4().hex)
    run_cli("list", "s3://", env=env).fails(4).one_line()
    connection = azurite.env()["AZURE_STORAGE_CONNECTION_STRING"]
    wrong_key = "AccountKey=" + base64.b64encode(b"w" * 64).decode()
    wrong = ";".join(wrong_key if p.startswith("AccountKey=") else p for p in connection.split(";"))
    run_cli("list", "azure://", env=cli_env(AZURE_STORAGE_CONNECTION_STRING=wrong)).fails(4).one_line()


def test_list_buckets_is_not_for_local_or_memory_locations() -> None:
    env = cli_env()
    for url in ("memory://", "file://"):
        run_cli("list", url, env=env).fails(2).one_line()
