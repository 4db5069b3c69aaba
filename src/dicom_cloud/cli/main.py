"""The ``dicom-cloud`` command: parses arguments, calls :mod:`dicom_cloud.api`, renders the result.

No storage logic lives here. Errors from the core become one line on stderr and the exit
code of their class (table in ``docs/cli.md`` and in ``dicom-cloud --help``). The parser is
argparse: it costs nothing at start-up, which matters for a command run thousands of times
by scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from .. import __version__, api
from ..errors import ConflictError, DicomCloudError, NotFoundError, TransferFailedError, UsageError
from ..location import LocationOpener
from ..retry import DEFAULT_ATTEMPTS
from ..store import ObjectInfo
from ..transfer import (
    DEFAULT_MULTIPART_THRESHOLD,
    DEFAULT_PARALLEL,
    DEFAULT_PART_CONCURRENCY,
    DEFAULT_PART_SIZE,
    TransferSummary,
)
from ..url import account_scheme
from . import dimse as dimse_commands
from . import serve as serve_commands
from . import viewer as viewer_commands
from . import worker as worker_commands
from .jobs import add_cluster_option, add_job_commands, add_journal_option, cluster_arguments, job_request
from .options import (
    client_encryption,
    config_from_args,
    dicom_selection_flags,
    options_from_args,
    parse_duration,
    setup_logging,
    transfer_options,
)
from .render import (
    TransferProgress,
    bucket_line,
    bucket_record,
    choose_mode,
    error_record,
    human_bytes,
    listing_line,
    object_record,
    plural,
    print_error,
)
from .runner import Stopped
from .runner import run as run_command

EXIT_CODES_HELP = """\
exit codes:
  0   success                          7   integrity check failed
  1   some transfers failed; verify    8   destination exists (create-only writes)
      found differences                9   unsafe object name (../, NUL)
  2   bad arguments or URL             10  operation not supported by the store
  3   not found (object, bucket,       11  encrypted under a master key not given
      prefix or local path)            12  not DICOM, or a malformed DICOM header
  4   credentials refused              13  the same job is already running
  5   permission denied                14  sync would delete more than --max-delete
  6   network failure or throttling    15  needs an extra: pip install 'dicom-cloud[X]'
                                       130 interrupted (Ctrl-C); run again to resume
                                       143 stopped by SIGTERM; run again to resume
"""

DESCRIPTION = """\
Move DICOM files between local disk and object storage: AWS S3 and S3-compatible
servers, Google Cloud Storage, Azure Blob Storage.

Locations are URLs: s3://bucket/key, gs://bucket/key, azure://container/blob (or
az://), file:///path or a plain path. A trailing slash means "inside this prefix".

