"""With --json, an error that ends a command is also a JSON record on stdout (docs/cli.md, Output),
besides its one line on stderr; against SeaweedFS."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import Backend, cli_env, make_backend, run_cli


@pytest.fixture
def s3(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request, "s3")


def _error_record(lines: list[dict[str, object]]) -> dict[str, object]:
    assert lines, "no JSON record on stdout"
    assert [r["event"] for r in lines].count("error") == 1, lines
    assert lines[-1]["event"] == "error", lines
    return lines[-1]


def test_a_missing_bucket_is_a_json_error_record(s3: Backend, tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(b"x" * 10)
    env = cli_env(s3.env)
    for argv in (
        ["upload", str(tmp_path), "s3://no-such-bucket-here/p/", "-r", "--json"],
        ["list", "s3://no-such-bucket-here/", "--json"],
        ["sync", str(tmp_path), "s3://no-such-bucket-here/p/", "--json"],
    ):
        result = run_cli(*argv, env=env).fails(3)
        record = _error_record(result.json_lines())
        assert record["exit_code"] == 3 and record["error_type"] == "BucketNotFoundError", record
        assert isinstance(record["error"], str) and "no-such-bucket-here" in record["error"]
        assert f"dicom-cloud: error: {record['error']}" in result.stderr  # the same message


def test_refused_credentials_are_a_json_error_record(s3: Backend, tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(b"x" * 10)
    env = cli_env(s3.env, AWS_SECRET_ACCESS_KEY="not-the-secret")
    result = run_cli("upload", tmp_path, s3.url("p/"), "-r", "--json", env=env).fails(4)
    record = _error_record(result.json_lines())
    assert (record["error_type"], record["exit_code"]) == ("AuthenticationError", 4), record
    assert "not-the-secret" not in result.stdout + result.stderr


def test_a_missing_source_is_a_json_error_record_with_its_hint(s3: Backend, tmp_path: Path) -> None:
    result = run_cli("upload", tmp_path / "nothing", s3.url("p/"), "-r", "--json", env=cli_env(s3.env))
    record = _error_record(result.fails(3).json_lines())
    assert record["error_type"] == "NotFoundError", record
    result = run_cli("verify", tmp_path / "nothing", s3.url("p/"), "--json", env=cli_env(s3.env))
    assert _error_record(result.json_lines())["exit_code"] == result.code != 0


def test_without_json_stdout_stays_empty(s3: Backend, tmp_path: Path) -> None:
    result = run_cli("list", "s3://no-such-bucket-here/", env=cli_env(s3.env)).fails(3)
    assert result.stdout == ""
