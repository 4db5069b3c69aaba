"""Finding credentials and settings in each ecosystem's standard places, in its standard order.

Nothing here logs or returns a secret in a printable form: callers hand the values to the
client library and to nothing else. See ``docs/credentials.md`` for the order, as users see it.
"""

from __future__ import annotations

import base64
import configparser
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .aws_chain import ProfileKeys, chain_setting, profile_keys
from .errors import UsageError


@dataclass(frozen=True, repr=False)
class AwsKeys:
    """One set of AWS keys, as they are now."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:  # never the secret or the token
        return f"AwsKeys(access_key_id={self.access_key_id[:4]}..., session_token={bool(self.session_token)})"


@dataclass(frozen=True, repr=False)
class AwsSettings:
    """What the S3 client needs. No keys and no ``key_source`` means "let the library find them"
    (web identity from the environment, ECS container credentials, instance role)."""

    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    region: str = "us-east-1"
    endpoint: str | None = None
    #: Where the keys came from, for ``--verbose`` ("environment", "profile default"...). Never the keys.
    source: str = "library default chain"
    #: Keys that change over time (assumed roles, SSO, credential_process), kept current by botocore
    #: (:mod:`.aws_chain`); called for the keys to sign with now.
    key_source: Callable[[], AwsKeys] | None = field(default=None, compare=False)
    #: obstore's S3 credential provider for the same keys (a callable, or None with static keys).
    obstore_provider: Callable[[], dict[str, object]] | None = field(default=None, compare=False)

    @property
    def has_keys(self) -> bool:
        """Whether we hold keys (static or kept current), as our own SigV4 signers need."""
        return bool(self.access_key_id and self.secret_access_key) or self.key_source is not None

    def keys(self) -> AwsKeys | None:
        """The keys to sign with now, or None when the S3 library finds its own."""
        if self.key_source is not None:
            return self.key_source()
        if self.access_key_id and self.secret_access_key:
            return AwsKeys(self.access_key_id, self.secret_access_key, self.session_token)
        return None

    def __repr__(self) -> str:  # keep secrets out of tracebacks and logs
        return f"AwsSettings(region={self.region!r}, endpoint={self.endpoint!r}, source={self.source!r})"


def _read_ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    if path.is_file():
        try:
            parser.read(path, encoding="utf-8")
        except configparser.Error as exc:
            raise UsageError(f"cannot parse {path}: {exc.message.splitlines()[0]}") from None
    return parser


def aws_settings(
    *, region: str | None = None, endpoint: str | None = None, env: dict[str, str] | None = None
) -> AwsSettings:
    """Resolve AWS credentials like the AWS CLI does.

    Order for keys: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``),
    then the profile ``AWS_PROFILE`` (or ``default``) in ``~/.aws/credentials`` and
    ``~/.aws/config``: a profile with ``role_arn``, SSO settings, ``credential_process`` or
    ``web_identity_token_file`` through botocore's chain (the ``aws`` extra, :mod:`.aws_chain`),
    one with keys as they are; then whatever the S3 library finds itself (web identity token
    file from the environment, ECS container credentials, EC2 instance role).
    Region: argument, ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile's ``region``, us-east-1.
    Endpoint: argument, ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, the profile's ``endpoint_url``.
    """
    e = os.environ if env is None else env
    home = Path(e.get("HOME", str(Path.home())))
    profile_name = e.get("AWS_PROFILE") or e.get("AWS_DEFAULT_PROFILE") or "default"
    creds_file = Path(e.get("AWS_SHARED_CREDENTIALS_FILE", str(home / ".aws" / "credentials")))
    config_file = Path(e.get("AWS_CONFIG_FILE", str(home / ".aws" / "config")))
    creds = _read_ini(creds_file)
    config = _read_ini(config_file)
    config_section = "default" if profile_name == "default" else f"profile {profile_name}"
    profile: dict[str, str] = {}
    if config.has_section(config_section):
        profile.update(config[config_section])
    if creds.has_section(profile_name):
        profile.update(creds[profile_name])
    explicit_profile = bool(e.get("AWS_PROFILE") or e.get("AWS_DEFAULT_PROFILE"))
    if explicit_profile and not profile:
        raise UsageError(
            f"AWS profile '{profile_name}' not found",
            hint=f"define it in {creds_file} or {config_file}, or unset AWS_PROFILE",
        )

    key: str | None
    secret: str | None
    token: str | None
    chain: ProfileKeys | None = None
    if e.get("AWS_ACCESS_KEY_ID") and e.get("AWS_SECRET_ACCESS_KEY"):
        key, secret, token = e["AWS_ACCESS_KEY_ID"], e["AWS_SECRET_ACCESS_KEY"], e.get("AWS_SESSION_TOKEN")
        source = "environment"
    elif what := chain_setting(profile):
        # botocore's order inside a profile (role_arn before keys, credential_process after the
        # credentials file's keys) is the AWS CLI's: it decides, not a copy of its rules here.
        chain = profile_keys(profile_name, what=what, config_file=config_file, credentials_file=creds_file)
        key = secret = token = None
        source = f"profile {profile_name} ({what}, {chain.method} through botocore)"
    elif profile.get("aws_access_key_id") and profile.get("aws_secret_access_key"):
        key, secret = profile["aws_access_key_id"], profile["aws_secret_access_key"]
        token = profile.get("aws_session_token")
        source = f"profile {profile_name}"
    else:
        key = secret = token = None
        source = "library default chain"

    resolved_region = (
        region or e.get("AWS_REGION") or e.get("AWS_DEFAULT_REGION") or profile.get("region") or "us-east-1"
    )
    resolved_endpoint = (
        endpoint or e.get("AWS_ENDPOINT_URL_S3") or e.get("AWS_ENDPOINT_URL") or profile.get("endpoint_url")
    )
    return AwsSettings(
        access_key_id=key,
        secret_access_key=secret,
        session_token=token or None,
        region=resolved_region,
        endpoint=resolved_endpoint or None,
        source=source,
        key_source=chain.current if chain else None,
        obstore_provider=chain.obstore_provider if chain else None,
    )


@dataclass(frozen=True, repr=False)
class AzureSettings:
    account: str | None = None
    account_key: str | None = None
    sas_token: str | None = None
    #: Blob service endpoint (``https://ACCOUNT.blob.core.windows.net`` or an emulator's URL).
    endpoint: str | None = None
    source: str = "library default chain"
    extra: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"AzureSettings(account={self.account!r}, endpoint={self.endpoint!r}, source={self.source!r})"


#: The Azure storage emulator's published development account (not a secret).
_EMULATOR_ACCOUNT = "devstoreaccount1"
_EMULATOR_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def parse_connection_string(text: str) -> dict[str, str]:
    """Split an Azure Storage connection string (``Key=Value;Key=Value``) into its parts."""
    parts: dict[str, str] = {}
    for item in text.strip().strip(";").split(";"):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError("AZURE_STORAGE_CONNECTION_STRING is malformed (expected Key=Value;Key=Value)")
        parts[name.strip()] = value.strip()
    return parts


def azure_settings(*, endpoint: str | None = None, env: dict[str, str] | None = None) -> AzureSettings:
    """Resolve Azure Blob credentials.

    Order: ``AZURE_STORAGE_CONNECTION_STRING``; then ``AZURE_STORAGE_ACCOUNT`` with
    ``AZURE_STORAGE_KEY`` or ``AZURE_STORAGE_SAS_TOKEN``; then the library's own chain
    (managed identity, workload identity, Azure CLI) for ``AZURE_STORAGE_ACCOUNT``.
    """
    e = os.environ if env is None else env
    conn = e.get("AZURE_STORAGE_CONNECTION_STRING")
    if conn:
        parts = parse_connection_string(conn)
        if parts.get("UseDevelopmentStorage", "").lower() == "true":
            return AzureSettings(
                account=_EMULATOR_ACCOUNT,
                account_key=_EMULATOR_KEY,
                endpoint=endpoint or f"http://127.0.0.1:10000/{_EMULATOR_ACCOUNT}",
                source="connection string (development storage)",
            )
        account = parts.get("AccountName")
        blob_endpoint = endpoint or parts.get("BlobEndpoint")
        if not blob_endpoint and account:
            protocol = parts.get("DefaultEndpointsProtocol", "https")
            suffix = parts.get("EndpointSuffix", "core.windows.net")
            blob_endpoint = f"{protocol}://{account}.blob.{suffix}"
        if not account and blob_endpoint:
            account = _account_from_endpoint(blob_endpoint)
        if not account:
            raise UsageError("AZURE_STORAGE_CONNECTION_STRING has no AccountName or BlobEndpoint")
        sas = parts.get("SharedAccessSignature")
        _check_account_key(parts.get("AccountKey"), "AZURE_STORAGE_CONNECTION_STRING")
        return AzureSettings(
            account=account,
            account_key=parts.get("AccountKey"),
            sas_token=sas.lstrip("?") if sas else None,
            endpoint=blob_endpoint,
            source="AZURE_STORAGE_CONNECTION_STRING",
        )
    account = e.get("AZURE_STORAGE_ACCOUNT") or e.get("AZURE_STORAGE_ACCOUNT_NAME")
    if not account:
        raise UsageError(
            "no Azure credentials found",
            hint="set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT with "
            "AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN",
        )
    key = e.get("AZURE_STORAGE_KEY") or e.get("AZURE_STORAGE_ACCOUNT_KEY")
    _check_account_key(key, "AZURE_STORAGE_KEY")
    sas = e.get("AZURE_STORAGE_SAS_TOKEN")
    source = "AZURE_STORAGE_KEY" if key else "AZURE_STORAGE_SAS_TOKEN" if sas else "library default chain"
    return AzureSettings(
        account=account,
        account_key=key or None,
        sas_token=sas.lstrip("?") if sas else None,
        endpoint=endpoint or e.get("AZURE_STORAGE_BLOB_ENDPOINT") or None,
        source=source,
    )


def _check_account_key(key: str | None, source: str) -> None:
    """An account key is base64; say so now rather than fail inside a signature (never print it)."""
    if key is None:
        return
    try:
        base64.b64decode(key, validate=True)
    except ValueError:
        raise UsageError(f"the account key in {source} is not valid base64") from None


def _account_from_endpoint(endpoint: str) -> str | None:
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if host.endswith(".blob.core.windows.net"):
        return host.split(".", 1)[0]
    path = parts.path.strip("/")  # emulator style: http://127.0.0.1:10000/ACCOUNT
    return path.split("/", 1)[0] or None
