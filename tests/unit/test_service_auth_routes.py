"""Every route but /healthz refuses requests without valid credentials (401), before touching data.

The archive here knows no token and no share link: the routes must answer 401 without calling
anything else of it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dicom_cloud.service.app import create_app
from dicom_cloud.service.settings import load_settings

_SAMPLES = {
    "study": "1.2.3",
    "series": "1.2.3.4",
    "instance": "1.2.3.4.5",
    "frames": "1",
    "frame": "1",
    "index": "0",
    "token_id": "1",
    "share_id": "1",
}
_QUERY = {"tenant": "t", "size": "10", "expires": "9999999999", "signature": "0" * 64}


class NoCredentials:
    """An archive that knows no API token and no share link."""

    async def authenticate(self, token: str) -> None:
        return None

    async def resolve_share(self, token: str) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the archive's {name} was called before authentication")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = load_settings({"data_dir": tmp_path, "bootstrap_admin": False}, environ={})
    app = create_app(settings, archive=NoCredentials())  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _operations(client: TestClient) -> list[tuple[str, str]]:
    spec = client.get("/openapi.json").json()
    found = []
    for path, item in spec["paths"].items():
        for method in item:
            concrete = re.sub(r"{(\w+)}", lambda m: _SAMPLES.get(m.group(1), "abc"), path)
            found.append((method.upper(), concrete))
    return found


def test_every_route_but_health_needs_credentials(client: TestClient) -> None:
    operations = _operations(client)
    assert len(operations) > 30
    for method, path in operations:
        if path == "/healthz":
            continue
        for headers in ({}, {"Authorization": "Bearer not-a-token"}):
            answer = client.request(
                method, path, params=_QUERY if "/files/" in path else None, headers=headers
            )
            assert answer.status_code == 401, (method, path, headers, answer.text)
            body = answer.json()
            assert body["error"] in ("UnauthenticatedError",), body
            if "/files/" not in path:
                assert answer.headers["www-authenticate"].startswith("Bearer")


def test_health_needs_nothing(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_other_schemes_are_refused(client: TestClient) -> None:
    answer = client.get("/studies", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert answer.status_code == 401


def test_docs_and_openapi_are_served(client: TestClient) -> None:
    assert "swagger" in client.get("/docs").text.lower()
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


@pytest.mark.parametrize(
    ("values", "public"),
    [
        ({}, True),  # development: on by default
        ({"public_docs": False}, False),
        ({"environment": "production"}, False),  # production: off by default
        ({"environment": "production", "public_docs": True}, True),
    ],
)
def test_docs_are_public_only_where_the_settings_say(
    tmp_path: Path, values: dict[str, Any], public: bool
) -> None:
    production = {"signing_secret": "s" * 32, "public_url": "https://pacs.example.org"}
    tokens: list[str] = []
    settings = load_settings(
        {"data_dir": tmp_path, **(production if "environment" in values else {}), **values}, environ={}
    )
    assert settings.docs_are_public is public
    with TestClient(create_app(settings, announce_token=tokens.append)) as c:
        for path in ("/docs", "/openapi.json"):
            answer = c.get(path)
            assert answer.status_code == (200 if public else 401), (path, answer.text)
            if not public:
                assert answer.headers["www-authenticate"].startswith("Bearer")
                assert c.get(path, headers={"Authorization": "Bearer dcat_" + "x" * 43}).status_code == 401
            # With a credential they answer either way.
            answer = c.get(path, headers={"Authorization": f"Bearer {tokens[0]}"})
            assert answer.status_code == 200
        spec = c.get("/openapi.json", headers={"Authorization": f"Bearer {tokens[0]}"}).json()
        assert "/studies" in spec["paths"] and "/openapi.json" not in spec["paths"]
        assert c.get("/healthz").status_code == 200


def test_access_log_has_no_query_string_no_path_no_credential(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="dicom_cloud.service.access"):
        client.get(
            "/studies/1.2.3/series",
            params={"PatientName": "DOE^JANE"},
            headers={"Authorization": "Bearer s3cr3t"},
        )
    records = [r for r in caplog.records if r.name == "dicom_cloud.service.access"]
    assert records
    from dicom_cloud.service.observability import JsonFormatter

    line = JsonFormatter().format(records[-1])
    entry = json.loads(line)
    assert entry["route"] == "/studies/{study}/series" and entry["status"] == 401
    for secret in ("DOE", "JANE", "s3cr3t", "1.2.3"):
        assert secret not in line


def test_metrics_count_requests_by_route_template(tmp_path: Path) -> None:
    settings = load_settings(
        {"data_dir": tmp_path, "bootstrap_admin": False, "metrics_public": True}, environ={}
    )
    with TestClient(create_app(settings, archive=NoCredentials())) as c:  # type: ignore[arg-type]
        c.get("/studies/1.2.3/metadata")
        text = c.get("/metrics").text
    assert (
        'dicom_cloud_http_requests_total{method="GET",route="/studies/{study}/metadata",status="401"} 1.0'
        in text
    )
