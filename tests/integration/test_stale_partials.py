"""Partial files of a download killed with ``kill -9``: the next run that writes those files removes
them, and the tree ends exact (SeaweedFS and a local directory as sources, the real console script).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from test_cli import CLI, assert_same_tree, cli_env, make_backend, run_cli

from dicom_cloud.localio import PARTIAL_SUFFIX

MiB = 1024 * 1024


def _tree(root: Path, files: Mapping[str, bytes]) -> dict[str, bytes]:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return dict(files)


def _partials(root: Path) -> list[Path]:
    found: list[Path] = []
    for directory, _, names in os.walk(root):
        found += [Path(directory) / n for n in names if n.endswith(PARTIAL_SUFFIX)]
    return found


@pytest.mark.parametrize("source", ["s3", "local"])
def test_rerun_after_kill_9_mid_download_leaves_no_partial_file(
    request: pytest.FixtureRequest, tmp_path: Path, source: str
) -> None:
    backend = make_backend(request, source)
    env = cli_env(backend.env, DICOM_CLOUD_STATE_DIR=str(tmp_path / "state"))
    rng = random.Random(11)
    files = {f"s{i // 100}/i{i:04d}.dcm": rng.randbytes(rng.randint(500, 20000)) for i in range(600)}
    files["a-large/big.dcm"] = rng.randbytes(200 * MiB)
    local_src = tmp_path / "src"
    _tree(local_src, files)
    if source == "local":
        src_url = str(local_src) + "/"
    else:
        run_cli("upload", local_src, backend.url("k/"), "-r", "-q", "--no-journal", env=env, timeout=300).ok()
        src_url = backend.url("k/")
    out = tmp_path / "out"
    argv = ["download", src_url, str(out), "-r", "-j", "8", "--multipart-threshold", "16MiB", "-q"]
    proc = subprocess.Popen([str(CLI), *argv], env=dict(env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    big_partial = out / "a-large" / ".big.dcm"
    deadline = time.monotonic() + 120
    try:
        # Killed once the large file's partial holds some of its bytes (it is written in parts).
        while proc.poll() is None and time.monotonic() < deadline:
            held = [p for p in _partials(out) if p.name.startswith(big_partial.name)]
            if held and any(p.stat().st_blocks * 512 >= 8 * MiB for p in held if p.exists()):
                break
            time.sleep(0.002)
        assert proc.poll() is None, "the download ended before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    left = _partials(out)
    assert any(p.name.startswith(big_partial.name) for p in left), left  # what the issue is about

    run_cli(*argv, env=env, timeout=300).ok()
    assert _partials(out) == []
    assert_same_tree(out, files)