Credentials come from each provider's standard places: AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws; GOOGLE_APPLICATION_CREDENTIALS;
AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT with AZURE_STORAGE_KEY or
AZURE_STORAGE_SAS_TOKEN. Run 'dicom-cloud COMMAND --help' for examples.
"""

TransferCall = Callable[..., Coroutine[Any, Any, TransferSummary]]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own errors: usage line, message, exit 2
        self.print_usage(sys.stderr)
        print(f"dicom-cloud: error: {message}", file=sys.stderr)
        print(f"hint: run '{self.prog} --help' for the options and examples", file=sys.stderr)
        raise SystemExit(2)


# -- option groups ---------------------------------------------------------------------


def _connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--endpoint",
        default=os.environ.get("DICOM_CLOUD_ENDPOINT"),
        help="S3-compatible endpoint URL (MinIO, SeaweedFS, Ceph...); also DICOM_CLOUD_ENDPOINT "
        "or AWS_ENDPOINT_URL",
    )
    group.add_argument("--region", help="AWS region (default: AWS_REGION, the profile's, else us-east-1)")
    style = group.add_mutually_exclusive_group()
    style.add_argument(
        "--path-style",
        dest="path_style",
        action="store_const",
        const=True,
        default=None,
        help="S3 path-style addressing (the default when --endpoint is given)",
    )
    style.add_argument(
        "--virtual-host",
        dest="path_style",
        action="store_const",
        const=False,
        help="S3 virtual-host addressing",
    )
    group.add_argument(
        "--retries",
        type=_bounded_int(0, 20),
        default=4,
        help="retries per request on transient failures (default: %(default)s)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds before one request is abandoned (default: %(default)s)",
    )
    group.add_argument(
        "--sse-customer-key-file",
        metavar="PATH",
        default=os.environ.get("DICOM_CLOUD_SSE_CUSTOMER_KEY_FILE"),
        help="file with a base64 32-byte key: SSE-C on S3, customer-provided key on Azure, CSEK on GCS; "
        "needed again to read; never logged (also DICOM_CLOUD_SSE_CUSTOMER_KEY_FILE)",
    )


def _output_options(parser: argparse.ArgumentParser, *, quiet: bool = True) -> None:
    group = parser.add_argument_group("output")
    if quiet:
        group.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    group.add_argument("--json", dest="json_output", action="store_true", help="one JSON object per line")
    group.add_argument("-v", "--verbose", action="store_true", help="log decisions to stderr (never secrets)")


def _transfer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="where to read: a URL or a local path")
    parser.add_argument("destination", help="where to write: a URL or a local path")
    parser.add_argument(
        "-r", "--recursive", action="store_true", help="every object under a prefix or directory"
    )
    _write_options(parser)


def _write_options(parser: argparse.ArgumentParser) -> None:
    """How a transfer writes (tags, encryption, DICOM layout, de-identification, selection,
    performance): shared with ``receive``."""
    parser.add_argument("--tags", help="metadata K=V,K2=V2 stored with every object written")
    parser.add_argument(
        "--object-tags", action="store_true", help="also store --tags as S3 object tags / Azure index tags"
    )
    parser.add_argument(
        "--encrypt",
        choices=["server-side", "client-side"],
        help="client-side: encrypt before upload with --master-key (Orthanc's A1 envelope, or DC2; "
        "a download decrypts, see --keep-encrypted); "
        "server-side: SSE-S3 (AES256) on S3, Azure and GCS always encrypt at rest",
    )
    _key_arguments(parser)
    parser.add_argument(
        "--encryption-format",
        choices=["A1", "DC2", "a1", "dc2"],
        help="client-side format: A1 (Orthanc-compatible, default) or DC2 (chunked, ranged reads)",
    )
    parser.add_argument("--sse-kms-key-id", help="SSE-KMS key id or ARN for S3 writes")
    parser.add_argument(
        "--azure-encryption-scope", metavar="NAME", help="Azure encryption scope for writes (must exist)"
    )
    parser.add_argument(
        "--gcs-kms-key",
        metavar="NAME",
        help="Cloud KMS key for GCS writes: projects/P/locations/L/keyRings/R/cryptoKeys/K",
    )
    parser.add_argument(
        "--no-overwrite", action="store_true", help="skip objects that already exist at the destination"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan; transfer nothing")
    dicom = parser.add_argument_group("DICOM")
    dicom.add_argument(
        "--layout",
        metavar="PRESET|TEMPLATE",
        help="name objects from their DICOM header: 'hashed' (no UID in names, load spread over "
        "prefixes), 'uid' ({StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm), "
        "'orthanc-flat' / 'orthanc-legacy' (Orthanc's object names), or a template",
    )
    dicom.add_argument(
        "--layout-key-file",
        metavar="PATH",
        help="secret for the 'hashed' layout: names cannot be linked to UIDs",
    )
    dicom.add_argument(
        "--dicom-tags",
        metavar="K1,K2",
        help="DICOM attributes stored as object metadata (dicom_<keyword>), e.g. Modality,SeriesInstanceUID",
    )
    dicom.add_argument(
        "--validate",
        action="store_true",
        help="skip files that are not DICOM (each reported with the reason)",
    )
    dicom.add_argument(
        "--strict", action="store_true", help="read headers strictly (Part 10 files with all identity UIDs)"
    )
    dicom.add_argument(
        "--on-conflict",
        choices=["overwrite", "skip", "keep-both", "fail"],
        help="an object already at the name with other bytes (with a DICOM layout: the same SOP Instance "
        "UID, from before or from another file of the run): replace it (reported as replaced), leave it, "
        "write beside it (name~crc32c), or fail that file (listed; exit 1, or 8 for one file); identical "
        "objects are skipped (default: fail with a DICOM layout, else overwrite)",
    )
    dicom.add_argument(
        "--deidentify",
        action="store_true",
        help="de-identify every instance on its way (PS3.15 Basic Profile; needs --deid-secret-file)",
    )
    dicom.add_argument(
        "--deid-secret-file",
        metavar="PATH",
        help="secret (>= 16 bytes) making new UIDs and pseudonyms consistent across files and runs",
    )
    dicom.add_argument(
        "--deid-dates",
        choices=["remove", "shift"],
        default="remove",
        help="dates: removed (Basic Profile) or shifted per patient, intervals kept (default: %(default)s)",
    )
    dicom.add_argument(
        "--deid-map",
        metavar="PATH",
        help="keep the UID mapping (JSON lines: old, new) in this file; it links the data back to "
        "patients: store it apart, or not at all (the default)",
    )
    dicom.add_argument(
        "--manifest",
        metavar="PATH",
        help="inventory of what was transferred: .jsonl, .csv or .parquet (UIDs, key, size, CRC32C, status)",
    )
    select = parser.add_argument_group("selection")
    select.add_argument("--include", metavar="GLOB", action="append", default=[], help="only names matching")
    select.add_argument(
        "--exclude", metavar="GLOB", action="append", default=[], help="leave out names matching"
    )
    select.add_argument(
        "--files-from", metavar="PATH", help="only the names listed in this file, one per line"
    )
    select.add_argument("--modality", metavar="M", action="append", default=[], help="only these modalities")
    select.add_argument(
        "--study-uid", "--study", metavar="UID", action="append", default=[], help="only this study"
    )
    select.add_argument(
        "--series-uid", "--series", metavar="UID", action="append", default=[], help="only this series"
    )
    select.add_argument("--sop-class", metavar="UID", action="append", default=[], help="only this SOP class")
    dicom.add_argument(
        "--allow-phi",
        action="store_true",
        help="allow patient data (PatientName, PatientID, dates...) in names, metadata and --tags",
    )
    perf = parser.add_argument_group("performance")
    perf.add_argument(
        "-j",
        "--parallel",
        type=_bounded_int(1, 512),
        default=DEFAULT_PARALLEL,
        help="objects transferred at once (default: %(default)s, measured: docs/benchmarks.md)",
    )
    perf.add_argument(
        "--part-size",
        default=f"{DEFAULT_PART_SIZE // 2**20}MiB",
        help="part size of multipart transfers (default: %(default)s)",
    )
    perf.add_argument(
        "--multipart-threshold",
        default=f"{DEFAULT_MULTIPART_THRESHOLD // 2**20}MiB",
        help="larger objects use multipart uploads and ranged parallel downloads (default: %(default)s)",
    )
    perf.add_argument(
        "--part-concurrency",
        type=_bounded_int(1, 64),
        default=DEFAULT_PART_CONCURRENCY,
        help="parts of one large object in flight (default: %(default)s)",
    )
    perf.add_argument(
        "--attempts",
        type=_bounded_int(1, 20),
        default=DEFAULT_ATTEMPTS,
        help="attempts per object on network faults and throttling, with backoff "
        "(default: %(default)s; see docs/reliability.md)",
    )


def _key_arguments(parser: argparse.ArgumentParser) -> None:
    keys = parser.add_argument_group("client-side encryption keys (also DICOM_CLOUD_MASTER_KEY, config file)")
    keys.add_argument(
        "--master-key",
        metavar="ID:PATH",
        help="master key: a uint32 id and a file of base64 of 32 bytes; encrypts, and decrypts its objects",
    )
    keys.add_argument(
        "--previous-key",
        metavar="ID:PATH",
        action="append",
        default=[],
        help="an older master key, for reading only (repeatable)",
    )


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return parse


# -- commands --------------------------------------------------------------------------


def _transfer(verb: str, call: TransferCall) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        options = options_from_args(args)
        config = config_from_args(args, encrypt=args.encrypt, sse_kms_key_id=args.sse_kms_key_id)
        mode = choose_mode(quiet=args.quiet, json_output=args.json_output)
        on_cluster = args.cluster is not None and not options.dry_run  # a dry run only lists: here
        if args.journal_url is not None and args.cluster is None:
            raise UsageError(
                "--journal is the journal of a run on a cluster", hint="add --cluster, or drop --journal"
            )
        if on_cluster:
            cluster = _cluster_of(args)
        with TransferProgress(mode, verb, report_failures=args.recursive) as progress:
            if on_cluster:
                from ..cluster.runner import transfer_on_cluster

                summary = run_command(
                    transfer_on_cluster(
                        args.command,
                        args.source,
                        args.destination,
                        cluster=cluster,
                        arguments=cluster_arguments(args),
                        options=options,
                        config=config,
                        on_event=progress,
                        job=job_request(args),
                        partition_items=args.partition_size,
                        journal_url=args.journal_url,
                    )
                )
            else:
                summary = run_command(
                    call(
                        args.source,
                        args.destination,
                        recursive=args.recursive,
                        options=options,
                        config=config,
                        on_event=progress,
                        manifest=args.manifest,
                        deid_map=args.deid_map,
                        job=job_request(args),
                    )
                )
        progress.summary(summary)
        if summary.failed and not args.recursive:
            raise summary.failed[0][1]  # one object: exit with its own error's code
        dicom_selection = dicom_selection_flags(args)
        if dicom_selection and not options.dry_run and not summary.selected:
            looked_at = summary.filtered_out
            raise NotFoundError(
                f"no object matched {dicom_selection} "
                f"({looked_at} object{'s' if looked_at != 1 else ''} looked at)",
                hint="'dicom-cloud list URL -r --studies' shows the studies there",
            )
        if summary.failed:
            attempted = len(summary.failed) + summary.files + summary.skipped
            conflicts = sum(1 for _, error in summary.failed if isinstance(error, ConflictError))
            raise TransferFailedError(
                f"{len(summary.failed)} of {plural(attempted, 'transfer')} failed"
                + (
                    f" ({plural(conflicts, 'conflict')}: other bytes under a name already taken)"
                    if conflicts
                    else ""
                ),
                failed=len(summary.failed),
                hint="choose --on-conflict keep-both, overwrite or skip for the conflicts; re-run the "
                "same command to retry the other failures"
                if conflicts
                else "re-run the same command to retry the failed ones",
            )
        return 0

    return handler


def _cluster_of(args: argparse.Namespace) -> Any:
    """The ``--cluster`` of a transfer command, refused where it does not apply."""
    from ..cluster.spec import parse_cluster

    cluster = parse_cluster(args.cluster)
    if args.partition_size < 1:
        raise UsageError("--partition-size must be at least 1")
    if not args.recursive:
        raise UsageError("--cluster runs a recursive transfer", hint="add --recursive, or drop --cluster")
    for flag, value in (("--manifest", args.manifest), ("--deid-map", args.deid_map)):
        if value:
            raise UsageError(f"{flag} is not available with --cluster", hint=f"drop {flag} or --cluster")
    return cluster


def _display(config: Any, url: str) -> Callable[[str], str]:
    """How keys under ``url`` are shown (opening a location makes no request)."""
    return LocationOpener(config).open(url).display


def _list(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if account_scheme(args.url) is not None:
        return _list_buckets(args, config)
    if args.studies:
        return _list_studies(args, config)
    location = LocationOpener(config).open(args.url)
    # Names are shown relative to the listed prefix's directory, as `aws s3 ls` does.
    if location.names_directory or location.is_local:
        base = location.prefix
    else:
        parent = location.key.rpartition("/")[0]
        base = f"{parent}/" if parent else ""

    async def run() -> tuple[int, int]:
        count = total = 0
        async for info in api.list_async(
            args.url, recursive=args.recursive, config=config, metadata=args.metadata
        ):
            count += 1
            total += info.size
            if args.json_output:
                record = object_record(info, location.display)
                if args.metadata:
                    record["metadata"] = dict(info.metadata)
                print(json.dumps(record, ensure_ascii=False))
            else:
                name = info.key[len(base) :] if info.key.startswith(base) else info.key
                line = listing_line(info, details=args.details, name=name)
                if args.metadata and info.metadata:
                    line += "  " + " ".join(f"{k}={v}" for k, v in sorted(info.metadata.items()))
                print(line)
        return count, total

    count, total = run_command(run())
    if args.details and not args.json_output:
        print(f"{plural(count, 'entry', 'entries')}, {human_bytes(total)}", file=sys.stderr)
    return 0


def _list_buckets(args: argparse.Namespace, config: Any) -> int:
    """``list s3://`` (gs://, azure://): the buckets or containers, as ``aws s3 ls`` does."""
    if args.recursive or args.studies or args.metadata:
        raise UsageError(
            f"{args.url} lists buckets: --recursive, --studies and --metadata apply inside a bucket",
            hint=f"give a bucket: {args.url}BUCKET/",
        )
    for bucket in run_command(api.list_buckets_async(args.url, config=config)):
        if args.json_output:
            print(json.dumps(bucket_record(bucket), ensure_ascii=False))
        else:
            print(bucket_line(bucket, details=args.details))
    return 0


