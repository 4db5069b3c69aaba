"""The Orthanc storage plugin: Orthanc's attachments on S3, Azure Blob, GCS or a local directory.

Orthanc loads it through orthanc-python: its configuration names :data:`ENTRY_SCRIPT` as
``PythonScript`` (``dicom-cloud orthanc-config`` prints a ready configuration). Modules:

- :mod:`.config`: the configuration sections and keys of Orthanc's C++ plugins, validated;
- :mod:`.storage`: the storage area (create/read/remove), hybrid mode, encryption, moves;
- :mod:`.removals`: the durable list of removals that failed, retried later;
- :mod:`.move`: ``/move-storage`` requests and the worker of asynchronous moves;
- :mod:`.plugin`: the glue with the ``orthanc`` module (imported only inside Orthanc).

See ``docs/orthanc-plugin.md``.
"""

from enum import Enum
from pathlib import Path

#: The file Orthanc's ``PythonScript`` names. It sits alone in its folder, which orthanc-python puts
#: first on ``sys.path``, so that nothing else there can shadow a module.
ENTRY_SCRIPT = Path(__file__).resolve().parent / "script" / "dicom_cloud_orthanc_plugin.py"


class HybridMode(Enum):
    """Where new attachments go, and which storage is read first (here, not in :mod:`.config`, so
    that the command line lists the modes without loading the plugin's configuration code)."""

    DISABLED = "Disabled"
    WRITE_TO_FILE_SYSTEM = "WriteToFileSystem"
    WRITE_TO_OBJECT_STORAGE = "WriteToObjectStorage"
