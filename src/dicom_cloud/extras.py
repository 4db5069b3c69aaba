"""The optional parts of the package (extras) and the check that names the missing one.

``pip install dicom-cloud`` is the CLI and the library API; what else a command needs comes
with an extra (pyproject.toml, docs/packaging.md). A command that needs one calls
:func:`require` before importing anything from it, so that a missing extra is one line naming
the ``pip install`` to run (:class:`~dicom_cloud.errors.MissingExtraError`, exit 15), not a
traceback from deep inside an import.
"""

from __future__ import annotations

import importlib.util
import sys

from .errors import MissingExtraError

#: Extra -> the top-level modules it provides (the ones the code imports by name).
EXTRAS: dict[str, tuple[str, ...]] = {
    "service": (
        "fastapi",
        "uvicorn",
        "sqlalchemy",
        "alembic",
        "prometheus_client",
        "jwt",
        "orjson",
        "PIL",
        "numpy",
        "pylibjpeg",
        "openjpeg",
    ),
    "dimse": ("pynetdicom",),
    "postgres": ("psycopg", "procrastinate"),
    "parquet": ("pyarrow",),
    "aws": ("botocore",),
    "cluster": ("dask", "distributed"),
}


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported (empty when the extra is installed)."""
    return [name for name in EXTRAS[extra] if not _importable(name)]


def _importable(name: str) -> bool:
    if name in sys.modules:  # None there means "blocked" (as tests and some embedders do)
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def require(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` when ``extra`` is not (fully) installed.

    ``feature`` names what needed it, as the user asked for it ("dicom-cloud serve").
    """
    absent = missing(extra)
    if absent:
        partly = len(absent) < len(EXTRAS[extra])
        detail = f" completely (missing: {', '.join(absent)})" if partly else ""
        message = f"{feature} needs the '{extra}' extra, which is not installed{detail}"
        raise MissingExtraError(message, extra=extra)
