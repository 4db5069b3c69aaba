"""A durable list of objects whose removal failed, retried later and reported.

Orthanc ignores an error raised by a storage area's ``remove``: it answers the DELETE with 200
and forgets the attachment. So a removal that fails (object store down, permission refused) is
recorded here, in a JSON-lines file rewritten atomically on every change, and retried by the
plugin's timer and on demand (``POST /dicom-cloud/pending-removals/retry``). An object is never
silently orphaned: it is either gone or listed here, across restarts.

One line per entry::

    {"storage": "object-storage", "key": "7f3c...dcm.enc", "since": "2026-11-21T21:00:00+00:00",
     "attempts": 2, "error": "NetworkError: ..."}

Keys are attachment names (uuids and extensions): no patient data.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..errors import DicomCloudError, NotFoundError, UsageError


@dataclass
class PendingRemoval:
    #: "object-storage" or "file-system".
    storage: str
    key: str
    since: str
    attempts: int = 1
    error: str = ""


#: Removes ``keys`` from the storage called ``storage``; raises on failure.
Remover = Callable[[str, list[str]], None]


class PendingRemovals:
    """The list, kept in memory and in ``path``; safe to use from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], PendingRemoval] = {}
        self._load()

    def _load(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise UsageError(f"cannot read the pending removals file {self.path}: {exc.strerror}") from exc
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = PendingRemoval(**json.loads(line))
            except (ValueError, TypeError) as exc:
                raise UsageError(
                    f"{self.path} line {number} is not a pending removal",
                    hint="the file is written by the plugin only; restore it or remove the bad line",
                ) from exc
            self._entries[(entry.storage, entry.key)] = entry

    def _save(self) -> None:
        """Write the whole list atomically (it is short: only failed removals live here)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        lines = "".join(json.dumps(asdict(e), sort_keys=True) + "\n" for e in self._entries.values())
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(lines)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    def add(self, storage: str, keys: Iterable[str], error: BaseException) -> None:
        """Record that removing ``keys`` from ``storage`` failed with ``error``."""
        message = _describe(error)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._lock:
            for key in keys:
                entry = self._entries.get((storage, key))
                if entry is None:
                    self._entries[(storage, key)] = PendingRemoval(storage, key, now, 1, message)
                else:
                    entry.attempts += 1
                    entry.error = message
            self._save()

    def discard(self, storage: str, keys: Iterable[str]) -> None:
        """Forget ``keys`` (written again, so no longer to be removed)."""
        with self._lock:
            changed = False
            for key in keys:
                changed |= self._entries.pop((storage, key), None) is not None
            if changed:
                self._save()

    def entries(self) -> list[PendingRemoval]:
        with self._lock:
            return [PendingRemoval(**asdict(e)) for e in self._entries.values()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def retry(self, remove: Remover) -> tuple[int, int]:
        """Try every entry again; returns (removed now, still pending)."""
        with self._lock:
            todo = list(self._entries.values())
        removed = 0
        for entry in todo:
            try:
                remove(entry.storage, [entry.key])
            except NotFoundError:
                pass  # already gone: that is what was wanted
            except DicomCloudError as exc:
                self.add(entry.storage, [entry.key], exc)
                continue
            with self._lock:
                if self._entries.pop((entry.storage, entry.key), None) is not None:
                    removed += 1
                with contextlib.suppress(OSError):
                    self._save()
        return removed, len(self)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]
