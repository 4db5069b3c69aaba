"""The ``dicom-cloud`` command: parses arguments, calls :mod:`dicom_cloud.api`, renders the result.

No storage logic lives here. Errors from the core become one line on stderr and the exit
code of their class (table in ``docs/cli.md`` and in ``dicom-cloud --help``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Annotated, Any, TypeVar

import typer

from .. import __version__, api
from ..backends import StoreConfig
from ..errors import EXIT_INTERRUPTED, DicomCloudError, TransferFailedError, UsageError
from ..store import PutOptions
from ..transfer import (
    DEFAULT_MULTIPART_THRESHOLD,
    DEFAULT_PARALLEL,
    DEFAULT_PART_CONCURRENCY,
    DEFAULT_PART_SIZE,
    TransferOptions,
    TransferSummary,
)
from .render import (
    TransferProgress,
    choose_mode,
    human_bytes,
    listing_line,
    object_record,
    print_error,
)

T = TypeVar("T")

EXIT_CODES_HELP = """\b
Exit codes:
  0   success                      6   network failure or throttling
  1   some transfers failed        7   integrity check failed
  2   bad arguments or URL         8   destination exists (--no-overwrite)
  3   not found (object, bucket,   9   unsafe object name (../, NUL)
      local path)                  10  operation not supported by the store
  4   credentials refused          130 interrupted (Ctrl-C)
  5   permission denied
