"""A place to read from or write to: a store plus a key or prefix inside it, opened from a URL."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

from .backends import StoreConfig, open_store
from .errors import NotFoundError, UsageError
from .store import ObjectInfo, Store
from .url import StorageURL, parse_url


@dataclass(frozen=True)
class Location:
    """``store`` holds the object(s); ``key`` is the object's key or the prefix of a tree.

    For local paths the store is rooted at ``/`` and ``key`` is the absolute path without its
    leading slash.
    """

    url: StorageURL
    store: Store
    key: str

    @property
    def is_local(self) -> bool:
        return self.url.is_local

    @property
    def names_directory(self) -> bool:
        return self.url.names_directory

    @property
    def prefix(self) -> str:
        """The key as a tree prefix: empty, or ending with one ``/``."""
        stripped = self.key.rstrip("/")
        return f"{stripped}/" if stripped else ""

    def join(self, relative: str) -> str:
        """The key of ``relative`` (a ``/``-separated name) inside this location's prefix."""
        return self.prefix + relative

    def display(self, key: str | None = None) -> str:
        """The user-facing form of ``key`` (default: this location's own key)."""
        key = self.key if key is None else key
        return self.store.url(key)

    def basename(self) -> str:
        return posixpath.basename(self.key.rstrip("/"))

    async def stat_object(self, action: str) -> ObjectInfo:
        """The one object this location names; a clear UsageError when it names a directory or a
        prefix instead (``action`` completes the hint: "add --recursive to <action> ...")."""
        hint = f"add --recursive to {action} everything under it"
        if self.names_directory:
            raise UsageError(f"{self.display()} is a directory or prefix", hint=hint)
        try:
            return await self.store.stat(self.key)
        except NotFoundError:
            if self.is_local:
                if os.path.isdir("/" + self.key):
                    raise UsageError(f"{self.display()} is a directory", hint=hint) from None
            else:
                async for _ in self.store.list(self.prefix):
                    raise UsageError(f"{self.display()} is a prefix, not an object", hint=hint) from None
            raise


def _check_object_key(url: StorageURL) -> None:
    """S3 and Azure keys with empty, "." or ".." segments are refused: they read as paths
    that mean something else, and the S3/Azure client cannot address them."""
    segments = url.key.rstrip("/").split("/") if url.key.rstrip("/") else []
    if any(segment in ("", ".", "..") for segment in segments):
        raise UsageError(
            f"'{url}' has an empty, '.' or '..' path segment",
            hint="write the object name without '//', '/./' or '/../'",
        )


class LocationOpener:
    """Opens locations, sharing one store per bucket so that same-store copies stay server-side."""

    def __init__(self, config: StoreConfig | None = None) -> None:
        self.config = config or StoreConfig()
        self._stores: dict[tuple[str, str], Store] = {}

    def open(self, target: str | StorageURL) -> Location:
        url = parse_url(target) if isinstance(target, str) else target
        identity = (url.scheme, url.bucket)
        store = self._stores.get(identity)
        if store is None:
            store = self._stores[identity] = open_store(url, self.config)
        key = url.key.lstrip("/") if url.is_local else url.key
        if url.scheme in ("s3", "azure"):
            _check_object_key(url)
        return Location(url=url, store=store, key=key)

    async def close(self) -> None:
        for store in self._stores.values():
            await store.close()
        self._stores.clear()
