"""Benchmark `dicom-cloud sync` against `aws s3 sync` and `rclone sync` on many small objects.

    bench/setup && .venv/bin/python bench/sync.py [--files 100000] [--tools dicom-cloud,aws-cli,rclone]

One SeaweedFS server on loopback, one local tree of --files small files (0.5-2 KiB, 1,000 per
directory). Each tool syncs the same tree into its own prefix, in three steps run for every tool in
turn:

1. initial: the destination is empty (every file is created);
2. no-change: the same sync again (nothing to do: the cost of the diff alone);
3. change: 1% of the files rewritten (same size, new bytes) and 0.1% removed, then a sync with deletion.

dicom-cloud also runs the no-change step without its journal ("cold": contents compared through the
checksums in object metadata) to show what the journal saves. Each run is a child process with a clean
environment; wall time, CPU and peak RSS come from wait4() (bench/spawn.py). After every step the
destination is listed and checked against the tree (names and sizes). Results: bench/results/sync.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run as common  # noqa: E402

TOOLS = ("dicom-cloud", "aws-cli", "rclone")
STEPS = ("initial", "no-change", "no-change-cold", "change")


@dataclass
class Sample:
    step: str
    tool: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    maxrss_mib: float = 0.0
    error: str | None = None


def make_tree(root: Path, count: int, seed: int = 11) -> dict[str, int]:
    """``count`` files of 512-2048 random bytes, 1,000 per directory; returns name -> size."""
    marker = root.with_name(f"{root.name}.json")  # beside the tree, not in it
    if marker.exists():
        return json.loads(marker.read_text())
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(seed)
    sizes: dict[str, int] = {}
    for i in range(count):
        rel = f"d{i // 1000:04d}/f{i:06d}.dcm"
        data = rng.randbytes(rng.randint(512, 2048))
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        sizes[rel] = len(data)
    marker.write_text(json.dumps(sizes))
    return sizes


def mutate(root: Path, sizes: dict[str, int], seed: int = 12) -> dict[str, int]:
    """Rewrite 1% of the files with new bytes of the same size; remove 0.1%."""
    rng = random.Random(seed)
    names = sorted(sizes)
    for rel in rng.sample(names, max(1, len(names) // 100)):
        (root / rel).write_bytes(rng.randbytes(sizes[rel]))
    removed = rng.sample(names, max(1, len(names) // 1000))
    for rel in removed:
        (root / rel).unlink(missing_ok=True)
    root.with_name(f"{root.name}.json").unlink(missing_ok=True)  # no longer the generated tree
    return {rel: size for rel, size in sizes.items() if rel not in set(removed)}


def command(tool: str, step: str, tree: Path, srv: Any, prefix: str, home: Path) -> list[str]:
    url = f"s3://{common.BUCKET}/{prefix}"
    delete = step == "change"
    if tool == "dicom-cloud":
        argv = [str(common.VENV_BIN / "dicom-cloud"), "sync", str(tree), url, "-q", "--max-delete", "1%"]
        return [*argv, "--delete"] if delete else argv
    if tool == "aws-cli":
        argv = [str(common.VENV_BIN / "aws"), "--endpoint-url", srv.endpoint, "s3", "sync", str(tree), url]
        return [*argv, "--only-show-errors", *(["--delete"] if delete else [])]
    # rclone sync always deletes extraneous files; --checksum compares MD5s (S3 ETags), as we compare
    # checksums, rather than modification times stored in its own metadata.
    remote = f"bench:{common.BUCKET}/{prefix.rstrip('/')}"
    return ["rclone", "sync", str(tree), remote, "--checksum", "--transfers", "32", "--checkers", "32"]


def environment(tool: str, srv: Any, home: Path) -> dict[str, str]:
    env = common.tool_env(tool, srv, home)
    if tool == "aws-cli":
        # The same number of requests in flight as the others (aws-cli's default is 10).
        config = home / "aws-config"
        config.write_text("[default]\ns3 =\n  max_concurrent_requests = 32\n  max_queue_size = 10000\n")
        env["AWS_CONFIG_FILE"] = str(config)
    if tool == "dicom-cloud":
        env["DICOM_CLOUD_STATE_DIR"] = str(home / "state")
    return env


def check(store: Any, prefix: str, expected: dict[str, int]) -> str | None:
    got = {key[len(prefix) :]: size for key, size in common.list_prefix(store, prefix).items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])[:3]
        return f"destination differs: missing {missing}, extra {extra}, wrong size {wrong}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--data-dir", type=Path, default=BENCH / ".data")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    args = parser.parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    for tool in tools:
        problem = common.tool_problem(tool)
        if problem:
            print(f"sync: {tool}: {problem}", file=sys.stderr)
            return 2
    data_dir = args.data_dir.resolve()
    tree = data_dir / f"sync-tree-{args.files}"
    print(f"sync: generating {args.files} files under {tree} ...", file=sys.stderr, flush=True)
    expected = make_tree(tree, args.files)
    common.warm_page_cache(p for p in tree.rglob("*.dcm"))
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server_dir = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=data_dir))
    srv = common.start_server(server_dir)
    store = common.make_store(srv)
    homes = {tool: Path(tempfile.mkdtemp(prefix=f"home-{tool}-", dir=data_dir)) for tool in tools}
    samples: list[Sample] = []
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": common.machine(),
        "versions": common.versions(tools),
        "files": args.files,
        "bytes": sum(expected.values()),
    }
    try:
        for step in STEPS:
            if step == "change":
                expected = mutate(tree, expected)
            for tool in tools:
                if step == "no-change-cold" and tool != "dicom-cloud":
                    continue
                if step == "no-change-cold":
                    shutil.rmtree(homes[tool] / "state", ignore_errors=True)
                prefix = f"sync-{tool}/"
                argv = command(tool, step, tree, srv, prefix, homes[tool])
                sample = Sample(step, tool)
                common.touch_memory()
                started = time.monotonic()
                log = logs / f"sync-{tool}-{step}.log"
                record = common.run_child(
                    argv, environment(tool, srv, homes[tool]), log, common.RUN_TIMEOUT * 2
                )
                sample.wall_s = record.get("wall_s", time.monotonic() - started)
                sample.cpu_s = record.get("user_s", 0.0) + record.get("sys_s", 0.0)
                sample.maxrss_mib = record.get("maxrss_kib", 0) / 1024
                if record.get("error") or record.get("exit_code") != 0:
                    sample.error = f"{record.get('error') or 'exit ' + str(record.get('exit_code'))}"
                else:
                    sample.error = check(store, prefix, expected)
                samples.append(sample)
                print(
                    f"sync: {step:<15} {tool:<12} {sample.wall_s:8.1f} s  cpu {sample.cpu_s:7.1f} s  "
                    f"rss {sample.maxrss_mib:7.0f} MiB  {sample.error or 'ok'}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        srv.stop()
        shutil.rmtree(server_dir, ignore_errors=True)
        for home in homes.values():
            shutil.rmtree(home, ignore_errors=True)
    text = report(samples, meta)
    print("\n" + text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "sync.md").write_text(text)
    (args.results / "sync.json").write_text(
        json.dumps({**meta, "samples": [asdict(s) for s in samples]}, indent=1)
    )
    return 0 if all(s.error is None for s in samples) else 1


def report(samples: list[Sample], meta: dict[str, Any]) -> str:
    lines = [
        f"# sync benchmark: {meta['files']} files ({meta['bytes'] / 1e6:.0f} MB), {meta['date']}",
        "",
        f"Machine: {meta['machine']}. Versions: {meta['versions']}.",
        "",
        "| step | tool | wall s | CPU s | peak RSS MiB | vs dicom-cloud (time) | result |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    ours = {s.step: s for s in samples if s.tool == "dicom-cloud"}
    for s in samples:
        base = ours.get(s.step)
        ratio = f"{s.wall_s / base.wall_s:.2f}x" if base and base.wall_s and s.tool != "dicom-cloud" else ""
        lines.append(
            f"| {s.step} | {s.tool} | {s.wall_s:.1f} | {s.cpu_s:.1f} | {s.maxrss_mib:.0f} | {ratio} | "
            f"{s.error or 'ok'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
