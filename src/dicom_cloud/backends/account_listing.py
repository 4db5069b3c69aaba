"""The buckets (S3 ListBuckets) and containers (Azure List Containers) an account's credentials reach.

obstore works inside one bucket; these two account-level listings are plain signed GETs over
:mod:`.rest`: SigV4 (:mod:`.sigv4`) for S3, an account SAS signed with the account key (or the SAS
token given) for Azure. Both answer XML, in pages followed by a continuation token or marker.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlencode

import requests

from ..credentials import AwsSettings, AzureSettings
from ..errors import AuthenticationError, DicomCloudError, PermissionDeniedError
from ..store import BucketInfo
from . import StoreConfig
from .http_errors import S3_AUTH_CODES, status_error
from .rest import Request, RestClient
from .sigv4 import Signer, aws_endpoint, current_credentials

_AZURE_AUTH_CODES = frozenset(
    {"AuthenticationFailed", "InvalidAuthenticationInfo", "NoAuthenticationInformation"}
)
#: Azure and Azurite answer a bad signature with this message (code AuthorizationFailure).
_AZURE_AUTH_MESSAGE = "Server failed to authenticate the request"


async def list_s3_buckets(aws: AwsSettings, config: StoreConfig) -> list[BucketInfo]:
    """Every bucket of the account, by ListBuckets (``GET /`` on the endpoint), page after page."""
    credentials = current_credentials(aws)
    if credentials is None:
        raise AuthenticationError(
            "listing buckets needs AWS keys and none were found",
            hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (see docs/credentials.md)",
        )
    endpoint = (aws.endpoint or aws_endpoint(aws.region)).rstrip("/")
    signer = Signer(credentials, aws.region)
    client = RestClient(
        what=f"S3 at {endpoint}",
        max_retries=config.max_retries,
        timeout=(config.connect_timeout, config.request_timeout),
    )
    buckets: list[BucketInfo] = []
    token = ""
    try:
        while True:
            url = f"{endpoint}/" + (
                f"?{urlencode({'continuation-token': token}, quote_via=quote)}" if token else ""
            )

            def build(url: str = url) -> Request:
                signed = signer.sign("GET", url)
                return Request("GET", url, signed.headers)

            response = await client.send(build)
            if response.status_code >= 300:
                raise _s3_error(response)
            root = _xml(response, "S3")
            for bucket in _descendants(root, "Bucket"):
                buckets.append(BucketInfo(_text(bucket, "Name"), _date(_text(bucket, "CreationDate"))))
            token = _text(root, "ContinuationToken")
            if not token:
                return buckets
    finally:
        client.close()


async def list_azure_containers(az: AzureSettings, config: StoreConfig) -> list[BucketInfo]:
    """Every container of the storage account, by List Containers, marker after marker."""
    from .azure_sas import account_sas

    if not az.account or not (az.account_key or az.sas_token):
        raise AuthenticationError(
            "listing containers needs the storage account's key or a SAS token",
            hint="set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT with AZURE_STORAGE_KEY "
            "or AZURE_STORAGE_SAS_TOKEN (see docs/credentials.md)",
        )
    endpoint = (az.endpoint or f"https://{az.account}.blob.core.windows.net").rstrip("/")
    account, account_key, sas_token = az.account, az.account_key, az.sas_token
    client = RestClient(
        what=f"Azure at {endpoint}",
        max_retries=config.max_retries,
        timeout=(config.connect_timeout, config.request_timeout),
    )

    def credential() -> str:
        if account_key:
            # A short-lived account SAS: list (l) on the service (s), nothing else.
            return account_sas(
                account=account,
                account_key=account_key,
                permissions="l",
                resource_types="s",
                expiry=datetime.now(UTC) + timedelta(minutes=15),
                plain_http=endpoint.startswith("http://"),
            )
        return (sas_token or "").lstrip("?")

    containers: list[BucketInfo] = []
    marker = ""
    try:
        while True:
            query = {"comp": "list"} | ({"marker": marker} if marker else {})

            def build(query: dict[str, str] = query) -> Request:
                return Request(
                    "GET", f"{endpoint}/?{urlencode(query)}&{credential()}", {"x-ms-version": "2021-08-06"}
                )

            response = await client.send(build)
            if response.status_code >= 300:
                raise _azure_error(response, endpoint)
            root = _xml(response, "Azure")
            for container in _descendants(root, "Container"):
                containers.append(BucketInfo(_text(container, "Name")))
            marker = _text(root, "NextMarker")
            if not marker:
                return containers
    finally:
        client.close()


def _s3_error(response: requests.Response) -> DicomCloudError:
    code, _ = _code_and_message(response)
    detail = f": {code}" if code else f": HTTP {response.status_code}"
    if code in S3_AUTH_CODES or response.status_code == 401:
        return AuthenticationError(
            f"S3 refused the credentials for listing buckets{detail}",
            hint="check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile (docs/credentials.md)",
        )
    if response.status_code == 403:
        return PermissionDeniedError(
            f"permission denied for listing buckets{detail}",
            hint="the credentials are valid but may not list the account's buckets (s3:ListAllMyBuckets)",
        )
    return status_error("S3", response.status_code, "the bucket listing", detail)


def _azure_error(response: requests.Response, endpoint: str) -> DicomCloudError:
    code, message = _code_and_message(response)
    detail = f": {code}" if code else f": HTTP {response.status_code}"
    if code in _AZURE_AUTH_CODES or message.startswith(_AZURE_AUTH_MESSAGE) or response.status_code == 401:
        return AuthenticationError(
            f"Azure refused the credentials for listing the containers of {endpoint}{detail}",
            hint="check the account key or SAS token (environment or connection string)",
        )
    if response.status_code == 403:
        return PermissionDeniedError(
            f"permission denied for listing the containers of {endpoint}{detail}",
            hint="a SAS token must be an account SAS allowing list (sp=l) on the service (srt=s)",
        )
    return status_error("Azure", response.status_code, "the container listing", detail)


def _xml(response: requests.Response, provider: str) -> ET.Element:
    try:
        return ET.fromstring(response.content)  # noqa: S314 - the provider's own answer
    except ET.ParseError:
        raise DicomCloudError(f"{provider} answered the listing with a body that is not XML") from None


def _code_and_message(response: requests.Response) -> tuple[str, str]:
    try:
        root = ET.fromstring(response.content)  # noqa: S314 - the provider's own answer
    except ET.ParseError:
        return "", ""
    return _text(root, "Code"), " ".join(_text(root, "Message").split())


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _descendants(root: ET.Element, name: str) -> list[ET.Element]:
    return [element for element in root.iter() if _local(element.tag) == name]


def _text(element: ET.Element, name: str) -> str:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return ""


def _date(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    except ValueError:
        return None
