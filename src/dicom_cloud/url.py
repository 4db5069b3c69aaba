"""Parsing of storage location strings (``s3://bucket/key``, ``gs://``, ``azure://``, ``file://``, paths)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from .errors import UsageError

Scheme = Literal["s3", "gs", "azure", "file", "memory"]

_SCHEME_ALIASES: dict[str, Scheme] = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gs",
    "gcs": "gs",
    "azure": "azure",
    "az": "azure",
    "file": "file",
    "memory": "memory",
}


@dataclass(frozen=True)
class StorageURL:
    """A parsed location: which store, which bucket, and which key (or prefix) inside it.

    For ``file`` locations ``bucket`` is empty and ``key`` is an absolute local path.
    ``memory://name/key`` is an in-process store for tests and examples.
    """

    scheme: Scheme
    bucket: str
    key: str

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def names_directory(self) -> bool:
        """True when the text ended with a slash (or named only a bucket): it means "inside this"."""
        return self.key == "" or self.key.endswith("/")

    def __str__(self) -> str:
        if self.scheme == "file":
            return self.key
        return f"{self.scheme}://{self.bucket}/{self.key}"


def account_scheme(text: str) -> Scheme | None:
    """The scheme of a URL naming a whole account (``s3://``, ``gs://``, ``az://``: no bucket), or
    None. Only ``list`` takes such URLs; every other use needs a bucket (:func:`parse_url`).

    >>> account_scheme("az://"), account_scheme("s3://bucket/")
    ('azure', None)
    """
    head, sep, rest = text.partition("://")
    scheme = _SCHEME_ALIASES.get(head.lower())
    if not sep or rest.strip("/") or scheme is None or scheme in ("file", "memory"):
        return None
    return scheme


def parse_url(text: str) -> StorageURL:
    """Parse a location given on the command line or through the API.

    >>> parse_url("s3://bucket/a/b.dcm")
    StorageURL(scheme='s3', bucket='bucket', key='a/b.dcm')
    >>> parse_url("az://container/")
    StorageURL(scheme='azure', bucket='container', key='')
    """
    if not text:
        raise UsageError("empty location", hint="give a URL like s3://bucket/prefix/ or a local path")
    if "\x00" in text:
        raise UsageError("location contains a NUL character")
    head, sep, rest = text.partition("://")
    if not sep:
        no_colon = re.match(r"^([A-Za-z0-9]+)//", text)
        if no_colon and no_colon.group(1).lower() in _SCHEME_ALIASES:
            # "s3//bucket/x/" would otherwise quietly become the local directory ./s3/bucket/x/.
            scheme_text = no_colon.group(1)
            raise UsageError(
                f"'{text}' looks like a URL with the colon missing: "
                f"did you mean {scheme_text}:{text[len(scheme_text) :]}?",
                hint=f"use ./{text} for a local path",
            )
        typo = re.match(r"^([A-Za-z0-9]+):/?(?!/)", text)
        if typo and typo.group(1).lower() in _SCHEME_ALIASES:
            # "s3:/bucket" or "gs:bucket" would otherwise quietly become a local directory.
            raise UsageError(
                f"'{text}' looks like a {typo.group(1)}:// URL with a slash missing",
                hint=f"write {typo.group(1)}://... (or ./{text} for a local path)",
            )
        return _local(text)
    name = head.lower()
    scheme = _SCHEME_ALIASES.get(name)
    if scheme is None:
        raise UsageError(
            f"unknown storage scheme '{head}://'",
            hint="use s3://, gs://, azure:// (or az://), file:// or a local path",
        )
    if scheme == "file":
        # file:///abs/path (empty host) or file://localhost/abs/path
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):
            raise UsageError(f"file URL must be absolute: {text}", hint="write file:///absolute/path")
        return _local(unquote(rest))
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UsageError(f"missing bucket or container name in '{text}'")
    _check_bucket(bucket, scheme, text)
    return StorageURL(scheme=scheme, bucket=bucket, key=key)


def _local(path_text: str) -> StorageURL:
    trailing = path_text.endswith(("/", os.sep))
    path = os.path.abspath(os.path.expanduser(path_text))
    if trailing and not path.endswith("/"):
        path += "/"
    return StorageURL(scheme="file", bucket="", key=path)


def _check_bucket(bucket: str, scheme: Scheme, text: str) -> None:
    if scheme == "memory":
        return
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-._")
    if scheme == "s3":
        allowed |= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")  # legacy buckets; the server decides
    if not (3 <= len(bucket) <= 255) or not set(bucket) <= allowed:
        raise UsageError(
            f"'{bucket}' is not a valid bucket or container name (in '{text}')",
            hint="bucket names use lower-case letters, digits, '-' and '.'",
        )