"""

app = typer.Typer(
    name="dicom-cloud",
    help=(
        "Move DICOM files between local disk and object storage: AWS S3 and S3-compatible servers, "
        "Google Cloud Storage, Azure Blob Storage.\n\n"
        "Locations are URLs: s3://bucket/key, gs://bucket/key, azure://container/blob (or az://), "
        "file:///path or a plain path. A trailing slash means 'inside this prefix'.\n\n"
        "Credentials come from each provider's standard places: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
        "AWS_PROFILE and ~/.aws; GOOGLE_APPLICATION_CREDENTIALS; AZURE_STORAGE_CONNECTION_STRING or "
        "AZURE_STORAGE_ACCOUNT with AZURE_STORAGE_KEY / AZURE_STORAGE_SAS_TOKEN.\n\n" + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# -- shared options --------------------------------------------------------------------

Endpoint = Annotated[
    str | None,
    typer.Option(
        "--endpoint",
        help="S3-compatible endpoint URL (MinIO, SeaweedFS, Ceph...); also AWS_ENDPOINT_URL.",
        envvar="DICOM_CLOUD_ENDPOINT",
        rich_help_panel="Connection",
    ),
]
Region = Annotated[
    str | None,
    typer.Option(
        "--region", help="AWS region (default: AWS_REGION, profile, us-east-1).", rich_help_panel="Connection"
    ),
]
PathStyle = Annotated[
    bool | None,
    typer.Option(
        "--path-style/--virtual-host",
        help="S3 addressing; default: path style when --endpoint is given.",
        rich_help_panel="Connection",
    ),
]
Retries = Annotated[
    int,
    typer.Option(
        "--retries",
        min=0,
        max=20,
        help="Retries per request on transient failures.",
        rich_help_panel="Connection",
    ),
]
Timeout = Annotated[
    float,
    typer.Option(
        "--timeout", min=1, help="Seconds before one request is abandoned.", rich_help_panel="Connection"
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.", rich_help_panel="Output")]
JsonOut = Annotated[
    bool,
    typer.Option(
        "--json", help="Print one JSON object per line (events or objects).", rich_help_panel="Output"
    ),
]
Verbose = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="Log requests and decisions to stderr.", rich_help_panel="Output"),
]
Recursive = Annotated[
    bool, typer.Option("--recursive", "-r", help="Operate on every object under a prefix or directory.")
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show what would be done; change nothing.")]
Parallel = Annotated[
    int,
    typer.Option(
        "--parallel",
        "-j",
        min=1,
        max=512,
        help=f"Objects transferred at once (default {DEFAULT_PARALLEL}, measured on small DICOM files).",
        rich_help_panel="Performance",
    ),
]
PartSize = Annotated[
    str,
    typer.Option(
        "--part-size",
        help="Part size for multipart transfers (e.g. 8MiB, 64MB).",
        rich_help_panel="Performance",
    ),
]
Threshold = Annotated[
    str,
    typer.Option(
        "--multipart-threshold",
        help="Objects larger than this use multipart/ranged transfers.",
        rich_help_panel="Performance",
    ),
]
PartConcurrency = Annotated[
    int,
    typer.Option(
        "--part-concurrency",
        min=1,
        max=64,
        help="Parts of one large object in flight.",
        rich_help_panel="Performance",
    ),
]


def _config(
    endpoint: str | None,
    region: str | None,
    path_style: bool | None,
    retries: int,
    timeout: float,
    *,
    encrypt: str | None = None,
    sse_kms_key_id: str | None = None,
) -> StoreConfig:
    sse: str | None = None
    if encrypt is not None:
        if encrypt != "server-side":
            raise UsageError(
                f"--encrypt {encrypt} is not available",
                hint="use --encrypt server-side (SSE-S3, or SSE-KMS with --sse-kms-key-id)",
            )
        sse = "AES256"
    if sse_kms_key_id:
        sse = "aws:kms"
    return StoreConfig(
        endpoint=endpoint,
        region=region,
        path_style=path_style,
        max_retries=retries,
        request_timeout=timeout,
        server_side_encryption=sse,
        sse_kms_key_id=sse_kms_key_id,
    )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}  # fmt: skip


def parse_size(text: str, option: str) -> int:
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else ""
    if not match or unit not in _UNITS:
        raise UsageError(f"{option}: cannot read size '{text}'", hint="write e.g. 8MiB, 64MB or 1048576")
    return int(float(match.group(1)) * _UNITS[unit])


_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$", re.IGNORECASE)


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text)
    if not match:
        raise UsageError(f"--expires: cannot read duration '{text}'", hint="write e.g. 3600, 30m, 12h or 7d")
    value, unit = int(match.group(1)), (match.group(2) or "s").lower()
    seconds = value * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    return timedelta(seconds=seconds)


def parse_tags(text: str | None) -> dict[str, str]:
    """``K=V,K2=V2`` into a dict; keys are checked so that every provider accepts them."""
    if not text:
        return {}
    tags: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(
                f"--tags: '{item}' is not KEY=VALUE", hint='write --tags "Source=PACS1,Dataset=CT"'
            )
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
            raise UsageError(f"--tags: key '{key}' must start with a letter and use letters, digits, _ . -")
        if not value.isascii():
            raise UsageError(f"--tags: value of '{key}' must be ASCII (HTTP headers carry metadata)")
        tags[key] = value.strip()
    return tags


def _transfer_options(
    parallel: int,
    part_size: str,
    threshold: str,
    part_concurrency: int,
    *,
    tags: str | None = None,
    object_tags: bool = False,
    no_overwrite: bool = False,
    dry_run: bool = False,
) -> TransferOptions:
    metadata = parse_tags(tags)
    return TransferOptions(
        parallel=parallel,
        part_size=parse_size(part_size, "--part-size"),
        multipart_threshold=parse_size(threshold, "--multipart-threshold"),
        part_concurrency=part_concurrency,
        put=PutOptions(metadata=metadata, tags=metadata if object_tags else {}),
        no_overwrite=no_overwrite,
        dry_run=dry_run,
    )


def _setup_logging(verbose: bool) -> None:
    if verbose:
        logging.basicConfig(
            level=logging.DEBUG, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
        )
        # Third-party HTTP logs may print signed URLs: keep them at INFO.
        for noisy in ("urllib3", "google", "httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.INFO)
    else:
        logging.basicConfig(
            level=logging.WARNING, format="dicom-cloud: warning: %(message)s", stream=sys.stderr
        )


def _run_transfer(
    verb: str,
    call: Callable[..., Coroutine[Any, Any, TransferSummary]],
    source: str,
    destination: str,
    *,
    recursive: bool,
    options: TransferOptions,
    config: StoreConfig,
    quiet: bool,
    json_output: bool,
) -> None:
    mode = choose_mode(quiet=quiet, json_output=json_output)
    with TransferProgress(mode, verb) as progress:
        summary = asyncio.run(
            call(source, destination, recursive=recursive, options=options, config=config, on_event=progress)
        )
    progress.summary(summary)
    if summary.failed:
        attempted = len(summary.failed) + summary.files + summary.skipped
        raise TransferFailedError(
            f"{len(summary.failed)} of {attempted} transfers failed",
            failed=len(summary.failed),
            hint="re-run the same command to retry the failed ones",
        )


# -- commands --------------------------------------------------------------------------


def _transfer_command(
    name: str, verb: str, call: Callable[..., Coroutine[Any, Any, TransferSummary]], doc: str
) -> None:
    def command(
        source: Annotated[
            str, typer.Argument(help="Where to read: a URL or a local path.", show_default=False)
        ],
        destination: Annotated[
            str, typer.Argument(help="Where to write: a URL or a local path.", show_default=False)
        ],
        recursive: Recursive = False,
        tags: Annotated[
            str | None, typer.Option("--tags", help="Metadata K=V,K2=V2 stored with every object written.")
        ] = None,
        object_tags: Annotated[
            bool,
            typer.Option("--object-tags", help="Also store --tags as S3 object tags / Azure index tags."),
        ] = False,
        encrypt: Annotated[
            str | None,
            typer.Option(
                "--encrypt",
                help="'server-side': SSE-S3 (AES256) on S3; Azure and GCS always encrypt at rest.",
            ),
        ] = None,
        sse_kms_key_id: Annotated[
            str | None, typer.Option("--sse-kms-key-id", help="SSE-KMS key id or ARN for S3 writes.")
        ] = None,
        no_overwrite: Annotated[
            bool, typer.Option("--no-overwrite", help="Skip objects that already exist at the destination.")
        ] = False,
        dry_run: DryRun = False,
        parallel: Parallel = DEFAULT_PARALLEL,
        part_size: PartSize = f"{DEFAULT_PART_SIZE // 2**20}MiB",
        multipart_threshold: Threshold = f"{DEFAULT_MULTIPART_THRESHOLD // 2**20}MiB",
        part_concurrency: PartConcurrency = DEFAULT_PART_CONCURRENCY,
        endpoint: Endpoint = None,
        region: Region = None,
        path_style: PathStyle = None,
        retries: Retries = 4,
        timeout: Timeout = 300.0,
        quiet: Quiet = False,
        json_output: JsonOut = False,
        verbose: Verbose = False,
    ) -> None:
        _setup_logging(verbose)
        options = _transfer_options(
            parallel,
            part_size,
            multipart_threshold,
            part_concurrency,
            tags=tags,
            object_tags=object_tags,
            no_overwrite=no_overwrite,
            dry_run=dry_run,
        )
        config = _config(
            endpoint, region, path_style, retries, timeout, encrypt=encrypt, sse_kms_key_id=sse_kms_key_id
        )
        _run_transfer(
            verb,
            call,
            source,
            destination,
            recursive=recursive,
            options=options,
            config=config,
            quiet=quiet,
            json_output=json_output,
        )

    command.__doc__ = doc
    app.command(name, epilog=EXIT_CODES_HELP)(command)


_transfer_command(
    "upload",
    "Uploaded",
    api.upload_async,
    """Upload a local file, or a directory with --recursive, to a bucket.

    \b
    dicom-cloud upload scan.dcm s3://archive/scans/scan.dcm
    dicom-cloud upload study/ s3://archive/studies/1/ --recursive
    dicom-cloud upload study/ gs://archive/1/ -r --tags "Source=PACS1"
    dicom-cloud upload study/ s3://bucket/1/ -r --endpoint http://127.0.0.1:9000
    """,
)
_transfer_command(
    "download",
    "Downloaded",
    api.download_async,
    """Download an object, or a prefix with --recursive, to local disk.

    Files appear under their final name only when complete and verified.

    \b
    dicom-cloud download s3://archive/scans/scan.dcm scan.dcm
    dicom-cloud download s3://archive/studies/1/ local-study/ --recursive
    """,
)
_transfer_command(
    "copy",
    "Copied",
    api.copy_async,
    """Copy between any two locations: server-side inside one bucket, streamed across providers.

    \b
    dicom-cloud copy s3://src/study/ gs://dst/study/ --recursive
    dicom-cloud copy azure://c/a.dcm s3://b/a.dcm
    """,
)


@app.command("list", epilog=EXIT_CODES_HELP)
def list_command(
    url: Annotated[
        str, typer.Argument(help="Bucket, prefix or local directory to list.", show_default=False)
    ],
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="List every object below, not one level.")
    ] = False,
    details: Annotated[
        bool, typer.Option("--details", "-l", help="Show last-modified time and size.")
    ] = False,
    json_output: JsonOut = False,
    endpoint: Endpoint = None,
    region: Region = None,
    path_style: PathStyle = None,
    retries: Retries = 4,
    timeout: Timeout = 300.0,
    verbose: Verbose = False,
) -> None:
    """List objects under a prefix (one level, or everything with --recursive).

    \b
    dicom-cloud list s3://archive/studies/
    dicom-cloud list s3://archive/studies/ --recursive --details
    dicom-cloud list gs://archive/ --json
    """
    _setup_logging(verbose)
    config = _config(endpoint, region, path_style, retries, timeout)

    async def run() -> tuple[int, int]:
        count = total = 0
        from ..location import LocationOpener

        display = LocationOpener(config).open(url)
        base = (
            display.prefix
            if (display.names_directory or display.is_local)
            else display.key.rpartition("/")[0]
        )
        base = f"{base.rstrip('/')}/" if base.strip("/") else ""
        async for info in api.list_async(url, recursive=recursive, config=config):
            count += 1
            total += info.size
            if json_output:
                print(__import__("json").dumps(object_record(info, display.display), ensure_ascii=False))
            else:
                name = info.key[len(base) :] if info.key.startswith(base) else info.key
                print(listing_line(info, details=details, name=name))
        return count, total

    count, total = asyncio.run(run())
    if details and not json_output:
        print(f"{count} entries, {human_bytes(total)}", file=sys.stderr)


@app.command("delete", epilog=EXIT_CODES_HELP)
def delete_command(
    url: Annotated[str, typer.Argument(help="Object, or prefix with --recursive.", show_default=False)],
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Delete every object under the prefix.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Do not ask for confirmation.")] = False,
    dry_run: DryRun = False,
    quiet: Quiet = False,
    json_output: JsonOut = False,
    endpoint: Endpoint = None,
    region: Region = None,
    path_style: PathStyle = None,
    retries: Retries = 4,
    timeout: Timeout = 300.0,
    verbose: Verbose = False,
) -> None:
    """Delete an object, or everything under a prefix with --recursive.

    Asks for confirmation on a terminal; elsewhere refuses without --force.

    \b
    dicom-cloud delete s3://archive/scans/old.dcm
    dicom-cloud delete s3://archive/tmp/ --recursive --dry-run
    dicom-cloud delete s3://archive/tmp/ --recursive --force
    """
    _setup_logging(verbose)
    config = _config(endpoint, region, path_style, retries, timeout)
    if not force and not dry_run:
        if recursive:
            objects, total = asyncio.run(api.count_async(url, config=config))
            question = (
                f"Delete {objects} object{'s' if objects != 1 else ''} ({human_bytes(total)}) under {url}?"
            )
            if objects == 0:
                question = ""
        else:
            question = f"Delete {url}?"
        if question:
            if not sys.stdin.isatty():
                raise UsageError(
                    "refusing to delete without confirmation",
                    hint="pass --force (or --dry-run to see what would go)",
                )
            if not typer.confirm(question, default=False, err=True):
                print("Nothing deleted.", file=sys.stderr)
                return
    verb = "would delete" if dry_run else "deleted"

    def report(info: Any) -> None:
        if json_output:
            print(
                __import__("json").dumps(
                    {"event": verb.replace(" ", "_"), "key": info.key, "size": info.size}
                )
            )
        elif dry_run or not quiet:
            print(f"{verb} {info.key}")

    summary = asyncio.run(
        api.delete_async(url, recursive=recursive, dry_run=dry_run, config=config, on_deleted=report)
    )
    if not quiet and not json_output:
        print(
            f"{'Would delete' if dry_run else 'Deleted'} {summary.objects} object"
            f"{'s' if summary.objects != 1 else ''} ({human_bytes(summary.bytes)})",
            file=sys.stderr,
        )


@app.command("share", epilog=EXIT_CODES_HELP)
def share_command(
    url: Annotated[
        str, typer.Argument(help="Object to share (s3://, gs:// or azure://).", show_default=False)
    ],
    expires: Annotated[
        str, typer.Option("--expires", "-e", help="Lifetime: seconds or 30m, 12h, 7d (S3: at most 7d).")
    ] = "1h",
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="One URL per object under the prefix.")
    ] = False,
    json_output: JsonOut = False,
    endpoint: Endpoint = None,
    region: Region = None,
    path_style: PathStyle = None,
    retries: Retries = 4,
    timeout: Timeout = 300.0,
    verbose: Verbose = False,
) -> None:
    """Print a presigned URL that lets anyone holding it download the object until it expires.

    \b
    dicom-cloud share s3://archive/scans/scan.dcm --expires 12h
    dicom-cloud share gs://archive/study/ --recursive --expires 7d --json
    """
    _setup_logging(verbose)
    config = _config(endpoint, region, path_style, retries, timeout)
    lifetime = parse_duration(expires)

    async def run() -> None:
        if not recursive:
            link = await api.share_async(url, expires=lifetime, config=config)
            print(__import__("json").dumps({"url": url, "link": link}) if json_output else link)
            return
        from ..location import LocationOpener

        opener = LocationOpener(config)
        location = opener.open(url)
        try:
            found = False
            async for info in location.store.list(location.prefix):
                found = True
                link = await location.store.sign(info.key, lifetime)
                target = location.display(info.key)
                print(
                    __import__("json").dumps({"url": target, "link": link})
                    if json_output
                    else f"{target}\t{link}"
                )
            if not found:
                raise UsageError(f"nothing found under {url}")
        finally:
            await opener.close()

    asyncio.run(run())


@app.command("version")
def version_command() -> None:
    """Print the version."""
    print(f"dicom-cloud {__version__}")


# -- entry point -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (errors are printed, never raised)."""
    try:
        app(args=argv, prog_name="dicom-cloud", standalone_mode=False)
    except DicomCloudError as exc:
        print_error(exc, exc.hint)
        return exc.exit_code
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except (KeyboardInterrupt, typer.Abort):
        print("\ndicom-cloud: interrupted; finished objects are complete", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as exc:
        # Typer's own parser errors (bad option, missing argument) know how to show themselves.
        show = getattr(exc, "show", None)
        if callable(show) and hasattr(exc, "exit_code"):
            show()
            return int(exc.exit_code)
        if type(exc).__name__ == "Abort":
            print("\ndicom-cloud: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if os.environ.get("DICOM_CLOUD_DEBUG"):
            raise
        print_error(f"internal error: {exc!r}", "this is a bug; DICOM_CLOUD_DEBUG=1 shows details")
        return 1
    return 0


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
