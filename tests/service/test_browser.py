"""The page in a real headless Chromium (Debian's, driven by Playwright) against a live gateway process.

Register a support set by dropping real encoded clips, classify a query with explain, and check what
is on the page: score bars, the heat map and the alignment drawn over it. Screenshots go to the test's
tmp folder, and to `docs/images/ui-*.png` when `FSAR_UPDATE_SCREENSHOTS=1`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from service.settings import Settings
from tests.service.live_gateway import LiveGateway
from tests.service.test_api import LABELS, class_video

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]
KEY = "0123456789abcdef0123"
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
expect = sync_api.expect


def chromium_path() -> str | None:
    """Debian's Chromium (Playwright's own browser download is not used)."""
    for candidate in (os.environ.get("FSAR_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run does it as root)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    settings = Settings(backbone="fsar-tiny", pretrained=None, num_frames=4, demo=True, log_level="warning",
                        api_keys=f"demo:{KEY}")
    with LiveGateway(settings, tmp_path_factory.mktemp("browser-gateway")) as live:
        yield live


def clips(folder: Path) -> tuple[list[Path], Path]:
    """Support clips named after their class (3 classes x 2 shots) and one query clip, real H.264 mp4s."""
    folder.mkdir(parents=True, exist_ok=True)
    support = []
    for c in range(3):
        for s in range(2):
            path = folder / f"{LABELS[c].replace(' ', '_')}_{s}.mp4"
            path.write_bytes(class_video(c, s))
            support.append(path)
    query = folder / "query.mp4"
    query.write_bytes(class_video(1, 7))
    return support, query


def save(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"ui-{name}.png"), full_page=True)
    if os.environ.get("FSAR_UPDATE_SCREENSHOTS") == "1":
        target = REPO / "docs" / "images" / f"ui-{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target), full_page=True)


def test_register_classify_and_explain_in_a_browser(browser, gateway, tmp_path: Path) -> None:
    support, query = clips(tmp_path / "clips")
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" and "401" not in msg.text else None)
    page.on("pageerror", lambda err: problems.append(str(err)))
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))

    page.goto(gateway.url + "/")  # a browser on / lands on the page
    assert page.url == gateway.url + "/ui"
    # The gateway has API keys: the page asks for one and keeps it in sessionStorage, never in the URL.
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", KEY)
    page.click("#key-save")
    page.wait_for_selector("#model-line:has-text('demo model')")
    assert page.evaluate("sessionStorage.getItem('fsar.apiKey')") == KEY
    assert KEY not in page.url

    # Register: drop the clips (the file input is the drop zone's fallback; both call one handler).
    page.set_input_files("#support-files", [str(p) for p in support])
    expect(page.locator("#clip-list .thumbs img")).to_have_count(6 * 4, timeout=60_000)
    labels = page.eval_on_selector_all(".clip-label", "inputs => inputs.map(i => i.value)")
    assert labels == [LABELS[c] for c in range(3) for _ in range(2)]
    page.fill("#set-name", "plant floor")
    save(page, tmp_path, "register")
    page.click("#register")
    page.wait_for_selector("#set-list li[data-set]")
    assert "plant floor" in page.inner_text("#set-list")

    # Classify few-shot with explain.
    page.set_input_files("#query-file", str(query))
    page.click("#classify")
    page.wait_for_selector("#explanation:not([hidden]) #heatmap rect.cell")
    bars = page.eval_on_selector_all(".score .bar", "bars => bars.map(b => b.getBoundingClientRect().width)")
    assert len(bars) == 3 and bars == sorted(bars, reverse=True) and bars[0] > 0
    assert page.locator("#scores .score").first.get_attribute("data-label") in LABELS
    assert page.locator("#heatmap rect.cell").count() == 4 * 4
    assert page.locator("#heatmap image.query-thumb").count() == 4
    assert page.locator("#heatmap g.path.forward polyline").count() == 1  # the OTAM path is drawn
    assert int(page.locator("#heatmap g.path.forward").get_attribute("data-pairs")) >= 4
    assert page.locator("#class-tabs .tab").count() == 3
    save(page, tmp_path, "explanation")

    # Another explained class, then zero-shot (no prototypes: thumbnails only, no path).
    page.locator("#class-tabs .tab").nth(1).click()
    assert "active" in page.locator("#class-tabs .tab").nth(1).get_attribute("class")
    page.check("input[name=mode][value=zero-shot]")
    page.fill("#labels", "opening a valve\nwaving a hand")
    page.click("#classify")
    expect(page.locator("#scores .score")).to_have_count(2)
    page.wait_for_selector("#heatmap image.query-thumb")
    assert page.locator("#heatmap rect.cell").count() == 0

    # Delete the set.
    page.click("#set-list button[data-set]")
    page.wait_for_selector("#no-sets:not([hidden])")

    assert not problems, problems
    assert all(url.startswith(gateway.url) or url.startswith("data:") for url in requests), requests
    assert not any(KEY in url for url in requests)
    context.close()
