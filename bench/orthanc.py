"""Orthanc with the dicom-cloud storage plugin on SeaweedFS against Orthanc's own file-system storage.

    .venv/bin/python bench/orthanc.py [--instances N] [--repeat N] [--clients N]

For each configuration (``filesystem``: Orthanc's own storage; ``plugin-s3``: our plugin on a local
SeaweedFS; ``plugin-s3-encrypted``: the same with A1 encryption) and each repetition, a fresh Orthanc
(``tests/orthanc_server.py``) ingests the synthetic CT study of ``bench/generate.py`` through
``POST /instances`` and then serves every instance back through ``GET /instances/{id}/file``, with
``--clients`` HTTP clients at once. Every file read back is checked against the manifest's SHA-256.
Repetitions are interleaved and the order of the configurations rotated; the report gives medians
and the plugin's throughput as a ratio of the file system's. Results go to
``bench/results/orthanc-latest.md`` and ``.json``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))

import generate  # noqa: E402
from orthanc_server import OrthancServer, start_orthanc  # noqa: E402
from servers import S3Server, start_seaweedfs  # noqa: E402

CONFIGURATIONS = ("filesystem", "plugin-s3", "plugin-s3-encrypted")
#: Not run by default: the plugin on a local directory, to tell the plugin's own cost from the server's.
EXTRA_CONFIGURATIONS = ("plugin-local",)
MEMORY_TOUCH = 2 << 30


@dataclass
class Sample:
    configuration: str
    repetition: int
    ingest_s: float = 0.0
    retrieve_s: float = 0.0
    instances: int = 0
    bytes: int = 0
    error: str | None = None


@dataclass
class Report:
    started: str
    machine: dict[str, Any]
    parameters: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)


class Client:
    """One keep-alive HTTP connection per thread to Orthanc."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._local = threading.local()

    def request(self, method: str, path: str, body: bytes = b"") -> bytes:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=300)
            self._local.conn = conn
        conn.request(method, path, body=body or None)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status} {data[:200]!r}")
        return data


def configuration(name: str, s3: S3Server, workdir: Path, key_file: Path) -> dict[str, Any]:
    """Orthanc's configuration: its own storage, or the plugin as ``dicom-cloud orthanc-config`` makes it."""
    base: dict[str, Any] = {"Name": name, "StorageDirectory": str(workdir / "storage")}
    if name == "filesystem":
        return base
    from dicom_cloud.cli.orthanc import python_path
    from dicom_cloud.orthanc import ENTRY_SCRIPT

    plugin = {
        **base,
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancPython.so"],
        "PythonScript": str(ENTRY_SCRIPT),
        "DicomCloud": {"PythonPath": python_path()},
    }
    if name == "plugin-local":
        return {**plugin, "DicomCloudLocalStorage": {"Directory": str(workdir / "storage" / "objects")}}
    bucket = f"bench-{name}-{int(time.time() * 1000)}"
    s3.create_bucket(bucket)
    section: dict[str, Any] = {
        "BucketName": bucket,
        "Region": s3.region,
        "Endpoint": s3.endpoint,
        "VirtualAddressing": False,
        "AccessKey": s3.access_key,
        "SecretKey": s3.secret_key,
    }
    if name.endswith("encrypted"):
        section["StorageEncryption"] = {"MasterKey": [1, str(key_file)]}
    return {**plugin, "AwsS3Storage": section}


def run_once(
    sample: Sample, orthanc: OrthancServer, files: list[Path], digests: dict[str, str], clients: int
) -> None:
    client = Client(orthanc.http_port)
    bodies = [f.read_bytes() for f in files]  # read before the clock starts

    def ingest(body: bytes) -> str:
        return str(json.loads(client.request("POST", "/instances", body))["ID"])

    def retrieve(item: tuple[str, str]) -> None:
        instance, name = item
        data = client.request("GET", f"/instances/{instance}/file")
        if hashlib.sha256(data).hexdigest() != digests[name]:
            raise RuntimeError(f"{name}: the file read back differs")

    with ThreadPoolExecutor(clients) as pool:
        os.sync()
        touch = b"\x01" * MEMORY_TOUCH
        del touch
        started = time.perf_counter()
        ids = list(pool.map(ingest, bodies))
        sample.ingest_s = time.perf_counter() - started
        started = time.perf_counter()
        list(pool.map(retrieve, zip(ids, [f.name for f in files], strict=True)))
        sample.retrieve_s = time.perf_counter() - started
    sample.instances = len(files)
    sample.bytes = sum(len(b) for b in bodies)


