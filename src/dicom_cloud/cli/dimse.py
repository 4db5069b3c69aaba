"""``dicom-cloud dimse`` (the archive's DIMSE face alone), ``dicom-cloud receive`` (a C-STORE
router into a bucket), and the DIMSE flags ``serve`` shares. The face itself is in
``dicom_cloud.dimse`` (docs/dimse.md)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..extras import require
from ..localio import make_dirs

if TYPE_CHECKING:
    from ..dimse.config import DimseSettings
    from ..service.settings import ServiceSettings
    from ..transfer import TransferEvent

DEFAULT_DICOM_PORT = 11112


def add_dimse_flags(sub: argparse.ArgumentParser, *, serve: bool) -> None:
    """The DIMSE face's flags (also TOML keys: docs/dimse.md)."""
    group = sub.add_argument_group("DICOM network (DIMSE; docs/dimse.md)")
    group.add_argument(
        "--dicom-port",
        type=int,
        help="listen for DICOM associations on this port"
        + (" (default: no DIMSE face)" if serve else f" (default {DEFAULT_DICOM_PORT})"),
    )
    group.add_argument("--dicom-host", help="address the DICOM port listens on (default: --host)")
    group.add_argument("--ae-title", help="our AE title, the one peers call (default DICOMCLOUD)")
    group.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="AE@HOST[:PORT][,tenant=T][,ops=...]",
        help="a known peer (repeatable): its AE title, the address it calls from and the port it "
        "listens on (C-MOVE destinations), its tenant, and what it may do: ops=echo+store+find+move+get",
    )
    group.add_argument("--dicom-max-associations", type=int, help="associations open at once (default 16)")
    group.add_argument(
        "--dicom-max-pdu", type=int, help="largest PDU accepted, bytes (default 65536; 0: any)"
    )
    group.add_argument("--dicom-tls-cert", metavar="PEM", help="DICOM TLS: the certificate chain")
    group.add_argument("--dicom-tls-key", metavar="PEM", help="DICOM TLS: the private key")
    group.add_argument(
        "--dicom-tls-ca", metavar="PEM", help="DICOM TLS: require client certificates signed by this CA"
    )


def dimse_flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The service settings the DIMSE flags give (None: not given)."""
    return {
        "dicom_port": args.dicom_port,
        "dicom_host": args.dicom_host,
        "ae_title": args.ae_title,
        "dicom_max_associations": args.dicom_max_associations,
        "dicom_max_pdu": args.dicom_max_pdu,
        "dicom_tls_cert": args.dicom_tls_cert,
        "dicom_tls_key": args.dicom_tls_key,
        "dicom_tls_ca": args.dicom_tls_ca,
    }


def dimse_settings(settings: ServiceSettings, peer_flags: list[str]) -> DimseSettings:
    """The DIMSE face's settings from the service's, peers of the flags added to the file's."""
    from ..dimse.config import DimseSettings, peers_from

    strings = [p for p in settings.dicom_peers if isinstance(p, str)]
    tables = [p for p in settings.dicom_peers if isinstance(p, dict)]
    return DimseSettings(
        ae_title=settings.ae_title,
        host=settings.dicom_host or settings.host,
        port=DEFAULT_DICOM_PORT if settings.dicom_port is None else settings.dicom_port,
        environment=settings.environment,
        peers=peers_from([*strings, *peer_flags], tables),
        called_tenants=dict(settings.dicom_called_tenants),
        default_tenant=settings.bootstrap_tenant,
        max_associations=settings.dicom_max_associations,
        max_pdu=settings.dicom_max_pdu,
        max_bytes_in_flight=settings.dicom_max_bytes_in_flight,
        tls_cert=settings.dicom_tls_cert,
        tls_key=settings.dicom_tls_key,
        tls_ca=settings.dicom_tls_ca,
    ).check()


def announce(settings: DimseSettings, port: int) -> None:
    note = (
        " (development, no peer configured: any calling AE on the loopback address is accepted)"
        if settings.open_to_loopback
        else f" ({len(settings.peers)} peer{'s' if len(settings.peers) != 1 else ''} configured)"
    )
    tls = " over TLS" if settings.tls_cert else ""
    print(
        f"dicom-cloud: AE {settings.ae_title} listening on {settings.host}:{port}{tls}{note}",
        file=sys.stderr,
        flush=True,
    )


