"""The core package alone: a fresh virtualenv with ``pip install dicom-cloud`` (no extras) from the
package index, pinned by constraints/test.txt. The CLI moves files with it; a command that needs an
extra exits 15 with one line naming the ``pip install`` to run.

Installs the project's real dependencies (pip's wheel cache makes a repeated run take seconds),
from a copy of the sources so that the build leaves nothing in the working tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Distributions only extras bring: none may be in the core install.
EXTRA_ONLY = {
    "fastapi", "uvicorn", "sqlalchemy", "alembic", "prometheus-client", "pyjwt", "orjson", "pillow",
    "numpy", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "psycopg", "procrastinate", "pyarrow",
    "botocore", "crc32c",
}  # fmt: skip


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bin/ directory of a virtualenv holding dicom-cloud without extras."""
    base = tmp_path_factory.mktemp("core-install")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run(
        [*pip, "-c", str(ROOT / "constraints" / "test.txt"), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    yield venv / "bin"


def _env(tmp_path: Path) -> dict[str, str]:
    """No PYTHONPATH (the installed copy runs, not the sources) and no provider settings."""
    drop = ("PYTHONPATH", "AWS_", "AZURE_", "GOOGLE_", "DICOM_CLOUD_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["DICOM_CLOUD_STATE_DIR"] = str(tmp_path / "state")
    return env


def _run(bin_dir: Path, *args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [str(bin_dir / "dicom-cloud"), *map(str, args)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def _fails_naming(result: subprocess.CompletedProcess[str], extra: str) -> None:
    assert result.returncode == 15, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("dicom-cloud: error:") and f"'{extra}' extra" in lines[0], result.stderr
    assert lines[1:] == [f"hint: pip install 'dicom-cloud[{extra}]'"], result.stderr


def test_the_core_installs_no_extra(core: Path) -> None:
    listed = subprocess.run(
        [str(core / "python"), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert "dicom-cloud" in names and "google-crc32c" in names and "obstore" in names
    assert names & EXTRA_ONLY == set()
    probe = (
        "from dicom_cloud import checksum\n"
        "print(checksum.IMPLEMENTATION, checksum.crc32c_hex(memoryview(b'123456789')))"
    )
    crc = subprocess.run(
        [str(core / "python"), "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert crc.stdout.split() == ["google-crc32c", "e3069283"]  # the CRC32C check value


def test_core_cli_moves_files(core: Path, tmp_path: Path) -> None:
    env = _env(tmp_path)
    study = tmp_path / "study"
    (study / "series").mkdir(parents=True)
    (study / "series" / "one.dcm").write_bytes(b"first" * 1000)
    (study / "two.dcm").write_bytes(b"second" * 1000)
    bucket = tmp_path / "bucket"
    up = _run(core, "upload", study, f"file://{bucket}/archive/", "--recursive", env=env)
    assert up.returncode == 0 and "Uploaded 2 files" in up.stderr, up.stdout + up.stderr  # the summary
    listing = _run(core, "list", f"{bucket}/archive/", "--recursive", env=env)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split() == ["series/one.dcm", "two.dcm"]
    back = tmp_path / "back"
    down = _run(core, "download", f"{bucket}/archive/", back, "--recursive", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert (back / "series" / "one.dcm").read_bytes() == b"first" * 1000
    assert (back / "two.dcm").read_bytes() == b"second" * 1000


def test_commands_needing_an_extra_name_it(core: Path, tmp_path: Path) -> None:
    env = _env(tmp_path)
    _fails_naming(_run(core, "serve", "--data-dir", tmp_path / "service", env=env), "service")
    token = ["token", "create", "--tenant", "t", "--scopes", "read", "--name", "n"]
    _fails_naming(_run(core, *token, "--data-dir", tmp_path / "service", env=env), "service")
    _fails_naming(_run(core, "worker", "--data-dir", tmp_path / "service", env=env), "service")
    (tmp_path / "one.dcm").write_bytes(b"x")
    manifest = ["--manifest", tmp_path / "m.parquet"]
    _fails_naming(
        _run(core, "upload", tmp_path / "one.dcm", tmp_path / "out/", *manifest, env=env), "parquet"
    )
    config = tmp_path / "aws-config"
    config.write_text("[profile work]\nrole_arn = arn:aws:iam::123456789012:role/r\nsource_profile = base\n")
    aws = {**env, "AWS_PROFILE": "work", "AWS_CONFIG_FILE": str(config)}
    _fails_naming(_run(core, "list", "s3://bucket/", env=aws), "aws")
