"""The DIMSE face beside Orthanc 1.10's DICOM server: C-STORE with DCMTK's storescu and C-FIND at
study level with one pynetdicom client, one run, same data, same clients.

    .venv/bin/python bench/dimse.py [--instances 400] [--find-instances 100000] [--queries 50]
                                    [--fill stow|cstore] [--fill-batch 100] [--fill-clients 4]

Both servers run at once on loopback, each as its own process with its default embedded storage:
``dicom-cloud serve --dicom-port`` (objects in a local directory, SQLite index; the DIMSE face in
the main process) and ``/usr/sbin/Orthanc`` (its file storage, SQLite index, SyncStorageArea off:
dicom-cloud does not fsync its objects either). Measured, each server in turn:

- C-STORE of the synthetic CT study of ``bench/generate.py`` with ``storescu``: all instances on
  one association, then the same split over 4 storescu processes at once (the study is deleted
  in between, through each server's HTTP API, so every store is a new one); each step runs on
  one server then the other before the next step (interleaved: both see the same machine), and
  the server's CPU seconds (user + system, from /proc) are recorded beside its time;
- the fill of both indexes with ``--find-instances`` small instances (10 per series, 5 series per
  study, a patient per study), timed but not what this benchmark compares: with ``--fill stow``
  (the default) by STOW-RS in requests of ``--fill-batch`` instances, ``--fill-clients`` requests
  at once, to both servers alike (Orthanc through its DICOMweb plugin, loaded for this only), a
  round of requests to one server then the same round to the other; with ``--fill cstore`` by
  ``--fill-clients`` storescu processes at once (about 50 minutes for 100,000 instances on a
  2-core machine, where STOW-RS takes a few minutes). Either way both servers index the same
  files through their own ingest, so the C-FIND that follows searches the same data;
- C-FIND at study level (median and p95 latency over ``--queries`` runs) of three searches: a
  patient ID, a month of study dates, a patient-name wildcard; each server must return as many
  studies as the other.

The report goes to ``bench/results/dimse.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))

import generate  # noqa: E402
from dicomweb import tree_cpu_seconds  # noqa: E402
from live_service import free_port, start_service_process  # noqa: E402
from orthanc_server import PLUGINS_DIR, start_orthanc  # noqa: E402
from run import anonymize, machine  # noqa: E402
from service import STOW_HEADERS, multipart, percentile, small_instances  # noqa: E402

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
OURS, ORTHANC = "dicom-cloud", "orthanc"


def note(text: str) -> None:
    print(f"dimse-bench: {text}", file=sys.stderr, flush=True)


class Target:
    def __init__(
        self,
        name: str,
        port: int,
        ae: str,
        delete_study: Callable[[str], None],
        stop: Callable[[], None],
        pid: int | None = None,
        stow: Callable[[bytes], None] | None = None,
    ):
        self.name, self.port, self.ae = name, port, ae
        self.delete_study, self.stop = delete_study, stop
        self.pid = pid
        self.stow = stow  # one STOW-RS request (multipart/related body of STOW_HEADERS)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server so far (0 when unknown): its process and the live
        processes below it (the HTTP workers of ``dicom-cloud serve``, which take the STOW-RS fill),
        and their children that ended."""
        return 0.0 if self.pid is None else tree_cpu_seconds(self.pid)


def stow_request(http: httpx.Client, url: str, name: str, body: bytes) -> None:
    """One STOW-RS request; every instance must be stored."""
    answer = http.post(url, content=body, headers={**STOW_HEADERS, "Accept": "application/dicom+json"})
    if answer.status_code != 200 or answer.json().get("00081198", {}).get("Value"):
        raise RuntimeError(f"STOW-RS into {name} answered {answer.status_code}: {answer.text[:300]}")


def start_ours(work: Path) -> Target:
    port = free_port()
    service = start_service_process(work, extra_args=("--dicom-port", str(port)))
    http = httpx.Client(headers={"Authorization": f"Bearer {service.token}"}, timeout=600)

    def delete(uid: str) -> None:
        http.delete(f"{service.url}/studies/{uid}").raise_for_status()

    def stop() -> None:
        http.close()
        service.stop()

    def stow(body: bytes) -> None:
        stow_request(http, f"{service.url}/studies", OURS, body)

    return Target(OURS, port, "DICOMCLOUD", delete, stop, service.pid, stow)


