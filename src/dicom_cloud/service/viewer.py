"""The OHIF viewer: its prebuilt files installed from npm, and prepared to be served at ``/viewer/``.

``install_viewer`` fetches the ``@ohif/app`` package (``npm pack``: the registry's tarball, nothing
built or run) or takes a tarball already downloaded, and puts its ``dist/`` (the prebuilt
single-page application) in the viewer directory, replacing an older copy only once the new one
is complete. Nothing of it is committed to the repository or shipped in the wheel.

``ViewerFiles`` serves that directory: ``index.html`` rewritten for the ``/viewer/`` sub-path, and
an ``app-config.js`` generated here that points OHIF's DICOMweb data source at this service (the
shipped one points at a public demo server). OHIF loads its lazily imported chunks from ``/``
whatever its public path says, so those files are also served at the root (``routes/viewer.py``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from ..errors import NetworkError, NotFoundError, UsageError

PACKAGE = "@ohif/app"
#: The version installed by default: the one this service's configuration and tests were made for.
DEFAULT_VERSION = "3.13.2"
#: Written beside the files: what was installed, from where, when.
MARKER = "dicom-cloud-viewer.json"
#: The URL path the viewer is served under.
MOUNT = "/viewer"
NPM_TIMEOUT = 900.0

_NETWORK_CODES = (
    "ENOTFOUND",
    "EAI_AGAIN",
    "ECONNREFUSED",
    "ECONNRESET",
    "ETIMEDOUT",
    "ENETUNREACH",
    "ENOTCACHED",
)


@dataclass(frozen=True)
class InstalledViewer:
    path: Path
    version: str
    files: int


def install_viewer(
    target: Path, *, version: str = DEFAULT_VERSION, tarball: Path | None = None, npm: str | None = None
) -> InstalledViewer:
    """Install OHIF's ``dist/`` into ``target`` (from ``tarball``, else ``npm pack @ohif/app@version``).
    Errors: npm missing or the tarball unreadable (UsageError), the registry unreachable
    (NetworkError), no such version (NotFoundError)."""
    if not re.fullmatch(r"[0-9A-Za-z.+-]{1,64}", version):
        raise UsageError(f"not a package version: {version!r}", hint=f"e.g. --version {DEFAULT_VERSION}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".viewer-", dir=target.parent) as work:
        workdir = Path(work)
        source = tarball if tarball is not None else _npm_pack(version, workdir, npm)
        staged = workdir / "dist"
        files, found_version = _extract_dist(source, staged)
        marker = {
            "package": PACKAGE,
            "version": found_version or version,
            "installed": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": "tarball" if tarball is not None else "npm",
        }
        (staged / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        # Swap in the complete copy: a failed install above leaves the old viewer as it was.
        old = workdir / "old"
        if target.exists():
            target.rename(old)
        staged.rename(target)
    return InstalledViewer(target, str(marker["version"]), files)


def _npm_pack(version: str, workdir: Path, npm: str | None) -> Path:
    executable = npm or shutil.which("npm")
    if executable is None:
        raise UsageError(
            "npm is not installed: it is needed to download the OHIF viewer",
            hint="install Node.js and npm (Debian: apt-get install npm), or run "
            f"'npm pack {PACKAGE}@{version}' on another machine and pass the file with --from",
        )
    try:
        done = subprocess.run(
            [
                executable,
                "pack",
                f"{PACKAGE}@{version}",
                "--pack-destination",
                str(workdir),
                "--json",
                "--loglevel=error",
                "--no-fund",
                "--no-audit",
            ],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise NetworkError(f"npm pack {PACKAGE}@{version} did not finish in {NPM_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise UsageError(f"npm could not be run: {exc.strerror}") from None
    if done.returncode != 0:
        message = _npm_error(done.stderr + done.stdout)
        if "E404" in done.stderr or "ETARGET" in done.stderr or "No matching version" in done.stderr:
            raise NotFoundError(f"npm has no {PACKAGE}@{version}", hint=f"see 'npm view {PACKAGE} versions'")
        if any(code in done.stderr for code in _NETWORK_CODES) or "offline" in done.stderr.lower():
            raise NetworkError(
                f"npm could not reach its registry to download {PACKAGE}@{version}: {message}",
                hint="check the network or npm's registry setting; offline: pass a tarball with --from",
            )
        raise UsageError(f"npm pack {PACKAGE}@{version} failed: {message}")
    packed = sorted(workdir.glob("*.tgz"))
    if not packed:
        raise UsageError(f"npm pack {PACKAGE}@{version} wrote no tarball")
    return packed[0]


def _npm_error(output: str) -> str:
    """npm's first error line, without its ``npm error`` prefix (the rest is a log path)."""
    for line in output.splitlines():
        text = re.sub(r"^npm (ERR!|error)\s*", "", line.strip())
        if text and not text.startswith(("A complete log", "code ")):
            return text[:300]
    return "no message"


