"""The commands about trees and jobs: ``sync``, ``verify``, ``jobs`` and ``resume``; and the journal
option shared by the transfer commands. Parsing and rendering only: the work is in api.py."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import api
from ..cluster.partition import DEFAULT_PARTITION_ITEMS
from ..deletelimit import DEFAULT_MAX_DELETE, parse_max_delete
from ..errors import DifferencesFoundError, TransferFailedError, UsageError
from ..journal import find_job, forget_job, list_jobs, prune_jobs
from .options import config_from_args, options_from_args, parse_duration, selection
from .render import TransferProgress, choose_mode, human_bytes, plural
from .runner import run as run_command

if TYPE_CHECKING:  # imported where used: a command other than sync and verify needs neither
    from ..sync import SyncSummary
    from ..treediff import Difference

AddCommand = Callable[[str, str, str, Callable[[argparse.Namespace], int]], Any]
AddArguments = Callable[..., None]

#: Arguments that change how fast or how loudly a transfer runs, not what it writes: a re-run that
#: changes only these is the same job.
_NOT_IDENTITY = frozenset(
    {
        "handler", "command", "argv", "source", "destination", "recursive", "parallel", "part_size",
        "part_concurrency", "multipart_threshold", "quiet", "json_output", "verbose", "retries",
        "timeout", "attempts", "no_journal", "dry_run", "manifest", "deid_map", "cluster", "partition_size",
        "journal_url",
    }
)  # fmt: skip


def add_journal_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-journal",
        action="store_true",
        help="keep no journal of this run (an interrupted run then starts again from scratch)",
    )


def add_cluster_option(parser: argparse.ArgumentParser, *, journal: bool = True) -> None:
    parser.add_argument(
        "--cluster",
        metavar="local:N|tcp://HOST:PORT",
        help="run a recursive transfer on a Dask cluster: local:N starts N worker processes here "
        "(needs the cluster extra; docs/cluster.md)",
    )
    if journal:
        _add_journal_url(parser)
    parser.add_argument(
        "--partition-size",
        type=int,
        default=DEFAULT_PARTITION_ITEMS,
        metavar="N",
        help=f"with --cluster: objects per task (default {DEFAULT_PARTITION_ITEMS}); a worker lost "
        "redoes at most one task's unfinished objects",
    )


def _add_journal_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--journal",
        dest="journal_url",
        metavar="postgresql://...",
        help="with --cluster: keep the job's finished objects in this PostgreSQL database, shared by "
        "workers on any machine (required with a remote cluster; put the password in PGPASSWORD "
        "or ~/.pgpass on the workers, not in the URL)",
    )


def cluster_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The command's arguments as sent to the workers of a cluster: flags and file paths (never key
    material: the workers read keys and credentials themselves); the handler stays here."""
    return {key: value for key, value in vars(args).items() if key != "handler"}


def job_request(args: argparse.Namespace) -> api.JobRequest | None:
    """What the journal of this command records, or None with --no-journal."""
    if getattr(args, "no_journal", False):
        return None
    options = {key: value for key, value in sorted(vars(args).items()) if key not in _NOT_IDENTITY}
    return api.JobRequest(
        options=json.loads(json.dumps(options, default=str)),
        argv=tuple(getattr(args, "argv", ())),
        cwd=str(Path.cwd()),
    )


# -- sync ------------------------------------------------------------------------------


