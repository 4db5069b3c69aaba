"""Master keys (key-encryption keys) and the key ring that picks one by id.

A master key is 32 random bytes with a uint32 id. Orthanc's object-storage plugins keep each
one in a file holding its base64 form (``openssl rand -base64 32 > key``) and name it in the
configuration as ``[id, path]``; here a key is named on the command line as ``ID:PATH``.

Key material never appears in a repr, a str or an error message: errors name the file or the
variable and say what is wrong with it, never what it holds.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dicom_cloud.errors import KeyMissingError, UsageError

#: Length of a master key: AES-256.
KEY_SIZE = 32
#: Key ids are stored as 4 bytes in every object header.
MAX_KEY_ID = 2**32 - 1

_MAKE_KEY_HINT = "Make a master key with: openssl rand -base64 32 > master.key"
_SPEC = re.compile(r"(?P<id>[0-9]+):(?P<path>.+)", re.DOTALL)


def _check_id(key_id: object) -> int:
    # bool is an int subclass: True as a key id is certainly a mistake.
    if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 <= key_id <= MAX_KEY_ID:
        raise UsageError(f"master key id {key_id!r} is not an integer from 0 to {MAX_KEY_ID} (a uint32)")
    return key_id


@dataclass(frozen=True)
class MasterKey:
    """A 32-byte AES-256 master key and its uint32 id. The repr shows the id only."""

    id: int
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_id(self.id)
        if not isinstance(self.key, bytes):
            # Immutable bytes only: a caller's bytearray could change under us.
            raise UsageError(f"master key {self.id} must be given as bytes, not {type(self.key).__name__}")
        if len(self.key) != KEY_SIZE:
            # Say the length only: the bytes themselves are the secret.
            raise UsageError(
                f"master key {self.id} is {len(self.key)} bytes long; it must be exactly {KEY_SIZE}",
                hint=_MAKE_KEY_HINT,
            )

    @classmethod
    def from_base64(cls, key_id: int, text: bytes | str, *, source: str) -> MasterKey:
        """Decode a key from its base64 form; ``source`` names where it came from, for errors.

        Whitespace anywhere is ignored (``openssl rand -base64`` ends with a newline and wraps
        long output), anything else that is not base64 is refused. Unlike Orthanc, which
        silently truncates a longer key and leaves a shorter one partly unset, the decoded
        length must be exactly 32 bytes.
        """
        _check_id(key_id)
        raw = text.encode("ascii", "replace") if isinstance(text, str) else text
        compact = b"".join(raw.split())
        try:
            key = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            # "from None": the decoder's message could quote the offending input.
            raise UsageError(f"{source} does not hold a base64-encoded key", hint=_MAKE_KEY_HINT) from None
        if len(key) != KEY_SIZE:
            raise UsageError(
                f"{source} holds {len(key)} bytes once base64-decoded; a master key must be exactly "
                f"{KEY_SIZE} bytes",
                hint=_MAKE_KEY_HINT,
            )
        return cls(key_id, key)

    @classmethod
    def from_file(cls, key_id: int, path: str | os.PathLike[str]) -> MasterKey:
        """Read a key file in Orthanc's format: base64 of exactly 32 bytes."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise UsageError(
                f"cannot read master key file {os.fspath(path)!r}: {e.strerror or e}",
                hint=_MAKE_KEY_HINT,
            ) from e
        return cls.from_base64(key_id, data, source=f"master key file {os.fspath(path)!r}")

    @classmethod
    def from_env(cls, key_id: int, name: str, environ: Mapping[str, str] | None = None) -> MasterKey:
        """Read a key from an environment variable holding its base64 form."""
        env = os.environ if environ is None else environ
        value = env.get(name)
        if value is None or not value.strip():
            raise UsageError(f"environment variable {name} is not set or empty; it should hold a master key")
        return cls.from_base64(key_id, value, source=f"environment variable {name}")

    @classmethod
    def from_spec(cls, spec: str) -> MasterKey:
        """Load the key named by a command-line spec ``ID:PATH`` (see `parse_key_spec`)."""
        key_id, path = parse_key_spec(spec)
        return cls.from_file(key_id, path)


def parse_key_spec(spec: str) -> tuple[int, Path]:
    """Split ``ID:PATH`` into a uint32 id (decimal digits) and a path; nothing is read.

    Only the first colon separates, so ``3:C:\\keys\\k`` is id 3 and a Windows path.
    """
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise UsageError(
            f"master key {spec!r} is not of the form ID:PATH",
            hint="Give the key's numeric id and its file, e.g. 3:/etc/dicom-cloud/master-3.key",
        )
    key_id = int(match["id"])
    if key_id > MAX_KEY_ID:
        raise UsageError(f"master key id {key_id} in {spec!r} does not fit a uint32 (0 to {MAX_KEY_ID})")
    return key_id, Path(match["path"])


class KeyRing:
    """The current master key (used to encrypt) and previous ones (still accepted to decrypt).

    Ids are unique within a ring, since an object names its key by id alone.
    """

    def __init__(self, current: MasterKey, previous: Sequence[MasterKey] = ()) -> None:
        self.current = current
        self.previous: tuple[MasterKey, ...] = tuple(previous)
        self._by_id: dict[int, MasterKey] = {}
        for key in (current, *self.previous):
            if key.id in self._by_id:
                raise UsageError(f"master key id {key.id} is given twice; each master key needs its own id")
            self._by_id[key.id] = key

    @classmethod
    def from_specs(cls, current: str, previous: Iterable[str] = ()) -> KeyRing:
        """Build a ring from ``ID:PATH`` specs, reading each key file."""
        return cls(MasterKey.from_spec(current), [MasterKey.from_spec(s) for s in previous])

    @property
    def ids(self) -> list[int]:
        """Every id in the ring, current first."""
        return list(self._by_id)

    def lookup(self, key_id: int) -> MasterKey:
        """The key with this id; `UsageError` naming the id and the known ids if there is none."""
        key = self._by_id.get(key_id)
        if key is None:
            known = ", ".join(str(i) for i in self._by_id)
            raise KeyMissingError(
                f"master key id {key_id} is not configured (known ids: {known})",
                key_id=key_id,
                hint=f"add the master key with id {key_id} as a previous key (--previous-key {key_id}:PATH)",
            )
        return key

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._by_id

    def __repr__(self) -> str:
        previous = ", ".join(str(k.id) for k in self.previous)
        return f"KeyRing(current={self.current.id}, previous=[{previous}])"
