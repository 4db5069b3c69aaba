"""The web page and the OHIF viewer in a real browser: Debian's headless Chromium driven by
Playwright (never Playwright's own browser download), against the service under uvicorn.

One service and one browser for the module (starting Chromium and OHIF costs seconds). The OHIF
files come from ``scripts/install-test-servers`` (``dicom-cloud viewer install`` into
``.servers/ohif``; ``DICOM_CLOUD_TEST_VIEWER_DIR`` overrides). Screenshots are kept in
``test-artifacts/browser/`` at the top of the repository (gitignored).
"""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from playwright.sync_api import expect
from pydicom.data import get_testdata_file

from dicom_cloud.service.settings import ServiceSettings
from live_service import LiveService, start_service

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "browser"
CT = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
MR = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
#: JPEG baseline (1.2.840.10008.1.2.4.50), RGB.
JPEG = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))  # type: ignore[arg-type]
#: WebGL in headless Chromium without a GPU (docs: shared/reference on OHIF).
CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
VIEWPORT_TIMEOUT = 60.0


def viewer_dir() -> Path:
    import os

    configured = os.environ.get("DICOM_CLOUD_TEST_VIEWER_DIR")
    path = Path(configured) if configured else REPO / ".servers" / "ohif"
    if not (path / "index.html").is_file():
        pytest.fail(f"the OHIF viewer is not installed in {path}: run scripts/install-test-servers")
    return path


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed: run scripts/install-test-servers (apt-get install chromium)")
    return found


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    data = tmp_path_factory.mktemp("web")
    settings = ServiceSettings(data_dir=data, viewer_dir=viewer_dir(), bootstrap_admin=True)
    service = start_service(settings)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    # The pages' Content-Security-Policy stays on: Playwright's string predicates
    # (wait_for_function) would need 'unsafe-eval', so the tests use locators and expect().
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def api(web: LiveService) -> httpx.Client:
    return httpx.Client(base_url=web.url, headers={"Authorization": f"Bearer {web.admin_token}"}, timeout=30)


def stored(web: LiveService, *paths: Path) -> None:
    """The files are in the archive (STOW-RS; the same bytes again are a no-op), whichever test
    ran first."""
    parts = b"".join(
        b"--B\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes() + b"\r\n" for path in paths
    )
    with api(web) as client:
        answer = client.post(
            "/studies",
            content=parts + b"--B--\r\n",
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'},
        )
    assert answer.status_code == 200, answer.text


def study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def signed_in(browser: Any, web: LiveService) -> Any:
    """A browser context signed in through the login page."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(web.url + "/")
    page.wait_for_url("**/login?next=*")
    page.fill("#token", str(web.admin_token))
    page.click("#sign-in")
    page.wait_for_url(web.url + "/")
    return context, page


#: While the viewport is photographed, everything but its canvas is invisible: OHIF's tooltips,
#: toasts and banners drawn over it must not count as an image.
_ONLY_THE_VIEWPORT = (
    "body * { visibility: hidden !important; } canvas[data-probe] { visibility: visible !important; }"
)


def shows_an_image(page: Any, name: str) -> dict[str, float]:
    """Waits until OHIF's viewport (its largest canvas) shows an image; keeps the screenshot.
    The statistics are of the canvas's own pixels: a blank or black canvas is one flat colour."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + VIEWPORT_TIMEOUT
    stats: dict[str, float] = {}
    while time.monotonic() < deadline:
        found = page.evaluate(
            """() => {
                let best = null;
                for (const canvas of document.querySelectorAll('canvas')) {
                    canvas.removeAttribute('data-probe');
                    const box = canvas.getBoundingClientRect();
                    const area = box.width * box.height;
                    if (area > 100 * 100 && (!best || area > best.area)) best = {canvas, area};
                }
                if (best) best.canvas.setAttribute('data-probe', '1');
                return best !== null;
            }"""
        )
        if found:
            shot = page.locator("canvas[data-probe]").screenshot(
                path=str(ARTIFACTS / f"{name}.png"), style=_ONLY_THE_VIEWPORT
            )
            pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=np.float64)
            stats = {
                "std": float(pixels.std()),
                "mean": float(pixels.mean()),
                "distinct": float(len(np.unique(pixels))),
                "lit": float((pixels > 16).mean()),
            }
            if stats["std"] > 10 and stats["distinct"] > 32 and stats["lit"] > 0.05:
                page.screenshot(path=str(ARTIFACTS / f"{name}-page.png"))
                return stats
        page.wait_for_timeout(1000)
    page.screenshot(path=str(ARTIFACTS / f"{name}-page.png"))
    raise AssertionError(f"the viewport never showed an image ({name}): last pixel statistics {stats}")


