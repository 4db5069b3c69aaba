"""``dicom-cloud worker``: runs the ingest jobs a service with ``ingest_queue`` queues.

It reads the same settings as ``dicom-cloud serve`` (flags > environment > config file), opens
the same archive (storage and PostgreSQL index) and runs jobs until stopped: SIGINT or SIGTERM
ends it within two seconds, its running jobs cancelled and queued again for another worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from ..errors import UsageError
from ..extras import require
from .serve import add_setting_flags, setting_flag_values

SUMMARY = (
    "Run ingest workers: the completions of uploads that a service with ingest_queue (PostgreSQL\n"
    "index) queued. Start any number, on any machine reaching the database and the storage; each\n"
    "reads the service's settings. SIGINT/SIGTERM stop it within 2 s (running jobs go back to the\n"
    "queue). Needs the service and postgres extras: pip install 'dicom-cloud[service,postgres]'."
)
EXAMPLES = (
    "  dicom-cloud worker --config service.toml\n"
    "  dicom-cloud worker --storage s3://archive/dicom --database postgresql://svc@db/dicom --concurrency 8\n"
    "  dicom-cloud worker --config service.toml --stalled-after 30\n"
    "  dicom-cloud worker --config service.toml --until-empty   # drain the queue, then exit 0\n"
    "  dicom-cloud worker --config service.toml --metrics-port 9102   # Prometheus at :9102/metrics"
)


def register(add: Callable[..., Any]) -> None:
    """Add the command to the CLI (``add`` is ``build_parser``'s helper)."""
    sub = add("worker", SUMMARY, EXAMPLES, _worker)
    add_setting_flags(sub)
    sub.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="upload sessions ingested at once by this process (default 4; 4 files at once each)",
    )
    sub.add_argument(
        "--stalled-after",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a worker silent this long is taken as dead and its running jobs are run again "
        "(default 60; heartbeats every quarter of it)",
    )
    sub.add_argument(
        "--until-empty",
        action="store_true",
        help="exit (0) once no job is waiting or running anywhere, retries included (scripts, tests)",
    )
    sub.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve this worker's Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    sub.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address the metrics listen on (default 127.0.0.1; 0.0.0.0 for a scraper elsewhere: "
        "the metrics are counts only, no patient data, and have no authentication)",
    )
    sub.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _worker(args: argparse.Namespace) -> int:
    require("service", "dicom-cloud worker")
    require("postgres", "dicom-cloud worker")
    from ..service.observability import setup_json_logging
    from ..service.settings import load_settings

    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if args.stalled_after < 2:
        raise UsageError("--stalled-after must be at least 2 seconds")
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        raise UsageError("--metrics-port must be between 1 and 65535")
    flags = setting_flag_values(args)
    flags["log_level"] = args.log_level
    settings = load_settings(flags, config_file=args.config)
    setup_json_logging(settings.log_level)
    if settings.log_level != "debug":  # one line per job start and end is the queue's debug
        logging.getLogger("procrastinate").setLevel(logging.WARNING)
    from ..archive.queue import queue_conninfo

    queue_conninfo(settings.database_url)  # a SQLite index refused before anything is opened
    from ..archive.queue import WorkerMetrics
    from .runner import run

    metrics = WorkerMetrics()
    if args.metrics_port is not None:
        _serve_metrics(metrics, args.metrics_host, args.metrics_port)
    run(_run(settings, args.concurrency, args.stalled_after, args.until_empty, metrics))
    return 0


def _serve_metrics(metrics: Any, host: str, port: int) -> None:
    """Prometheus' own small HTTP server, in a daemon thread (it ends with the process)."""
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc


async def _run(
    settings: Any, concurrency: int, stalled_after: float, until_empty: bool, metrics: Any
) -> None:
    from ..archive import Archive
    from ..archive.queue import IngestQueue
    from ..service.app import archive_settings

    log = logging.getLogger("dicom_cloud.worker")
    name = f"{socket.gethostname()}:{os.getpid()}"
    async with (
        await Archive.open(archive_settings(settings)) as archive,
        await IngestQueue.open(settings.database_url) as queue,
    ):
        log.info("worker.started", extra={"worker": name, "concurrency": concurrency})
        await queue.run_worker(
            archive,
            concurrency=concurrency,
            stalled_after=stalled_after,
            until_empty=until_empty,
            name=name,
            metrics=metrics,
        )
        log.info("worker.stopped", extra={"worker": name})
