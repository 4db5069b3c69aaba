"""``dicom-cloud viewer install``: put the OHIF viewer where ``dicom-cloud serve`` serves it.

The viewer directory is the service's ``viewer_dir`` setting (default ``<data_dir>/viewer``),
so the same ``--data-dir``/``--viewer-dir``/``--config`` as the service's find the same place.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..localio import make_dirs


def register(add: Callable[..., Any]) -> None:
    """Add the command to the CLI (``add`` is ``build_parser``'s helper). Nothing of the service
    is imported here: every command builds this parser, and FastAPI costs start-up time."""
    sub = add(
        "viewer",
        "Install the OHIF web viewer that 'dicom-cloud serve' shows at /viewer/: the prebuilt\n"
        "files of the npm package @ohif/app (downloaded with 'npm pack', so npm must be\n"
        "installed and its registry reachable; or give a tarball with --from).",
        "  dicom-cloud viewer install\n"
        "  dicom-cloud viewer install --data-dir /srv/dicom-cloud\n"
        "  dicom-cloud viewer install --viewer-dir /opt/ohif --version 3.13.2\n"
        "  npm pack @ohif/app@3.13.2 && dicom-cloud viewer install --from ohif-app-3.13.2.tgz   (offline)",
        _viewer,
    )
    sub.add_argument("action", choices=["install"])
    sub.add_argument(
        "--version", help="@ohif/app version (default: the one this release is tested with, 3.13.2)"
    )
    sub.add_argument("--from", dest="tarball", type=Path, help="install from this npm tarball (no download)")
    sub.add_argument("--config", help="the service's TOML config file (for viewer_dir or data_dir)")
    sub.add_argument("--data-dir", help="the service's data directory (the viewer goes to DATA_DIR/viewer)")
    sub.add_argument("--viewer-dir", help="install into this directory instead")
    sub.add_argument("--json", action="store_true", help="print a JSON object")


def _viewer(args: argparse.Namespace) -> int:
    from ..service.settings import load_settings
    from ..service.viewer import DEFAULT_VERSION, install_viewer

    settings = load_settings(
        {"data_dir": args.data_dir, "viewer_dir": args.viewer_dir}, config_file=args.config
    )
    target = settings.viewer_path
    make_dirs(target.parent, private=settings.viewer_dir is None)  # the data directory is owner-only
    installed = install_viewer(target, version=args.version or DEFAULT_VERSION, tarball=args.tarball)
    if args.json:
        print(
            json.dumps({"path": str(installed.path), "version": installed.version, "files": installed.files})
        )
    else:
        print(f"OHIF viewer {installed.version} installed in {installed.path} ({installed.files} files);")
        print("'dicom-cloud serve' with the same settings shows it at /viewer/")
    return 0