def test_login_upload_list_and_view_in_ohif(web: LiveService, browser: Any, tmp_path: Path) -> None:
    context, page = signed_in(browser, web)
    # A folder, as an admin would pick one: sub-folders, DICOM files and some that are not.
    folder = tmp_path / "export"
    (folder / "ct").mkdir(parents=True)
    (folder / "other").mkdir()
    shutil.copy(CT, folder / "ct" / CT.name)
    shutil.copy(MR, folder / "other" / MR.name)
    shutil.copy(JPEG, folder / "other" / JPEG.name)
    (folder / "notes.txt").write_text("not a DICOM file")
    (folder / "other" / "empty.dcm").write_bytes(b"")
    page.set_input_files("#folder-input", str(folder))
    page.wait_for_selector("#upload-summary[data-done='1']", timeout=60_000)
    assert page.text_content("#upload-summary") == "3 stored, 2 refused, of 5 files"
    names = {row.get_attribute("data-name") for row in page.locator("#upload-files li").all()}
    assert f"export/ct/{CT.name}" in names and "export/other/empty.dcm" in names
    refused = {
        row.locator("td").nth(0).text_content(): row.locator("td").nth(1).text_content()
        for row in page.locator("#refused-rows tr").all()
    }
    assert set(refused) == {"export/notes.txt", "export/other/empty.dcm"}
    assert refused["export/other/empty.dcm"] == "empty file"
    assert "DICOM" in str(refused["export/notes.txt"]), refused
    page.screenshot(path=str(ARTIFACTS / "upload.png"), full_page=True)
    # The studies are listed (the page reloads its list after an upload).
    for path in (CT, MR, JPEG):
        page.wait_for_selector(f"tr[data-study='{study_uid(path)}']")
    rows = page.locator("#study-rows tr")
    page.fill("input[name=from]", "2004-01-01")
    page.fill("input[name=to]", "2004-12-31")
    page.click("#search button[type=submit]")
    expect(rows).to_have_count(2)  # CT and MR of 2004, not the 2017 JPEG
    page.fill("input[name=patient]", "1CT")  # a part of the patient ID
    page.click("#search button[type=submit]")
    expect(rows).to_have_count(1)
    page.fill("input[name=patient]", "")
    page.fill("input[name=modality]", "CT")
    page.click("#search button[type=submit]")
    expect(rows).to_have_count(1)
    assert page.locator(f"#study-rows tr[data-study='{study_uid(CT)}']").count() == 1

    page.click(f"tr[data-study='{study_uid(CT)}'] a.button")  # "Open in viewer"
    page.wait_for_url("**/viewer/viewer?StudyInstanceUIDs=*")
    stats = shows_an_image(page, "ct-in-ohif")
    assert stats["std"] > 10

    page.goto(web.url + "/")
    page.click("#sign-out")
    page.wait_for_url(web.url + "/login")
    left = {cookie["name"] for cookie in context.cookies()}
    assert not left & {"dc_session", "dc_csrf", "dc_share"}, left  # (OHIF keeps its language)
    page.goto(web.url + "/")
    page.wait_for_url("**/login?next=*")  # the page's API calls are 401 again
    context.close()


def test_jpeg_instance_in_ohif(web: LiveService, browser: Any) -> None:
    stored(web, JPEG)
    context, page = signed_in(browser, web)
    page.goto(f"{web.url}/viewer/viewer?StudyInstanceUIDs={study_uid(JPEG)}")
    shows_an_image(page, "jpeg-in-ohif")
    context.close()


