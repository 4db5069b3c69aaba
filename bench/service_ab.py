"""Two trees of the DICOMweb service side by side, answering in alternation: an A/B of a change.

    .venv/bin/python bench/service_ab.py --base-src ../other-checkout/src [--rounds 30] [--stow]

Both are ``dicom-cloud serve`` with their own embedded storage (local objects, SQLite): this
checkout's, and one run from ``--base-src`` (a ``src`` directory put first on ``PYTHONPATH``). The
study of ``bench/generate.py`` is stored in both, then measured in rounds, the order of the two
servers alternating every round:

- the whole study as one multipart/related answer, read by ``bench/dicomweb.py``'s parsing client
  (the parts cut out as they stream in, as a viewer does) and compared with the files (length and
  CRC-32 of every part);
- the same answer read without parsing (its bytes counted): the servers without the client's work;
- with ``--stow``, the study's STOW-RS (deleted first), ``--clients`` requests at once, in rounds
  of their own before the reads.

Each figure is the median of the rounds: wall time, and the server's CPU time read from
``/proc/PID/task/*/schedstat`` in nanoseconds (a retrieval takes under a tenth of a CPU-second,
a few clock ticks of ``/proc/PID/stat``; threads that end during a measurement are not counted).
On a VM whose speed drifts by a tenth within minutes, two servers side by side taking turns held
still better than runs one after the other; still, this tree against itself gave 0.94-1.08x
(docs/benchmarks.md, 2026-12-05): repeat a comparison before believing a small difference.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pydicom

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import generate  # noqa: E402
from dicomweb import (  # noqa: E402
    MULTIPART_DICOM,
    BenchError,
    Server,
    descendants,
    start_ours,
    stow,
    wado_streamed,
)
from run import file_system, machine  # noqa: E402
from service import multipart  # noqa: E402

THIS, BASE = "this tree", "base"


@dataclass
class Samples:
    """(wall seconds, server CPU seconds) per round, per measure."""

    by_measure: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def add(self, measure: str, seconds: float, cpu: float) -> None:
        self.by_measure.setdefault(measure, []).append((seconds, cpu))

    def medians(self, measure: str) -> tuple[float, float]:
        pairs = self.by_measure[measure]
        return statistics.median(s for s, _ in pairs), statistics.median(c for _, c in pairs)


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and the live processes below it (the workers), every thread, from
    schedstat (nanoseconds)."""
    total = 0
    for member in [pid, *descendants(pid)]:
        try:
            tasks = list(Path(f"/proc/{member}/task").iterdir())
        except OSError:
            continue  # ended meanwhile
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


def start(name: str, workdir: Path, clients: int, pythonpath: str | None) -> Server:
    env = {"PYTHONPATH": pythonpath} if pythonpath else None
    return start_ours(workdir / name.replace(" ", "-"), clients, None, name=name, env=env)


def fingerprints(contents: list[bytes]) -> Counter[tuple[int, int]]:
    """Length and CRC-32 of each content: a study's parts compared with its files in some tens of
    milliseconds (parsing every instance would take longer than the measurements)."""
    return Counter((len(content), zlib.crc32(content)) for content in contents)


def stow_all(pool: ThreadPoolExecutor, server: Server, batches: list[bytes]) -> None:
    """The study's STOW-RS requests, as many at once as the pool has threads."""
    list(pool.map(partial(stow, server), batches))


def raw_read(server: Server, path: str) -> int:
    """The answer's length, read without parsing it."""
    with server.http.stream("GET", f"{server.root}{path}", headers={"Accept": MULTIPART_DICOM}) as answer:
        if answer.status_code != 200:
            raise BenchError(f"{server.name}: WADO-RS {path} answered {answer.status_code}")
        return sum(len(chunk) for chunk in answer.iter_raw())


def measured(server: Server, samples: Samples, measure: str, work: Callable[[], Any]) -> Any:
    cpu, begun = cpu_seconds(server.pid), time.perf_counter()
    result = work()
    samples.add(measure, time.perf_counter() - begun, cpu_seconds(server.pid) - cpu)
    return result


