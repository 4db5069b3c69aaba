"""Where the archive keeps each kind of object in its store (spec: ``docs/archive.md``).

Every key is relative to the archive root (the storage URL's prefix) and starts with the
tenant, so a tenant's data can be listed, copied or erased by prefix::

    {tenant}/instances/{h[0:2]}/{h[2:4]}/{h}.{crc}.dcm      the DICOM instance (Part 10)
    {tenant}/metadata/{h[0:2]}/{h[2:4]}/{h}.{crc}.json      its DICOM JSON sidecar
    {tenant}/derived/{h[0:2]}/{h[2:4]}/{h}.{crc}/{name}     rendered previews and other derivatives
    {tenant}/staging/{session}/{index}                      presigned uploads, before ingest
    {tenant}/quarantine/{session}/{index}                   refused uploads, kept for inspection

``h`` is :func:`dicom_cloud.dicom.layout.uid_hash` of the SOP Instance UID (the ``hashed``
preset: no UID, no patient data in any name) and ``crc`` the CRC32C of the instance's bytes:
a different instance stored under the same UID can never overwrite the object another index
row points at, even when two writers race.

Tenant names are restricted (:func:`check_tenant`) so that they can be used in keys as they are.
"""

from __future__ import annotations

import re
from typing import Final

from ..dicom.layout import uid_hash
from ..errors import UsageError

_TENANT: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def check_tenant(tenant: str) -> str:
    """``tenant`` if it is 1-63 lower-case letters, digits, ``-`` and ``_`` (starting with a
    letter or digit); UsageError otherwise."""
    if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
        raise UsageError("invalid tenant name", hint="use 1-63 lower-case letters, digits, '-' or '_'")
    return tenant


class BucketLayout:
    """Key names of the archive's objects; ``name_key`` keys the UID hash (see ``uid_hash``)."""

    def __init__(self, name_key: bytes | None = None) -> None:
        self._name_key = name_key

    def _stem(self, sop_instance_uid: str, crc32c: str) -> str:
        h = uid_hash(sop_instance_uid, self._name_key)
        return f"{h[0:2]}/{h[2:4]}/{h}.{crc32c}"

    def instance_key(self, tenant: str, sop_instance_uid: str, crc32c: str) -> str:
        return f"{tenant}/instances/{self._stem(sop_instance_uid, crc32c)}.dcm"

    def sidecar_key(self, tenant: str, sop_instance_uid: str, crc32c: str) -> str:
        return f"{tenant}/metadata/{self._stem(sop_instance_uid, crc32c)}.json"

    def derived_prefix(self, tenant: str, sop_instance_uid: str, crc32c: str) -> str:
        return f"{tenant}/derived/{self._stem(sop_instance_uid, crc32c)}/"

    @staticmethod
    def instance_key_of(tenant: str, key: str) -> str | None:
        """The instance key an instance, sidecar or derived key belongs to; None for other keys."""
        for kind, suffix in (("instances", ".dcm"), ("metadata", ".json"), ("derived", None)):
            prefix = f"{tenant}/{kind}/"
            if not key.startswith(prefix):
                continue
            parts = key[len(prefix) :].split("/")
            if suffix is None:  # derived: {h[0:2]}/{h[2:4]}/{stem}/{name}
                return f"{tenant}/instances/{'/'.join(parts[:3])}.dcm" if len(parts) == 4 else None
            if len(parts) == 3 and parts[2].endswith(suffix):
                return f"{tenant}/instances/{parts[0]}/{parts[1]}/{parts[2][: -len(suffix)]}.dcm"
            return None
        return None

    @staticmethod
    def staging_key(tenant: str, session_id: str, index: int) -> str:
        return f"{tenant}/staging/{session_id}/{index}"

    @staticmethod
    def staging_prefix(tenant: str) -> str:
        return f"{tenant}/staging/"

    @staticmethod
    def quarantine_key(tenant: str, staging_key: str) -> str:
        """The quarantine key of a staging object: same session and index."""
        prefix = f"{tenant}/staging/"
        if not staging_key.startswith(prefix):
            raise UsageError("the object is not in this tenant's staging area")
        return f"{tenant}/quarantine/{staging_key[len(prefix) :]}"
