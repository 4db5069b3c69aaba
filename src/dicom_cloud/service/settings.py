"""The service's settings: one validated object, from flags > environment > config file > defaults.

Environment variables are ``DICOM_CLOUD_SERVICE_<FIELD>`` in upper case (lists comma-separated);
the config file is TOML with the field names as keys, found by ``--config`` or
``DICOM_CLOUD_SERVICE_CONFIG``. The table of fields is in ``docs/service.md``.

Outside ``environment = "development"`` the settings refuse unsafe defaults: a signing secret must be
given (several instances must share it, and a generated one would not survive a restart), the public
URL must be set (it goes into every link the service hands out), and CORS may not allow every origin.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import UsageError

ENV_PREFIX = "DICOM_CLOUD_SERVICE_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"

#: The smallest signing secret accepted outside development (bytes of text).
MIN_SECRET_LENGTH = 32


def default_data_dir() -> Path:
    """Where the embedded default keeps its objects and SQLite index."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dicom-cloud"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class ServiceSettings(BaseModel):
    """Everything the service reads at start-up. Immutable once built."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    environment: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = Field(8042, ge=0, le=65535)
    #: Worker processes of ``dicom-cloud serve``; default: the cores this process may run on.
    workers: int | None = Field(None, ge=1, le=256)
    #: The URL clients reach this service at (behind a load balancer: the balancer's URL).
    public_url: str | None = None
    data_dir: Path = Field(default_factory=default_data_dir)
    #: Object storage for the archive; default ``file://<data_dir>/objects``.
    storage: str | None = None
    #: SQLAlchemy URL of the index; default SQLite in ``data_dir``.
    database: str | None = None
    #: Extra DICOM attributes (keywords or ggggeeee) the index makes searchable.
    query_tags: tuple[str, ...] = ()

    #: Client-side encryption of everything the archive writes (instances, sidecars, previews).
    encrypt: bool = False
    encryption_format: Literal["A1", "DC2"] = "A1"
    #: ``ID:PATH`` of the master key file; default: DICOM_CLOUD_MASTER_KEY, then the CLI's config file.
    master_key: str | None = None
    #: ``ID:PATH`` of older keys, to read objects written under them.
    previous_keys: tuple[str, ...] = ()

    #: HMAC secret of the service's own signed URLs (local-storage uploads); shared by all instances.
    signing_secret: str | None = Field(None, repr=False)

    api_tokens: bool = True
    #: Seconds a worker keeps a validated API token or share link before reading it again (0: off).
    #: A revocation reaches the worker that handled it at once, the others within this time.
    auth_cache_seconds: float = Field(5.0, ge=0, le=60)
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    #: Default: discovered from the issuer's ``/.well-known/openid-configuration``.
    oidc_jwks_url: str | None = None
    oidc_tenant_claim: str = "tenant"
    oidc_scope_claim: str = "scope"
    oidc_algorithms: tuple[str, ...] = ("RS256", "ES256")
    oidc_jwks_ttl_seconds: float = Field(300.0, gt=0)
    #: The tenant of JWTs without the tenant claim; None refuses such tokens.
    oidc_default_tenant: str | None = None

    cors_origins: tuple[str, ...] = ()

    upload_max_bytes: int = Field(512 * 1024**2, gt=0)
    upload_max_files: int = Field(1000, gt=0)
    upload_url_ttl_seconds: int = Field(900, gt=0, le=7 * 24 * 3600)
    #: Files larger than this are uploaded in parts of this size (S3 with static keys, Azure with
    #: the account key, GCS).
    upload_part_size: int = Field(64 * 1024**2, ge=5 * 1024**2)
    stow_max_bytes: int = Field(512 * 1024**2, gt=0)
    #: STOW-RS parts up to this size are held in memory and stored whole; larger ones are staged
    #: in the archive's storage as they arrive and stored as streams.
    stow_part_memory_bytes: int = Field(16 * 1024**2, ge=1024**2)
    #: One budget over the memory all request bodies hold at once (STOW-RS parts with their
    #: ingest, service-signed upload PUTs); a request waits for its share.
    request_memory_bytes: int = Field(256 * 1024**2, ge=16 * 1024**2)
    #: How long a request waits for its share of ``request_memory_bytes``; then 503 + Retry-After.
    request_memory_wait_seconds: float = Field(30.0, ge=0)
    share_max_ttl_seconds: int = Field(30 * 24 * 3600, gt=0)
    #: Serve /metrics without credentials (only for scrapers on a private network).
    metrics_public: bool = False
    #: Serve /docs and /openapi.json without credentials; None: yes in development, no in
    #: production (the document lists every route and setting name of the deployment).
    public_docs: bool | None = None
    #: Seconds between two sweeps of orphaned objects and empty staging folders (0: never).
    orphan_sweep_interval_seconds: float = Field(3600.0, ge=0)
    #: Objects and folders younger than this are left alone by the sweep (an ingest or an
    #: upload may be about to use them).
    orphan_grace_seconds: float = Field(3600.0, gt=0)
    #: Completed uploads are ingested by ``dicom-cloud worker`` processes from a queue in the
    #: index database (PostgreSQL only) and answered 202 with a status URL; off: in the request.
    ingest_queue: bool = False
    #: With ``ingest_queue``: STOW-RS requests to /studies whose Content-Length is above this are
    #: staged and queued, answered 202 with a status URL (0: always stored in the request).
    stow_queue_bytes: int = Field(64 * 1024**2, ge=0)
    #: Create an admin token for ``bootstrap_tenant`` on first start and print it once.
    bootstrap_admin: bool = True
    bootstrap_tenant: str = Field("default", min_length=1, max_length=200)
    #: Where ``dicom-cloud viewer install`` put the OHIF viewer; default ``<data_dir>/viewer``.
    viewer_dir: Path | None = None
    #: Lifetime of the browser session cookie set by ``POST /login`` (the token's own expiry and
    #: revocation are still checked on every request).
    session_max_age_seconds: int = Field(12 * 3600, ge=60, le=30 * 24 * 3600)

    #: The DIMSE face (docs/dimse.md): DICOM associations on this port (None: no DIMSE face).
    dicom_port: int | None = Field(None, ge=0, le=65535)
    #: Address the DIMSE face listens on; default: ``host``.
    dicom_host: str | None = None
    ae_title: str = Field("DICOMCLOUD", min_length=1, max_length=16)
    #: Known peers: ``AE@HOST[:PORT][,tenant=T][,ops=store+find]`` strings or TOML tables
    #: (ae_title, host, port, tenant, operations); environment: separated by ``;``.
    dicom_peers: tuple[str | dict[str, Any], ...] = ()
    #: Tenants by called AE title (further AE titles the face answers to); default: bootstrap_tenant.
    dicom_called_tenants: dict[str, str] = Field(default_factory=dict)
    dicom_max_associations: int = Field(16, ge=1, le=1000)
    #: Largest PDU accepted (bytes; 0: no limit).
    dicom_max_pdu: int = Field(65536, ge=0)
    #: Bytes of received instances being ingested at once, all associations together.
    dicom_max_bytes_in_flight: int = Field(256 * 1024**2, ge=1024**2)
    #: DICOM TLS: certificate chain and key files (PEM); with a CA file, client certificates required.
    dicom_tls_cert: str | None = None
    dicom_tls_key: str | None = None
    dicom_tls_ca: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("query_tags", "cors_origins", "oidc_algorithms", "previous_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("data_dir", "viewer_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        """Relative directories are taken from where the command runs, once: the derived
        ``file://`` URL and SQLite path must not change meaning (or fail) later."""
        return None if value is None else value.expanduser().absolute()

    @field_validator("dicom_peers", mode="before")
    @classmethod
    def _split_semicolons(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(";") if part.strip())
        return value

    @field_validator("public_url")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("public_url must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _queue_needs_postgres(self) -> ServiceSettings:
        if self.ingest_queue and not self.database_url.startswith("postgresql"):
            raise ValueError(
                "ingest_queue needs a PostgreSQL index (database = postgresql://...); "
                "with a SQLite index uploads are ingested in the service process: leave ingest_queue off"
            )
        return self

    @model_validator(mode="after")
    def _safe_outside_development(self) -> ServiceSettings:
        if self.environment == "development":
            return self
        problems = []
        if not self.signing_secret or len(self.signing_secret) < MIN_SECRET_LENGTH:
            problems.append(f"signing_secret must be set to at least {MIN_SECRET_LENGTH} random characters")
        if not self.public_url:
            problems.append("public_url must be set (it goes into every link the service returns)")
        if "*" in self.cors_origins:
            problems.append("cors_origins may not be '*'; list the origins of your web applications")
        if not self.api_tokens and not self.oidc_issuer:
            problems.append("no authentication: enable api_tokens or set oidc_issuer")
        if problems:
            raise ValueError("unsafe settings for production: " + "; ".join(problems))
        return self

    # -- derived values ------------------------------------------------------------------

    @property
    def storage_url(self) -> str:
        return self.storage or (self.data_dir / "objects").as_uri()

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.data_dir / 'index.sqlite'}"

    @property
    def docs_are_public(self) -> bool:
        """Whether /docs and /openapi.json answer without credentials (``public_docs``)."""
        if self.public_docs is None:
            return self.environment == "development"
        return self.public_docs

    @property
    def viewer_path(self) -> Path:
        """The directory holding the installed OHIF viewer (``viewer_dir``)."""
        return self.viewer_dir or self.data_dir / "viewer"

    @property
    def worker_count(self) -> int:
        """``workers``, or one per core this process may run on."""
        return self.workers or available_cores()

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    def secret_bytes(self) -> bytes:
        """The signing secret; in development without one, a random one for this process."""
        if self.signing_secret:
            return self.signing_secret.encode()
        return _process_secret()


_PROCESS_SECRET: list[bytes] = []


def _process_secret() -> bytes:
    if not _PROCESS_SECRET:
        _PROCESS_SECRET.append(secrets.token_bytes(32))
    return _PROCESS_SECRET[0]


def load_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> ServiceSettings:
    """Merge the three sources (flags win, then environment, then the config file) and validate.

    ``flags`` holds only the values given on the command line (None means not given). Errors
    become one :class:`UsageError` naming the fields, never echoing secret values.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file or environ.get(CONFIG_ENV)
    if path:
        values.update(_read_config(Path(path)))
    fields = ServiceSettings.model_fields
    for name in fields:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = raw
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = value
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UsageError(f"unknown service setting(s): {', '.join(unknown)}", hint="see docs/service.md")
    try:
        return ServiceSettings(**values)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors()
        )
        raise UsageError(f"invalid service settings: {reasons}", hint="see docs/service.md") from None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    # A [service] table, or the keys at top level.
    section = data.get("service", data)
    if not isinstance(section, dict):
        raise UsageError(f"config file {path}: [service] must be a table")
    return dict(section)
