from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from dicom_cloud.cli.main import build_parser, command_named, main
from dicom_cloud.cli.options import parse_duration, parse_size, parse_tags
from dicom_cloud.errors import UsageError


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("8MiB", 8 * 2**20),
        ("64MB", 64 * 10**6),
        ("1048576", 1048576),
        ("16mib", 16 * 2**20),
        ("1.5GiB", int(1.5 * 2**30)),
        ("5 M", 5 * 10**6),
        ("2k", 2000),
        ("100B", 100),
        (" 3KiB ", 3 * 1024),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text, "--part-size") == value


@pytest.mark.parametrize("text", ["", "abc", "8XB", "-1", "8 MiBs", "5ib", "MiB", "1e6"])
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(UsageError, match="--part-size"):
        parse_size(text, "--part-size")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("30m", timedelta(minutes=30)),
        ("7d", timedelta(days=7)),
        ("3600", timedelta(hours=1)),
        ("12h", timedelta(hours=12)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        ("1H", timedelta(hours=1)),
    ],
)
def test_parse_duration(text: str, value: timedelta) -> None:
    assert parse_duration(text) == value


@pytest.mark.parametrize("text", ["", "1.5h", "abc", "10y", "-5m", "m"])
def test_parse_duration_bad(text: str) -> None:
    with pytest.raises(UsageError, match="--expires"):
        parse_duration(text)


def test_parse_tags() -> None:
    assert parse_tags(None) == {}
    assert parse_tags("") == {}
    assert parse_tags("Source=PACS1,Dataset=CT") == {"Source": "PACS1", "Dataset": "CT"}
    assert parse_tags(" a_b = x y ,e=") == {"a_b": "x y", "e": ""}
    assert parse_tags("k=v=w") == {"k": "v=w"}


@pytest.mark.parametrize(
    "text", ["novalue", "a=1,b", "=x", "1abc=x", "bad key=x", "k/x=1", "ké=1", "k=é", "Study-Id=1", "a.b=1"]
)
def test_parse_tags_bad(text: str) -> None:
    with pytest.raises(UsageError, match="--tags"):
        parse_tags(text)


def test_help_returns_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "upload" in out and "exit codes" in out.lower()


def test_missing_local_source_is_exit_3_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["upload", "/nonexistent", "memory://b/x"]) == 3
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert "/nonexistent" in captured.err


def test_bad_scheme_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.dcm").write_bytes(b"x")
    assert main(["upload", str(tmp_path / "a.dcm"), "ftp://bucket/x"]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "scheme" in captured.err


def test_bad_option_values_are_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.dcm").write_bytes(b"x")
    src = str(tmp_path / "a.dcm")
    assert main(["upload", src, "memory://b/x", "--part-size", "lots"]) == 2
    assert main(["upload", src, "memory://b/x", "--part-size", "1MiB"]) == 2  # below the S3 minimum
    assert main(["upload", src, "memory://b/x", "--tags", "novalue"]) == 2
    assert main(["upload", src]) == 2  # missing argument (click's usage error)
    assert main(["upload", src, "memory://b/x", "--no-such-option"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_upload_to_memory_succeeds(
    tmp_path: Path, mem_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.dcm").write_bytes(b"hello")
    assert main(["upload", str(tmp_path / "a.dcm"), f"memory://{mem_bucket}/dir/", "--quiet"]) == 0
    assert main(["list", f"memory://{mem_bucket}/dir/"]) == 0
    assert "a.dcm" in capsys.readouterr().out


def imported_by_parsing(argv: list[str], command: str | None, modules: set[str]) -> set[str]:
    """Which of ``modules`` (or of their packages) a fresh process has imported once the CLI's parser,
    built for ``command``, has parsed ``argv``."""
    code = (
        "import sys\n"
        "from dicom_cloud.cli.main import build_parser\n"
        f"build_parser({command!r}).parse_args({argv!r})\n"
        "print('\\n'.join(sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    return {m for m in modules if m in loaded or any(name.startswith(m + ".") for name in loaded)}


def test_start_up_loads_no_heavy_library() -> None:
    """A plain command must not pay for pydicom, numpy, SQLAlchemy or FastAPI: scripts run it in loops
    (0.1 s of start-up, measured, against 0.25 s with them)."""
    heavy = {"pydicom", "numpy", "sqlalchemy", "fastapi", "PIL", "uvicorn", "dask", "distributed"}
    argv = ["upload", "a", "s3://b/c", "-r", "--cluster", "local:2"]
    assert imported_by_parsing(argv, None, heavy) == set()


def test_a_transfer_imports_no_module_it_does_not_use() -> None:
    """Sync, verify, manifests, UID maps and the TOML reader are imported by the commands that use
    them: each module a start imports costs every command (docs/benchmarks.md, 2026-12-05)."""
    unused = {"sync", "treediff", "dicom.manifest", "dicom.uidmap"}
    argv = ["download", "s3://b/p/", "out/", "-r"]
    modules = {f"dicom_cloud.{name}" for name in unused} | {"tomllib"}
    assert imported_by_parsing(argv, "download", modules) == set()


@pytest.mark.parametrize(
    "argv",
    [
        ["download", "s3://b/p/", "out/", "-r", "--endpoint", "http://127.0.0.1:9000", "--quiet"],
        ["upload", "study/", "s3://b/p/", "-r", "--tags", "Source=PACS1", "--part-size", "8MiB"],
        ["sync", "a/", "s3://b/a/", "--delete", "--max-delete", "10"],
        ["token", "create", "--tenant", "t", "--scopes", "read", "--expires", "30d"],
        ["orthanc-config", "--local", "objects"],
    ],
)
def test_a_command_parses_the_same_with_only_its_own_options_built(argv: list[str]) -> None:
    """``main`` builds the options of the command being run only: what it parses is what the
    parser of every command parses."""
    lean = build_parser(command_named(argv)).parse_args(argv)
    full = build_parser().parse_args(argv)
    handlers = lean.__dict__.pop("handler"), full.__dict__.pop("handler")
    assert vars(lean) == vars(full)
    assert all(callable(handler) for handler in handlers)


def test_an_unknown_command_is_refused_with_the_list_of_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["uplod", "a", "s3://b/a"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'uplod'" in err and "'upload'" in err and "'orthanc-config'" in err
