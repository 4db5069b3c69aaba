"""``dicom-cloud serve`` (the DICOMweb service under uvicorn) and ``dicom-cloud token create``.

Both read the service settings the same way: flags > ``DICOM_CLOUD_SERVICE_*`` environment >
config file (``--config``) > defaults. With no settings at all, ``serve`` keeps objects and a SQLite
index under the data directory, and on first start prints an admin API token once.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import secrets
from collections.abc import Callable
from typing import Any

from ..errors import UsageError
from ..extras import require
from ..localio import make_dirs
from .dimse import add_dimse_flags, dimse_flag_values, dimse_settings

#: Flags shared by both commands: (flag, settings field, help).
_SETTING_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--config", "", "TOML config file (keys as in docs/service.md; default $DICOM_CLOUD_SERVICE_CONFIG)"),
    ("--data-dir", "data_dir", "directory of the embedded default storage and index"),
    (
        "--storage",
        "storage",
        "object storage of the archive: s3://bucket/prefix, gs://..., azure://..., path",
    ),
    ("--database", "database", "index database URL: postgresql://user@host/db or sqlite:///path"),
    ("--query-tags", "query_tags", "extra DICOM attributes to index for searches, comma-separated"),
)


def add_setting_flags(sub: argparse.ArgumentParser) -> None:
    """The flags naming the archive's settings (shared with ``dicom-cloud dimse``)."""
    for flag, _, text in _SETTING_FLAGS:
        sub.add_argument(flag, help=text)