def register(
    add: Callable[..., Any],
    write_options: Callable[[argparse.ArgumentParser], None],
    connection_options: Callable[[argparse.ArgumentParser], None],
    output_options: Callable[..., None],
) -> None:
    """Add ``dimse`` and ``receive`` to the CLI."""
    from .jobs import add_journal_option
    from .serve import add_setting_flags

    sub = add(
        "dimse",
        "Run the archive's DICOM network face alone (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET), on\n"
        "the same storage and index as 'dicom-cloud serve' (same settings; docs/dimse.md). To run\n"
        "it beside the DICOMweb service instead: dicom-cloud serve --dicom-port 11112.",
        "  dicom-cloud dimse\n"
        "  dicom-cloud dimse --dicom-port 104 --ae-title PACS --peer CT1@10.0.0.5,tenant=radiology\n"
        "  dicom-cloud dimse --config service.toml --environment production",
        _dimse,
    )
    add_setting_flags(sub)
    sub.add_argument(
        "--environment", choices=["development", "production"], help="production requires configured peers"
    )
    sub.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    add_dimse_flags(sub, serve=False)

    sub = add(
        "receive",
        "Receive instances from modalities and PACS (a C-STORE SCP) and write them straight to a\n"
        "bucket or directory, as 'upload' would (--layout, --encrypt, --deidentify, --dicom-tags,\n"
        "the journal); no index. Each instance is acknowledged once it is written and verified\n"
        "at the destination. Without --layout, objects are named by the 'uid' layout.",
        "  dicom-cloud receive s3://archive/incoming/\n"
        "  dicom-cloud receive gs://research/ --deidentify --deid-secret-file deid.key --port 11112\n"
        "  dicom-cloud receive azure://acct/c/ --encrypt client-side --master-key 1:key.b64 \\\n"
        "      --peer CT1@10.0.0.5 --environment production",
        _receive,
    )
    sub.add_argument("destination", help="where to write: a URL or a local directory")
    group = sub.add_argument_group("DICOM network")
    group.add_argument("--port", type=int, default=DEFAULT_DICOM_PORT, help="port (default: %(default)s)")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    group.add_argument("--ae-title", default="DICOMCLOUD", help="our AE title (default: %(default)s)")
    group.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="AE@HOST[:PORT][,ops=...]",
        help="a known sender (repeatable); none: loopback callers only (development)",
    )
    group.add_argument(
        "--environment",
        choices=["development", "production"],
        default="development",
        help="production requires --peer (default: %(default)s)",
    )
    group.add_argument("--max-associations", type=int, default=16, help="default: %(default)s")
    group.add_argument("--max-pdu", type=int, default=65536, help="bytes (default: %(default)s)")
    group.add_argument("--tls-cert", metavar="PEM", help="DICOM TLS: the certificate chain")
    group.add_argument("--tls-key", metavar="PEM", help="DICOM TLS: the private key")
    group.add_argument("--tls-ca", metavar="PEM", help="DICOM TLS: require client certificates of this CA")
    group.add_argument(
        "--spool",
        metavar="DIR",
        help="where received instances wait until written (default: under the state directory)",
    )
    write_options(sub)
    add_journal_option(sub)
    connection_options(sub)
    output_options(sub)


def _dimse(args: argparse.Namespace) -> int:
    require("service", "dicom-cloud dimse")
    require("dimse", "dicom-cloud dimse")
    from ..dimse.face import run_archive_face
    from ..service.app import archive_settings
    from ..service.observability import setup_json_logging
    from ..service.settings import load_settings
    from .runner import run as run_command
    from .serve import setting_flag_values

    settings = load_settings(
        {
            **setting_flag_values(args),
            **dimse_flag_values(args),
            "environment": args.environment,
            "log_level": args.log_level,
        },
        config_file=args.config,
    )
    if settings.storage is None or settings.database is None:
        make_dirs(settings.data_dir, private=True)  # patient data: owner only
    setup_json_logging(settings.log_level)
    dimse = dimse_settings(settings, args.peer)
    run_command(run_archive_face(dimse, archive_settings(settings), lambda port: announce(dimse, port)))
    return 0


