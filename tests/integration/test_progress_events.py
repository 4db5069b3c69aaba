"""The --json event stream of a download killed with ``kill -9`` and run again, from SeaweedFS: totals
are counted before anything starts, objects finished by the killed run are reported apart, and what
is done never exceeds the total."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from test_cli import CLI, Result, assert_same_tree, cli_env, make_backend, run_cli
from test_sync import _done_count


def _replay(records: list[dict[str, Any]]) -> dict[str, int]:
    """Follow the stream as a renderer does, checking that done never exceeds the total."""
    totals: dict[str, Any] = {}
    seen = done = already = 0
    for record in records:
        kind = record["event"]
        if kind == "counted":
            totals = record
        elif kind == "started":
            seen += 1
        elif kind == "skipped" and record.get("already_done"):
            already += 1
        elif kind in ("completed", "skipped", "failed"):
            done += 1
        if kind in ("started", "completed", "skipped"):
            assert totals, f"{kind} before any count"
            total = max(totals["files"] - totals["already_done"], seen)
            assert done <= total, record
    return {
        "done": done,
        "already": already,
        "files": totals["files"],
        "already_counted": totals["already_done"],
    }


def test_resumed_download_reports_earlier_work_apart_and_never_overshoots(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    backend = make_backend(request, "s3")
    state = tmp_path / "state"
    env: Mapping[str, str] = cli_env(backend.env, DICOM_CLOUD_STATE_DIR=str(state))
    rng = random.Random(3)
    files = {f"p{i // 250}/f{i:04d}.dcm": rng.randbytes(rng.randint(100, 4000)) for i in range(1500)}
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    run_cli("upload", src, backend.url("t/"), "-r", "-q", "--no-journal", env=env, timeout=300).ok()

    out = tmp_path / "out"
    argv = ["download", backend.url("t/"), str(out), "-r", "-j", "2", "--json"]
    proc = subprocess.Popen([str(CLI), *argv], env=dict(env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while _done_count(env) < 300 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the download ended before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    recorded = _done_count(env)
    assert 0 < recorded < len(files)

    again: Result = run_cli(*argv, env=env, timeout=300).ok()
    records = again.json_lines()
    kinds = [r["event"] for r in records]
    assert kinds.index("counted") < kinds.index("skipped")  # a total before anything is reported done
    final = [r for r in records if r["event"] == "counted" and r["complete"]]
    assert len(final) == 1 and final[0]["files"] == len(files)
    assert final[0]["bytes"] == sum(len(data) for data in files.values())
    replayed = _replay(records)
    summary = records[-1]
    # Files written before the kill but not yet recorded are found identical: skipped, not already done.
    identical = summary["identical"]
    assert replayed["already"] == replayed["already_counted"] == summary["skipped"] - identical >= recorded
    assert replayed["done"] == summary["files"] + identical == len(files) - replayed["already"]
    assert_same_tree(out, files)
