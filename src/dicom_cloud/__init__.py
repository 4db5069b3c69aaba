"""dicom-cloud: move, protect, index and serve DICOM images on object storage."""

__version__ = "0.1.0"
