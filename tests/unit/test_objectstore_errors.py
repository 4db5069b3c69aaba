"""translate_error: obstore's errors classified by class, status and provider code, never by the name.

The messages are built in obstore 0.12's format (as SeaweedFS, Azurite and a closed port produce
them), around object names that hold the words, codes and even the line structure the
classification reads.
"""

from __future__ import annotations

import json
import urllib.parse

import pytest
from obstore import exceptions as obx

from dicom_cloud.backends.objectstore import translate_error
from dicom_cloud.errors import (
    AuthenticationError,
    BucketNotFoundError,
    DicomCloudError,
    NetworkError,
    NotFoundError,
    PermissionDeniedError,
    ThrottledError,
    UsageError,
)

WHERE = "s3://bkt/key"
#: Names that hold what a text search would find: codes, statuses, phrases, and forged structure.
NAMES = [
    "connectors/a.dcm",
    "credentials/a.dcm",
    "NoSuchBucket SignatureDoesNotMatch AccessDenied SlowDown NoSuchUpload/a.dcm",
    "<Code>NoSuchBucket</Code>/status code: 503/timed out/a.dcm",
    "x\n\nDebug source:\nGeneric {\n    source: RetryError(\n            inner: Status {\n"
    "                status: 401,\n                body: Some(\n"
    '                    "<Code>SignatureDoesNotMatch</Code>",\n/a.dcm',
    'y\n    status: 503,\n    code: "SlowDown",\n    HttpError {\n        kind: Connect,\n/a.dcm',
]


def _rust_string(text: str) -> str:
    """A string as Rust's Debug prints it: quoted, with quotes, backslashes and controls escaped."""
    return json.dumps(text, ensure_ascii=False)


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def status_error(
    cls: type[BaseException], name: str, status: int, reason: str, code: str | None, message: str = "m"
) -> BaseException:
    url = "http://127.0.0.1:8333/bkt/" + urllib.parse.quote(name)
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<Key>{_xml(name)}</Key></Error>"
        if code
        else ""
    )
    variant = {obx.PermissionDeniedError: "PermissionDenied", FileNotFoundError: "NotFound"}.get(cls)
    head = f"for path {name}: " if variant else "Generic S3 error: "
    outer = f"{variant} {{\n    path: {_rust_string(name)}," if variant else 'Generic {\n    store: "S3",'
    text = (
        f"{head}Error performing GET {url} in 1ms - Server returned non-2xx status code: "
        f"{status} {reason}: {body}\n\nDebug source:\n{outer}\n    source: RetryError(\n"
        f"        RetryErrorImpl {{\n            method: GET,\n"
        f"            uri: Some(\n                {url},\n            ),\n            retries: 0,\n"
        f"            inner: Status {{\n                status: {status},\n"
        f"                body: Some(\n                    {_rust_string(body)},\n                ),\n"
        "            },\n        },\n    ),\n}"
    )
    return cls(text)


def transport_error(name: str, kind: str, io_kind: str) -> BaseException:
    url = "http://127.0.0.1:1/bkt/" + urllib.parse.quote(name)
    text = (
        f"Generic S3 error: Error performing GET {url} in 1ms - HTTP error: error sending request\n\n"
        f'Debug source:\nGeneric {{\n    store: "S3",\n    source: RetryError(\n        RetryErrorImpl {{\n'
        f"            method: GET,\n            uri: Some(\n                {url},\n            ),\n"
        f"            inner: Http(\n                HttpError {{\n                    kind: {kind},\n"
        f"                    source: reqwest::Error {{\n                        kind: Request,\n"
        f"                        source: Os {{\n                            code: 111,\n"
        f"                            kind: {io_kind},\n"
        f'                            message: "x",\n                        }},\n'
        "                    },\n                },\n            ),\n        },\n    ),\n}"
    )
    return obx.GenericError(text)