def _list_studies(args: argparse.Namespace, config: Any) -> int:
    studies, unreadable = run_command(api.studies_async(args.url, config=config))
    for study in studies:
        modalities = ",".join(sorted(study.modalities)) or "-"
        if args.json_output:
            record = {
                "study_instance_uid": study.study_instance_uid,
                "series": len(study.series),
                "instances": study.instances,
                "bytes": study.bytes,
                "modalities": sorted(study.modalities),
            }
            print(json.dumps(record))
        else:
            print(
                f"{study.study_instance_uid}  {len(study.series):>4} series  {study.instances:>6} instances  "
                f"{human_bytes(study.bytes):>10}  {modalities}"
            )
    if not args.json_output:
        note = (
            f", {plural(unreadable, 'object')} not readable as DICOM (encrypted or other files)"
            if unreadable
            else ""
        )
        print(f"{plural(len(studies), 'study', 'studies')}{note}", file=sys.stderr)
    return 0


def _delete(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not args.force and not args.dry_run:
        question = f"Delete {args.url}?"
        if args.recursive:
            objects, total = run_command(api.count_async(args.url, config=config))
            question = (
                f"Delete {plural(objects, 'object')} ({human_bytes(total)}) under {args.url}?"
                if objects
                else ""
            )
        if question:
            if not sys.stdin.isatty():
                raise UsageError(
                    "refusing to delete without confirmation",
                    hint="pass --force (or --dry-run to see what would go)",
                )
            answer = input(f"{question} [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                print("Nothing deleted.", file=sys.stderr)
                return 0
    verb = "would delete" if args.dry_run else "deleted"

    display = _display(config, args.url)

    def report(info: ObjectInfo) -> None:
        if args.json_output:
            record = {
                "event": verb.replace(" ", "_"),
                "key": info.key,
                "url": display(info.key),
                "size": info.size,
            }
            print(json.dumps(record, ensure_ascii=False))
        elif args.dry_run or not args.quiet:
            print(f"{verb} {display(info.key)}")

    summary = run_command(
        api.delete_async(
            args.url, recursive=args.recursive, dry_run=args.dry_run, config=config, on_deleted=report
        )
    )
    if not args.quiet and not args.json_output:
        head = "Would delete" if args.dry_run else "Deleted"
        print(f"{head} {plural(summary.objects, 'object')} ({human_bytes(summary.bytes)})", file=sys.stderr)
    return 0


def _share(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    lifetime = parse_duration(args.expires)

    def emit(target: str, link: str) -> None:
        print(
            json.dumps({"url": target, "link": link})
            if args.json_output
            else (f"{target}\t{link}" if args.recursive else link)
        )

    async def run() -> None:
        if not args.recursive:
            emit(args.url, await api.share_async(args.url, expires=lifetime, config=config))
            return
        async for target, link in api.share_many_async(args.url, expires=lifetime, config=config):
            emit(target, link)

    run_command(run())
    return 0


def _rekey(args: argparse.Namespace) -> int:
    encryption = client_encryption("client-side", args.encryption_format, args.master_key, args.previous_key)
    options = transfer_options(
        args.parallel, f"{DEFAULT_PART_SIZE}", f"{DEFAULT_MULTIPART_THRESHOLD}", DEFAULT_PART_CONCURRENCY,
        encryption=encryption, rekey=True,
    )  # fmt: skip
    mode = choose_mode(quiet=args.quiet, json_output=args.json_output)
    with TransferProgress(mode, "Re-encrypted", report_failures=args.recursive) as progress:
        summary = run_command(
            api.copy_async(
                args.url,
                args.url,
                recursive=args.recursive,
                options=options,
                config=config_from_args(args),
                on_event=progress,
            )
        )
    progress.summary(summary)
    if summary.failed:
        if not args.recursive:
            raise summary.failed[0][1]
        raise TransferFailedError(
            f"{plural(len(summary.failed), 'object')} could not be re-encrypted",
            failed=len(summary.failed),
            hint="run the same command again: objects already under the new key are skipped",
        )
    return 0


def _version(_: argparse.Namespace) -> int:
    print(f"dicom-cloud {__version__}")
    return 0


class _NotRun:
    """Stands for the parser of a command other than the one being run, taking every call of
    argparse's building API and doing nothing. Running one command needs neither the other
    commands' parsers nor their options: building every command's options (about 470
    ``add_argument`` calls) was 6-8 ms of each start, and their parsers another 2-3 ms. An unknown
    command gets the whole parser, whose error lists every command."""

    def __getattr__(self, name: str) -> Callable[..., _NotRun]:
        return self._nothing

    def _nothing(self, *args: object, **kwargs: object) -> _NotRun:
        return self


def command_named(argv: Sequence[str]) -> str | None:
    """The command an argument list runs (its first word), or None when it starts with an option."""
    return argv[0] if argv and not argv[0].startswith("-") else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with ``command``, only that command's options are built."""
    parser = _Parser(
        prog="dicom-cloud", description=DESCRIPTION, epilog=EXIT_CODES_HELP, formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"dicom-cloud {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    built: list[str] = []

    def add(name: str, summary: str, examples: str, handler: Callable[[argparse.Namespace], int]) -> Any:
        if command is not None and name != command:
            return _NotRun()  # another command: neither its parser nor its options are made
        sub = commands.add_parser(
            name,
            help=summary,
            description=f"{summary}\n\nexamples:\n{examples}",
            epilog=EXIT_CODES_HELP,
            formatter_class=_Formatter,
        )
        sub.set_defaults(handler=handler)
        built.append(name)
        return sub

    for name, verb, call, summary, examples in (
        (
            "upload",
            "Uploaded",
            api.upload_async,
            "Upload a local file, or a directory with --recursive, to a bucket.",
            "  dicom-cloud upload scan.dcm s3://archive/scans/scan.dcm\n"
            "  dicom-cloud upload study/ s3://archive/studies/1/ --recursive\n"
            '  dicom-cloud upload study/ gs://archive/1/ -r --tags "Source=PACS1"\n'
            "  dicom-cloud upload study/ s3://bucket/1/ -r --endpoint http://127.0.0.1:9000",
        ),
        (
            "download",
            "Downloaded",
            api.download_async,
            "Download an object, or a prefix with --recursive, to local disk. Files appear under\n"
            "their final name only when complete and verified.",
            "  dicom-cloud download s3://archive/scans/scan.dcm scan.dcm\n"
            "  dicom-cloud download s3://archive/studies/1/ local-study/ --recursive",
        ),
        (
            "copy",
            "Copied",
            api.copy_async,
            "Copy between any two locations: server-side inside one bucket, streamed across providers.",
            "  dicom-cloud copy s3://src/study/ gs://dst/study/ --recursive\n"
            "  dicom-cloud copy azure://c/a.dcm s3://b/a.dcm",
        ),
    ):
        sub = add(name, summary, examples, _transfer(verb, call))
        _transfer_arguments(sub)
        if name == "download":
            sub.add_argument(
                "--keep-encrypted",
                action="store_true",
                help="write the local copies client-side encrypted under the current master key "
                "(by default a download decrypts, --encrypt client-side included)",
            )
        add_journal_option(sub)
        add_cluster_option(sub)
        _connection_options(sub)
        _output_options(sub)

    sub = add(
        "list",
        "List objects under a prefix (one level, or everything with --recursive); with a scheme\n"
        "alone (s3://, gs://, azure://), the buckets or containers the credentials reach.",
        "  dicom-cloud list s3://\n"
        "  dicom-cloud list s3://archive/studies/\n"
        "  dicom-cloud list s3://archive/studies/ --recursive --details\n"
        "  dicom-cloud list gs://archive/ --json",
        _list,
    )
    sub.add_argument("url", help="bucket, prefix or local directory; s3:// gs:// azure:// alone: the buckets")
    sub.add_argument("-r", "--recursive", action="store_true", help="every object below, not one level")
    sub.add_argument("-l", "--details", action="store_true", help="show last-modified time and size")
    sub.add_argument(
        "--metadata",
        "-m",
        action="store_true",
        help="also show each object's metadata (--tags, --dicom-tags like dicom_modality): a request each",
    )
    sub.add_argument(
        "--studies",
        action="store_true",
        help="group the objects below by DICOM study (series, instances, size, modalities), from headers",
    )
    _connection_options(sub)
    _output_options(sub, quiet=False)

    sub = add(
        "delete",
        "Delete an object, or everything under a prefix with --recursive. Asks for\n"
        "confirmation on a terminal; elsewhere refuses without --force.",
        "  dicom-cloud delete s3://archive/scans/old.dcm\n"
        "  dicom-cloud delete s3://archive/tmp/ --recursive --dry-run\n"
        "  dicom-cloud delete s3://archive/tmp/ --recursive --force",
        _delete,
    )
    sub.add_argument("url", help="object, or prefix with --recursive")
    sub.add_argument("-r", "--recursive", action="store_true", help="every object under the prefix")
    sub.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    sub.add_argument("--dry-run", action="store_true", help="print what would be deleted; delete nothing")
    _connection_options(sub)
    _output_options(sub)

    sub = add(
        "share",
        "Print a presigned URL that lets anyone holding it download the object until it expires.",
        "  dicom-cloud share s3://archive/scans/scan.dcm --expires 12h\n"
        "  dicom-cloud share gs://archive/study/ --recursive --expires 7d --json",
        _share,
    )
    sub.add_argument("url", help="object to share (s3://, gs:// or azure://)")
    sub.add_argument(
        "-e",
        "--expires",
        default="1h",
        help="lifetime: seconds, or 30m, 12h, 7d (S3: at most 7d) (default: %(default)s)",
    )
    sub.add_argument("-r", "--recursive", action="store_true", help="one URL per object under the prefix")
    _connection_options(sub)
    _output_options(sub, quiet=False)

    sub = add(
        "rekey",
        "Re-encrypt client-side encrypted objects under a new master key, in place. Objects already\n"
        "under the new key are skipped, so an interrupted rekey resumes by running it again.",
        "  dicom-cloud rekey s3://archive/studies/ -r --master-key 8:new.key --previous-key 7:old.key",
        _rekey,
    )
    sub.add_argument("url", help="object, or prefix with --recursive")
    sub.add_argument("-r", "--recursive", action="store_true", help="every object under the prefix")
    _key_arguments(sub)
    sub.add_argument(
        "--encryption-format", choices=["A1", "DC2", "a1", "dc2"], help="format to rewrite in (default: A1)"
    )
    sub.add_argument(
        "-j",
        "--parallel",
        type=_bounded_int(1, 512),
        default=8,
        help="objects at once (default: %(default)s)",
    )
    _connection_options(sub)
    _output_options(sub)

    add_job_commands(add, _transfer_arguments, _connection_options, _output_options)

    # cleanup: leftovers of interrupted transfers (code in cli/cleanup.py)
    from . import cleanup as cleanup_command

    sub = add(
        "cleanup",
        cleanup_command.SUMMARY,
        cleanup_command.EXAMPLES,
        lambda args: cleanup_command.run(args, config_from_args(args)),
    )
    cleanup_command.add_arguments(sub)
    _connection_options(sub)
    _output_options(sub)

    serve_commands.register(add)  # dicom-cloud serve, dicom-cloud token (the service's commands)
    worker_commands.register(add)  # dicom-cloud worker (the ingest queue's jobs)
    viewer_commands.register(add)  # dicom-cloud viewer install (OHIF for serve's /viewer/)
    dimse_commands.register(add, _write_options, _connection_options, _output_options)
    add("version", "Print the version.", "  dicom-cloud version", _version)

    from .orthanc import add_parser as add_orthanc_parser  # the Orthanc plugin's configuration

    add_orthanc_parser(commands, add)
    if command is not None and not built:
        return build_parser()  # not a command: refused with the list of every command
    return parser


# -- entry point -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (errors are printed, never raised)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_named(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 0
    args.argv = argv  # recorded by journals, for `resume`
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    setup_logging(getattr(args, "verbose", False))
    json_output = bool(getattr(args, "json_output", False))
    try:
        code: int = args.handler(args)
        return code
    except DicomCloudError as exc:
        print_error(exc, exc.hint)
        if json_output:
            error_record(type(exc).__name__, str(exc), exc.exit_code, exc.hint)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (runner.Stopped)
        stopped = exc if isinstance(exc, Stopped) else Stopped(signal.SIGINT)
        print(f"\ndicom-cloud: {stopped.verb}; finished objects are complete", file=sys.stderr)
        if json_output:
            error_record(type(stopped).__name__, stopped.verb, stopped.exit_code)
        return stopped.exit_code
    except BrokenPipeError:
        return 0
    except Exception as exc:
        if os.environ.get("DICOM_CLOUD_DEBUG"):
            raise
        print_error(f"internal error: {exc!r}", "this is a bug; DICOM_CLOUD_DEBUG=1 shows details")
        if json_output:
            error_record("InternalError", f"internal error: {exc!r}", 1)
        return 1


def run() -> None:
    """Console-script entry point.

    Exits through ``os._exit`` after flushing: obstore's Rust threads can abort CPython's
    interpreter shutdown (CPython gh-87135), which would turn a success into SIGABRT.
    """
    code = main()
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
