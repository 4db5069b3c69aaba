"""Recently authenticated opaque secrets (API tokens, share links), kept for a few seconds.

Every request authenticates its bearer credential; without a cache that is a database read per
request. A hit skips the read for ``ttl`` seconds after the secret was last looked up:

- the key is the secret's SHA-256, never the secret itself;
- only valid secrets are kept (an unknown or refused one is looked up every time);
- the expiry time of the token or link is checked on every hit, so an expiring credential stops
  working on time;
- a revocation clears the cache of the process that handled it at once; other worker processes
  and other instances of the service keep honouring a revoked credential for at most ``ttl``
  seconds (documented in docs/service.md, setting ``auth_cache_seconds``; 0 turns the cache off).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

from .auth import Principal

#: Most secrets kept; the least recently stored is dropped first.
MAX_ENTRIES = 4096


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    expires: datetime | None
    stored_at: float


class CredentialCache:
    """Bounded, short-lived memory of valid secrets and their principals (one per process)."""

    def __init__(self, ttl: float, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    @staticmethod
    def key(secret: str) -> bytes:
        return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()

    def get(self, key: bytes) -> Principal | None:
        """The principal of a secret validated less than ``ttl`` seconds ago and not expired now."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if time.monotonic() - entry.stored_at >= self.ttl or (
            entry.expires is not None and datetime.now(UTC) >= entry.expires
        ):
            del self._entries[key]
            return None
        return entry.principal

    def put(self, key: bytes, principal: Principal, expires: datetime | None) -> None:
        if self.ttl <= 0:
            return
        self._entries.pop(key, None)
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
        self._entries[key] = _Entry(principal, expires, time.monotonic())

    def clear(self) -> None:
        """Forget every secret (after a revocation: the next request of each is looked up)."""
        self._entries.clear()
