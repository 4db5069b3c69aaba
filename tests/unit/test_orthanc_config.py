"""The plugin's configuration parser (no Orthanc): defaults as upstream, and every start-up error."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from dicom_cloud.errors import UsageError
from dicom_cloud.orthanc.config import MEGABYTE, HybridMode, parse_configuration


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "master.key"
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


def s3(**keys: Any) -> dict[str, Any]:
    return {
        "StorageDirectory": "/var/lib/orthanc/db",
        "AwsS3Storage": {"BucketName": "b", "Region": "r", **keys},
    }


def test_no_section_means_inactive() -> None:
    assert parse_configuration({"StorageDirectory": "/x"}) is None


def test_s3_defaults_are_upstream() -> None:
    config = parse_configuration(s3())
    assert config is not None
    assert (config.provider, config.bucket, config.structure, config.root_path) == ("s3", "b", "flat", "")
    assert config.legacy_unknown_files is False
    assert config.hybrid_mode is HybridMode.DISABLED
    assert config.encryption is None
    assert config.store_config.region == "r"
    assert config.store_config.path_style is False  # VirtualAddressing true
    assert (config.store_config.connect_timeout, config.store_config.request_timeout) == (30, 1200)
    assert config.store_config.max_retries == 10
    assert config.environment == {}  # default AWS credential chain
    assert config.storage_directory == Path("/var/lib/orthanc/db")
    assert config.pending_removals_file == Path("/var/lib/orthanc/db/dicom-cloud-pending-removals.jsonl")
    assert config.object_name("0a1b2c3d-x", 1) == "0a1b2c3d-x.dcm"


def test_s3_keys_are_applied(key_file: Path) -> None:
    config = parse_configuration(
        s3(
            AccessKey="AK",
            SecretKey="SK",
            Endpoint="s3.fr-par.scw.cloud",
            VirtualAddressing=False,  # path-style: the endpoint is used as it is
            ConnectionTimeout=5,
            RequestTimeout=60,
            MaxRetries=2,
            StorageClass="STANDARD_IA",
            Tags={"Project": "pacs"},
            RootPath="orthanc/",
            StorageStructure="legacy",
            EnableLegacyUnknownFiles=True,
            HybridMode="WriteToFileSystem",
            StorageEncryption={
                "MasterKey": [3, str(key_file)],
                "PreviousMasterKeys": [[1, str(key_file)]],
                "MaxConcurrentInputSize": 16,
            },
        )
    )
    assert config is not None
    assert config.environment == {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"}
    assert "SK" not in repr(config)
    assert config.store_config.endpoint == "https://s3.fr-par.scw.cloud"
    assert config.store_config.path_style is True
    assert (config.store_config.connect_timeout, config.store_config.max_retries) == (5, 2)
    assert (config.storage_class, dict(config.tags)) == ("STANDARD_IA", {"Project": "pacs"})
    assert config.hybrid_mode is HybridMode.WRITE_TO_FILE_SYSTEM
    assert config.encryption is not None
    assert config.encryption.ring.ids == [3, 1]
    assert config.encryption.max_concurrent_input_size == 16 * MEGABYTE
    assert config.object_name("0a1b2c3d-x", 1) == "orthanc/0a/1b/0a1b2c3d-x"  # legacy: no .enc
    assert "master key ids 3, 1" in config.describe()


def test_virtual_addressing_with_an_endpoint_puts_the_bucket_in_the_host() -> None:
    config = parse_configuration(s3(Endpoint="s3.fr-par.scw.cloud"))
    assert config is not None and config.store_config.endpoint == "https://b.s3.fr-par.scw.cloud"
    assert config.store_config.path_style is False
    local = parse_configuration(s3(Endpoint="http://127.0.0.1:9000/", VirtualAddressing=False))
    assert local is not None and local.store_config.endpoint == "http://127.0.0.1:9000/"


def test_deprecated_migration_key_means_write_to_object_storage() -> None:
    config = parse_configuration(s3(MigrationFromFileSystemEnabled=True))
    assert config is not None and config.hybrid_mode is HybridMode.WRITE_TO_OBJECT_STORAGE


def test_encryption_names_and_disable(key_file: Path) -> None:
    config = parse_configuration(s3(StorageEncryption={"MasterKey": [3, str(key_file)]}))
    assert config is not None and config.object_name("0a1b2c3d-x", 3) == "0a1b2c3d-x.dcm.head.enc"
    assert config.encryption is not None and config.encryption.max_concurrent_input_size == 1024 * MEGABYTE
    off = parse_configuration(s3(StorageEncryption={"Enable": False}))
    assert off is not None and off.encryption is None


def test_azure_gcs_local(tmp_path: Path) -> None:
    azure = parse_configuration(
        {
            "AzureBlobStorage": {
                "ConnectionString": "AccountName=a;AccountKey=AAAA",
                "ContainerName": "c",
                "AccessTier": "Cool",
            }
        }
    )
    assert azure is not None and azure.provider == "azure" and azure.storage_class == "Cool"
    assert azure.environment == {"AZURE_STORAGE_CONNECTION_STRING": "AccountName=a;AccountKey=AAAA"}
    assert azure.create_container and not azure.not_applied  # Orthanc's default: create if missing
    account = tmp_path / "sa.json"
    account.write_text("{}")
    gcs = parse_configuration({"GoogleCloudStorage": {"ServiceAccountFile": str(account), "BucketName": "g"}})
    assert gcs is not None and gcs.environment == {"GOOGLE_APPLICATION_CREDENTIALS": str(account)}
    local = parse_configuration({"DicomCloudLocalStorage": {"Directory": str(tmp_path)}})
    assert local is not None and local.provider == "file" and local.bucket == str(tmp_path)


@pytest.mark.parametrize(
    ("configuration", "message"),
    [
        ({"AwsS3Storage": {"Region": "r"}}, "AwsS3Storage.BucketName configuration missing"),
        ({"AwsS3Storage": {"BucketName": "b"}}, "AwsS3Storage.Region configuration missing"),
        ({"AwsS3Storage": {"BucketName": "", "Region": "r"}}, "AwsS3Storage.BucketName is empty"),
        ({"AwsS3Storage": {"BucketName": 3, "Region": "r"}}, "AwsS3Storage.BucketName must be a string"),
        ({"AwsS3Storage": []}, "AwsS3Storage must be a JSON object"),
        (s3(AccessKey="AK"), "AccessKey and SecretKey go together"),
        (s3(StorageStructure="tree"), "StorageStructure 'tree' is invalid"),
        (s3(RootPath="/abs"), "RootPath must not start with '/'"),
        (s3(RootPath="a/../b"), "RootPath 'a/../b' is not a safe prefix"),
        (s3(HybridMode="WriteToDisk"), "HybridMode 'WriteToDisk' is invalid"),
        (s3(StorageClass="CHEAP"), "StorageClass 'CHEAP' is not an S3 storage class"),
        (s3(Tags={"a": 1}), "Tags must be an object of strings"),
        (s3(VirtualAddressing="no"), "VirtualAddressing must be true or false"),
        (s3(EnableLegacyUnknownFiles=1), "EnableLegacyUnknownFiles must be true or false"),
        (s3(ConnectionTimeout=0), "ConnectionTimeout must be a number >= 1"),
        (s3(MaxRetries=-1), "MaxRetries must be an integer >= 0"),
        (s3(MaxConnections=0), "MaxConnections must be an integer >= 1"),
        (s3(StorageEncryption={}), "StorageEncryption is enabled but has no MasterKey"),
        (s3(StorageEncryption=[]), "StorageEncryption must be a JSON object"),
        (s3(StorageEncryption={"MasterKey": "k"}), 'MasterKey must be [id, "/path/to/key"]'),
        (s3(StorageEncryption={"MasterKey": [-1, "/k"]}), "not an integer from 0 to"),
        (s3(StorageEncryption={"MasterKey": [1, "/nonexistent/k"]}), "cannot read master key file"),
        (
            {"AzureBlobStorage": {"ContainerName": "c"}},
            "AzureBlobStorage.ConnectionString configuration missing",
        ),
        ({"AzureBlobStorage": {"ConnectionString": "AccountName=a"}}, "ContainerName configuration missing"),
        (
            {"AzureBlobStorage": {"ConnectionString": "garbage", "ContainerName": "c"}},
            "ConnectionString is malformed",
        ),
        (
            {
                "AzureBlobStorage": {
                    "ConnectionString": "AccountName=a",
                    "ContainerName": "c",
                    "AccessTier": "Warm",
                }
            },
            "AccessTier 'Warm' is not an Azure access tier",
        ),
        ({"GoogleCloudStorage": {"BucketName": "g"}}, "ServiceAccountFile configuration missing"),
        (
            {"GoogleCloudStorage": {"ServiceAccountFile": "/nonexistent.json", "BucketName": "g"}},
            "is not a readable file",
        ),
        ({"DicomCloudLocalStorage": {}}, "DicomCloudLocalStorage.Directory configuration missing"),
        ({"DicomCloudLocalStorage": {"Directory": "rel"}}, "must be an absolute path"),
        ({**s3(), "DicomCloudLocalStorage": {"Directory": "/x"}}, "more than one storage section"),
        ({**s3(), "DicomCloud": {"RemovalRetryInterval": 0}}, "RemovalRetryInterval must be a number >= 1"),
        ({**s3(), "StorageDirectory": 5}, "StorageDirectory must be a path"),
    ],
)
def test_start_up_errors(configuration: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_configuration(configuration)
    assert message in str(caught.value)


def test_bad_master_key_length(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_text(base64.b64encode(os.urandom(16)).decode())
    with pytest.raises(UsageError, match="exactly 32"):
        parse_configuration(s3(StorageEncryption={"MasterKey": [1, str(short)]}))


def test_duplicate_key_ids(key_file: Path) -> None:
    with pytest.raises(UsageError, match="given twice"):
        parse_configuration(
            s3(
                StorageEncryption={
                    "MasterKey": [1, str(key_file)],
                    "PreviousMasterKeys": [[1, str(key_file)]],
                }
            )
        )


# -- dicom-cloud orthanc-config ------------------------------------------------------------------


def run_config(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from dicom_cloud.cli.main import main

    code = main(["orthanc-config", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_orthanc_config_command(tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_config(
        capsys,
        "--s3",
        "pacs",
        "--endpoint",
        "http://127.0.0.1:9000",
        "--region",
        "eu-west-1",
        "--master-key",
        f"3:{key_file}",
        "--hybrid",
        "WriteToFileSystem",
        "--storage-directory",
        str(tmp_path / "st"),
        "--http-port",
        "8050",
        "--dicomweb",
        "--structure",
        "legacy",
        "--root-path",
        "o",
    )
    assert code == 0
    config = json.loads(out)
    section = config["AwsS3Storage"]
    assert section["BucketName"] == "pacs" and section["VirtualAddressing"] is False
    assert section["StorageEncryption"]["MasterKey"] == [3, str(key_file)]
    assert section["HybridMode"] == "WriteToFileSystem" and section["StorageStructure"] == "legacy"
    assert "AccessKey" not in section  # only with --embed-credentials
    assert config["HttpPort"] == 8050 and config["DicomWeb"]["Host"] == "127.0.0.1:8050"
    assert Path(config["PythonScript"]).is_file()
    assert config["Plugins"][0].endswith("libOrthancPython.so")
    # The package is importable from the listed paths.
    assert any(
        (Path(p) / "dicom_cloud" / "__init__.py").is_file() for p in config["DicomCloud"]["PythonPath"]
    )
    assert parse_configuration(config) is not None


def test_orthanc_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    code, _, err = run_config(capsys, "--azure", "c")
    assert code == 2 and "AZURE_STORAGE_CONNECTION_STRING" in err
    code, _, err = run_config(capsys, "--local", str(tmp_path), "--master-key", "1:/nonexistent.key")
    assert code == 2 and "cannot read master key file" in err
    code, _, err = run_config(capsys, "--local", str(tmp_path), "--root-path", "/abs")
    assert code == 2 and "RootPath" in err
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    code, _, err = run_config(capsys, "--s3", "b", "--embed-credentials")
    assert code == 2 and "AWS_ACCESS_KEY_ID" in err
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "AccountName=a;AccountKey=AAAA")
    code, out, _ = run_config(capsys, "--azure", "c", "--access-tier", "Cool")
    assert code == 0 and json.loads(out)["AzureBlobStorage"]["AccessTier"] == "Cool"
