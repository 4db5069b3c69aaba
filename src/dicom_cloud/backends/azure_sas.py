"""SAS tokens signed with the account key: service SAS for blobs and containers, and an account SAS
for the one operation a service SAS cannot grant (creating a container).

obstore's own Azure signing puts the percent-encoded blob name in the signed resource,
which Azure (and Azurite) refuse for names with spaces or non-ASCII characters; the
canonical resource must hold the decoded name.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlencode

#: A service version that supports every field of the string-to-sign below.
SAS_VERSION = "2021-08-06"


def service_sas(
    *,
    account: str,
    account_key: str,
    resource: str,
    kind: str,
    permissions: str,
    expiry: datetime,
    plain_http: bool,
    encryption_scope: str = "",
    now: datetime | None = None,
) -> str:
    """The query string of a service SAS for ``resource`` (``container`` or ``container/blob``,
    decoded) of ``kind`` ``b`` (blob) or ``c`` (container), signed with the account key."""
    now = now or datetime.now(UTC)
    # Start a little in the past: clocks of client and server are never exactly equal.
    start = (now - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    end = expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
    protocol = "https,http" if plain_http else "https"
    string_to_sign = "\n".join(
        [
            permissions,
            start,
            end,
            f"/blob/{account}/{resource}",
            "",  # signed identifier
            "",  # signed IP
            protocol,
            SAS_VERSION,
            kind,  # signed resource
            "",  # snapshot time
            encryption_scope,
            "",  # rscc
            "",  # rscd
            "",  # rsce
            "",  # rscl
            "",  # rsct
        ]
    )
    digest = hmac.new(base64.b64decode(account_key), string_to_sign.encode("utf-8"), hashlib.sha256).digest()
    fields = {"sv": SAS_VERSION, "st": start, "se": end, "sr": kind, "sp": permissions, "spr": protocol}
    if encryption_scope:
        fields["ses"] = encryption_scope
    fields["sig"] = base64.b64encode(digest).decode()
    return urlencode(fields)


def blob_sas_url(
    *,
    endpoint: str,
    account: str,
    account_key: str,
    container: str,
    blob: str,
    expires: timedelta,
    permissions: str = "r",
    now: datetime | None = None,
    operation: Mapping[str, str] | None = None,
) -> str:
    """A URL granting ``permissions`` (``r`` read, ``w`` write...) on one blob until ``now + expires``;
    ``operation`` adds the request's own query parameters (``comp=block&blockid=...``)."""
    now = now or datetime.now(UTC)
    query = service_sas(
        account=account,
        account_key=account_key,
        resource=f"{container}/{blob}",
        kind="b",
        permissions=permissions,
        expiry=now + expires,
        plain_http=endpoint.startswith("http://"),
        now=now,
    )
    url = f"{endpoint.rstrip('/')}/{quote(container)}/{quote(blob, safe='/')}?{query}"
    return f"{url}&{urlencode(operation, quote_via=quote)}" if operation else url


def account_sas(
    *,
    account: str,
    account_key: str,
    permissions: str,
    resource_types: str,
    expiry: datetime,
    plain_http: bool,
    now: datetime | None = None,
) -> str:
    """The query string of an account SAS for the blob service (``resource_types``: ``s`` service,
    ``c`` container, ``o`` object), signed with the account key."""
    now = now or datetime.now(UTC)
    start = (now - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    end = expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
    protocol = "https,http" if plain_http else "https"
    string_to_sign = "\n".join(
        [account, permissions, "b", resource_types, start, end, "", protocol, SAS_VERSION, "", ""]
    )
    digest = hmac.new(base64.b64decode(account_key), string_to_sign.encode("utf-8"), hashlib.sha256).digest()
    fields = {"sv": SAS_VERSION, "ss": "b", "srt": resource_types, "sp": permissions, "st": start, "se": end}
    fields |= {"spr": protocol, "sig": base64.b64encode(digest).decode()}
    return urlencode(fields)
