"""`--cluster local:2` beside one process, on one local SeaweedFS server.

    .venv/bin/python bench/cluster.py [--instances 400] [--small 20000] [--workers 2]

Scenarios, each run once per mode, the modes interleaved (single, cluster; then cluster, single):

- study: upload of bench/generate.py's study (--instances CT files of ~512 KB);
- small: upload of --small files of 512-2048 bytes (1,000 per directory);
- one: upload of one small file with --recursive (the fixed cost of a run: on a cluster, starting
  the workers).

Every run uploads into a fresh prefix, as a child process with a clean environment (bench/spawn.py:
wall time, and CPU time of the command and of its worker processes, from wait4()); SeaweedFS's CPU
seconds are read from /proc around each run; the load average is printed before and after. Each
upload is listed and checked (names and sizes) before it counts.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run as common  # noqa: E402


def small_tree(root: Path, count: int, seed: int = 21) -> dict[str, int]:
    if root.exists() and sum(1 for _ in root.rglob("*.dcm")) == count:
        return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*.dcm")}
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(seed)
    sizes = {}
    for i in range(count):
        rel = f"d{i // 1000:03d}/f{i:06d}.dcm"
        size = rng.randint(512, 2048)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
        sizes[rel] = size
    return sizes


def server_cpu(srv: Any) -> float:
    """CPU seconds of the SeaweedFS process group so far."""
    import psutil

    proc = psutil.Process(srv._proc.popen.pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--parallel", type=int, default=0, help="--parallel of each worker (default: the CLI's)"
    )
    parser.add_argument("--scenarios", default="one,study,small")
    parser.add_argument("--data-dir", type=Path, default=BENCH / ".data")
    args = parser.parse_args()
    data = args.data_dir.resolve()
    manifest = common.ensure(data / f"inputs-{args.instances}", args.instances, 1 << 20)
    study = data / f"inputs-{args.instances}" / "study"
    trees = {
        "study": (study, {e.name.removeprefix("study/"): e.size for e in manifest.study}),
        "small": (
            data / f"cluster-small-{args.small}",
            small_tree(data / f"cluster-small-{args.small}", args.small),
        ),
        "one": (data / "cluster-one", {"a.dcm": 1000}),
    }
    (data / "cluster-one").mkdir(parents=True, exist_ok=True)
    (data / "cluster-one" / "a.dcm").write_bytes(os.urandom(1000))
    for _, (tree, _) in trees.items():
        common.warm_page_cache(p for p in tree.rglob("*") if p.is_file())
    server_dir = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=data))
    srv = common.start_server(server_dir)
    store = common.make_store(srv)
    home = Path(tempfile.mkdtemp(prefix="home-cluster-", dir=data))
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        order = [
            ("one", "single"), ("one", "cluster"),
            ("study", "single"), ("study", "cluster"),
            ("small", "cluster"), ("small", "single"),
        ]  # fmt: skip
        order = [(scenario, mode) for scenario, mode in order if scenario in args.scenarios.split(",")]
        for n, (scenario, mode) in enumerate(order):
            tree, expected = trees[scenario]
            prefix = f"run-{n}-{scenario}-{mode}/"
            argv = [
                str(common.VENV_BIN / "dicom-cloud"),
                "upload",
                str(tree),
                f"s3://{common.BUCKET}/{prefix}",
            ]
            argv += ["-r", "-q", "--no-journal"]
            if mode == "cluster":
                argv += ["--cluster", f"local:{args.workers}"]
                if args.parallel:
                    argv += ["--parallel", str(args.parallel)]
            env = common.tool_env("dicom-cloud", srv, home)
            before_load, before_cpu = loadavg(), server_cpu(srv)
            os.sync()
            record = common.run_child(argv, env, logs / f"cluster-{n}.log", common.RUN_TIMEOUT)
            server = server_cpu(srv) - before_cpu
            got = {k[len(prefix) :]: v for k, v in common.list_prefix(store, prefix).items()}
            error = record.get("error") or (
                None if record.get("exit_code") == 0 else f"exit {record.get('exit_code')}"
            )
            if error is None and got != expected:
                error = f"destination differs ({len(got)} of {len(expected)} objects)"
            row = {
                "scenario": scenario,
                "mode": mode,
                "objects": len(expected),
                "wall_s": record.get("wall_s", 0.0),
                "cpu_s": record.get("user_s", 0.0) + record.get("sys_s", 0.0),
                "server_cpu_s": server,
                "load": f"{before_load} -> {loadavg()}",
                "error": error,
            }
            rows.append(row)
            print(
                f"{scenario:<6} {mode:<8} {row['objects']:>6} objects  wall {row['wall_s']:7.1f} s  "
                f"cpu {row['cpu_s']:6.1f} s  server cpu {server:6.1f} s  load {row['load']}  {error or 'ok'}",
                flush=True,
            )
    finally:
        srv.stop()
        shutil.rmtree(server_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    by = {(r["scenario"], r["mode"]): r for r in rows}
    print()
    for scenario in sorted({scenario for scenario, _ in order}):
        single, cluster = by[(scenario, "single")], by[(scenario, "cluster")]
        objects = single["objects"]
        print(
            f"{scenario}: cluster/single wall {cluster['wall_s'] / single['wall_s']:.2f}, "
            f"cpu {cluster['cpu_s'] / max(single['cpu_s'], 1e-9):.2f}; per object: wall "
            f"{(cluster['wall_s'] - single['wall_s']) / objects * 1000:+.2f} ms, cpu "
            f"{(cluster['cpu_s'] - single['cpu_s']) / objects * 1000:+.2f} ms"
        )
    return 0 if all(r["error"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
