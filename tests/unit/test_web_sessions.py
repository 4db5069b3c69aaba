"""Browser sessions, CSRF checks, share links in a browser, the web pages and the viewer's files,
in-process (TestClient) over a real archive on a local directory and SQLite."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from dicom_cloud.cli.main import main
from dicom_cloud.errors import NetworkError, UsageError
from dicom_cloud.service.app import create_app
from dicom_cloud.service.auth import CSRF_COOKIE, SESSION_COOKIE, SHARE_COOKIE, csrf_token
from dicom_cloud.service.routes.web import safe_next
from dicom_cloud.service.settings import load_settings
from dicom_cloud.service.viewer import MARKER, install_viewer

CT_PATH = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
MR_PATH = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
CT_STUDY = str(pydicom.dcmread(CT_PATH, stop_before_pixels=True).StudyInstanceUID)
MR_STUDY = str(pydicom.dcmread(MR_PATH, stop_before_pixels=True).StudyInstanceUID)
BASE = "http://testserver"
HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}

INDEX = (
    '<!doctype html><html><head><script>window.PUBLIC_URL="/"</script>'
    '<link rel="manifest" href="/manifest.json"><script src="/app-config.js"></script>'
    '<script src="/init-service-worker.js"></script></head><body>'
    '<script src="/app.bundle.abc.js"></script></body></html>'
)


def npm_tarball(path: Path, files: dict[str, bytes], version: str = "3.13.2") -> Path:
    """A tarball shaped like the npm package's (``package/...``)."""
    with tarfile.open(path, "w:gz") as archive:
        entries = {"package/package.json": json.dumps({"name": "@ohif/app", "version": version}).encode()}
        entries.update({f"package/{name}": data for name, data in files.items()})
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def fake_ohif(tmp_path: Path) -> Path:
    return npm_tarball(
        tmp_path / "ohif.tgz",
        {
            "dist/index.html": INDEX.encode(),
            "dist/app-config.js": b"window.config = {demo: true};",
            "dist/app.bundle.abc.js": b"console.log('app')",
            "dist/12.bundle.def.js": b"console.log('chunk')",
            "dist/assets/logo.svg": b"<svg/>",
            "README.md": b"not the dist",
        },
    )


