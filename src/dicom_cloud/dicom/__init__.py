"""DICOM-aware helpers: reading identities from Part 10 headers."""