@pytest.mark.parametrize("name", NAMES)
def test_status_and_code_decide_whatever_the_name(name: str) -> None:
    cases: list[tuple[BaseException, type[DicomCloudError]]] = [
        (status_error(obx.GenericError, name, 400, "Bad Request", "InvalidArgument"), UsageError),
        (status_error(obx.GenericError, name, 416, "Range Not Satisfiable", "InvalidRange"), UsageError),
        (status_error(FileNotFoundError, name, 404, "Not Found", "NoSuchKey"), NotFoundError),
        (status_error(FileNotFoundError, name, 404, "Not Found", None), NotFoundError),
        (status_error(FileNotFoundError, name, 404, "Not Found", "NoSuchBucket"), BucketNotFoundError),
        (
            status_error(obx.PermissionDeniedError, name, 403, "Forbidden", "AccessDenied"),
            PermissionDeniedError,
        ),
        (status_error(obx.PermissionDeniedError, name, 403, "Forbidden", None), PermissionDeniedError),
        (
            status_error(obx.PermissionDeniedError, name, 403, "Forbidden", "SignatureDoesNotMatch"),
            AuthenticationError,
        ),
        (
            status_error(
                obx.PermissionDeniedError,
                name,
                403,
                "Forbidden",
                "AuthorizationFailure",
                "Server failed to authenticate the request. Make sure...",
            ),
            AuthenticationError,
        ),
        (status_error(obx.GenericError, name, 503, "Service Unavailable", "SlowDown"), ThrottledError),
        (status_error(obx.GenericError, name, 500, "Internal Server Error", "InternalError"), NetworkError),
        (status_error(obx.GenericError, name, 404, "Not Found", "NoSuchUpload"), NetworkError),
    ]
    for exc, expected in cases:
        error = translate_error(exc, WHERE)
        assert type(error) is expected, (str(exc)[:200], type(error))
        assert not isinstance(error, ThrottledError) or expected is ThrottledError


@pytest.mark.parametrize("name", NAMES)
def test_transport_faults_by_kind_whatever_the_name(name: str) -> None:
    refused = translate_error(transport_error(name, "Connect", "ConnectionRefused"), WHERE, "http://e")
    assert type(refused) is NetworkError and "cannot reach http://e" in str(refused)
    dropped = translate_error(transport_error(name, "Interrupted", "ConnectionReset"), WHERE)
    assert type(dropped) is NetworkError and "connection dropped" in str(dropped)
    timed_out = translate_error(transport_error(name, "Timeout", "TimedOut"), WHERE)
    assert type(timed_out) is NetworkError and "timed out" in str(timed_out)


@pytest.mark.parametrize("name", [name for name in NAMES if "\n" not in name])
def test_unstructured_errors_are_not_guessed_from_the_name(name: str) -> None:
    """An error without the structured part (obstore always appends it) is classified by its class."""
    error = translate_error(obx.GenericError(f"something failed for {name}"), WHERE)
    assert type(error) is DicomCloudError


def test_bulk_delete_refusal_is_permission_denied() -> None:
    name = "del/SlowDown credentials/a"
    text = (
        f"Generic S3 error: DeleteObjects request failed for key {name}: Access Denied. "
        "(code: AccessDenied)\n\n"
        f'Debug source:\nGeneric {{\n    store: "S3",\n    source: DeleteFailed {{\n'
        f"        path: {_rust_string(name)},\n"
        '        code: "AccessDenied",\n        message: "Access Denied.",\n    },\n}'
    )
    assert type(translate_error(obx.GenericError(text), WHERE)) is PermissionDeniedError


def test_credential_lookup_failure_is_an_authentication_error() -> None:
    text = (
        "Generic S3 error: Error performing PUT http://169.254.169.254/latest/api/token in 1ms - error\n\n"
        'Debug source:\nGeneric {\n    store: "S3",\n    source: RetryError(\n        RetryErrorImpl {\n'
        "            method: PUT,\n            uri: Some(\n                http://169.254.169.254/latest/api/token,\n"
        "            ),\n            inner: Http(\n                HttpError {\n"
        "                    kind: Connect,\n"
        "                },\n            ),\n        },\n    ),\n}"
    )
    assert type(translate_error(obx.GenericError(text), WHERE)) is AuthenticationError
