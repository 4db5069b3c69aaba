"""The plugin's configuration: Orthanc's JSON configuration in, one validated :class:`PluginConfig` out.

The sections and keys are those of Orthanc's C++ object-storage plugins (v2.5.4): ``AwsS3Storage``,
``AzureBlobStorage``, ``GoogleCloudStorage``, plus ``DicomCloudLocalStorage`` (ours: a local directory
standing in for a bucket, for tests and single machines) and ``DicomCloud`` (ours: how the embedded
interpreter finds this package, where failed removals are recorded). Defaults are upstream's; a bad
value is a :class:`~dicom_cloud.errors.UsageError` naming the section and key, raised before anything is
registered, so Orthanc refuses to start (as it does with the C++ plugins). The full table of keys is in
``docs/orthanc-plugin.md``.

Nothing here talks to Orthanc or to storage: :func:`parse_configuration` is a pure function of the
configuration and of the key files it names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from ..backends import StoreConfig
from ..credentials import parse_connection_string
from ..crypto.keys import MAX_KEY_ID, KeyRing, MasterKey
from ..dicom.layout import orthanc_object_name
from ..errors import UsageError
from . import HybridMode

Provider = Literal["s3", "azure", "gs", "file"]

#: Section name -> provider, in the order the sections are looked for.
SECTIONS: Mapping[str, Provider] = {
    "AwsS3Storage": "s3",
    "AzureBlobStorage": "azure",
    "GoogleCloudStorage": "gs",
    "DicomCloudLocalStorage": "file",
}
#: Our own plugin-wide section.
PLUGIN_SECTION = "DicomCloud"

#: S3 storage classes the AWS SDK knows (``Aws::S3::Model::StorageClass``); anything else is refused.
S3_STORAGE_CLASSES = frozenset(
    {
        "STANDARD",
        "REDUCED_REDUNDANCY",
        "STANDARD_IA",
        "ONEZONE_IA",
        "INTELLIGENT_TIERING",
        "GLACIER",
        "DEEP_ARCHIVE",
        "OUTPOSTS",
        "GLACIER_IR",
        "SNOW",
        "EXPRESS_ONEZONE",
    }
)
AZURE_ACCESS_TIERS = frozenset({"Hot", "Cool", "Cold", "Archive", "Premium"})

MEGABYTE = 1024 * 1024


@dataclass(frozen=True)
class EncryptionSettings:
    """``StorageEncryption``: the key ring and the byte budget of concurrent encryption work."""

    ring: KeyRing
    #: ``MaxConcurrentInputSize`` in bytes (configured in MB).
    max_concurrent_input_size: int


@dataclass(frozen=True)
class PluginConfig:
    """Everything the storage area needs, validated."""

    section: str
    provider: Provider
    #: Bucket or container; for the local backend, the directory.
    bucket: str
    store_config: StoreConfig
    #: Credentials from the section, as the ecosystem's environment variables (applied to the Orthanc
    #: process before the store opens). Never printed: the repr hides the values.
    environment: Mapping[str, str] = field(default_factory=dict, repr=False)
    structure: Literal["flat", "legacy"] = "flat"
    root_path: str = ""
    legacy_unknown_files: bool = False
    hybrid_mode: HybridMode = HybridMode.DISABLED
    #: Orthanc's ``StorageDirectory``: the file-system side of hybrid mode.
    storage_directory: Path = Path("OrthancStorage")
    encryption: EncryptionSettings | None = None
    #: S3 ``StorageClass`` or Azure ``AccessTier``: both become the object's storage class.
    storage_class: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    #: Settings accepted for compatibility that our backends cannot apply (logged at start-up).
    not_applied: tuple[str, ...] = ()
    #: Azure ``CreateContainerIfNotExists``: create the container at start-up when it is missing.
    create_container: bool = False
    #: Durable record of objects whose removal failed (JSON lines), retried every
    #: ``removal_retry_interval`` seconds.
    pending_removals_file: Path = Path("OrthancStorage/dicom-cloud-pending-removals.jsonl")
    removal_retry_interval: float = 60.0

    def object_name(self, uuid: str, content_type: int, *, alternate: bool = False) -> str:
        """The object-storage name of an attachment (flat or legacy, under RootPath, ``.enc``)."""
        return orthanc_object_name(
            uuid,
            content_type,
            structure=self.structure,
            root_path=self.root_path,
            encrypted=self.encryption is not None,
            alternate=alternate,
        )

    def describe(self) -> str:
        """One line for the start-up log: no credentials, no key material."""
        where = f"{self.provider}://{self.bucket}" if self.provider != "file" else f"directory {self.bucket}"
        parts = [f"{self.section}: {where}", f"structure {self.structure}"]
        if self.root_path:
            parts.append(f"root path {self.root_path}")
        if self.encryption is not None:
            ids = ", ".join(str(i) for i in self.encryption.ring.ids)
            parts.append(f"A1 encryption (master key ids {ids})")
        if self.hybrid_mode is not HybridMode.DISABLED:
            parts.append(f"hybrid mode {self.hybrid_mode.value} with {self.storage_directory}")
        return ", ".join(parts)


class _Section:
    """Typed reads of one JSON object, with errors naming ``Section.Key``."""

    def __init__(self, name: str, values: object) -> None:
        if not isinstance(values, Mapping):
            raise UsageError(f"{name} must be a JSON object", hint="see docs/orthanc-plugin.md")
        self.name = name
        self.values: Mapping[str, Any] = values

    def _bad(self, key: str, expected: str) -> UsageError:
        return UsageError(
            f"{self.name}.{key} must be {expected}, not {self.values[key]!r}",
            hint="see the table of keys in docs/orthanc-plugin.md",
        )

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        if key not in self.values:
            if required:
                raise UsageError(
                    f"{self.name}.{key} configuration missing: unable to initialize the plugin",
                    hint="see docs/orthanc-plugin.md for the keys of each section",
                )
            return default
        value = self.values[key]
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        if required and not value.strip():
            raise UsageError(f"{self.name}.{key} is empty: unable to initialize the plugin")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.values.get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0) -> float:
        value = self.values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise self._bad(key, f"a number >= {minimum:g}")
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        value = self.values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._bad(key, f"an integer >= {minimum}")
        return value


def parse_configuration(configuration: Mapping[str, Any]) -> PluginConfig | None:
    """Validate Orthanc's whole configuration; ``None`` when no storage section is present.

    Exactly one of the storage sections may be present: Orthanc accepts one storage area.
    """
    present = [name for name in SECTIONS if name in configuration]
    if not present:
        return None
    if len(present) > 1:
        raise UsageError(
            f"more than one storage section is configured ({', '.join(present)})",
            hint="Orthanc has one storage area: keep one of these sections",
        )
    name = present[0]
    provider = SECTIONS[name]
    section = _Section(name, configuration[name])
    ours = _Section(PLUGIN_SECTION, configuration.get(PLUGIN_SECTION, {}))
    storage_directory = _storage_directory(configuration)

    environment: dict[str, str] = {}
    not_applied: list[str] = []
    create_container = False
    storage_class: str | None = None
    tags: dict[str, str] = {}
    if provider == "s3":
        bucket = section.string("BucketName", required=True)
        region = section.string("Region", required=True)
        access_key = section.string("AccessKey")
        secret_key = section.string("SecretKey")
        if bool(access_key) != bool(secret_key):
            raise UsageError(
                f"{name}: AccessKey and SecretKey go together",
                hint="give both, or neither to use the default AWS credential chain",
            )
        if access_key and secret_key:
            environment = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
        endpoint = section.string("Endpoint", "") or None
        if endpoint and "://" not in endpoint:
            endpoint = "https://" + endpoint  # the AWS SDK's default scheme
        virtual = section.boolean("VirtualAddressing", True)
        if endpoint and virtual:
            endpoint = _virtual_host_endpoint(endpoint, bucket)
        store_config = StoreConfig(
            endpoint=endpoint,
            region=region,
            path_style=not virtual,
            connect_timeout=section.number("ConnectionTimeout", 30, minimum=1),
            request_timeout=section.number("RequestTimeout", 1200, minimum=1),
            max_retries=section.integer("MaxRetries", 10),
        )
        if section.integer("MaxConnections", 25, minimum=1) != 25:
            not_applied.append("MaxConnections (the S3 client pools connections itself)")
        storage_class = section.string("StorageClass")
        if storage_class is not None and storage_class not in S3_STORAGE_CLASSES:
            raise UsageError(
                f"{name}.StorageClass {storage_class!r} is not an S3 storage class",
                hint="use one of " + ", ".join(sorted(S3_STORAGE_CLASSES)),
            )
        tags = _tags(section)
    elif provider == "azure":
        connection_string = section.string("ConnectionString", required=True)
        assert connection_string is not None
        try:
            parse_connection_string(connection_string)
        except UsageError:
            raise UsageError(f"{name}.ConnectionString is malformed (expected Key=Value;Key=Value)") from None
        bucket = section.string("ContainerName", required=True)
        environment = {"AZURE_STORAGE_CONNECTION_STRING": connection_string}
        create_container = section.boolean("CreateContainerIfNotExists", True)
        storage_class = section.string("AccessTier")
        if storage_class is not None and storage_class not in AZURE_ACCESS_TIERS:
            raise UsageError(
                f"{name}.AccessTier {storage_class!r} is not an Azure access tier",
                hint="use one of " + ", ".join(sorted(AZURE_ACCESS_TIERS)),
            )
        store_config = _timeouts(section)
    elif provider == "gs":
        account_file = section.string("ServiceAccountFile", required=True)
        assert account_file is not None
        if not Path(account_file).is_file():
            raise UsageError(f"{name}.ServiceAccountFile {account_file!r} is not a readable file")
        bucket = section.string("BucketName", required=True)
        environment = {"GOOGLE_APPLICATION_CREDENTIALS": account_file}
        store_config = _timeouts(section)
    else:
        bucket = section.string("Directory", required=True)
        assert bucket is not None
        if not Path(bucket).is_absolute():
            raise UsageError(f"{name}.Directory must be an absolute path, not {bucket!r}")
        store_config = StoreConfig()
    assert bucket is not None

    structure_text = section.string("StorageStructure", "flat")
    structure: Literal["flat", "legacy"]
    if structure_text == "flat":
        structure = "flat"
    elif structure_text == "legacy":
        structure = "legacy"
    else:
        raise UsageError(
            f"{name}.StorageStructure {structure_text!r} is invalid: allowed values are 'flat' and 'legacy'"
        )
    root_path = section.string("RootPath", "") or ""
    # orthanc_object_name validates RootPath (leading '/', unsafe segments) with the names themselves.
    orthanc_object_name("0000", 1, structure=structure, root_path=root_path)

    hybrid = _hybrid_mode(section)
    pending = ours.string("PendingRemovalsFile")
    return PluginConfig(
        section=name,
        provider=provider,
        bucket=bucket,
        store_config=store_config,
        environment=environment,
        structure=structure,
        root_path=root_path,
        legacy_unknown_files=section.boolean("EnableLegacyUnknownFiles", False),
        hybrid_mode=hybrid,
        storage_directory=storage_directory,
        encryption=_encryption(name, section.values.get("StorageEncryption")),
        storage_class=storage_class,
        tags=tags,
        not_applied=tuple(not_applied),
        create_container=create_container,
        pending_removals_file=(
            Path(pending) if pending else storage_directory / "dicom-cloud-pending-removals.jsonl"
        ),
        removal_retry_interval=ours.number("RemovalRetryInterval", 60, minimum=1),
    )


def _virtual_host_endpoint(endpoint: str, bucket: str | None) -> str:
    """The bucket's own endpoint for virtual-hosted requests (``https://BUCKET.host``).

    The AWS SDK puts the bucket in front of a custom endpoint's host itself; the S3 client used here
    takes a virtual-hosted endpoint as the bucket's address, so the bucket is added here.
    """
    parts = urlsplit(endpoint)
    if not parts.hostname:
        raise UsageError(f"AwsS3Storage.Endpoint {endpoint!r} is not a URL or host name")
    return urlunsplit(parts._replace(netloc=f"{bucket}.{parts.netloc}"))


def _storage_directory(configuration: Mapping[str, Any]) -> Path:
    value = configuration.get("StorageDirectory", "OrthancStorage")
    if not isinstance(value, str) or not value:
        raise UsageError(f"StorageDirectory must be a path, not {value!r}")
    return Path(value)


def _timeouts(section: _Section) -> StoreConfig:
    """Timeouts and retries for Azure and GCS: our defaults unless the section sets them."""
    defaults = StoreConfig()
    return StoreConfig(
        connect_timeout=section.number("ConnectionTimeout", defaults.connect_timeout, minimum=1),
        request_timeout=section.number("RequestTimeout", defaults.request_timeout, minimum=1),
        max_retries=section.integer("MaxRetries", defaults.max_retries),
    )


def _tags(section: _Section) -> dict[str, str]:
    value = section.values.get("Tags", {})
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise UsageError(f"{section.name}.Tags must be an object of strings, not {value!r}")
    return dict(value)


def _hybrid_mode(section: _Section) -> HybridMode:
    text = section.string("HybridMode", HybridMode.DISABLED.value)
    try:
        mode = HybridMode(text)
    except ValueError:
        # Upstream treats an unknown value as Disabled; a typo would then silently send new files to
        # the wrong storage, so it is refused here.
        allowed = ", ".join(m.value for m in HybridMode)
        raise UsageError(
            f"{section.name}.HybridMode {text!r} is invalid: allowed values are {allowed}"
        ) from None
    if section.boolean("MigrationFromFileSystemEnabled", False) and mode is HybridMode.DISABLED:
        # The deprecated key means what WriteToObjectStorage means (as upstream).
        mode = HybridMode.WRITE_TO_OBJECT_STORAGE
    return mode


def _key(name: str, what: str, value: object) -> MasterKey:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or isinstance(value[0], bool)
        or not isinstance(value[0], int)
        or not isinstance(value[1], str)
    ):
        raise UsageError(
            f'{name}.StorageEncryption.{what} must be [id, "/path/to/key"], not {value!r}',
            hint='e.g. "MasterKey": [3, "/etc/orthanc/master-3.key"]',
        )
    if not 0 <= value[0] <= MAX_KEY_ID:
        raise UsageError(
            f"{name}.StorageEncryption.{what}: id {value[0]} is not an integer from 0 to {MAX_KEY_ID}"
        )
    return MasterKey.from_file(value[0], value[1])


def _encryption(name: str, value: object) -> EncryptionSettings | None:
    if value is None:
        return None
    section = _Section(f"{name}.StorageEncryption", value)
    if not section.boolean("Enable", True):
        return None
    if "MasterKey" not in section.values:
        raise UsageError(
            f"{name}.StorageEncryption is enabled but has no MasterKey",
            hint='add "MasterKey": [id, "/path/to/key"], or set "Enable": false',
        )
    current = _key(name, "MasterKey", section.values["MasterKey"])
    previous_values = section.values.get("PreviousMasterKeys", [])
    if not isinstance(previous_values, list):
        raise UsageError(f"{name}.StorageEncryption.PreviousMasterKeys must be a list of [id, path]")
    previous = [_key(name, "PreviousMasterKeys", v) for v in previous_values]
    size_mb = section.integer("MaxConcurrentInputSize", 1024, minimum=1)
    return EncryptionSettings(KeyRing(current, previous), size_mb * MEGABYTE)
