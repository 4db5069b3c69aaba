"""Azure Blob stores over obstore: account key, SAS or Entra ID, encryption scopes and
customer-provided keys, SAS signing of blob URLs, and the resumable-upload (block) client."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from obstore import exceptions as obx
from obstore.store import AzureStore

from ..credentials import AzureSettings, azure_settings
from ..errors import UsageError
from ..store import BucketInfo, Features
from . import StoreConfig, refuse_key_in_clear
from .azure_sas import blob_sas_url, service_sas
from .objectstore import ObjectStoreBackend, Signer, _first_line, client_options, retry_config

if TYPE_CHECKING:
    from obstore.store import AzureSASToken

    from ..resumable import ResumableUploads


def open_azure(bucket: str, config: StoreConfig) -> ObjectStoreBackend:
    """An Azure Blob container as a Store."""
    retry = retry_config(config)
    client = client_options(config)
    az = azure_settings(endpoint=config.endpoint)
    az_kwargs: dict[str, Any] = {"account_name": az.account}
    if az.account_key:
        az_kwargs["account_key"] = az.account_key
    if az.sas_token:
        az_kwargs["sas_key"] = az.sas_token
    if az.endpoint:
        az_kwargs["endpoint"] = az.endpoint.rstrip("/")
        client["allow_http"] = az.endpoint.startswith("http://")
    # Server-side encryption (docs/server-side-encryption.md); the S3-only options are ignored.
    scope, cpk = config.azure_encryption_scope, config.sse_customer_key
    if scope and cpk is not None:
        raise UsageError(
            "an Azure blob is encrypted with an encryption scope or a customer-provided key, not both",
            hint="give either the encryption scope or the customer key",
        )
    encryption = None
    if cpk is not None:
        refuse_key_in_clear(az.endpoint or "https://blob.core.windows.net")
        # obstore sends x-ms-encryption-key, -key-sha256 and -algorithm: AES256 on every
        # blob request, inside the SharedKey signature.
        az_kwargs["encryption_key"] = base64.b64encode(cpk).decode()
        encryption = "a customer-provided key"
    credential_provider: _ScopedContainerSAS | None = None
    if scope:
        encryption = f"encryption scope {scope}"
        if az.account and az.account_key:
            # obstore adds client default headers after signing, so a SharedKey signature would
            # not cover x-ms-encryption-scope and Azure refuses the request. Sign container SAS
            # tokens with the key instead, naming the scope (ses): Azure then encrypts every
            # write made with them under the scope, and no extra header is needed.
            credential_provider = _ScopedContainerSAS(
                account=az.account,
                account_key=az.account_key,
                container=bucket,
                scope=scope,
                plain_http=bool(az.endpoint and az.endpoint.startswith("http://")),
            )
            az_kwargs.pop("account_key", None)
            az_kwargs.pop("sas_key", None)
        else:
            # SAS tokens and Entra ID tokens do not sign headers: the header is enough.
            client["default_headers"] = {"x-ms-encryption-scope": scope}
    try:
        azure = AzureStore(
            bucket,
            client_options=client,
            retry_config=retry,
            credential_provider=credential_provider,
            **az_kwargs,
        )
    except obx.BaseError as exc:
        raise UsageError(f"invalid Azure configuration: {_first_line(exc)}") from exc
    features = Features(
        # With a customer-provided key obstore copies with Put Blob From URL, which Azurite
        # does not implement (501) and Azure limits to 5,000 MiB: copies go through the client.
        server_side_copy=cpk is None,
        presign=bool(az.account_key),
        object_tags=True,
        etag_is_md5=False,
        list_buckets=True,
    )
    signer: Signer | None = None
    if az.account and az.account_key:
        account, account_key = az.account, az.account_key
        blob_endpoint = az.endpoint or f"https://{account}.blob.core.windows.net"

        def signer(key: str, expires: timedelta, method: Literal["GET", "PUT"]) -> str:
            return blob_sas_url(
                endpoint=blob_endpoint,
                account=account,
                account_key=account_key,
                container=bucket,
                blob=key,
                expires=expires,
                permissions="r" if method == "GET" else "cw",
            )

    azure_backend = ObjectStoreBackend(
        azure, "azure", bucket, features, endpoint=az.endpoint or "Azure", signer=signer
    )
    azure_backend.write_encryption = encryption
    azure_backend.resumable_factory = _azure_resumable_factory(bucket, az, config)
    azure_backend.bucket_lister = partial(_list_azure_containers, az, config)
    return azure_backend


def _azure_resumable_factory(
    bucket: str, az: AzureSettings, config: StoreConfig
) -> Callable[[], ResumableUploads] | None:
    """Blocks are written with SAS URLs signed by the account key; other credentials (SAS tokens
    from the environment, Entra ID) and the encryption options make the store not resumable."""
    if not (az.account and az.account_key):
        return None
    if config.sse_customer_key is not None or config.azure_encryption_scope is not None:
        return None
    account, key = az.account, az.account_key
    endpoint = az.endpoint or f"https://{account}.blob.core.windows.net"

    def build() -> ResumableUploads:
        # Imported when first used: the REST stack (requests) costs a tenth of a second to import.
        from .azure_blocks import AzureResumableUploads

        return AzureResumableUploads(
            container=bucket,
            endpoint=endpoint,
            account=account,
            account_key=key,
            max_retries=config.max_retries,
            timeout=(config.connect_timeout, config.request_timeout),
        )

    return build


class _ScopedContainerSAS:
    """obstore credential provider: container SAS tokens signed with the account key, carrying
    an encryption scope (``ses``, service version 2020-12-06 and later), renewed before expiry."""

    #: Read, add, create, write, delete, list, tags: what the store does, in Azure's order.
    PERMISSIONS = "racwdlt"
    LIFETIME = timedelta(hours=6)

    def __init__(
        self, *, account: str, account_key: str, container: str, scope: str, plain_http: bool
    ) -> None:
        self._account = account
        self._key = account_key
        self._container = container
        self._scope = scope
        self._plain_http = plain_http

    def __call__(self) -> AzureSASToken:
        expiry = datetime.now(UTC) + self.LIFETIME
        token = service_sas(
            account=self._account,
            account_key=self._key,
            resource=self._container,
            kind="c",
            permissions=self.PERMISSIONS,
            expiry=expiry,
            plain_http=self._plain_http,
            encryption_scope=self._scope,
        )
        # Renewed a quarter of an hour early, so that no request starts with a token about to lapse.
        return {"sas_token": token, "expires_at": expiry - timedelta(minutes=15)}


async def _list_azure_containers(*args: Any) -> list[BucketInfo]:
    # Imported when used: the REST stack (requests) is not loaded by transfers that never list buckets.
    from .account_listing import list_azure_containers

    return await list_azure_containers(*args)
