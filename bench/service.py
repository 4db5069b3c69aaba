"""Benchmark of the DICOMweb service: STOW-RS ingest, WADO-RS retrieval, QIDO-RS latency.

    .venv/bin/python bench/service.py [--instances 400] [--batch 10] [--qido-instances 5000]
                                      [--queries 200] [--storage local|s3] [--json]

What it measures, against a real uvicorn on loopback (the same code as ``dicom-cloud serve``):

- STOW-RS: the synthetic CT study of ``bench/generate.py`` (~512 KB per instance) stored in
  requests of ``--batch`` instances; instances/s and MB/s.
- WADO-RS: the whole study retrieved as one multipart/related answer; instances/s and MB/s.
- QIDO-RS: latency (median, p95) of study, series and instance searches once ``--qido-instances``
  small instances (distinct patients, studies, series) are indexed besides the study.

The same measurements beside Orthanc's DICOMweb plugin, in one run on the same data, are
``bench/dicomweb.py`` (which reuses this module's request helpers and small instances).

Storage is a local directory and the index SQLite by default; ``--storage s3`` uses a SeaweedFS
started by ``tests/servers.py``. Run it on a quiet machine: both cores are used by the client and
the server together.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))

import generate  # noqa: E402

BOUNDARY = "bench-boundary-7d1f"


def multipart(parts: list[bytes]) -> bytes:
    chunks = []
    for part in parts:
        chunks += [f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part, b"\r\n"]
    chunks.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(chunks)


STOW_HEADERS = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}


def small_instances(count: int) -> Iterator[bytes]:
    """Tiny CT instances (8x8 pixels): 10 per series, 5 series per study, a patient per study."""
    study = series = ""
    for index in range(count):
        if index % 50 == 0:
            study = generate_uid()
        if index % 10 == 0:
            series = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID = f"P{index // 50:06d}"
        ds.PatientName = f"Bench^{index // 50:06d}"
        ds.StudyDate = f"2020{(index // 50) % 12 + 1:02d}{(index // 50) % 28 + 1:02d}"
        ds.Modality = "CT"
        ds.SeriesNumber, ds.InstanceNumber = (index // 10) % 5 + 1, index % 10 + 1
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = bytes(128)
        out = io.BytesIO()
        dcmwrite(out, ds, enforce_file_format=True)
        yield out.getvalue()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dicom_cloud.service.settings import load_settings
    from live_service import start_service

    temporary = args.data_dir is None
    work = Path(args.data_dir or tempfile.mkdtemp(prefix="dicom-cloud-bench-"))
    manifest = generate.ensure(
        work / "input", instances=args.instances, large_size=1 << 20, log=not args.json
    )
    files = [work / "input" / "study" / entry.name.split("/")[-1] for entry in manifest.study]
    values: dict[str, Any] = {"data_dir": work / "service", "stow_max_bytes": 1 << 30}
    server = None
    if args.storage == "s3":
        import os

        from servers import start_seaweedfs

        server = start_seaweedfs(work / "seaweedfs")
        server.create_bucket("bench")
        os.environ.update(server.env())
        values["storage"] = "s3://bench/archive"
    service = start_service(load_settings(values, environ={}))
    results: dict[str, Any] = {"instances": len(files), "batch": args.batch, "storage": args.storage}
    try:
        with httpx.Client(
            base_url=service.url, headers={"Authorization": f"Bearer {service.admin_token}"}, timeout=600
        ) as http:
            total = sum(path.stat().st_size for path in files)
            start = time.perf_counter()
            for first in range(0, len(files), args.batch):
                body = multipart([path.read_bytes() for path in files[first : first + args.batch]])
                answer = http.post("/studies", content=body, headers=STOW_HEADERS)
                answer.raise_for_status()
            elapsed = time.perf_counter() - start
            results["stow_instances_per_s"] = round(len(files) / elapsed, 1)
            results["stow_mb_per_s"] = round(total / elapsed / 1e6, 1)

            study = http.get("/studies", params={"limit": 1}).json()[0]["0020000D"]["Value"][0]
            start = time.perf_counter()
            received = 0
            with http.stream("GET", f"/studies/{study}") as answer:
                answer.raise_for_status()
                for chunk in answer.iter_bytes():
                    received += len(chunk)
            elapsed = time.perf_counter() - start
            results["wado_instances_per_s"] = round(len(files) / elapsed, 1)
            results["wado_mb_per_s"] = round(received / elapsed / 1e6, 1)

            batch: list[bytes] = []
            for data in small_instances(args.qido_instances):
                batch.append(data)
                if len(batch) == 100:
                    http.post("/studies", content=multipart(batch), headers=STOW_HEADERS).raise_for_status()
                    batch = []
            if batch:
                http.post("/studies", content=multipart(batch), headers=STOW_HEADERS).raise_for_status()
            results["indexed_instances"] = len(files) + args.qido_instances
            queries: dict[str, tuple[str, dict[str, str]]] = {
                "studies_by_patient_id": ("/studies", {"PatientID": "P000007"}),
                "studies_by_name_wildcard": ("/studies", {"PatientName": "Bench^00001*"}),
                "studies_by_date_range": ("/studies", {"StudyDate": "20200301-20200331", "limit": "100"}),
                "series_all_limit_100": ("/series", {"limit": "100"}),
                "instances_by_modality": ("/instances", {"Modality": "CT", "limit": "100"}),
            }
            for name, (path, params) in queries.items():
                times = []
                for _ in range(args.queries):
                    start = time.perf_counter()
                    http.get(path, params=params).raise_for_status()
                    times.append((time.perf_counter() - start) * 1000)
                results[f"qido_{name}_ms"] = {
                    "median": round(statistics.median(times), 2),
                    "p95": round(percentile(times, 0.95), 2),
                }
    finally:
        service.stop()
        if server is not None:
            server.stop()
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=400, help="CT instances of the study (~512 KB each)")
    parser.add_argument("--batch", type=int, default=10, help="instances per STOW-RS request")
    parser.add_argument("--qido-instances", type=int, default=5000, help="small instances indexed for QIDO")
    parser.add_argument("--queries", type=int, default=200, help="repetitions of each QIDO query")
    parser.add_argument("--storage", choices=["local", "s3"], default="local")
    parser.add_argument("--data-dir", help="where inputs and the service's data go (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    results = run(args)
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:40} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