def start_theirs(work: Path) -> Target:
    orthanc = start_orthanc(
        work,
        {
            "Name": "bench",
            "DicomAet": "ORTHANC",
            "SyncStorageArea": False,
            "DicomAlwaysAllowFind": True,
            # For the STOW-RS fill only; the measured operations are DIMSE.
            "Plugins": [str(PLUGINS_DIR / "libOrthancDicomWeb.so")],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        },
    )
    http = httpx.Client(timeout=600)

    def delete(uid: str) -> None:
        for item in orthanc.post("/tools/lookup", uid):
            if item["Type"] == "Study":
                orthanc.delete(f"/studies/{item['ID']}")

    def stop() -> None:
        http.close()
        orthanc.stop()

    def stow(body: bytes) -> None:
        stow_request(http, f"{orthanc.url}/dicom-web/studies", ORTHANC, body)

    return Target(ORTHANC, orthanc.dicom_port, "ORTHANC", delete, stop, orthanc.pid, stow)


def storescu(target: Target, shares: list[list[str]]) -> float:
    """Seconds for one storescu run per share (files, or ``+sd DIR``) at once, each on one
    association; every store must succeed."""
    processes = len(shares)
    started = time.perf_counter()
    with ThreadPoolExecutor(processes) as pool:
        results = list(
            pool.map(
                lambda share: subprocess.run(
                    [
                        "storescu",
                        "-aet",
                        "BENCH",
                        "-aec",
                        target.ae,
                        "127.0.0.1",
                        str(target.port),
                        *map(str, share),
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                ),
                shares,
            )
        )
    seconds = time.perf_counter() - started
    for result in results:
        if result.returncode != 0:
            raise RuntimeError(f"storescu into {target.name} failed: {result.stderr[-2000:]}")
    return seconds


def stow_fill(targets: list[Target], bodies: list[bytes], clients: int) -> dict[str, float]:
    """Index the STOW-RS ``bodies`` in every target: a round of ``clients`` requests at once to one
    target, then the same round to the next (interleaved, as the other steps); seconds per target."""
    seconds = {target.name: 0.0 for target in targets}
    with ThreadPoolExecutor(clients) as pool:
        for turn, first in enumerate(range(0, len(bodies), clients)):
            batch = bodies[first : first + clients]
            for target in targets:
                assert target.stow is not None
                started = time.perf_counter()
                list(pool.map(target.stow, batch))
                seconds[target.name] += time.perf_counter() - started
            if turn % 50 == 49:
                note(f"filled {first + len(batch)} of {len(bodies)} requests")
    return seconds


def find(target: Target, keys: dict[str, str], repeat: int) -> tuple[list[float], int]:
    client = AE(ae_title="BENCH")
    client.add_requested_context(STUDY_ROOT_FIND)
    assoc = client.associate("127.0.0.1", target.port, ae_title=target.ae)
    if not assoc.is_established:
        raise RuntimeError(f"no association with {target.name}")
    timings, count = [], 0
    try:
        for _ in range(repeat):
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            for keyword in (
                "StudyInstanceUID",
                "PatientName",
                "PatientID",
                "StudyDate",
                "NumberOfStudyRelatedInstances",
            ):
                setattr(identifier, keyword, keys.get(keyword, ""))
            started = time.perf_counter()
            count = 0
            for status, _ in assoc.send_c_find(identifier, STUDY_ROOT_FIND):
                if status.Status in (0xFF00, 0xFF01):
                    count += 1
                elif status.Status != 0x0000:
                    raise RuntimeError(f"{target.name}: C-FIND status 0x{status.Status:04X}")
            timings.append(time.perf_counter() - started)
    finally:
        assoc.release()
    return timings, count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=400, help="CT instances of the study (~512 KB each)")
    p.add_argument("--find-instances", type=int, default=100_000, help="small instances indexed for C-FIND")
    p.add_argument("--queries", type=int, default=50, help="repetitions of each C-FIND")
    p.add_argument(
        "--fill",
        choices=["stow", "cstore"],
        default="stow",
        help="how both indexes are filled before the C-FIND: STOW-RS batches (default) or storescu",
    )
    p.add_argument("--fill-batch", type=int, default=100, help="instances per STOW-RS request of the fill")
    p.add_argument("--fill-clients", type=int, default=4, help="requests or storescu processes at once")
    p.add_argument("--data-dir", type=Path, default=BENCH / ".data", help="inputs and server data")
    p.add_argument("--results", type=Path, default=BENCH / "results", help="where dimse.md/.json go")
    args = p.parse_args(argv)
    if shutil.which("storescu") is None:
        p.error("storescu is missing: apt-get install dcmtk (scripts/install-test-servers)")
    if min(args.find_instances, args.queries, args.fill_batch, args.fill_clients) < 1:
        p.error("--find-instances, --queries, --fill-batch and --fill-clients must be positive")

    inputs = args.data_dir / "inputs-dicomweb"
    manifest = generate.ensure(inputs, instances=args.instances, large_size=1)
    study_files = [inputs / entry.name for entry in manifest.study]
    study_uid = str(pydicom.dcmread(study_files[0], stop_before_pixels=True).StudyInstanceUID)
    small_count = args.find_instances
    small_shares: list[list[str]] = []
    small_bodies: list[bytes] = []
    if args.fill == "cstore":
        # In --fill-clients directories (storescu +sd each: 100,000 names exceed a command line).
        shares = args.fill_clients
        small_dir = args.data_dir / f"inputs-dimse-small-{small_count}-{shares}"
        if not (small_dir / "done").exists():
            note(f"writing {small_count} small instances")
            shutil.rmtree(small_dir, ignore_errors=True)
            for share in range(shares):
                (small_dir / str(share)).mkdir(parents=True)
            for index, data in enumerate(small_instances(small_count)):
                (small_dir / str(index % shares) / f"{index:07d}.dcm").write_bytes(data)
            (small_dir / "done").touch()
        small_shares = [["+sd", str(small_dir / str(share))] for share in range(shares)]
    else:
        note(f"making {small_count} small instances")
        small = list(small_instances(small_count))
        small_bodies = [
            multipart(small[i : i + args.fill_batch]) for i in range(0, small_count, args.fill_batch)
        ]
        del small
    one = [[str(f) for f in study_files]]
    four = [[str(f) for f in study_files[i::4]] for i in range(4)]

    work = args.data_dir / "dimse-run"
    shutil.rmtree(work, ignore_errors=True)
    targets = [start_ours(work / "dicom-cloud"), start_theirs(work / "orthanc")]
    results: dict[str, dict[str, Any]] = {t.name: {} for t in targets}
    counts: dict[str, dict[str, int]] = {t.name: {} for t in targets}
    searches = {
        "patient_id": {"PatientID": "P000007"},
        "date_month": {"StudyDate": "20200301-20200331"},
        "name_wildcard": {"PatientName": "Bench^0000*"},
    }
    try:
        load_start = os.getloadavg()
        cpu: dict[str, dict[str, float]] = {t.name: {} for t in targets}
        loads: dict[str, float] = {}

        def measured(target: Target, step: str, work: Callable[..., Any], *args: Any) -> Any:
            before = target.cpu_seconds()
            value = work(target, *args)
            cpu[target.name][step] = target.cpu_seconds() - before
            loads[f"{step}_{target.name}"] = os.getloadavg()[0]
            return value

        # Interleaved: each step on one server then the other, so both see the same machine.
        for target in targets:
            note(f"{target.name}: C-STORE of the study, one association")
            results[target.name]["store_1"] = measured(target, "store_1", storescu, one)
            target.delete_study(study_uid)
        for target in targets:
            note(f"{target.name}: C-STORE of the study, 4 associations")
            results[target.name]["store_4"] = measured(target, "store_4", storescu, four)
        if args.fill == "cstore":
            for target in targets:
                note(f"{target.name}: C-STORE of {small_count} small instances, {len(small_shares)} at once")
                results[target.name]["fill"] = measured(target, "fill", storescu, small_shares)
        else:
            note(f"STOW-RS of {small_count} small instances into both, {args.fill_clients} requests at once")
            before = {t.name: t.cpu_seconds() for t in targets}
            fill_seconds = stow_fill(targets, small_bodies, args.fill_clients)
            for target in targets:
                results[target.name]["fill"] = fill_seconds[target.name]
                cpu[target.name]["fill"] = target.cpu_seconds() - before[target.name]
                loads[f"fill_{target.name}"] = os.getloadavg()[0]
            del small_bodies
        for name, keys in searches.items():
            for target in targets:
                find(target, keys, 2)  # warm
                timings, count = measured(target, f"find_{name}", find, keys, args.queries)
                counts[target.name][name] = count
                results[target.name][f"find_{name}"] = {
                    "median_ms": statistics.median(timings) * 1000,
                    "p95_ms": percentile(timings, 0.95) * 1000,
                    "cpu_ms_per_query": cpu[target.name][f"find_{name}"] * 1000 / args.queries,
                }
        for name in searches:
            if counts[OURS][name] != counts[ORTHANC][name]:
                raise RuntimeError(f"C-FIND {name}: {counts[OURS][name]} studies vs {counts[ORTHANC][name]}")
    finally:
        for target in targets:
            target.stop()
    study_mb = manifest.study_bytes / 1e6
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": [load_start, os.getloadavg()],
        "parameters": {
            "instances": len(study_files),
            "study_mb": study_mb,
            "find_instances": small_count,
            "queries": args.queries,
            "fill": (
                f"STOW-RS, {args.fill_batch} instances per request, {args.fill_clients} at once"
                if args.fill == "stow"
                else f"C-STORE, {args.fill_clients} storescu at once"
            ),
        },
        "results": results,
        "server_cpu_seconds": cpu,
        "load_after_step": loads,
        "find_counts": counts,
    }
    lines = [
        "# DIMSE: dicom-cloud beside Orthanc",
        "",
        f"{report['date']}, {report['machine']['cores']} cores, "
        f"{report['machine']['memory_gib']:.0f} GiB; load average {load_start[0]:.1f} at start. "
        f"Study: {len(study_files)} CT instances, {study_mb:.0f} MB; "
        f"C-FIND over {small_count} small instances ({report['parameters']['fill']}), "
        f"{args.queries} runs each.",
        "",
        "| | dicom-cloud | Orthanc | ratio | server CPU s, dicom-cloud / Orthanc | load after |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in (
        ("store_1", "C-STORE study, 1 association (s)"),
        ("store_4", "C-STORE study, 4 at once (s)"),
        ("fill", f"fill: {small_count} small by {'STOW-RS' if args.fill == 'stow' else 'C-STORE'} (s)"),
    ):
        ours, theirs = results[OURS][key], results[ORTHANC][key]
        lines.append(
            f"| {label} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f}x | "
            f"{cpu[OURS][key]:.1f} / {cpu[ORTHANC][key]:.1f} | "
            f"{loads[f'{key}_{OURS}']:.1f} / {loads[f'{key}_{ORTHANC}']:.1f} |"
        )
    for name in searches:
        ours_ms, theirs_ms = results[OURS][f"find_{name}"], results[ORTHANC][f"find_{name}"]
        lines.append(
            f"| C-FIND study {name} ({counts[OURS][name]} studies), median / p95 ms | "
            f"{ours_ms['median_ms']:.1f} / {ours_ms['p95_ms']:.1f} | "
            f"{theirs_ms['median_ms']:.1f} / {theirs_ms['p95_ms']:.1f} | "
            f"{theirs_ms['median_ms'] / ours_ms['median_ms']:.2f}x | "
            f"{ours_ms['cpu_ms_per_query']:.0f} / {theirs_ms['cpu_ms_per_query']:.0f} ms per query | "
            f"{loads[f'find_{name}_{OURS}']:.1f} / {loads[f'find_{name}_{ORTHANC}']:.1f} |"
        )
    lines += ["", "Ratio: Orthanc's time / dicom-cloud's (above 1: dicom-cloud is faster).", ""]
    text = anonymize("\n".join(lines), args.data_dir)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "dimse.md").write_text(text)
    (args.results / "dimse.json").write_text(anonymize(json.dumps(report, indent=1) + "\n", args.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
