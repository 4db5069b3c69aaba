"""The de-identification UID map log: which original UID became which new UID, one JSON line per pair.

Kept apart from de-identification itself so that the CLI can open the log without importing pydicom."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping


class UidMapLog:
    """The de-identification UID mapping, appended as JSON lines (old, new) from worker threads."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def write(self, mapping: Mapping[str, str]) -> None:
        lines = "".join(json.dumps({"old": old, "new": new}) + "\n" for old, new in mapping.items())
        with self._lock:
            self._file.write(lines)

    def close(self) -> None:
        self._file.close()
