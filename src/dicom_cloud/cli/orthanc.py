"""``dicom-cloud orthanc-config``: print an Orthanc configuration that loads the storage plugin.

The configuration names the plugin's entry script (``PythonScript``), tells the embedded interpreter
where this installation lives (``DicomCloud.PythonPath``: see docs/orthanc-plugin.md), and holds one
storage section with the keys of Orthanc's C++ plugins. The result is validated by the plugin's own
parser before it is printed, so what this command prints is what Orthanc will accept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..orthanc import ENTRY_SCRIPT, HybridMode

DEFAULT_PLUGINS_DIR = "/usr/share/orthanc/plugins"


def python_path() -> list[str]:
    """What the embedded interpreter needs on sys.path to import this installation of dicom_cloud."""
    paths: list[str] = []
    package_parent = str(Path(__file__).resolve().parents[2])  # .../src or .../site-packages
    for path in (package_parent, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]):
        if path not in paths:
            paths.append(path)
    return paths


def _key_pair(spec: str) -> list[Any]:
    from ..crypto.keys import parse_key_spec

    key_id, path = parse_key_spec(spec)
    return [key_id, str(path.resolve())]


def orthanc_configuration(args: argparse.Namespace) -> dict[str, Any]:
    """The whole configuration for the parsed options (validated like the plugin validates it)."""
    from ..orthanc.config import parse_configuration  # the plugin's own code, for this command only

    storage_directory = str(Path(args.storage_directory).resolve())
    section: dict[str, Any]
    if args.s3:
        region = args.region or os.environ.get("AWS_REGION") or "us-east-1"
        section = {"BucketName": args.s3, "Region": region}
        if args.endpoint:
            section["Endpoint"] = args.endpoint
            section["VirtualAddressing"] = False
        if args.embed_credentials:
            key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
            if not key or not secret:
                raise UsageError(
                    "--embed-credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set"
                )
            section.update(AccessKey=key, SecretKey=secret)
        if args.storage_class:
            section["StorageClass"] = args.storage_class
        name = "AwsS3Storage"
    elif args.azure:
        connection_string = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if not connection_string:
            raise UsageError(
                "--azure needs AZURE_STORAGE_CONNECTION_STRING: the plugin's ConnectionString is required"
            )
        section = {
            "ConnectionString": connection_string,
            "ContainerName": args.azure,
            "CreateContainerIfNotExists": True,
        }
        if args.access_tier:
            section["AccessTier"] = args.access_tier
        name = "AzureBlobStorage"
    elif args.gcs:
        account_file = args.service_account_file or os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if not account_file:
            raise UsageError("--gcs needs --service-account-file (or GOOGLE_APPLICATION_CREDENTIALS)")
        section = {"ServiceAccountFile": str(Path(account_file).resolve()), "BucketName": args.gcs}
        name = "GoogleCloudStorage"
    else:
        section = {"Directory": str(Path(args.local).resolve())}
        name = "DicomCloudLocalStorage"
    if args.structure != "flat":
        section["StorageStructure"] = args.structure
    if args.root_path:
        section["RootPath"] = args.root_path
    if args.hybrid != HybridMode.DISABLED.value:
        section["HybridMode"] = args.hybrid
    if args.master_key:
        encryption: dict[str, Any] = {"Enable": True, "MasterKey": _key_pair(args.master_key)}
        if args.previous_key:
            encryption["PreviousMasterKeys"] = [_key_pair(k) for k in args.previous_key]
        section["StorageEncryption"] = encryption
    plugins = [str(Path(args.plugins_dir) / "libOrthancPython.so")]
    configuration: dict[str, Any] = {
        "Name": args.name,
        "StorageDirectory": storage_directory,
        "IndexDirectory": storage_directory,
        "HttpPort": args.http_port,
        "DicomPort": args.dicom_port,
        "Plugins": plugins,
        "PythonScript": str(ENTRY_SCRIPT),
        "DicomCloud": {
            "PythonPath": python_path(),
            "PythonVersion": f"{sys.version_info[0]}.{sys.version_info[1]}",
        },
        name: section,
    }
    if args.dicomweb:
        plugins.append(str(Path(args.plugins_dir) / "libOrthancDicomWeb.so"))
        configuration["DicomWeb"] = {
            "Enable": True,
            "Root": "/dicom-web/",
            "Host": f"127.0.0.1:{args.http_port}",
        }
    parse_configuration(configuration)  # the plugin's own checks (reads the key files)
    return configuration


def add_parser(commands: Any, add: Any) -> None:
    """Register ``orthanc-config`` (``add`` is build_parser's helper that makes one subcommand)."""
    sub = add(
        "orthanc-config",
        "Print an Orthanc configuration (JSON) that stores Orthanc's files with the dicom-cloud\n"
        "plugin, using the keys of Orthanc's own object-storage plugins (docs/orthanc-plugin.md).",
        "  dicom-cloud orthanc-config --s3 pacs --region eu-west-1 > orthanc.json\n"
        "  dicom-cloud orthanc-config --s3 pacs --endpoint http://127.0.0.1:8333 --embed-credentials\n"
        "  dicom-cloud orthanc-config --azure pacs --master-key 1:/etc/orthanc/master.key\n"
        "  dicom-cloud orthanc-config --gcs pacs --service-account-file sa.json --hybrid WriteToFileSystem\n"
        "  dicom-cloud orthanc-config --local /srv/objects --dicomweb\n"
        "then: Orthanc orthanc.json",
        _orthanc_config,
    )
    where = sub.add_mutually_exclusive_group(required=True)
    where.add_argument("--s3", metavar="BUCKET", help="AwsS3Storage in this bucket")
    where.add_argument(
        "--azure",
        metavar="CONTAINER",
        help="AzureBlobStorage in this container (copies AZURE_STORAGE_CONNECTION_STRING in)",
    )
    where.add_argument("--gcs", metavar="BUCKET", help="GoogleCloudStorage in this bucket")
    where.add_argument("--local", metavar="DIR", help="DicomCloudLocalStorage in this directory")
    sub.add_argument("--endpoint", help="S3-compatible endpoint (sets VirtualAddressing false)")
    sub.add_argument("--region", help="S3 region (default: AWS_REGION, else us-east-1)")
    sub.add_argument(
        "--embed-credentials",
        action="store_true",
        help="copy AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY into the configuration (AccessKey, "
        "SecretKey); without it the plugin uses the default AWS credential chain",
    )
    sub.add_argument("--storage-class", help="S3 StorageClass of new objects (e.g. STANDARD_IA)")
    sub.add_argument("--access-tier", help="Azure AccessTier of new blobs (Hot, Cool, Cold, Archive)")
    sub.add_argument("--service-account-file", help="GCS service-account key file (ServiceAccountFile)")
    sub.add_argument("--structure", choices=["flat", "legacy"], default="flat", help="StorageStructure")
    sub.add_argument("--root-path", default="", help="RootPath: a prefix for every object name")
    sub.add_argument("--master-key", metavar="ID:FILE", help="StorageEncryption.MasterKey (A1 encryption)")
    sub.add_argument(
        "--previous-key",
        metavar="ID:FILE",
        action="append",
        default=[],
        help="StorageEncryption.PreviousMasterKeys (repeatable)",
    )
    sub.add_argument(
        "--hybrid",
        choices=[m.value for m in HybridMode],
        default=HybridMode.DISABLED.value,
        help="HybridMode (default: %(default)s)",
    )
    sub.add_argument(
        "--storage-directory",
        default="OrthancStorage",
        help="Orthanc's StorageDirectory and IndexDirectory (default: %(default)s)",
    )
    sub.add_argument("--http-port", type=int, default=8042, help="default: %(default)s")
    sub.add_argument("--dicom-port", type=int, default=4242, help="default: %(default)s")
    sub.add_argument("--name", default="dicom-cloud", help="Orthanc's Name (default: %(default)s)")
    sub.add_argument("--dicomweb", action="store_true", help="also load Orthanc's DICOMweb plugin")
    sub.add_argument(
        "--plugins-dir",
        default=DEFAULT_PLUGINS_DIR,
        help="where Orthanc's plugins are (default: %(default)s)",
    )


def _orthanc_config(args: argparse.Namespace) -> int:
    print(json.dumps(orthanc_configuration(args), indent=2))
    return 0
