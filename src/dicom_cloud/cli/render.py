"""How the CLI shows progress, listings and summaries: rich bars, plain log lines, or JSON."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal, TextIO

from ..errors import ConflictError, DicomCloudError
from ..store import ObjectInfo
from ..transfer import TransferEvent, TransferSummary

OutputMode = Literal["rich", "plain", "json", "quiet"]


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def choose_mode(*, quiet: bool, json_output: bool, stream: TextIO = sys.stderr) -> OutputMode:
    if json_output:
        return "json"
    if quiet:
        return "quiet"
    return "rich" if stream.isatty() else "plain"


class TransferProgress:
    """Receives engine events and renders them in the chosen mode; thread-safe enough for one loop."""

    def __init__(
        self, mode: OutputMode, verb: str, *, interval: float = 5.0, report_failures: bool = True
    ) -> None:
        self.mode = mode
        #: Print a line per failed object (off when the caller reports a single failure itself).
        self.report_failures = report_failures
        self.verb = verb  # "Uploaded", "Downloaded", "Copied"
        self.interval = interval
        self.files_total = 0
        self.bytes_total = 0
        self.files_done = 0
        self.bytes_done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._last_line = self.started
        self._rich: Any = None
        self._task: Any = None

    def __enter__(self) -> TransferProgress:
        if self.mode == "rich":
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._rich = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[files]}"),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=True,
                console=_stderr_console(),
            )
            self._rich.start()
            self._task = self._rich.add_task("Transferring", total=None, files="0/0 files")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()

    def __call__(self, event: TransferEvent) -> None:
        kind = event.kind
        if kind in ("started", "planned"):
            self.files_total += 1
            self.bytes_total += event.size
        if kind == "progress":
            self.bytes_done += event.bytes
        elif kind == "completed":
            self.files_done += 1
            self.bytes_done += event.bytes
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
            self._rich.update(
                self._task,
                total=self.bytes_total or None,
                completed=self.bytes_done,
                files=f"{self.files_done}/{self.files_total} files",
            )

    def _error_line(self, event: TransferEvent, label: str = "error") -> None:
        if self.mode in ("json", "quiet") or not self.report_failures:
            return
        message = str(event.error) if event.error else "failed"
        text = f"{label}: {event.src}: {message}" if event.src not in message else f"{label}: {message}"
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr)

    def _maybe_plain_line(self) -> None:
        now = time.monotonic()
        if now - self._last_line < self.interval:
            return
        self._last_line = now
        elapsed = now - self.started
        rate = self.bytes_done / elapsed if elapsed > 0 else 0
        print(
            f"[{elapsed:6.1f}s] {self.files_done}/{self.files_total} files, "
            f"{human_bytes(self.bytes_done)}, {human_bytes(rate)}/s",
            file=sys.stderr,
            flush=True,
        )

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


def _format_time(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def print_error(error: DicomCloudError | str, hint: str | None = None) -> None:
    message = str(error)
    print(f"dicom-cloud: error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