def render(results: dict[str, Samples], base_src: Path, args: argparse.Namespace) -> str:
    m = machine()
    label = base_src.parent.name if base_src.name == "src" else base_src.name  # the other tree's name
    lines = [
        f"# The service, this tree beside {label} ({args.rounds} alternating rounds, medians)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; data on {file_system(args.data_dir)}. "
        f"Study: {args.instances} instances. Speed ratio above 1: this tree is faster.",
        "",
        "| measure | this tree s | base s | speed ratio | this tree CPU s | base CPU s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for measure in results[THIS].by_measure:
        (ours, our_cpu), (theirs, their_cpu) = results[THIS].medians(measure), results[BASE].medians(measure)
        figures = [
            f"{ours:.4f}",
            f"{theirs:.4f}",
            f"{theirs / ours:.2f}x",
            f"{our_cpu:.4f}",
            f"{their_cpu:.4f}",
        ]
        lines.append(f"| {measure} | " + " | ".join(figures) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-src", type=Path, required=True, help="the src directory of the other tree")
    p.add_argument("--rounds", type=int, default=30, help="rounds, the servers alternating (default 30)")
    p.add_argument("--instances", type=int, default=400, help="CT instances of the study (~512 KB each)")
    p.add_argument("--batch", type=int, default=10, help="instances per STOW-RS request")
    p.add_argument("--clients", type=int, default=4, help="concurrent STOW-RS requests")
    p.add_argument("--stow", action="store_true", help="measure the study's STOW-RS too")
    p.add_argument("--data-dir", type=Path, default=BENCH / ".data", help="inputs and server data")
    args = p.parse_args(argv)
    if not (args.base_src / "dicom_cloud" / "__init__.py").is_file():
        p.error(f"--base-src {args.base_src}: no dicom_cloud package there (give a tree's src directory)")
    if min(args.rounds, args.instances, args.batch, args.clients) < 1:
        p.error("counts must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base_src = args.base_src.resolve()
    inputs = args.data_dir / "inputs-dicomweb"  # the study dicomweb.py makes, shared with it
    manifest = generate.ensure(inputs, instances=args.instances, large_size=1)
    bodies = [(inputs / e.name).read_bytes() for e in manifest.study]
    expected = fingerprints(bodies)
    study = str(pydicom.dcmread(io.BytesIO(bodies[0])).StudyInstanceUID)
    batches = [multipart(bodies[i : i + args.batch]) for i in range(0, len(bodies), args.batch)]
    work = args.data_dir / "service-ab-run"
    shutil.rmtree(work, ignore_errors=True)
    servers = [start(THIS, work, args.clients, None)]
    try:
        servers.append(start(BASE, work, args.clients, str(base_src)))
        results = {server.name: Samples() for server in servers}
        with ThreadPoolExecutor(args.clients) as pool:
            for server in servers:
                stow_all(pool, server, batches)
            rounds = [(turn, "stow") for turn in range(args.rounds if args.stow else 0)]
            rounds += [(turn, "read") for turn in range(args.rounds)]
            for turn, kind in rounds:  # the STOW-RS rounds first: the reads then find the study settled
                for server in servers[turn % 2 :] + servers[: turn % 2]:
                    samples = results[server.name]
                    if kind == "stow":
                        server.delete_study(study)
                        os.sync()  # the deletion's writes are not flushed during the measurement
                        measured(server, samples, "STOW-RS study", partial(stow_all, pool, server, batches))
                        continue
                    whole = partial(wado_streamed, server, f"/studies/{study}")
                    if fingerprints(measured(server, samples, "whole study, parsed", whole)) != expected:
                        raise BenchError(f"{server.name}: the study retrieved differs from the one stored")
                    raw = partial(raw_read, server, f"/studies/{study}")
                    measured(server, samples, "whole study, raw", raw)
    except (BenchError, httpx.HTTPError) as error:
        print(f"service-ab: FAILED: {error}; the servers' data and logs are kept in {work}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            server.stop()
    shutil.rmtree(work, ignore_errors=True)
    print(render(results, base_src, args), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
