"""The DICOMweb service: a FastAPI face over the archive core (``docs/service.md``).

from dicom_cloud.service import create_app, load_settings
app = create_app(load_settings({"storage": "s3://archive/dicom"}))
"""

from __future__ import annotations

from ..extras import require

require("service", "the DICOMweb service (dicom_cloud.service)")

# The check comes first: without the extra, importing the modules below fails deep inside them.
from .app import create_app
from .settings import ServiceSettings, load_settings

__all__ = ["ServiceSettings", "create_app", "load_settings"]
