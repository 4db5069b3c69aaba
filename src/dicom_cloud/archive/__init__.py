"""The DICOM archive core: ingest, index, query, retrieve, render and delete instances, plus the
service's own records (API tokens, share links, upload sessions). No HTTP here: the service
parses requests, calls :class:`Archive`, and renders what it returns.
"""

from __future__ import annotations

from ..extras import require

require("service", "the archive core (dicom_cloud.archive)")

# The check comes first: without the extra, importing the modules below fails deep inside them.
from .core import Archive, QueryParams
from .records import (
    SCOPES,
    AcceptedFile,
    ApiToken,
    DeclaredFile,
    DeleteResult,
    DicomJson,
    Frames,
    InstanceRecord,
    OrphanSweep,
    OtherStudyError,
    RejectedFile,
    Rendered,
    Scope,
    ShareLink,
    StoredInstance,
    StudyLabels,
    UploadOutcome,
    UploadSession,
    UploadState,
)
from .settings import ArchiveSettings

__all__ = [
    "SCOPES",
    "AcceptedFile",
    "ApiToken",
    "Archive",
    "ArchiveSettings",
    "DeclaredFile",
    "DeleteResult",
    "DicomJson",
    "Frames",
    "InstanceRecord",
    "OrphanSweep",
    "OtherStudyError",
    "QueryParams",
    "RejectedFile",
    "Rendered",
    "Scope",
    "ShareLink",
    "StoredInstance",
    "StudyLabels",
    "UploadOutcome",
    "UploadSession",
    "UploadState",
]