def _sync(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    name_filter = selection(args)
    if name_filter is not None and name_filter.needs_header:
        raise UsageError("sync selects by name only: --modality, --study-uid and the like do not apply")
    parse_max_delete(args.max_delete)
    if args.bidirectional and args.delete:
        raise UsageError("--bidirectional carries deletions both ways by itself; drop --delete")
    config = config_from_args(args, encrypt=args.encrypt, sse_kms_key_id=args.sse_kms_key_id)
    mode = choose_mode(quiet=args.quiet, json_output=args.json_output)

    def plan_line(action: str, rel: str, size: int) -> None:
        if mode == "json":
            print(json.dumps({"event": "plan", "action": action, "name": rel, "size": size}), flush=True)
        elif mode != "quiet":
            print(f"would {action:<8} {rel} ({human_bytes(size)})")

    from ..sync import SyncOptions

    sync_options = SyncOptions(
        delete=args.delete,
        max_delete=args.max_delete,
        bidirectional=args.bidirectional,
        conflict=args.conflict,
        name_filter=name_filter,
        checksum=args.checksum,
    )
    copier: Any = None
    if args.cluster is not None and not args.dry_run:
        from ..cluster.runner import SyncCopier
        from ..cluster.spec import parse_cluster

        if args.partition_size < 1:
            raise UsageError("--partition-size must be at least 1")
        copier = SyncCopier(
            parse_cluster(args.cluster), cluster_arguments(args), partition_items=args.partition_size
        )

    async def run() -> SyncSummary:
        try:
            return await api.sync_async(
                args.source,
                args.destination,
                options=options,
                sync=sync_options,
                config=config,
                on_event=None if args.dry_run else progress,
                on_plan=plan_line,
                job=job_request(args),
                copier=copier,
            )
        finally:
            if copier is not None:
                await copier.aclose()

    with TransferProgress(mode, "Synced") as progress:
        summary = run_command(run())
    _sync_summary(mode, summary)
    if summary.failed:
        raise TransferFailedError(
            f"{plural(len(summary.failed), 'object')} failed to sync; nothing was deleted",
            failed=len(summary.failed),
            hint="run the same sync again: what is done is skipped",
        )
    return 0


def _sync_summary(mode: str, summary: SyncSummary) -> None:
    counts = {
        "created": summary.created,
        "updated": summary.updated,
        "deleted": summary.deleted,
        "unchanged": summary.unchanged,
        "conflicts": summary.conflicts,
        "failed": len(summary.failed),
    }
    nouns = {"conflicts": "conflict"}
    if mode == "json":
        record = {"event": "summary", **counts, "bytes": summary.bytes, "seconds": round(summary.seconds, 3)}
        print(json.dumps({**record, "dry_run": summary.dry_run}), flush=True)
        return
    if mode == "quiet":
        return
    head = "Would sync" if summary.dry_run else "Synced"
    text = ", ".join(
        plural(value, nouns[name]) if name in nouns else f"{value} {name}" for name, value in counts.items()
    )
    print(f"{head}: {text}; {human_bytes(summary.bytes)} in {summary.seconds:.1f} s", file=sys.stderr)


# -- verify ----------------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    name_filter = selection(args)
    if name_filter is not None and name_filter.needs_header:
        raise UsageError("verify selects by name only: --modality, --study-uid and the like do not apply")
    mode = choose_mode(quiet=args.quiet, json_output=args.json_output)

    def report(difference: Difference) -> None:
        if mode == "json":
            record = {"event": "difference", "kind": difference.kind, "name": difference.rel}
            print(json.dumps({**record, "detail": difference.detail}), flush=True)
        elif mode != "quiet":
            print(f"{difference.kind:<8} {difference.rel}  ({difference.detail})")

    started = time.monotonic()
    result = run_command(
        api.verify_async(
            args.source,
            args.destination,
            config=config_from_args(args),
            on_difference=report,
            parallel=args.parallel,
            name_filter=name_filter,
        )
    )
    seconds = time.monotonic() - started
    if mode == "json":
        record = {"event": "summary", "compared": result.compared, "differences": result.differences}
        print(json.dumps({**record, "bytes": result.bytes, "seconds": round(seconds, 3)}), flush=True)
    elif mode != "quiet":
        print(
            f"Compared {plural(result.compared, 'object')} ({human_bytes(result.bytes)}) in {seconds:.1f} s: "
            f"{plural(result.differences, 'difference')}",
            file=sys.stderr,
        )
    if result.differences:
        what = "the objects" if result.single else "the trees"
        raise DifferencesFoundError(
            f"{what} differ ({plural(result.differences, 'difference')})", differences=result.differences
        )
    return 0


# -- jobs and resume -------------------------------------------------------------------


def _jobs(args: argparse.Namespace) -> int:
    if args.older_than is not None and not args.prune:
        raise UsageError("--older-than goes with --prune", hint="dicom-cloud jobs --prune --older-than 30d")
    if args.dry_run and not args.prune:
        raise UsageError("--dry-run goes with --prune", hint="dicom-cloud jobs --prune --dry-run")
    if args.prune:
        return _prune(args)
    if args.forget:
        job = forget_job(args.forget)
        print(f"forgot job {job.id} ({job.verb} {job.source} -> {job.destination})", file=sys.stderr)
        return 0
    jobs = list(list_jobs(include_complete=args.all))
    if args.json_output:
        for job in jobs:
            print(json.dumps({"event": "job", **job.__dict__}))
        return 0
    if not jobs:
        print("no unfinished jobs" if not args.all else "no jobs", file=sys.stderr)
        return 0
    print(f"{'ID':<16}  {'STATUS':<11}  {'DONE':>7}  {'UPDATED':<16}  COMMAND")
    for job in jobs:
        updated = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.updated))
        command = (
            "dicom-cloud " + shlex.join(job.argv)
            if job.argv
            else f"{job.verb} {job.source} {job.destination}"
        )
        print(f"{job.id:<16}  {job.status:<11}  {job.done:>7}  {updated:<16}  {command}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    older_than = None
    if args.older_than is not None:
        try:
            older_than = parse_duration(args.older_than).total_seconds()
        except UsageError:
            raise UsageError(
                f"--older-than: cannot read duration '{args.older_than}'", hint="write e.g. 12h, 30d or 8w"
            ) from None
    pruned = prune_jobs(older_than=older_than, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for job in pruned:
        if args.json_output:
            record = {"event": "pruned", "id": job.id, "command": job.command, "reason": job.reason}
            print(json.dumps({**record, "dry_run": args.dry_run}))
        else:
            print(
                f"{verb} job {job.id} ({job.command or 'no command recorded'}): {job.reason}", file=sys.stderr
            )
    if not args.json_output:
        head = "Would prune" if args.dry_run else "Pruned"
        print(f"{head} {plural(len(pruned), 'stale job')}", file=sys.stderr)
    return 0


def _resume(args: argparse.Namespace) -> int:
    if args.job:
        job = find_job(args.job)
    else:
        waiting = [job for job in list_jobs() if not job.running]
        if not waiting:
            print("no unfinished jobs to resume", file=sys.stderr)
            return 0
        if len(waiting) > 1:
            ids = ", ".join(job.id for job in waiting)
            raise UsageError(
                f"{len(waiting)} unfinished jobs ({ids})",
                hint="name one: dicom-cloud resume ID ('dicom-cloud jobs --prune' removes stale ones)",
            )
        job = waiting[0]
    if not job.argv:
        raise UsageError(
            f"job {job.id} was not started from the command line", hint="run it again the same way"
        )
    print(f"resuming job {job.id}: dicom-cloud {shlex.join(job.argv)}", file=sys.stderr)
    try:
        os.chdir(job.cwd)
    except OSError as exc:
        raise UsageError(f"cannot enter {job.cwd}, where the job was started: {exc.strerror}") from None
    from .main import main  # the job's own command line, parsed as if typed again

    return main(job.argv)


# -- registration ----------------------------------------------------------------------


def add_job_commands(
    add: AddCommand,
    transfer_arguments: AddArguments,
    connection_options: AddArguments,
    output_options: AddArguments,
) -> None:
    sub = add(
        "sync",
        "Make DESTINATION hold what SOURCE holds: copy what is new or changed (size, then content\n"
        "checksum), and with --delete remove what SOURCE does not have. Any two locations: local\n"
        "directory, s3://, gs://, azure://. An interrupted sync resumes by running it again.",
        "  dicom-cloud sync archive/ s3://pacs-backup/archive/\n"
        "  dicom-cloud sync s3://pacs-backup/archive/ restore/ --delete --dry-run\n"
        "  dicom-cloud sync gs://a/studies/ azure://b/studies/ --delete --max-delete 1000\n"
        "  dicom-cloud sync laptop/ s3://team/shared/ --bidirectional",
        _sync,
    )
    transfer_arguments(sub)
    group = sub.add_argument_group("sync")
    group.add_argument(
        "--delete", action="store_true", help="delete destination objects that the source does not have"
    )
    group.add_argument(
        "--max-delete",
        default=DEFAULT_MAX_DELETE,
        metavar="N|P%",
        help="refuse (exit 14, nothing changed) to delete more than N objects or P%% of the tree"
        " (default: %(default)s)",
    )
    group.add_argument(
        "--checksum",
        action="store_true",
        help="compare the content of every pair of equal size, as verify does, instead of trusting"
        " the last sync's record of unchanged versions (reads what no stored checksum can tell)",
    )
    group.add_argument(
        "--bidirectional",
        action="store_true",
        help="merge both ways: changes and deletions on either side reach the other (docs/sync.md)",
    )
    group.add_argument(
        "--conflict",
        choices=["keep-both", "newer", "source", "destination"],
        default="keep-both",
        help="with --bidirectional, a name changed on both sides: the newer wins and the other is kept"
        " as NAME.conflict-TIME (keep-both), or is overwritten (newer), or one side always wins"
        " (default: %(default)s)",
    )
    add_cluster_option(sub, journal=False)
    connection_options(sub)
    output_options(sub)

    sub = add(
        "verify",
        "Compare two trees by name, size and content checksum, and list every difference: missing\n"
        "(only in SOURCE), extra (only in DESTINATION), size, content. Exit 1 when they differ.\n"
        "When SOURCE is one file or object, compare it with the one DESTINATION names (the same\n"
        "name inside DESTINATION when that is a directory or ends with /).",
        "  dicom-cloud verify archive/ s3://pacs-backup/archive/\n"
        "  dicom-cloud verify scan.dcm s3://pacs-backup/archive/scan.dcm\n"
        "  dicom-cloud verify s3://a/studies/ gs://b/studies/ --json",
        _verify,
    )
    sub.add_argument("source", help="the reference tree (URL or local directory), or one file or object")
    sub.add_argument("destination", help="the tree (or object) to check against it")
    sub.add_argument("-j", "--parallel", type=int, default=16, help="objects compared at once (default: 16)")
    sub.add_argument("--include", metavar="GLOB", action="append", default=[], help="only names matching")
    sub.add_argument(
        "--exclude", metavar="GLOB", action="append", default=[], help="leave out names matching"
    )
    sub.add_argument("--files-from", metavar="FILE", help="only the names listed in FILE")
    for option in ("modality", "study_uid", "series_uid", "sop_class"):
        sub.set_defaults(**{option: []})
    connection_options(sub)
    output_options(sub)

    sub = add(
        "jobs",
        "List unfinished jobs: recursive transfers and syncs that were interrupted or had failures.\n"
        "Their journals live in the state directory ($DICOM_CLOUD_STATE_DIR, else\n"
        "$XDG_STATE_HOME/dicom-cloud, else ~/.local/state/dicom-cloud).",
        "  dicom-cloud jobs\n  dicom-cloud jobs --all --json\n  dicom-cloud jobs --forget 3f2a9c\n"
        "  dicom-cloud jobs --prune --older-than 30d",
        _jobs,
    )
    sub.add_argument("--all", action="store_true", help="also syncs that completed (their state is kept)")
    sub.add_argument("--forget", metavar="ID", help="delete a job's journal (the next run starts afresh)")
    sub.add_argument(
        "--prune",
        action="store_true",
        help="remove stale jobs: never started or with nothing done to continue from, or whose local source"
        " or destination is gone; with --older-than, also any job not updated for that long",
    )
    sub.add_argument(
        "--older-than", metavar="AGE", help="with --prune: also jobs not updated for AGE (e.g. 30d, 12h)"
    )
    sub.add_argument("--dry-run", action="store_true", help="with --prune: list, remove nothing")
    sub.add_argument("--json", dest="json_output", action="store_true", help="one JSON object per line")

    sub = add(
        "resume",
        "Run an unfinished job again with its own command line, from the directory it was started in:\n"
        "finished objects are skipped and large uploads continue from their last part. Running the\n"
        "same command again does the same.",
        "  dicom-cloud resume\n  dicom-cloud resume 3f2a9c",
        _resume,
    )
    sub.add_argument(
        "job", nargs="?", help="job id or a unique prefix of it (default: the only unfinished job)"
    )
