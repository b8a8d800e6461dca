"""The page's files and how they are served: CSP, no external resources, no inline code, the redirect
from `/`, the open page and the keyed `POST /thumbnails` when API keys are configured."""
from __future__ import annotations

import base64
import re
from importlib import resources

import pytest

from service.api.routes_ui import CONTENT_SECURITY_POLICY, UI_FILES, prefers_html
from tests.service.test_api import class_video, running, tiny_settings

pytestmark = pytest.mark.timeout(120)
KEY = "tenant-a:0123456789abcdef0123"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


def ui_text(name: str) -> str:
    return resources.files("service.ui").joinpath(name).read_text()


def test_page_files_load_nothing_from_elsewhere_and_inline_nothing() -> None:
    for name in {file for file, _ in UI_FILES.values()}:
        text = ui_text(name)
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I) or name == "app.js", name
        assert "cdn" not in text.lower() and "@import" not in text
    html = ui_text("index.html")
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script"
    assert " style=" not in html and "<style" not in html and not re.search(r"\son[a-z]+=", html)
    script = ui_text("app.js")
    assert "localStorage" not in script and "sessionStorage" in script  # the key stays in the tab
    assert "fetch(path" in script and "http" not in script.replace("http://www.w3.org/2000/svg", "")


def test_prefers_html() -> None:
    assert prefers_html(BROWSER_ACCEPT)
    assert not prefers_html("application/json")
    assert not prefers_html("*/*")
    assert not prefers_html("")
    assert not prefers_html("application/json, text/html;q=0.5")


async def test_page_served_with_csp_and_browsers_redirected() -> None:
    async with running(tiny_settings(decode_isolation="thread")) as (client, _):
        for path, (_, media_type) in UI_FILES.items():
            response = await client.get(path)
            assert response.status_code == 200 and response.headers["content-type"] == media_type
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert response.headers["x-content-type-options"] == "nosniff"
        assert "default-src 'none'" in CONTENT_SECURITY_POLICY and "script-src 'self';" in CONTENT_SECURITY_POLICY
        redirect = await client.get("/", headers={"accept": BROWSER_ACCEPT})
        assert redirect.status_code == 307 and redirect.headers["location"] == "/ui"
        json_root = await client.get("/", headers={"accept": "application/json"})
        assert json_root.status_code == 404 and json_root.json()["error"]["code"] == "not_found"
        assert (await client.get("/docs")).status_code == 200
        assert (await client.head("/ui")).status_code == 200

        response = await client.post("/thumbnails", files=[("video", ("q.mp4", class_video(0), "video/mp4"))])
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["num_frames"] == 4 and body["size"] == 64 and len(body["thumbnails"]) == 4
        assert base64.b64decode(body["thumbnails"][0])[:2] == b"\xff\xd8"
        bad = await client.post("/thumbnails", files=[("video", ("q.mp4", b"not a video", "video/mp4"))])
        assert bad.status_code == 415


async def test_with_api_keys_the_page_loads_and_the_api_asks_for_a_key() -> None:
    async with running(tiny_settings(decode_isolation="thread", api_keys=KEY)) as (client, _):
        page = await client.get("/ui")
        assert page.status_code == 200 and "API key" in page.text
        assert (await client.get("/ui/app.js")).status_code == 200
        files = [("video", ("q.mp4", class_video(0), "video/mp4"))]
        assert (await client.post("/thumbnails", files=files)).status_code == 401
        assert (await client.get("/model")).status_code == 401
        keyed = await client.post("/thumbnails", files=files, headers={"X-API-Key": KEY.split(":")[1]})
        assert keyed.status_code == 200