def median(samples: list[Sample], what: Callable[[Sample], float]) -> float:
    values = [what(s) for s in samples if s.error is None]
    return statistics.median(values) if values else float("nan")


def render(report: Report) -> str:
    lines = [
        f"# Orthanc storage: dicom-cloud plugin vs Orthanc's file system ({report.started})",
        "",
        f"{report.parameters['instances']} CT instances ({report.parameters['study_mb']:.0f} MB), "
        f"{report.parameters['clients']} HTTP clients, {report.parameters['repeat']} repetitions (medians); "
        f"machine: {report.machine['cpus']} CPUs, {report.machine['system']}.",
        "",
        "| configuration | ingest (s) | ingest (instances/s) | retrieve (s) | retrieve (instances/s) "
        "| ingest vs file system | retrieve vs file system |",
        "|---|---|---|---|---|---|---|",
    ]
    by_name = {
        c: [s for s in report.samples if s.configuration == c] for c in report.parameters["configurations"]
    }
    base = by_name.get("filesystem", [])
    base_in, base_out = median(base, lambda s: s.ingest_s), median(base, lambda s: s.retrieve_s)
    count = report.parameters["instances"]
    for name, samples in by_name.items():
        ingest, retrieve = median(samples, lambda s: s.ingest_s), median(samples, lambda s: s.retrieve_s)
        failed = sum(1 for s in samples if s.error)
        lines.append(
            f"| {name}{f' ({failed} failed)' if failed else ''} | {ingest:.2f} | {count / ingest:.0f} "
            f"| {retrieve:.2f} | {count / retrieve:.0f} "
            f"| {base_in / ingest:.2f}x | {base_out / retrieve:.2f}x |"
        )
    lines += ["", "Ratios are throughput relative to Orthanc's own file-system storage (below 1: slower)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=400, help="CT instances in the study (default 400)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each configuration (default 3)")
    p.add_argument("--clients", type=int, default=4, help="HTTP clients at once (default 4)")
    p.add_argument(
        "--configurations",
        default=",".join(CONFIGURATIONS),
        help="comma-separated: filesystem, plugin-s3, plugin-s3-encrypted (default), plugin-local",
    )
    p.add_argument("--data-dir", type=Path, default=BENCH / ".data", help="inputs and server data")
    p.add_argument("--results", type=Path, default=BENCH / "results", help="where orthanc-latest.* go")
    args = p.parse_args(argv)
    names = [n for n in args.configurations.split(",") if n]
    unknown = set(names) - set(CONFIGURATIONS) - set(EXTRA_CONFIGURATIONS)
    if unknown:
        p.error(f"unknown configurations: {', '.join(sorted(unknown))}")

    inputs = args.data_dir / "inputs-orthanc"
    manifest = generate.ensure(inputs, instances=args.instances, large_size=1)
    files = [inputs / e.name for e in manifest.study]
    digests = {Path(e.name).name: e.sha256 for e in manifest.study}
    work = args.data_dir / "orthanc-runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    key_file = work / "master.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    report = Report(
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        machine={"system": " ".join(platform.uname()[:3]), "cpus": os.cpu_count()},
        parameters={
            "instances": len(files),
            "study_mb": sum(e.size for e in manifest.study) / 1e6,
            "clients": args.clients,
            "repeat": args.repeat,
            "configurations": names,
        },
    )
    s3 = start_seaweedfs(work / "seaweedfs")
    try:
        for repetition in range(args.repeat):
            order = names[repetition % len(names) :] + names[: repetition % len(names)]
            for name in order:
                sample = Sample(name, repetition)
                run_dir = work / f"{name}-{repetition}"
                orthanc = start_orthanc(run_dir, configuration(name, s3, run_dir, key_file))
                try:
                    run_once(sample, orthanc, files, digests, args.clients)
                except Exception as exc:
                    sample.error = repr(exc)
                finally:
                    orthanc.stop()
                    shutil.rmtree(run_dir / "storage", ignore_errors=True)
                report.samples.append(sample)
                status = sample.error or f"ingest {sample.ingest_s:.2f} s, retrieve {sample.retrieve_s:.2f} s"
                print(f"orthanc-bench: {name} #{repetition + 1}: {status}", file=sys.stderr)
    finally:
        s3.stop()
    text = render(report)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "orthanc-latest.md").write_text(text)
    payload = {**asdict(report), "samples": [asdict(s) for s in report.samples]}
    (args.results / "orthanc-latest.json").write_text(json.dumps(payload, indent=2))
    return 1 if any(s.error for s in report.samples) else 0


if __name__ == "__main__":
    sys.exit(main())
