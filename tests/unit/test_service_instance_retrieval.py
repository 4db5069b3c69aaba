"""Per-instance WADO-RS answered before the router (service/instance_retrieval.py): the same
answers as the route, for every request it takes and every one it leaves to the route."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from dicom_cloud.service.app import create_app
from dicom_cloud.service.instance_retrieval import InstanceRetrieval
from dicom_cloud.service.settings import load_settings

CT = Path(get_testdata_file("CT_small.dcm")).read_bytes()  # type: ignore[arg-type]
CT_DS = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
STUDY, SERIES, SOP = (str(CT_DS.StudyInstanceUID), str(CT_DS.SeriesInstanceUID), str(CT_DS.SOPInstanceUID))
PATH = f"/studies/{STUDY}/series/{SERIES}/instances/{SOP}"
MULTIPART = 'multipart/related; type="application/dicom"'


def _without_fast_path(app: FastAPI) -> FastAPI:
    app.user_middleware = [m for m in app.user_middleware if m.cls is not InstanceRetrieval]  # type: ignore[comparison-overlap]
    return app


class Pair:
    """Two apps over one archive: the service as built, and the same without the middleware."""

    def __init__(self, tmp_path: Path) -> None:
        tokens: list[str] = []
        settings = load_settings({"data_dir": tmp_path, "cors_origins": "https://viewer.example"}, environ={})
        self.fast = TestClient(create_app(settings, announce_token=tokens.append))
        self.fast.__enter__()
        self.admin = {"Authorization": f"Bearer {tokens[0]}"}
        self.route = TestClient(_without_fast_path(create_app(settings)))
        self.route.__enter__()
        body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + CT + b"\r\n--B--\r\n"
        stored = self.fast.post(
            "/studies",
            content=body,
            headers={**self.admin, "Content-Type": f"{MULTIPART}; boundary=B"},
        )
        assert stored.status_code == 200, stored.text

    def close(self) -> None:
        self.route.__exit__(None, None, None)
        self.fast.__exit__(None, None, None)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    made = Pair(tmp_path)
    yield made
    made.close()


@pytest.fixture
def answered(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each request went through the middleware's answer (True) or on to the route."""
    seen: list[bool] = []
    real = InstanceRetrieval._answer

    async def recorded(self: InstanceRetrieval, *args: Any) -> Any:
        try:
            result = await real(self, *args)
        except Exception:
            seen.append(False)
            raise
        seen.append(result[0] is not None)
        return result

    monkeypatch.setattr(InstanceRetrieval, "_answer", recorded)
    return seen


def _normalized(answer: Any) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body with the multipart boundary (random per answer) replaced."""
    headers = {k: v for k, v in answer.headers.items() if k not in ("date", "server")}
    body = answer.content
    found = re.search(r'boundary="?([^";]+)', headers.get("content-type", ""))
    if found:
        boundary = found.group(1)
        headers["content-type"] = headers["content-type"].replace(boundary, "BOUNDARY")
        body = body.replace(boundary.encode(), b"BOUNDARY")
        headers["content-length"] = str(len(body))
    return answer.status_code, headers, body


def _same(pair: Pair, path: str, headers: dict[str, str]) -> Any:
    fast = pair.fast.get(path, headers=headers)
    assert _normalized(fast) == _normalized(pair.route.get(path, headers=headers))
    return fast


@pytest.mark.parametrize(
    "accept",
    [
        None,
        MULTIPART,
        f'{MULTIPART}; transfer-syntax="*"',
        f"{MULTIPART}; transfer-syntax={CT_DS.file_meta.TransferSyntaxUID}",
        "application/dicom",
        "*/*",
    ],
)
def test_the_plain_retrieval_is_answered_before_the_router_as_the_route_answers_it(
    pair: Pair, answered: list[bool], accept: str | None
) -> None:
    headers = {**pair.admin, "Origin": "https://viewer.example", **({"Accept": accept} if accept else {})}
    answer = _same(pair, PATH, headers)
    assert answered == [True]
    assert answer.status_code == 200
    assert CT[-4096:] in answer.content  # the pixel data as stored
    assert answer.headers["access-control-allow-origin"] == "https://viewer.example"


def test_everything_else_is_left_to_the_route(pair: Pair, answered: list[bool]) -> None:
    other_study = f"/studies/1.2.3/series/{SERIES}/instances/{SOP}"
    share = pair.fast.post(f"/studies/{STUDY}/shares", json={"expires_in_seconds": 600}, headers=pair.admin)
    shared = {"Authorization": f"Bearer {share.json()['token']}"}
    cases: list[tuple[str, dict[str, str], int]] = [
        (PATH.replace(SOP, SOP + ".9"), pair.admin, 404),  # no such instance
        (PATH, {}, 401),  # no credential
        (PATH, {"Authorization": "Bearer nope"}, 401),
        (PATH, {"Authorization": "Basic eDp5"}, 401),
        (PATH, shared, 200),  # a share link of this study
        (other_study, shared, 403),  # ... of another one
        (PATH, {**pair.admin, "Accept": "application/json"}, 406),
        # A transcoding (to implicit VR little endian) is the route's work.
        (PATH, {**pair.admin, "Accept": f"{MULTIPART}; transfer-syntax=1.2.840.10008.1.2"}, 200),
        (PATH + "?_=123", pair.admin, 200),  # a query string: the route's Warning header
    ]
    for path, headers, status in cases:
        answer = _same(pair, path, headers)
        assert answer.status_code == status, (path, headers, answer.text)
    # The query string is seen before anything is done: that request is not in the list.
    assert answered == [False, False, False, False, True, False, False, False]
    assert "Warning" in pair.fast.get(PATH + "?_=123", headers=pair.admin).headers


def test_its_answers_are_counted_and_logged_under_the_route(pair: Pair, answered: list[bool]) -> None:
    assert pair.fast.get(PATH, headers=pair.admin).status_code == 200
    assert answered == [True]
    metrics = pair.fast.get("/metrics", headers=pair.admin).text
    template = "/studies/{study}/series/{series}/instances/{instance}"
    assert re.search(
        rf'dicom_cloud_http_requests_total\{{method="GET",route="{re.escape(template)}",status="200"\}} 1\.0',
        metrics,
    ), metrics
