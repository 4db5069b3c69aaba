from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicom_cloud.errors import UsageError
from dicom_cloud.url import StorageURL, account_scheme, parse_url


@pytest.mark.parametrize(
    ("text", "scheme"),
    [
        ("s3://bucket/a/b.dcm", "s3"),
        ("s3a://bucket/a/b.dcm", "s3"),
        ("S3://bucket/a/b.dcm", "s3"),
        ("gs://bucket/a/b.dcm", "gs"),
        ("gcs://bucket/a/b.dcm", "gs"),
        ("azure://bucket/a/b.dcm", "azure"),
        ("az://bucket/a/b.dcm", "azure"),
        ("memory://bucket/a/b.dcm", "memory"),
    ],
)
def test_remote_schemes_and_aliases(text: str, scheme: str) -> None:
    url = parse_url(text)
    assert url == StorageURL(scheme=scheme, bucket="bucket", key="a/b.dcm")  # type: ignore[arg-type]
    assert not url.is_local
    assert not url.names_directory
    assert str(url) == f"{scheme}://bucket/a/b.dcm"


def test_trailing_slash_means_inside() -> None:
    assert parse_url("s3://bucket/prefix/").names_directory
    assert parse_url("s3://bucket/prefix/").key == "prefix/"
    assert not parse_url("s3://bucket/prefix").names_directory


@pytest.mark.parametrize("text", ["s3://bucket", "s3://bucket/", "az://container/", "gs://bucket"])
def test_bucket_only_urls_name_a_directory(text: str) -> None:
    url = parse_url(text)
    assert url.key == ""
    assert url.names_directory


def test_file_urls() -> None:
    assert parse_url("file:///abs/path.dcm") == StorageURL("file", "", "/abs/path.dcm")
    assert parse_url("file://localhost/abs/path.dcm") == StorageURL("file", "", "/abs/path.dcm")
    assert parse_url("file:///abs/with%20space/") == StorageURL("file", "", "/abs/with space/")
    url = parse_url("file:///abs/dir/")
    assert url.is_local and url.names_directory
    assert url.key == "/abs/dir/"
    with pytest.raises(UsageError):
        parse_url("file://relative/path")


def test_plain_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = parse_url("study/a.dcm")
    assert rel == StorageURL("file", "", str(tmp_path / "study" / "a.dcm"))
    assert not rel.names_directory
    rel_dir = parse_url("study/")
    assert rel_dir.key == str(tmp_path / "study") + "/"
    assert rel_dir.names_directory
    assert parse_url("/abs/x.dcm") == StorageURL("file", "", "/abs/x.dcm")
    assert parse_url("/abs/dir/").key == "/abs/dir/"
    assert parse_url("/abs/./dir/../x").key == "/abs/x"
    assert str(parse_url("/abs/x.dcm")) == "/abs/x.dcm"


def test_home_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_url("~/scans/a.dcm").key == str(tmp_path / "scans" / "a.dcm")
    assert parse_url("~").key == str(tmp_path)
    assert not parse_url("~").names_directory
    assert parse_url("~/").key == str(tmp_path) + "/"
    assert parse_url("~/").names_directory


@pytest.mark.parametrize("text", ["ftp://host/x", "http://bucket/x", "s4://bucket/x", "://bucket/x"])
def test_bad_schemes(text: str) -> None:
    with pytest.raises(UsageError, match="scheme"):
        parse_url(text)


@pytest.mark.parametrize("text", ["s3://", "s3:///key", "gs:///", "memory:///x", "az://"])
def test_empty_bucket(text: str) -> None:
    with pytest.raises(UsageError, match="bucket"):
        parse_url(text)


@pytest.mark.parametrize(
    "text",
    [
        "gs://UpperCase/x",
        "az://Container/x",
        "s3://a/x",  # one character
        "s3://bad!name/x",
        "gs://with space/x",
        f"s3://{'b' * 256}/x",
    ],
)
def test_invalid_bucket_names(text: str) -> None:
    with pytest.raises(UsageError, match="not a valid bucket"):
        parse_url(text)


def test_legacy_upper_case_s3_bucket_is_left_to_the_server() -> None:
    assert parse_url("s3://Legacy.Bucket/x").bucket == "Legacy.Bucket"


def test_memory_bucket_names_are_free() -> None:
    assert parse_url("memory://A/x").bucket == "A"


@pytest.mark.parametrize("text", ["", "s3://bucket/a\x00b", "local\x00path", "file:///a\x00"])
def test_empty_and_nul_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_url(text)


def test_os_sep_trailing_is_directory() -> None:
    assert parse_url("/abs/dir" + os.sep).names_directory


@pytest.mark.parametrize(
    ("text", "meant"),
    [
        ("s3//bucket/x/", "s3://bucket/x/"),
        ("S3//bucket/x/f.dcm", "S3://bucket/x/f.dcm"),
        ("gs//bucket/x", "gs://bucket/x"),
        ("gcs//bucket", "gcs://bucket"),
        ("az//container/x", "az://container/x"),
        ("azure//container/", "azure://container/"),
        ("file///tmp/x", "file:///tmp/x"),
        ("memory//name/x", "memory://name/x"),
        ("s3a//bucket/x", "s3a://bucket/x"),
    ],
)
def test_scheme_with_the_colon_missing_is_refused(text: str, meant: str) -> None:
    """'s3//bucket/x/' would otherwise become the local directory ./s3/bucket/x/."""
    with pytest.raises(UsageError) as refused:
        parse_url(text)
    assert f"did you mean {meant}?" in str(refused.value)
    assert refused.value.hint is not None and f"./{text}" in refused.value.hint


@pytest.mark.parametrize("text", ["s3:/bucket/x", "gs:bucket"])
def test_scheme_with_a_slash_missing_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="slash missing"):
        parse_url(text)


@pytest.mark.parametrize("text", ["./s3//bucket/x/", "s3/bucket/x", "s3x//bucket", "data//s3", "/s3//bucket"])
def test_local_paths_that_only_resemble_a_scheme_are_kept(text: str) -> None:
    assert parse_url(text).is_local


@pytest.mark.parametrize(
    ("text", "scheme"),
    [
        ("s3://", "s3"),
        ("S3://", "s3"),
        ("gs://", "gs"),
        ("gcs:///", "gs"),
        ("az://", "azure"),
        ("azure://", "azure"),
    ],
)
def test_account_urls_name_a_scheme_alone(text: str, scheme: str) -> None:
    assert account_scheme(text) == scheme


@pytest.mark.parametrize(
    "text", ["s3://bucket", "s3://bucket/", "file://", "memory://", "s3:/", "bucket", "ftp://"]
)
def test_other_urls_are_not_account_urls(text: str) -> None:
    assert account_scheme(text) is None
