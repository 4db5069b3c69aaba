"""Entry script of the dicom-cloud storage plugin, loaded by orthanc-python (``PythonScript``).

Orthanc embeds the system's Python (Debian's 3.11), not the virtualenv dicom-cloud is installed
in. So before importing anything of ours this script puts the directories listed in the
configuration's ``DicomCloud.PythonPath`` (the virtualenv's site-packages and, for an editable
install, the project's ``src``) at the front of ``sys.path``; ``PYTHONPATH`` in Orthanc's
environment works too. ``dicom-cloud orthanc-config`` writes both keys. The virtualenv must use
the same Python minor version as Orthanc's interpreter (compiled wheels are per version).
"""

import json
import sys

import orthanc

_section = json.loads(orthanc.GetConfiguration()).get("DicomCloud", {})
for _path in reversed(_section.get("PythonPath", [])):
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)

_wanted = _section.get("PythonVersion")
_running = f"{sys.version_info[0]}.{sys.version_info[1]}"
if _wanted and _wanted != _running:
    message = (
        f"dicom-cloud was installed for Python {_wanted} but Orthanc embeds Python {_running}: install "
        f"it in a virtualenv made with Python {_running} and run 'dicom-cloud orthanc-config' from there"
    )
    orthanc.LogError(message)
    raise RuntimeError(message)

try:
    from dicom_cloud.orthanc.plugin import initialize
except ImportError as _exc:
    orthanc.LogError(
        f"dicom-cloud: cannot import the dicom_cloud package ({_exc}); set DicomCloud.PythonPath to "
        "the virtualenv's site-packages (dicom-cloud orthanc-config does) or PYTHONPATH"
    )
    raise

try:
    initialize()
except Exception as _exc:
    orthanc.LogError(f"dicom-cloud: the storage plugin cannot start: {_exc}")
    _hint = getattr(_exc, "hint", None)
    if _hint:
        orthanc.LogError(f"dicom-cloud: hint: {_hint}")
    raise
