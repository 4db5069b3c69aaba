"""How the CLI shows progress, listings and summaries: rich bars, plain log lines, or JSON."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal, TextIO

from ..errors import ConflictError, DicomCloudError
from ..names import printable
from ..store import BucketInfo, ObjectInfo
from ..transfer import ListingTotals, TransferEvent, TransferSummary

OutputMode = Literal["rich", "plain", "json", "quiet"]


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """A count and its noun, agreeing: ``1 object``, ``0 objects``, ``2 studies`` (``plural_form``
    for nouns that do not just take an s)."""
    return f"{count} {noun if count == 1 else (plural_form or noun + 's')}"


def choose_mode(*, quiet: bool, json_output: bool, stream: TextIO = sys.stderr) -> OutputMode:
    if json_output:
        return "json"
    if quiet:
        return "quiet"
    return "rich" if stream.isatty() else "plain"


def human_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class TransferProgress:
    """Receives engine events and renders them in the chosen mode; thread-safe enough for one loop.

    Totals come from the engine's counting pass (``counted`` events) as soon as it has them, else
    from the objects seen so far. Objects an earlier, interrupted run of the job finished are kept
    apart: they are neither in the totals nor in what is done, so done never exceeds the total.
    """

    def __init__(
        self, mode: OutputMode, verb: str, *, interval: float = 5.0, report_failures: bool = True
    ) -> None:
        self.mode = mode
        #: Print a line per failed object (off when the caller reports a single failure itself).
        self.report_failures = report_failures
        self.verb = verb  # "Uploaded", "Downloaded", "Copied"
        self.interval = interval
        #: The counting pass's latest totals (None: no counting pass, as for a single object).
        self.counted: ListingTotals | None = None
        #: Objects to work on seen so far (started or planned) and their bytes.
        self.files_seen = 0
        self.bytes_seen = 0
        #: Objects finished (written or skipped) and bytes dealt with (moved, or skipped).
        self.files_done = 0
        self.bytes_done = 0
        #: Bytes actually moved: the rate and the ETA are computed from these.
        self.bytes_moved = 0
        self.failed = 0
        #: Skipped because an earlier, interrupted run of the job finished them.
        self.already_done_seen = 0
        self.started = time.monotonic()
        self._last_line = self.started
        self._rich: Any = None
        self._task: Any = None

    @property
    def totals_known(self) -> bool:
        """Whether the totals are final (the whole source counted), not a lower bound."""
        return self.counted is None or self.counted.complete

    @property
    def files_total(self) -> int:
        """Objects this run works on: counted (or seen), less those an earlier run finished."""
        if self.counted is None:
            return self.files_seen
        return max(self.counted.files - self.counted.already_done, self.files_seen)

    @property
    def bytes_total(self) -> int:
        if self.counted is None:
            return self.bytes_seen
        return max(self.counted.bytes - self.counted.already_done_bytes, self.bytes_seen)

    @property
    def already_done(self) -> int:
        counted = self.counted.already_done if self.counted is not None else 0
        return max(counted, self.already_done_seen)

    def eta(self) -> float | None:
        """Seconds left at the rate so far; None while the total or the rate is unknown."""
        elapsed = time.monotonic() - self.started
        if not self.totals_known or self.bytes_moved <= 0 or elapsed <= 0:
            return None
        return max(self.bytes_total - self.bytes_done, 0) / (self.bytes_moved / elapsed)

    def files_text(self) -> str:
        """``12/787 files`` (``787+`` while counting), then what is kept apart."""
        text = f"{self.files_done}/{self.files_total}{'' if self.totals_known else '+'} files"
        if self.already_done:
            text += f", {self.already_done} already done"
        if self.failed:
            text += f", {self.failed} failed"
        return text

    def __enter__(self) -> TransferProgress:
        if self.mode == "rich":
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )

            self._rich = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[files]}"),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("{task.fields[eta]}"),
                transient=True,
                console=_stderr_console(),
            )
            self._rich.start()
            self._task = self._rich.add_task("Transferring", total=None, files="0/0 files", eta="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()

    def __call__(self, event: TransferEvent) -> None:
        kind = event.kind
        if kind in ("started", "planned"):
            self.files_seen += 1
            self.bytes_seen += event.size
        if kind == "counted":
            self.counted = event.totals
        elif kind == "progress":
            self.bytes_done += event.bytes
            self.bytes_moved += event.bytes
        elif kind == "completed":
            self.files_done += 1
            self.bytes_done += event.bytes
            self.bytes_moved += event.bytes
        elif kind == "skipped" and event.already_done:
            self.already_done_seen += 1  # apart: neither in the totals nor in what is done
        elif kind == "skipped":
            self.files_done += 1
            self.bytes_done += event.size
            if event.error is not None:  # left out by validation: say why
                self._error_line(event, label="skipped")
        elif kind == "failed":
            self.failed += 1
            self._error_line(event)
        if self.mode == "json":
            _json_line(_event_record(event))
        elif self.mode == "plain" and kind == "planned":
            print(f"would copy {event.src} -> {event.dst} ({human_bytes(event.size)})", file=sys.stdout)
        elif self.mode == "plain":
            self._maybe_plain_line()
        elif self.mode == "rich" and self._rich is not None:
            eta = self.eta()
            self._rich.update(
                self._task,
                total=self.bytes_total or None,
                completed=self.bytes_done,
                files=self.files_text(),
                eta="" if eta is None else f"ETA {human_duration(eta)}",
            )

    def _error_line(self, event: TransferEvent, label: str = "error") -> None:
        if self.mode in ("json", "quiet") or not self.report_failures:
            return
        message = str(event.error) if event.error else "failed"
        src = printable(event.src)  # a name with a line break must not forge a second line
        text = f"{label}: {src}: {message}" if src not in message else f"{label}: {message}"
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr)

    def _maybe_plain_line(self) -> None:
        now = time.monotonic()
        if now - self._last_line < self.interval:
            return
        self._last_line = now
        print(self.plain_line(now), file=sys.stderr, flush=True)

    def plain_line(self, now: float | None = None) -> str:
        """``[  5.0s] 12/787 files, 1.2 MB of 40.0 MB, 240.0 KB/s, ETA 2m42s, 582 already done``."""
        elapsed = (now or time.monotonic()) - self.started
        rate = self.bytes_moved / elapsed if elapsed > 0 else 0
        parts = [
            f"[{elapsed:6.1f}s] {self.files_done}/{self.files_total}{'' if self.totals_known else '+'} files",
            f"{human_bytes(self.bytes_done)} of {human_bytes(self.bytes_total)}"
            f"{'' if self.totals_known else '+'}",
            f"{human_bytes(rate)}/s",
        ]
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {human_duration(eta)}")
        if self.already_done:
            parts.append(f"{self.already_done} already done")
        if self.failed:
            parts.append(f"{self.failed} failed")
        return ", ".join(parts)

    def summary(self, summary: TransferSummary) -> None:
        conflicts_failed = sum(1 for _, error in summary.failed if isinstance(error, ConflictError))
        if self.mode == "json":
            _json_line(
                {
                    "event": "summary",
                    "files": summary.files,
                    "bytes": summary.bytes,
                    "replaced": summary.replaced,
                    "kept_both": summary.kept_both,
                    "skipped": summary.skipped,
                    "identical": summary.identical,
                    "conflicts": len(summary.conflicts),
                    "failed": len(summary.failed),
                    "failures": [_failure_record(src, error) for src, error in summary.failed],
                    "seconds": round(summary.seconds, 3),
                    "dry_run": summary.dry_run,
                    "throttled": summary.throttled,
                    "lowest_concurrency": summary.lowest_concurrency,
                }
            )
            return
        if self.mode == "quiet":
            # Errors only: the objects that failed, once the run is over.
            if self.report_failures:
                for src, error in summary.failed:
                    print(_failure_line(src, error), file=sys.stderr)
            return
        seconds = max(summary.seconds, 1e-6)
        verb = "Would transfer" if summary.dry_run else self.verb
        parts = [
            f"{verb} {_count(summary.files, 'file')} ({human_bytes(summary.bytes)})",
            f"in {summary.seconds:.1f} s",
        ]
        if not summary.dry_run and summary.files:
            parts.append(f"{summary.files / seconds:.0f} files/s, {human_bytes(summary.bytes / seconds)}/s")
        if summary.replaced:
            parts.append(f"{summary.replaced} replaced (other bytes were there)")
        if summary.kept_both:
            parts.append(f"{summary.kept_both} written beside other bytes (keep-both)")
        if summary.identical:
            parts.append(f"{summary.identical} identical (skipped)")
        rejected = len(summary.rejected)
        conflicts_left = len(summary.conflicts) - conflicts_failed
        other_skips = summary.skipped - rejected - summary.identical - conflicts_left
        if other_skips:
            parts.append(f"{other_skips} skipped")
        if rejected:
            parts.append(f"{rejected} not DICOM or malformed (left out)")
        if summary.conflicts:
            parts.append(
                f"{_count(len(summary.conflicts), 'conflict')} (other bytes under a name already taken; "
                f"{'left as they were' if conflicts_left else 'not written'})"
            )
        parts.append(f"{len(summary.failed) - conflicts_failed} failed")
        if summary.throttled:
            parts.append(
                f"throttled {_count(summary.throttled, 'time')}; "
                f"concurrency went down to {summary.lowest_concurrency}"
            )
        print(", ".join(parts), file=sys.stderr)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' if number != 1 else ''}"


def _failure_line(src: str, error: DicomCloudError) -> str:
    message = str(error)
    return f"error: {message}" if src in message else f"error: {src}: {message}"


def _failure_record(src: str, error: DicomCloudError) -> dict[str, Any]:
    return {"src": src, "error": str(error), "error_type": type(error).__name__, "exit_code": error.exit_code}


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _event_record(event: TransferEvent) -> dict[str, Any]:
    record: dict[str, Any] = {"event": event.kind, "src": event.src, "dst": event.dst, "size": event.size}
    if event.kind == "progress":
        record["bytes"] = event.bytes
    if event.already_done:
        record["already_done"] = True
    if event.totals is not None:
        totals = event.totals
        record.update(
            files=totals.files,
            bytes=totals.bytes,
            already_done=totals.already_done,
            already_done_bytes=totals.already_done_bytes,
            complete=totals.complete,
        )
    if event.error is not None:
        record["error"] = str(event.error)
        record["error_type"] = type(event.error).__name__
        record["exit_code"] = event.error.exit_code
    return record


def _json_line(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def object_record(info: ObjectInfo, display: Callable[[str], str]) -> dict[str, Any]:
    record: dict[str, Any] = {"key": info.key, "url": display(info.key), "size": info.size}
    if info.key.endswith("/"):
        record["type"] = "prefix"
    else:
        record["type"] = "object"
        record["last_modified"] = info.last_modified.isoformat() if info.last_modified else None
        if info.etag:
            record["etag"] = info.etag
    return record


def listing_line(info: ObjectInfo, *, details: bool, name: str) -> str:
    if info.key.endswith("/"):
        return f"{'':>19}  {'PRE':>12}  {name}" if details else name
    if not details:
        return name
    modified = _format_time(info.last_modified)
    return f"{modified:>19}  {info.size:>12}  {name}"


def bucket_line(bucket: BucketInfo, *, details: bool) -> str:
    """One bucket of ``list s3://``: its name, after its creation time with ``--details``."""
    return f"{_format_time(bucket.created):>19}  {bucket.name}" if details else bucket.name


def bucket_record(bucket: BucketInfo) -> dict[str, Any]:
    return {"bucket": bucket.name, "created": bucket.created.isoformat() if bucket.created else None}


def _format_time(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def print_error(error: DicomCloudError | str, hint: str | None = None) -> None:
    message = str(error)
    print(f"dicom-cloud: error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def error_record(error_type: str, message: str, exit_code: int, hint: str | None = None) -> None:
    """The JSON line (``--json``) of an error that ended the command, beside the line on stderr;
    its fields are those of a failed object's event (``error``, ``error_type``, ``exit_code``)."""
    record: dict[str, Any] = {
        "event": "error",
        "error": message,
        "error_type": error_type,
        "exit_code": exit_code,
    }
    if hint:
        record["hint"] = hint
    with contextlib.suppress(BrokenPipeError):  # nobody reads stdout any more; stderr has it
        _json_line(record)
