from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, unquote, urlsplit

from dicom_cloud.backends.azure_sas import SAS_VERSION, blob_sas_url

KEY = base64.b64encode(b"unit-test-account-key-bytes-0123456789").decode()
NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def _sign(blob: str, *, permissions: str = "r", protocol: str = "https") -> str:
    string_to_sign = "\n".join(
        [
            permissions,
            "2024-05-06T07:03:09Z",
            "2024-05-06T08:08:09Z",
            f"/blob/acct/container/{blob}",
            "",
            "",
            protocol,
            SAS_VERSION,
            "b",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
        ]
    )
    digest = hmac.new(base64.b64decode(KEY), string_to_sign.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def _url(blob: str, endpoint: str = "https://acct.blob.core.windows.net/", permissions: str = "r") -> str:
    return blob_sas_url(
        endpoint=endpoint,
        account="acct",
        account_key=KEY,
        container="container",
        blob=blob,
        expires=timedelta(hours=1),
        permissions=permissions,
        now=NOW,
    )


def test_deterministic_for_fixed_now() -> None:
    assert _url("a/b.dcm") == _url("a/b.dcm")
    url = urlsplit(_url("a/b.dcm"))
    assert (url.scheme, url.netloc, url.path) == ("https", "acct.blob.core.windows.net", "/container/a/b.dcm")
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert query == {
        "sv": SAS_VERSION,
        "st": "2024-05-06T07:03:09Z",
        "se": "2024-05-06T08:08:09Z",
        "sr": "b",
        "sp": "r",
        "spr": "https",
        "sig": _sign("a/b.dcm"),
    }


def test_blob_name_encoded_in_url_but_signed_decoded() -> None:
    blob = "study 1/séries #2/img?50%.dcm"
    url = urlsplit(_url(blob))
    # The path is percent-encoded ('/' kept), and decodes back to the name.
    assert " " not in url.path and "é" not in url.path and "#" not in url.path and "?" not in url.path
    assert "%20" in url.path and "%C3%A9" in url.path
    assert unquote(url.path) == f"/container/{blob}"
    assert url.fragment == ""
    sig = parse_qs(url.query)["sig"][0]
    assert sig == _sign(blob)  # computed over the decoded name
    assert sig != _sign(url.path.removeprefix("/container/"))


def test_http_endpoint_allows_http_and_write_permissions() -> None:
    url = urlsplit(_url("x.dcm", endpoint="http://127.0.0.1:10000/devstoreaccount1", permissions="cw"))
    assert url.path == "/devstoreaccount1/container/x.dcm"
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert query["spr"] == "https,http"
    assert query["sp"] == "cw"
    assert query["sig"] == _sign("x.dcm", permissions="cw", protocol="https,http")
