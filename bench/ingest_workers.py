"""Benchmark of the ingest queue: presigned uploads ingested in the request vs by queued workers.

    .venv/bin/python bench/ingest_workers.py [--uploads 500] [--rounds 3] [--workers 2] [--json]

Two ``dicom-cloud serve`` processes (one uvicorn worker each) on SeaweedFS (S3) and PostgreSQL,
each with its own database and bucket: one completes uploads in the request (200), the other
with ``--ingest-queue`` (202), beside ``--workers`` ``dicom-cloud worker`` processes that run
all the time. Each round sends ``--uploads`` upload sessions of one small instance (~1 KB:
the per-upload cost, not the bytes) to each, in turn, 16 at a time: declare, PUT to the
presigned URL, complete. Measured per mode and round:

- wall: from the first declaration to the last upload ingested (in-request: the last 200;
  queued: the last session ``completed`` in the index);
- complete latency: the answer time of ``POST /uploads/{id}/complete`` (median);
- server CPU: user+system seconds of the service process, plus the workers' when queued
  (also given apart), per upload (steadier than wall time on a shared machine).

The queue's overhead per upload is the difference of CPU per upload (and of wall per upload).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))

from archive_helpers import make_instance  # noqa: E402
from live_service import fresh_postgres_database, start_service_process  # noqa: E402
from servers import start_seaweedfs  # noqa: E402

CLI = [sys.executable, "-c", "from dicom_cloud.cli.main import run; run()"]
PARALLEL = 16


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def instances(count: int) -> list[bytes]:
    study = f"1.2.826.0.1.3680043.9.{uuid.uuid4().int % 10**12}"
    return [make_instance(study, f"{study}.1", f"{study}.1.{i + 1}", side=4) for i in range(count)]


async def send(url: str, token: str, files: list[bytes]) -> tuple[list[str], list[float], float]:
    """Upload sessions of one file each; their ids, the completions' latencies, the time the
    last completion was answered."""
    gate = asyncio.Semaphore(PARALLEL)
    latencies: list[float] = []
    async with (
        httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as http,
        httpx.AsyncClient(timeout=120) as bucket,
    ):

        async def one(i: int, data: bytes) -> str:
            async with gate:
                created = (
                    await http.post("/uploads", json={"files": [{"name": f"{i}.dcm", "size": len(data)}]})
                ).json()
                target = created["files"][0]
                (await bucket.put(target["url"], content=data, headers=target["headers"])).raise_for_status()
                started = time.perf_counter()
                answer = await http.post(f"/uploads/{created['id']}/complete")
                latencies.append(time.perf_counter() - started)
                if answer.status_code not in (200, 202):
                    raise RuntimeError(f"complete answered {answer.status_code}: {answer.text}")
                return str(created["id"])

        ids = await asyncio.gather(*(one(i, d) for i, d in enumerate(files)))
    return list(ids), latencies, time.perf_counter()


def wait_done(database: str, ids: list[str]) -> float:
    with psycopg.connect(database, autocommit=True) as connection:
        while True:
            row = connection.execute(
                "SELECT count(*) FROM upload_sessions WHERE id = ANY(%s) AND state = 'completed'", (ids,)
            ).fetchone()
            if row and row[0] == len(ids):
                return time.perf_counter()
            time.sleep(0.02)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-queue-"))
    s3 = start_seaweedfs(work / "seaweedfs")
    env = {**os.environ, **s3.env()}
    results: dict[str, list[dict[str, float]]] = {"in-request": [], "queued": []}
    with fresh_postgres_database() as db_sync, fresh_postgres_database() as db_queue:
        services = {}
        for mode, database, extra in (
            ("in-request", db_sync, ("--workers", "1")),
            ("queued", db_queue, ("--workers", "1", "--ingest-queue")),
        ):
            bucket = f"bench-{uuid.uuid4().hex[:12]}"
            s3.create_bucket(bucket)
            settings = ("--storage", f"s3://{bucket}/archive", "--database", database)
            services[mode] = (
                start_service_process(work / mode, setting_args=settings, extra_args=extra, env=s3.env()),
                database,
                settings,
            )
        _, _, queue_settings = services["queued"]
        workers = [
            subprocess.Popen(
                [
                    *CLI,
                    "worker",
                    *queue_settings,
                    "--log-level",
                    "warning",
                    "--concurrency",
                    str(args.concurrency),
                ],
                env=env,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(args.workers)
        ]
        try:
            time.sleep(2)  # the workers open the archive and the queue
            for round_ in range(args.rounds):
                for mode, (service, database, _) in services.items():
                    files = instances(args.uploads)
                    worker_pids = [w.pid for w in workers] if mode == "queued" else []
                    service_before = cpu_seconds(service.pid)
                    workers_before = sum(cpu_seconds(p) for p in worker_pids)
                    started = time.perf_counter()
                    ids, latencies, answered = asyncio.run(send(service.url, service.token, files))
                    finished = wait_done(database, ids) if mode == "queued" else answered
                    service_cpu = cpu_seconds(service.pid) - service_before
                    workers_cpu = sum(cpu_seconds(p) for p in worker_pids) - workers_before
                    cpu = service_cpu + workers_cpu
                    figure = {
                        "round": round_ + 1,
                        "wall_s": finished - started,
                        "uploads_per_s": args.uploads / (finished - started),
                        "complete_p50_ms": 1000 * statistics.median(latencies),
                        "server_cpu_ms_per_upload": 1000 * cpu / args.uploads,
                        "service_cpu_ms_per_upload": 1000 * service_cpu / args.uploads,
                        "workers_cpu_ms_per_upload": 1000 * workers_cpu / args.uploads,
                        "load": load(),
                    }
                    results[mode].append(figure)
                    if not args.json:
                        print(mode, json.dumps(figure), flush=True)
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(10)
            for service, _, _ in services.values():
                service.stop()
    s3.stop()
    summary = {
        mode: {
            key: statistics.median(r[key] for r in rows)
            for key in (
                "wall_s",
                "uploads_per_s",
                "complete_p50_ms",
                "server_cpu_ms_per_upload",
                "service_cpu_ms_per_upload",
                "workers_cpu_ms_per_upload",
            )
        }
        for mode, rows in results.items()
    }
    summary["overhead"] = {
        "server_cpu_ms_per_upload": summary["queued"]["server_cpu_ms_per_upload"]
        - summary["in-request"]["server_cpu_ms_per_upload"],
        "wall_ms_per_upload": 1000
        * (summary["queued"]["wall_s"] - summary["in-request"]["wall_s"])
        / args.uploads,
    }
    return {"parameters": vars(args), "rounds": results, "median": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uploads", type=int, default=500, help="upload sessions per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="dicom-cloud worker processes")
    parser.add_argument("--concurrency", type=int, default=4, help="jobs per worker process")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = run(args)
    print(json.dumps(report if args.json else report["median"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