def _extract_dist(tarball: Path, staged: Path) -> tuple[int, str | None]:
    """Extract ``package/dist/`` of an npm tarball into ``staged``; the package's version."""
    try:
        archive = tarfile.open(tarball, "r:*")  # noqa: SIM115 - closed by the with below
    except (OSError, tarfile.TarError) as exc:
        raise UsageError(f"{tarball} is not a readable npm package tarball: {exc}") from None
    files = 0
    version: str | None = None
    with archive:
        for member in archive.getmembers():
            if member.name == "package/package.json":
                handle = archive.extractfile(member)
                if handle is not None:
                    version = json.loads(handle.read()).get("version")
                continue
            if not member.name.startswith("package/dist/") or not (member.isfile() or member.isdir()):
                continue
            member.name = member.name[len("package/dist/") :]
            if not member.name:
                continue
            # data_filter refuses absolute names, '..', links out of the tree and device files.
            try:
                archive.extract(member, staged, filter="data")
            except tarfile.FilterError as exc:
                raise UsageError(f"{tarball} holds an unsafe file name ({exc}): not installed") from None
            files += member.isfile()
    if not (staged / "index.html").is_file() or not (staged / "app-config.js").is_file():
        raise UsageError(f"{tarball} holds no prebuilt viewer (package/dist/index.html is missing)")
    return files, version


class ViewerFiles:
    """An installed viewer directory, as served: file lookups confined to it, the rewritten
    ``index.html`` and the generated ``app-config.js``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def installed(self) -> bool:
        return (self.root / "index.html").is_file()

    @cached_property
    def version(self) -> str | None:
        try:
            value = json.loads((self.root / MARKER).read_text()).get("version")
        except (OSError, ValueError):
            return None
        return str(value) if value else None

    @cached_property
    def top_level(self) -> frozenset[str]:
        """Names directly in the viewer directory (the root-served chunks come from these)."""
        try:
            return frozenset(p.name for p in self.root.iterdir())
        except OSError:
            return frozenset()

    def file(self, relative: str) -> Path:
        """The file at ``relative`` inside the viewer; NotFoundError for anything else (directories,
        names leaving the directory)."""
        parts = [p for p in relative.split("/") if p]
        if not parts or any(p in (".", "..") or "\\" in p or "\0" in p for p in parts):
            raise NotFoundError("no such viewer file")
        path = self.root.joinpath(*parts)
        try:
            resolved = path.resolve(strict=True)
        except OSError:
            raise NotFoundError("no such viewer file") from None
        if not resolved.is_file() or not resolved.is_relative_to(self.root.resolve()):
            raise NotFoundError("no such viewer file")
        return resolved

    @cached_property
    def index_html(self) -> str:
        """OHIF's page with its absolute links moved under ``/viewer/`` and its service worker
        left out (a worker caching the viewer's requests would outlive a logout)."""
        text = (self.root / "index.html").read_text(encoding="utf-8")
        text = re.sub(r'<script src="/init-service-worker\.js"></script>', "", text)
        text = re.sub(r'(href|src)="/(?!/)', rf'\1="{MOUNT}/', text)
        return text.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{MOUNT}/"')


def app_config(root_path: str) -> str:
    """OHIF's ``app-config.js`` for this service: one DICOMweb data source at ``root_path`` (the
    service's root path, ``""`` at the top of its host) on the page's own origin, so cookies
    reach it and no CORS is involved."""
    root = json.dumps(root_path.rstrip("/"))
    return f"""/* Generated by dicom-cloud serve: OHIF's data source is this service. */
(function () {{
  var root = window.location.origin + {root};
  window.config = {{
    name: 'dicom-cloud',
    routerBasename: '{MOUNT}',
    extensions: [],
    modes: [],
    customizationService: {{}},
    showStudyList: true,
    maxNumberOfWebWorkers: 2,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    groupEnabledModesFirst: true,
    maxNumRequests: {{ interaction: 100, thumbnail: 5, prefetch: 10 }},
    showErrorDetails: 'production',
    defaultDataSourceName: 'dicom-cloud',
    dataSources: [
      {{
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'dicom-cloud',
        configuration: {{
          friendlyName: 'dicom-cloud',
          name: 'dicom-cloud',
          wadoUriRoot: root + '/wado',
          qidoRoot: root,
          wadoRoot: root,
          qidoSupportsIncludeField: true,
          supportsReject: false,
          imageRendering: 'wadors',
          thumbnailRendering: 'thumbnail',
          thumbnailRequestStrategy: 'fetch',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          staticWado: false,
          singlepart: 'video',
          bulkDataURI: {{ enabled: true, relativeResolution: 'studies' }},
          omitQuotationForMultipartRequest: true,
        }},
      }},
    ],
    httpErrorHandler: function (error) {{
      console.warn('dicom-cloud: request failed', error && error.status);
    }},
  }};
}})();
"""
