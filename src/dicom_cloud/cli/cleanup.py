"""``dicom-cloud cleanup``: remove what interrupted transfers left behind (see dicom_cloud.cleanup)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .options import parse_duration
from .render import human_bytes, plural
from .runner import run as run_command

if TYPE_CHECKING:
    from ..cleanup import Orphan

SUMMARY = (
    "Remove leftovers of interrupted transfers older than --older-than: unfinished S3 multipart\n"
    "uploads, Azure blobs holding only uncommitted blocks, partial files of local downloads.\n"
    "GCS keeps unfinished sessions out of sight and drops them after a week: nothing to do there."
)

EXAMPLES = (
    "  dicom-cloud cleanup s3://archive/ --dry-run\n"
    "  dicom-cloud cleanup s3://archive/studies/ --older-than 7d\n"
    "  dicom-cloud cleanup azure://container/ --older-than 12h --json\n"
    "  dicom-cloud cleanup ./downloads/ --older-than 1d"
)

_KIND_NAMES = {
    "multipart-upload": "multipart upload",
    "uncommitted-blocks": "uncommitted blocks",
    "partial-file": "partial file",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="bucket, prefix or local directory to clean")
    parser.add_argument(
        "--older-than",
        metavar="AGE",
        default="1d",
        help="take only leftovers started this long ago or earlier: seconds, or 30m, 12h, 7d "
        "(default: %(default)s; younger ones may be uploads in progress)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")


def run(args: argparse.Namespace, config: Any) -> int:
    from ..cleanup import cleanup_async  # loaded for this command only

    try:
        older_than = parse_duration(args.older_than)
    except UsageError:
        raise UsageError(
            f"--older-than: cannot read duration '{args.older_than}'", hint="write e.g. 3600, 30m, 12h or 7d"
        ) from None
    verb = "would remove" if args.dry_run else "removing"

    def report(orphan: Orphan) -> None:
        if args.json_output:
            record: dict[str, Any] = {
                "event": "would_remove" if args.dry_run else "removed",
                "url": orphan.url,
                "kind": orphan.kind,
                "initiated": orphan.initiated.isoformat() if orphan.initiated else None,
            }
            if orphan.upload_id:
                record["upload_id"] = orphan.upload_id
            if orphan.size is not None:
                record["size"] = orphan.size
            print(json.dumps(record, ensure_ascii=False))
        elif args.dry_run or not args.quiet:
            since = f" (started {orphan.initiated:%Y-%m-%d %H:%M} UTC)" if orphan.initiated else ""
            size = f", {human_bytes(orphan.size)}" if orphan.size is not None else ""
            print(f"{verb} {_KIND_NAMES[orphan.kind]} {orphan.url}{since}{size}")

    summary = run_command(
        cleanup_async(args.url, older_than=older_than, dry_run=args.dry_run, config=config, on_orphan=report)
    )
    if not args.quiet and not args.json_output:
        head = "Would remove" if args.dry_run else "Removed"
        count = summary.found if args.dry_run else summary.removed
        recent = f"; {summary.too_recent} more too recent to touch" if summary.too_recent else ""
        print(f"{head} {plural(count, 'leftover')}{recent}", file=sys.stderr)
    return 0