def setting_flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings those flags give (None: not given)."""
    return _flags(args, {})


def _flags(args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    values = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _ in _SETTING_FLAGS if field}
    values.update(extra)
    return values


def register(add: Callable[..., Any]) -> None:
    """Add the commands to the CLI (``add`` is ``build_parser``'s helper)."""
    sub = add(
        "serve",
        "Run the DICOMweb service (STOW/QIDO/WADO, uploads, share links). With no settings it\n"
        "keeps objects and a SQLite index under the data directory and prints an admin token on\n"
        "first start. OpenAPI docs at /docs. Needs the service extra:\n"
        "pip install 'dicom-cloud[service]' (and [service,postgres] for a PostgreSQL index).",
        "  dicom-cloud serve\n"
        "  dicom-cloud serve --port 8080 --public-url https://pacs.example.org\n"
        "  dicom-cloud serve --storage s3://archive/dicom --database postgresql://svc@db/dicom\n"
        "  dicom-cloud serve --database postgresql://svc@db/dicom --ingest-queue   # + dicom-cloud worker\n"
        "  dicom-cloud serve --dicom-port 11112 --ae-title DICOMCLOUD --peer CT1@10.0.0.5,tenant=a\n"
        "  DICOM_CLOUD_SERVICE_OIDC_ISSUER=https://login.example.org dicom-cloud serve --config service.toml",
        _serve,
    )
    add_setting_flags(sub)
    sub.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    sub.add_argument("--port", type=int, help="port to listen on (default 8042)")
    sub.add_argument(
        "--workers", type=int, help="worker processes (default: one per core; see docs/service.md)"
    )
    sub.add_argument("--public-url", help="URL clients reach the service at (goes into links)")
    sub.add_argument(
        "--viewer-dir", help="where 'dicom-cloud viewer install' put OHIF (default DATA_DIR/viewer)"
    )
    sub.add_argument(
        "--environment", choices=["development", "production"], help="production refuses unsafe settings"
    )
    sub.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    sub.add_argument(
        "--ingest-queue",
        action="store_const",
        const=True,
        help="completed uploads are queued for 'dicom-cloud worker' processes and answered 202 "
        "(PostgreSQL index only; docs/service.md)",
    )
    add_dimse_flags(sub, serve=True)

    sub = add(
        "token",
        "Create an API token directly in the index (for a new tenant, or when no admin token is left).\n"
        "The token is printed once; only its hash is kept. Needs the service extra.",
        "  dicom-cloud token create --tenant hospital-a --scopes admin --name 'ops'\n"
        "  dicom-cloud token create --tenant hospital-a --scopes write --name 'ci' --expires 30d\n"
        "  dicom-cloud token create --tenant hospital-a --scopes read --database postgresql://svc@db/dicom",
        _token,
    )
    sub.add_argument("action", choices=["create"])
    sub.add_argument("--tenant", required=True)
    sub.add_argument("--scopes", default="read", help="comma-separated: read, write, admin (default read)")
    sub.add_argument("--name", default="cli", help="what the token is for")
    sub.add_argument("--expires", help="lifetime: 3600, 30m, 12h, 30d, 4w (default: valid until revoked)")
    sub.add_argument("--json", action="store_true", help="print a JSON object")
    add_setting_flags(sub)


def server_stack() -> dict[str, str]:
    """uvicorn's HTTP parser and event loop: httptools and uvloop (C, a fraction of the CPU per
    request of h11 and asyncio's own loop) when they are installed, else the pure-Python pair."""
    fast_http = importlib.util.find_spec("httptools") is not None
    fast_loop = importlib.util.find_spec("uvloop") is not None
    return {"http": "httptools" if fast_http else "h11", "loop": "uvloop" if fast_loop else "asyncio"}


def _serve(args: argparse.Namespace) -> int:
    require("service", "dicom-cloud serve")
    from ..service.observability import setup_json_logging
    from ..service.settings import load_settings

    settings = load_settings(
        _flags(
            args,
            {
                "host": args.host,
                "port": args.port,
                "workers": args.workers,
                "public_url": args.public_url,
                "viewer_dir": args.viewer_dir,
                "environment": args.environment,
                "log_level": args.log_level,
                "ingest_queue": args.ingest_queue,
                **dimse_flag_values(args),
            },
        ),
        config_file=args.config,
    )
    if settings.storage is None or settings.database is None:
        make_dirs(settings.data_dir, private=True)  # patient data: owner only
    setup_json_logging(settings.log_level)
    if settings.dicom_port is None and args.peer:
        raise UsageError("--peer configures the DIMSE face: add --dicom-port")
    stop_dimse = _start_dimse(settings, args.peer)
    try:
        return _run_http(settings)
    finally:
        stop_dimse()


def _start_dimse(settings: Any, peer_flags: list[str]) -> Callable[[], None]:
    """The DIMSE face beside the HTTP service, in a thread of this (main) process: one listener
    whatever the number of HTTP workers. Nothing to stop without ``dicom_port``."""
    if settings.dicom_port is None:
        return lambda: None
    require("dimse", "dicom-cloud serve --dicom-port")
    from ..dimse.face import start_in_thread
    from ..service.app import archive_settings
    from .dimse import announce

    dimse = dimse_settings(settings, peer_flags)
    port, stop = start_in_thread(dimse, archive_settings(settings))
    announce(dimse, port)
    return stop


def _run_http(settings: Any) -> int:
    import uvicorn

    from ..service.app import SETTINGS_ENV, bootstrap_once, create_app
    from ..service.workers import balanced_workers_supported, run_workers

    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "proxy_headers": True,
        **server_stack(),
    }
    workers = settings.worker_count
    if workers == 1:
        uvicorn.run(create_app(settings), **options)
        return 0
    # Several processes: the schema is migrated and the first-start token made here, once; the
    # workers get the settings as resolved here, with one signing secret for all of them (a random
    # one per process would not verify the URLs another worker signed).
    asyncio.run(bootstrap_once(settings))
    shared = settings.model_copy(
        update={
            "bootstrap_admin": False,
            "signing_secret": settings.signing_secret or secrets.token_urlsafe(32),
        }
    )
    os.environ[SETTINGS_ENV] = shared.model_dump_json()
    if not balanced_workers_supported():  # uvicorn's own workers: whoever wakes first accepts
        uvicorn.run("dicom_cloud.service.app:app_from_environment", factory=True, workers=workers, **options)
        return 0
    host, port = options.pop("host"), options.pop("port")
    return run_workers(workers, host, port, options)


def _token(args: argparse.Namespace) -> int:
    require("service", "dicom-cloud token create")
    from ..archive import SCOPES, Archive
    from ..service.app import archive_settings
    from ..service.settings import load_settings
    from .options import parse_duration

    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise UsageError(
            f"unknown scope(s): {', '.join(unknown) or 'none given'}", hint="use read, write, admin"
        )
    lifetime = parse_duration(args.expires) if args.expires is not None else None
    settings = load_settings(_flags(args, {}), config_file=args.config)
    if settings.storage is None or settings.database is None:
        make_dirs(settings.data_dir, private=True)  # patient data: owner only

    async def create() -> tuple[str, Any]:
        async with await Archive.open(archive_settings(settings)) as archive:
            return await archive.create_token(args.tenant, args.name, scopes, lifetime)

    secret, record = asyncio.run(create())
    if args.json:
        print(
            json.dumps(
                {
                    "id": record.id,
                    "tenant": record.tenant,
                    "scopes": list(record.scopes),
                    "expires": record.expires.isoformat() if record.expires else None,
                    "token": secret,
                }
            )
        )
    else:
        print(secret)
    return 0
