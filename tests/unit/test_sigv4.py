"""SigV4 against AWS's published examples.

Two sources, both published by AWS:
- the "Signature Version 4 test suite" (aws-sig-v4-test-suite, service "service", 2015-08-30):
  generic-service rules (paths normalised and encoded again);
- the Amazon S3 API reference examples (examplebucket, 2013-05-24): header-signed GET with
  Range, PUT, GET ?lifecycle, list with a query, and the presigned GET URL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlsplit

import pytest

from dicom_cloud.backends import sigv4
from dicom_cloud.backends.sigv4 import EMPTY_SHA256, Signer, SigningCredentials

SUITE_CREDS = SigningCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
SUITE_WHEN = datetime(2015, 8, 30, 12, 36, tzinfo=UTC)
SUITE_TOKEN = (
    "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfI"
    "eoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0w"
    "q5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDryp"
    "NC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA=="
)

# (name, method, path?query, extra headers in request order, expected signature)
SUITE = [
    ("get-vanilla", "GET", "/", [], "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
    (
        "get-header-key-duplicate",
        "GET",
        "/",
        [("My-Header1", "value2"), ("My-Header1", "value2"), ("My-Header1", "value1")],
        "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea",
    ),
    (
        "get-header-value-order",
        "GET",
        "/",
        [
            ("My-Header1", "value4"),
            ("My-Header1", "value1"),
            ("My-Header1", "value3"),
            ("My-Header1", "value2"),
        ],
        "08c7e5a9acfcfeb3ab6b2185e75ce8b1deb5e634ec47601a50643f830c755c01",
    ),
    (
        "get-header-value-trim",
        "GET",
        "/",
        [("My-Header1", " value1"), ("My-Header2", ' "a   b   c"')],
        "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
    ),
    (
        "get-unreserved",
        "GET",
        "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
        [],
        "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f",
    ),
    ("get-utf8", "GET", "/\u1234", [], "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85"),
    (
        "get-vanilla-empty-query-key",
        "GET",
        "/?Param1=value1",
        [],
        "a67d582fa61cc504c4bae71f336f98b97f1ea3c7a6bfe1b6e45aec72011b9aeb",
    ),
    (
        "get-vanilla-query-order-key",
        "GET",
        "/?Param1=value2&Param1=Value1",
        [],
        "eedbc4e291e521cf13422ffca22be7d2eb8146eecf653089df300a15b2382bd1",
    ),
    (
        "get-vanilla-query-order-key-case",
        "GET",
        "/?Param2=value2&Param1=value1",
        [],
        "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
    ),
    (
        "get-vanilla-query-order-value",
        "GET",
        "/?Param1=value2&Param1=value1",
        [],
        "5772eed61e12b33fae39ee5e7012498b51d56abc0abb7c60486157bd471c4694",
    ),
    (
        "get-vanilla-query-unreserved",
        "GET",
        "/?-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz="
        "-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
        [],
        "9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197",
    ),
    (
        "get-vanilla-utf8-query",
        "GET",
        "/?\u1234=bar",
        [],
        "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04",
    ),
    ("post-vanilla", "POST", "/", [], "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
    (
        "post-header-key-sort",
        "POST",
        "/",
        [("My-Header1", "value1")],
        "c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c",
    ),
    (
        "post-header-value-case",
        "POST",
        "/",
        [("My-Header1", "VALUE1")],
        "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d",
    ),
    (
        "post-vanilla-query",
        "POST",
        "/?Param1=value1",
        [],
        "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
    ),
    # normalize-path group
    (
        "get-relative",
        "GET",
        "/example/..",
        [],
        "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    ),
    (
        "get-relative-relative",
        "GET",
        "/example1/example2/../..",
        [],
        "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    ),
    ("get-slash", "GET", "//", [], "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
    (
        "get-slash-dot-slash",
        "GET",
        "/./",
        [],
        "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    ),
    (
        "get-slash-pointless-dot",
        "GET",
        "/./example",
        [],
        "ef75d96142cf21edca26f06005da7988e4f8dc83a165a80865db7089db637ec5",
    ),
    (
        "get-slashes",
        "GET",
        "//example//",
        [],
        "9a624bd73a37c9a373b5312afbebe7a714a789de108f0bdfe846570885f57e84",
    ),
    (
        "get-space",
        "GET",
        "/example space/",
        [],
        "652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741",
    ),
    # sts group: a token sent as a header and signed
    (
        "post-sts-header-before",
        "POST",
        "/",
        [("X-Amz-Security-Token", SUITE_TOKEN)],
        "85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead",
    ),
]


@pytest.mark.parametrize(
    ("name", "method", "target", "headers", "signature"), SUITE, ids=[t[0] for t in SUITE]
)
def test_aws_sigv4_test_suite(
    name: str, method: str, target: str, headers: list[tuple[str, str]], signature: str
) -> None:
    signer = Signer(SUITE_CREDS, "us-east-1", "service")
    request_headers = [("Host", "example.amazonaws.com"), *headers, ("X-Amz-Date", "20150830T123600Z")]
    signed = signer.sign(
        method, f"https://example.amazonaws.com{target}", headers=request_headers, when=SUITE_WHEN
    )
    assert signed.headers["Authorization"].endswith(f"Signature={signature}"), signed.canonical_request
    assert signed.headers["Authorization"].startswith(
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders="
    )


def test_suite_canonical_request_and_string_to_sign() -> None:
    signer = Signer(SUITE_CREDS, "us-east-1", "service")
    signed = signer.sign(
        "GET",
        "https://example.amazonaws.com/",
        headers=[("Host", "example.amazonaws.com"), ("X-Amz-Date", "20150830T123600Z")],
        when=SUITE_WHEN,
    )
    assert signed.canonical_request == (
        "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n"
        + EMPTY_SHA256
    )
    assert signed.string_to_sign == (
        "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"
        "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
    )


# --- Amazon S3 examples ------------------------------------------------------------------------

S3_CREDS = SigningCredentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
S3_WHEN = datetime(2013, 5, 24, tzinfo=UTC)
S3 = Signer(S3_CREDS, "us-east-1", "s3")
HOST = "https://examplebucket.s3.amazonaws.com"


def _sig(signed: sigv4.SignedRequest) -> str:
    return signed.headers["Authorization"].rsplit("Signature=", 1)[1]


def test_s3_get_object_with_range() -> None:
    signed = S3.sign("GET", f"{HOST}/test.txt", headers={"Range": "bytes=0-9"}, when=S3_WHEN)
    assert _sig(signed) == "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    assert "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date," in signed.headers["Authorization"]
    assert signed.headers["x-amz-content-sha256"] == EMPTY_SHA256
    assert signed.headers["x-amz-date"] == "20130524T000000Z"


def test_s3_put_object_encodes_dollar_once() -> None:
    body = b"Welcome to Amazon S3."
    signed = S3.sign(
        "PUT",
        f"{HOST}/test$file.text",
        headers={"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
        payload_hash=sigv4.sha256_hex(body),
        when=S3_WHEN,
    )
    assert _sig(signed) == "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"
    assert signed.canonical_request.startswith("PUT\n/test%24file.text\n")
    # The same key already percent-encoded on the wire signs the same.
    again = S3.sign(
        "PUT",
        f"{HOST}/test%24file.text",
        headers={"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
        payload_hash=sigv4.sha256_hex(body),
        when=S3_WHEN,
    )
    assert _sig(again) == _sig(signed)


def test_s3_get_bucket_lifecycle_subresource() -> None:
    signed = S3.sign("GET", f"{HOST}/?lifecycle", when=S3_WHEN)
    assert _sig(signed) == "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"


def test_s3_list_objects_query() -> None:
    signed = S3.sign("GET", f"{HOST}/?max-keys=2&prefix=J", when=S3_WHEN)
    assert _sig(signed) == "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"


def test_s3_presigned_get_url() -> None:
    url = S3.presign("GET", f"{HOST}/test.txt", expires_in=86400, when=S3_WHEN)
    assert url == (
        "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    )


def test_s3_keeps_double_slashes_and_dots_in_keys() -> None:
    signed = S3.sign("GET", f"{HOST}/a//b/./c", when=S3_WHEN)
    assert signed.canonical_request.split("\n")[1] == "/a//b/./c"


def test_presign_upload_part_signs_extra_params_headers_and_token() -> None:
    creds = SigningCredentials("AKIAIOSFODNN7EXAMPLE", "secret", session_token="tok/en+=")
    signer = Signer(creds, "eu-west-1")
    url = signer.presign(
        "PUT",
        "http://127.0.0.1:8333/bucket/dir/a b.dcm",
        expires_in=900,
        params={"uploadId": "abc/def==", "partNumber": "3"},
        signed_headers={"content-type": "application/dicom"},
        when=S3_WHEN,
    )
    parts = urlsplit(url)
    assert parts.path == "/bucket/dir/a%20b.dcm"
    query = dict(parse_qsl(parts.query))
    assert query["uploadId"] == "abc/def=="
    assert query["partNumber"] == "3"
    assert query["X-Amz-SignedHeaders"] == "content-type;host"
    assert query["X-Amz-Security-Token"] == "tok/en+="
    assert query["X-Amz-Credential"] == "AKIAIOSFODNN7EXAMPLE/20130524/eu-west-1/s3/aws4_request"
    assert parts.query.endswith("X-Amz-Signature=" + query["X-Amz-Signature"])
    # Any change to a signed parameter changes the signature.
    other = signer.presign(
        "PUT",
        "http://127.0.0.1:8333/bucket/dir/a b.dcm",
        expires_in=900,
        params={"uploadId": "abc/def==", "partNumber": "4"},
        signed_headers={"content-type": "application/dicom"},
        when=S3_WHEN,
    )
    assert dict(parse_qsl(urlsplit(other).query))["X-Amz-Signature"] != query["X-Amz-Signature"]


def test_presign_refuses_lifetimes_s3_refuses() -> None:
    with pytest.raises(ValueError):
        S3.presign("GET", f"{HOST}/k", expires_in=0)
    with pytest.raises(ValueError):
        S3.presign("GET", f"{HOST}/k", expires_in=sigv4.MAX_PRESIGN_SECONDS + 1)


def test_session_token_header_is_signed() -> None:
    signer = Signer(SigningCredentials("AKID", "secret", session_token="TOKEN"), "us-east-1")
    signed = signer.sign("GET", f"{HOST}/k", when=S3_WHEN)
    assert signed.headers["x-amz-security-token"] == "TOKEN"
    assert "x-amz-security-token" in signed.headers["Authorization"].split("SignedHeaders=")[1]


def test_unsigned_and_streaming_payload_hashes_are_signed_as_given() -> None:
    for payload in (sigv4.UNSIGNED_PAYLOAD, sigv4.STREAMING_PAYLOAD):
        signed = S3.sign("PUT", f"{HOST}/k", payload_hash=payload, when=S3_WHEN)
        assert signed.headers["x-amz-content-sha256"] == payload
        assert signed.canonical_request.endswith("\n" + payload)


def test_credentials_repr_hides_secrets() -> None:
    text = repr(SigningCredentials("AKIAIOSFODNN7EXAMPLE", "supersecret", session_token="tok"))
    assert "supersecret" not in text and "tok" not in text.replace("token", "")


def test_urls_path_style_and_virtual_hosted() -> None:
    assert (
        sigv4.object_url("http://127.0.0.1:8333", "b", "a b/ü.dcm", path_style=True)
        == "http://127.0.0.1:8333/b/a%20b/%C3%BC.dcm"
    )
    assert sigv4.object_url("https://s3.eu-west-1.amazonaws.com", "b", "k", path_style=False) == (
        "https://b.s3.eu-west-1.amazonaws.com/k"
    )
    assert sigv4.bucket_url("http://127.0.0.1:8333/", "b", path_style=True) == "http://127.0.0.1:8333/b/"


def test_default_ports_are_not_part_of_the_signed_host() -> None:
    explicit = S3.sign("GET", "https://examplebucket.s3.amazonaws.com:443/test.txt", when=S3_WHEN)
    implicit = S3.sign("GET", f"{HOST}/test.txt", when=S3_WHEN)
    assert explicit.headers["Authorization"] == implicit.headers["Authorization"]
    other = S3.sign("GET", "http://127.0.0.1:8333/b/k", when=S3_WHEN)
    assert "host:127.0.0.1:8333\n" in other.canonical_request