def test_study_page_thumbnails_shares_and_delete(web: LiveService, browser: Any) -> None:
    stored(web, MR)
    context, page = signed_in(browser, web)
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    uid = study_uid(MR)
    page.goto(f"{web.url}/web/study/{uid}")
    thumbnail = page.locator("#series figure img").first
    thumbnail.wait_for()
    expect(thumbnail).to_have_js_property("complete", True)
    assert thumbnail.evaluate("image => image.naturalWidth") > 0  # decoded: not the broken-image icon
    # Labels saved through the page (a cookie write with its CSRF token), then searched by.
    page.fill("#labels input[name=tags]", "teaching, follow-up")
    page.click("#labels button[type=submit]")
    expect(page.locator("#study-status")).to_have_text("Labels saved.")
    page.goto(web.url + "/")
    page.fill("input[name=label]", "teaching")
    page.click("#search button[type=submit]")
    expect(page.locator("#study-rows tr")).to_have_count(1)
    page.click(f"tr[data-study='{uid}'] td a >> nth=0")
    page.wait_for_url(f"**/web/study/{uid}")
    expect(page.locator("#labels input[name=tags]")).to_have_value("follow-up, teaching")  # kept sorted
    page.click("#create-share")
    page.wait_for_selector("#new-share:not(.hidden)")
    url = page.input_value("#share-url")
    assert url.startswith(web.url + "/shared/")
    page.click("#copy-share")
    page.wait_for_selector("#copy-status:text('Copied.')")
    assert page.evaluate("navigator.clipboard.readText()") == url
    row = page.locator("#share-rows tr").first
    assert row.locator("td").nth(3).text_content() == "active"
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button").click()
    page.wait_for_selector("#share-rows tr td:text('revoked')")
    with httpx.Client() as anonymous:  # the revoked link is refused at once
        assert anonymous.get(url, headers={"Accept": "text/html"}).status_code == 401

    page.once("dialog", lambda dialog: dialog.dismiss())  # cancelled: nothing happens
    page.click("#delete-study")
    page.wait_for_timeout(300)
    assert page.url.endswith(f"/web/study/{uid}")
    messages: list[str] = []
    page.once("dialog", lambda dialog: (messages.append(dialog.message), dialog.accept()))
    page.click("#delete-study")
    page.wait_for_url(web.url + "/")
    assert "cannot be undone" in messages[0]
    with api(web) as client:
        assert client.get("/studies", params={"StudyInstanceUID": uid}).json() == []
    context.close()


def test_share_link_opens_the_study_read_only_without_login(web: LiveService, browser: Any) -> None:
    stored(web, CT, JPEG)
    uid = study_uid(CT)
    with api(web) as client:
        share = client.post(f"/studies/{uid}/shares", json={"expires_in_seconds": 3600}).json()
        brief = client.post(f"/studies/{uid}/shares", json={"expires_in_seconds": 1}).json()
    context = browser.new_context(viewport={"width": 1280, "height": 800})  # no session
    page = context.new_page()
    # The link is clicked on another site (as in a webmail): localhost is not 127.0.0.1's site, so
    # this checks that the SameSite=Strict cookie set by that navigation serves the viewer.
    page.goto(web.url.replace("127.0.0.1", "localhost") + "/login")
    page.evaluate(
        "url => { const a = document.createElement('a'); a.href = url; a.id = 'mail-link';"
        " a.textContent = 'shared study'; document.body.append(a); }",
        share["url"],
    )
    page.click("#mail-link")
    page.wait_for_url(f"**/viewer/viewer?StudyInstanceUIDs={uid}")
    assert page.url.startswith(web.url)
    shows_an_image(page, "share-link-in-ohif")
    # Read-only, this study only: a write and another study are refused.
    outcome = page.evaluate(
        """async ([uid, other]) => {
            const del = await fetch('/studies/' + uid, {method: 'DELETE'});
            const elsewhere = await fetch('/studies/' + other + '/series');
            const json = {headers: {Accept: 'application/dicom+json'}};
            const listed = await (await fetch('/studies', json)).json();
            return [del.status, elsewhere.status, listed.length];
        }""",
        [uid, study_uid(JPEG)],
    )
    assert outcome == [403, 403, 1]
    context.close()

    time.sleep(1.5)  # the one-second link has expired
    context = browser.new_context()
    page = context.new_page()
    answer = page.goto(brief["url"])
    assert answer is not None and answer.status == 401
    assert answer.headers["content-type"].startswith("text/html")
    assert "This share link no longer works" in page.text_content("h1")
    assert "expired" in page.text_content("p.message")
    page.screenshot(path=str(ARTIFACTS / "expired-share-link.png"))
    context.close()