def _receive(args: argparse.Namespace) -> int:
    require("dimse", "dicom-cloud receive")
    from ..dimse.config import DimseSettings, peers_from
    from ..journal import state_dir
    from .jobs import job_request
    from .options import config_from_args, options_from_args
    from .runner import run as run_command

    if args.dry_run:
        raise UsageError("receive has no --dry-run: it writes what it is sent")
    if args.include or args.exclude or args.files_from:
        raise UsageError(
            "--include, --exclude and --files-from select files by name; received instances have none",
            hint="select by DICOM attributes: --modality, --study-uid, --series-uid, --sop-class",
        )
    if args.layout is None:
        args.layout = "uid"
    options = options_from_args(args)
    config = config_from_args(args, encrypt=args.encrypt, sse_kms_key_id=args.sse_kms_key_id)
    settings = DimseSettings(
        ae_title=args.ae_title,
        host=args.host,
        port=args.port,
        environment=args.environment,
        peers=peers_from(args.peer, []),
        max_associations=args.max_associations,
        max_pdu=args.max_pdu,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
    ).check()
    if args.spool:
        spool = Path(args.spool).absolute()
    else:
        identity = json.dumps([args.destination, args.ae_title, args.port])
        spool = state_dir() / "receive" / hashlib.sha256(identity.encode()).hexdigest()[:16]
    make_dirs(spool, private=True)  # patient data: owner only
    printer = _EventPrinter(quiet=args.quiet, json_output=args.json_output)
    run_command(_route(args, settings, spool, options, config, job_request(args), printer))
    return 0


class _EventPrinter:
    """One line per instance written or refused (never patient data: names and outcomes)."""

    def __init__(self, *, quiet: bool, json_output: bool) -> None:
        self._quiet = quiet
        self._json = json_output

    def __call__(self, event: TransferEvent) -> None:
        if event.kind not in ("completed", "skipped", "failed"):
            return
        if self._json:
            record = {"event": event.kind, "destination": event.dst, "size": event.size}
            if event.error is not None:
                record["error"] = str(event.error)
            print(json.dumps(record), flush=True)
        elif not self._quiet or event.kind == "failed":
            reason = f": {event.error}" if event.error is not None else ""
            print(f"{event.kind} {event.dst}{reason}", file=sys.stderr, flush=True)


async def _route(
    args: argparse.Namespace,
    settings: DimseSettings,
    spool: Path,
    options: Any,
    config: Any,
    job: Any,
    printer: _EventPrinter,
) -> None:
    from dataclasses import replace

    from pynetdicom import evt

    from ..dicom.manifest import ManifestWriter
    from ..dicom.uidmap import UidMapLog
    from ..dimse.receive import Router, RouterStore
    from ..dimse.scp import Listener
    from ..journal import JobSpec, Journal
    from ..location import LocationOpener

    opener = LocationOpener(config)
    journal: Journal | None = None
    # Rows are complete as they are written: the manifest is kept (committed) however receive ends.
    manifest = ManifestWriter.open(args.manifest) if args.manifest else None
    uid_log = UidMapLog(args.deid_map) if args.deid_map else None
    if uid_log is not None:
        options = replace(options, on_uid_map=uid_log.write)
    try:
        destination = opener.open(args.destination)
        spool_location = opener.open(str(spool) + "/")
        opener.config.check_encryption_applies({destination.url.scheme})
        if job is not None:
            journal = Journal.open(
                JobSpec(
                    verb="receive",
                    source=spool_location.display(spool_location.key),
                    destination=destination.display(destination.key),
                    options=job.options,
                    argv=job.argv,
                    cwd=job.cwd,
                )
            )
        router = Router(
            spool_location, destination, options, journal=journal, on_event=printer, manifest=manifest
        )
        listener = Listener(settings, query_retrieve=False, loop=asyncio.get_running_loop())
        listener.on(evt.EVT_C_STORE, RouterStore(listener, router, settings))
        routing = asyncio.create_task(router.run())
        port = listener.start()
        announce(settings, port)
        try:
            summary = await routing
        finally:
            await asyncio.to_thread(listener.stop)
            routing.cancel()
            await asyncio.gather(routing, return_exceptions=True)
        if journal is not None:
            journal.finish(failed=len(summary.failed))
            journal = None
    finally:
        if journal is not None:
            journal.close()  # interrupted: kept, with what it recorded
        if manifest is not None:
            manifest.close()
        if uid_log is not None:
            uid_log.close()
        await opener.close()