@pytest.fixture
def app_parts(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    tokens: list[str] = []
    settings = load_settings({"data_dir": tmp_path / "data", "viewer_dir": tmp_path / "viewer"}, environ={})
    with TestClient(create_app(settings, announce_token=tokens.append), base_url=BASE) as client:
        admin = tokens[0]
        for path in (CT_PATH, MR_PATH):
            body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes() + b"\r\n--B--\r\n"
            stored = client.post(
                "/studies",
                content=body,
                headers={
                    "Content-Type": 'multipart/related; type="application/dicom"; boundary=B',
                    "Authorization": f"Bearer {admin}",
                },
            )
            assert stored.status_code == 200
        yield client, admin


def login(client: TestClient, token: str) -> Any:
    return client.post(
        "/login",
        content=f"token={token}&next=/web/study/1.2".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": BASE},
        follow_redirects=False,
    )


def set_cookie_headers(answer: Any) -> dict[str, str]:
    return {header.split("=", 1)[0]: header for header in answer.headers.get_list("set-cookie")}


def test_login_sets_an_httponly_strict_session_cookie(app_parts: tuple[TestClient, str]) -> None:
    client, admin = app_parts
    page = client.get("/login?next=/web/study/1.2")
    assert page.status_code == 200 and 'name="token"' in page.text and 'value="/web/study/1.2"' in page.text
    answer = login(client, admin)
    assert answer.status_code == 303 and answer.headers["location"] == "/web/study/1.2"
    cookies = set_cookie_headers(answer)
    session = cookies[SESSION_COOKIE].lower()
    assert "httponly" in session and "samesite=strict" in session and "path=/" in session
    assert "max-age=43200" in session and "secure" not in session  # plain HTTP here
    csrf = cookies[CSRF_COOKIE].lower()
    assert "httponly" not in csrf and "samesite=strict" in csrf
    assert client.cookies[CSRF_COOKIE] == csrf_token(admin)


def test_login_refuses_bad_tokens_and_share_tokens(app_parts: tuple[TestClient, str]) -> None:
    client, admin = app_parts
    answer = login(client, "dcat_not-a-token")
    assert answer.status_code == 401 and "unknown, revoked or expired" in answer.text
    assert "set-cookie" not in answer.headers
    share = client.post(
        f"/studies/{CT_STUDY}/shares", json={}, headers={"Authorization": f"Bearer {admin}"}
    ).json()
    answer = login(client, share["token"])
    assert answer.status_code == 401 and "share-link token" in answer.text
    forged = client.post(
        "/login",
        content=f"token={admin}".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": "https://evil.example"},
        follow_redirects=False,
    )
    assert forged.status_code == 403 and "set-cookie" not in forged.headers


def test_cookie_requests_are_authenticated_and_writes_need_the_csrf_token(
    app_parts: tuple[TestClient, str],
) -> None:
    client, admin = app_parts
    assert client.get("/studies").status_code == 401
    login(client, admin)
    assert len(client.get("/studies").json()) == 2
    path = f"/studies/{CT_STUDY}/labels"
    body = {"tags": ["teaching"]}
    missing = client.put(path, json=body)
    assert missing.status_code == 403 and "X-CSRF-Token" in missing.json()["message"]
    assert client.put(path, json=body, headers={"X-CSRF-Token": "0" * 40}).status_code == 403
    token = client.cookies[CSRF_COOKIE]
    foreign = client.put(path, json=body, headers={"X-CSRF-Token": token, "Origin": "https://evil.example"})
    assert foreign.status_code == 403 and "another origin" in foreign.json()["message"]
    assert client.put(path, json=body, headers={"X-CSRF-Token": token, "Origin": BASE}).status_code == 200
    assert client.put(path, json=body, headers={"X-CSRF-Token": token}).status_code == 200  # no Origin sent
    # A bearer request is judged by its header alone: no CSRF token, any Origin, cookies ignored.
    bearer = client.put(
        path, json=body, headers={"Authorization": f"Bearer {admin}", "Origin": "https://elsewhere.example"}
    )
    assert bearer.status_code == 200
    assert client.get("/studies", headers={"Authorization": "Bearer dcat_wrong"}).status_code == 401


def test_logout_clears_the_cookies(app_parts: tuple[TestClient, str]) -> None:
    client, admin = app_parts
    login(client, admin)
    answer = client.post("/logout", headers={"Origin": BASE}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/login"
    cleared = set_cookie_headers(answer)
    assert {SESSION_COOKIE, CSRF_COOKIE, SHARE_COOKIE} <= set(cleared)
    assert all("max-age=0" in value.lower() for value in cleared.values())
    assert client.get("/studies").status_code == 401


def test_next_never_leaves_the_service() -> None:
    assert safe_next("/web/study/1.2?x=1") == "/web/study/1.2?x=1"
    for target in (
        "//evil.example/x",
        "https://evil.example",
        "/\\evil.example",
        "javascript:alert(1)",
        "",
        None,
    ):
        assert safe_next(target) == "/"


def test_share_link_in_a_browser_opens_the_viewer_with_a_cookie(app_parts: tuple[TestClient, str]) -> None:
    client, admin = app_parts
    share = client.post(
        f"/studies/{CT_STUDY}/shares",
        json={"expires_in_seconds": 600},
        headers={"Authorization": f"Bearer {admin}"},
    ).json()
    path = "/shared/" + share["token"]
    as_api = client.get(path)  # API clients still get JSON
    assert as_api.status_code == 200 and as_api.json()["study_instance_uid"] == CT_STUDY
    answer = client.get(path, headers=HTML, follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/viewer/viewer?StudyInstanceUIDs={CT_STUDY}"
    cookie = set_cookie_headers(answer)[SHARE_COOKIE].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    max_age = int(cookie.split("max-age=")[1].split(";")[0])
    assert 590 <= max_age <= 600
    # The cookie reads that study only, and writes nothing.
    assert client.get(f"/studies/{CT_STUDY}/series").status_code == 200
    assert [s["0020000D"]["Value"][0] for s in client.get("/studies").json()] == [CT_STUDY]
    assert client.get(f"/studies/{MR_STUDY}/series").status_code == 403
    assert (
        client.delete(
            f"/studies/{CT_STUDY}", headers={"X-CSRF-Token": csrf_token(share["token"])}
        ).status_code
        == 403
    )
    # A session cookie, when there is one, is the credential (a signed-in user keeps their access).
    login(client, admin)
    assert len(client.get("/studies").json()) == 2


def test_expired_unknown_and_revoked_links_are_readable_pages(app_parts: tuple[TestClient, str]) -> None:
    client, admin = app_parts
    auth = {"Authorization": f"Bearer {admin}"}
    share = client.post(f"/studies/{CT_STUDY}/shares", json={}, headers=auth).json()
    client.delete(f"/shares/{share['id']}", headers=auth)
    for token in (share["token"], "dcsh_unknown"):
        answer = client.get("/shared/" + token, headers=HTML)
        assert answer.status_code == 401
        assert answer.headers["content-type"].startswith("text/html")
        assert "This share link no longer works" in answer.text and "set-cookie" not in answer.headers
        assert client.get("/shared/" + token).json()["error"] == "UnauthenticatedError"  # JSON for APIs


def test_pages_are_shells_with_a_strict_content_security_policy(app_parts: tuple[TestClient, str]) -> None:
    client, _ = app_parts
    for path in ("/", f"/web/study/{CT_STUDY}", "/login"):
        answer = client.get(path)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html"), path
        assert "script-src 'self'" in answer.headers["content-security-policy"]
        assert answer.headers["x-frame-options"] == "DENY"
        assert "<script>" not in answer.text  # no inline script: the policy would refuse it
    assert 'data-upload-max-bytes="536870912"' in client.get("/").text
    assert client.get("/web/study/1.2<script>").status_code == 400
    assert client.get("/web/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/web/static/../settings.py").status_code == 404


def test_viewer_not_installed_is_a_readable_page(app_parts: tuple[TestClient, str]) -> None:
    client, _ = app_parts
    answer = client.get("/viewer/viewer?StudyInstanceUIDs=1.2")
    assert answer.status_code == 404 and "dicom-cloud viewer install" in answer.text
    assert client.get("/12.bundle.def.js").status_code == 404
    assert client.get("/viewer", follow_redirects=False).headers["location"] == "/viewer/"


def test_installed_viewer_is_served_under_viewer_and_its_chunks_at_the_root(
    app_parts: tuple[TestClient, str], tmp_path: Path
) -> None:
    client, _ = app_parts
    installed = install_viewer(tmp_path / "viewer", tarball=fake_ohif(tmp_path))
    assert installed.version == "3.13.2" and installed.files == 5
    assert not (tmp_path / "viewer" / "README.md").exists()
    for path in ("/viewer/", "/viewer/viewer?StudyInstanceUIDs=1.2", "/viewer/localbasic"):
        page = client.get(path)
        assert page.status_code == 200, path
        assert 'window.PUBLIC_URL="/viewer/"' in page.text and 'src="/viewer/app.bundle.abc.js"' in page.text
        assert 'href="/viewer/manifest.json"' in page.text and "init-service-worker" not in page.text
    config = client.get("/viewer/app-config.js")
    assert "routerBasename: '/viewer'" in config.text and "demo" not in config.text
    assert "qidoRoot: root" in config.text and "window.location.origin" in config.text
    chunk = client.get("/12.bundle.def.js")
    assert chunk.status_code == 200 and chunk.text == "console.log('chunk')"
    assert "immutable" in chunk.headers["cache-control"]
    assert chunk.headers["content-type"].startswith("text/javascript")
    assert client.get("/assets/logo.svg").status_code == 200
    assert client.get("/viewer/missing.js").status_code == 404
    assert client.get("/missing.js").json()["error"] == "NotFoundError"
    assert client.get("/viewer/..%2f..%2fdata/index.sqlite").status_code == 404
    assert client.get("/healthz").status_code == 200  # routes win over the viewer's files


def test_install_keeps_the_old_viewer_when_the_new_one_is_unusable(tmp_path: Path) -> None:
    target = tmp_path / "viewer"
    install_viewer(target, tarball=fake_ohif(tmp_path))
    no_dist = npm_tarball(tmp_path / "empty.tgz", {"README.md": b"x"})
    with pytest.raises(UsageError, match="no prebuilt viewer"):
        install_viewer(target, tarball=no_dist)
    evil = npm_tarball(tmp_path / "evil.tgz", {"dist/index.html": b"x", "dist/../../../escape.js": b"x"})
    with pytest.raises(UsageError):
        install_viewer(target, tarball=evil)
    assert not (tmp_path / "escape.js").exists()
    assert json.loads((target / MARKER).read_text())["version"] == "3.13.2"
    assert (target / "12.bundle.def.js").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".viewer-")] == []


def test_install_without_npm_or_registry_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UsageError, match="npm is not installed") as missing:
        install_viewer(tmp_path / "viewer")
    assert missing.value.hint is not None and "--from" in missing.value.hint
    offline = tmp_path / "npm"
    offline.write_text(
        "#!/bin/sh\necho 'npm error code ENOTFOUND' >&2\n"
        "echo 'npm error request to https://registry.npmjs.org/@ohif%2fapp failed,"
        " reason: getaddrinfo ENOTFOUND' >&2\n"
        "exit 1\n"
    )
    offline.chmod(0o755)
    with pytest.raises(NetworkError, match="could not reach its registry") as unreachable:
        install_viewer(tmp_path / "viewer", npm=str(offline))
    assert "getaddrinfo ENOTFOUND" in str(unreachable.value)
    assert not (tmp_path / "viewer").exists()


def test_viewer_install_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tarball = fake_ohif(tmp_path)
    assert (
        main(["viewer", "install", "--from", str(tarball), "--data-dir", str(tmp_path / "d"), "--json"]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["path"] == str(tmp_path / "d" / "viewer") and printed["version"] == "3.13.2"
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o700  # the data directory is owner-only
    assert (
        main(
            [
                "viewer",
                "install",
                "--from",
                str(tmp_path / "nothing.tgz"),
                "--viewer-dir",
                str(tmp_path / "v"),
            ]
        )
        == 2
    )
    assert "not a readable npm package tarball" in capsys.readouterr().err
