"""Where master keys are found: command-line specs, the environment, or a configuration file.

First found wins, as a whole (keys from two places are never mixed):

1. ``--master-key ID:PATH`` and ``--previous-key ID:PATH`` (repeatable)
2. ``DICOM_CLOUD_MASTER_KEY=ID:PATH`` and ``DICOM_CLOUD_PREVIOUS_KEYS=ID:PATH,ID:PATH``
3. the ``[encryption]`` table of the configuration file ``DICOM_CLOUD_CONFIG``
   (default ``~/.config/dicom-cloud/config.toml``)::

       [encryption]
       master_key = "7:/etc/dicom-cloud/master-7.key"
       previous_keys = ["6:/etc/dicom-cloud/master-6.key"]
       format = "A1"          # or "DC2"; what --encrypt client-side writes

Key files hold base64 of 32 random bytes (``openssl rand -base64 32``), as Orthanc's do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .keys import KeyRing

MASTER_KEY_ENV = "DICOM_CLOUD_MASTER_KEY"
PREVIOUS_KEYS_ENV = "DICOM_CLOUD_PREVIOUS_KEYS"
CONFIG_ENV = "DICOM_CLOUD_CONFIG"


@dataclass(frozen=True)
class KeySettings:
    ring: KeyRing | None
    #: Format named by the configuration file, if any.
    format: str | None = None
    #: Where the keys came from (for messages; never the keys).
    source: str = "none"


def load_keys(
    master: str | None = None,
    previous: Sequence[str] = (),
    *,
    environ: Mapping[str, str] | None = None,
) -> KeySettings:
    """The key ring from the first place that names a master key; an empty result if none does."""
    env = os.environ if environ is None else environ
    if previous and not master:
        raise UsageError(
            "--previous-key needs --master-key too", hint="the master key encrypts; previous keys only read"
        )
    if master:
        return KeySettings(KeyRing.from_specs(master, previous), source="command line")
    if env.get(MASTER_KEY_ENV):
        extra = [spec.strip() for spec in env.get(PREVIOUS_KEYS_ENV, "").split(",") if spec.strip()]
        return KeySettings(KeyRing.from_specs(env[MASTER_KEY_ENV], extra), source=MASTER_KEY_ENV)
    path = Path(
        env.get(CONFIG_ENV) or Path(env.get("HOME", str(Path.home()))) / ".config/dicom-cloud/config.toml"
    )
    if not path.is_file():
        if env.get(CONFIG_ENV):
            raise UsageError(f"{CONFIG_ENV} names {path}, which does not exist")
        return KeySettings(None)
    import tomllib  # here, where a configuration file exists: most starts have none

    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("encryption", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    if not isinstance(table, dict) or not table.get("master_key"):
        return KeySettings(None)
    listed = table.get("previous_keys", [])
    if not isinstance(listed, list) or not all(isinstance(item, str) for item in listed):
        raise UsageError(f'{path}: encryption.previous_keys must be a list of "ID:PATH" strings')
    fmt = table.get("format")
    if fmt is not None and (not isinstance(fmt, str) or fmt.upper() not in ("A1", "DC2")):
        raise UsageError(f'{path}: encryption.format must be "A1" or "DC2", not {fmt!r}')
    return KeySettings(KeyRing.from_specs(str(table["master_key"]), listed), format=fmt, source=str(path))
