"""The playground at / in a real browser: Debian's Chromium, headless, driven by Playwright (no browser download)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.helpers import ROOT, ServerProcess, smooth_image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "tests" / "artifacts"
KEY = "SG_cccccccccccccccc"
WIDTH, HEIGHT = 96, 64

# Every value the progress bar is given, recorded from the page itself (the job may finish between two polls).
RECORD_PROGRESS = """
document.addEventListener("DOMContentLoaded", () => {
  window.progressSeen = [];
  const bar = document.getElementById("progress");
  new MutationObserver(() => {
    if (bar.hasAttribute("value")) window.progressSeen.push(Number(bar.getAttribute("value")));
  }).observe(bar, { attributes: true, attributeFilter: ["value"] });
});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("keyed"), env={"BEYOND_API_KEYS": KEY}).start()
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture()
def page_errors(page: Page) -> list[str]:
    """Script errors, and whatever the page logs as an error (failed loads included)."""
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    return errors


def picture(folder: Path) -> Path:
    path = folder / "picture.png"
    smooth_image(WIDTH, HEIGHT).save(path)
    return path


def frame(page: Page) -> tuple[float, float, float, float]:
    """The padded area on the page, in CSS pixels: the canvas's box plus the frame the page drew."""
    box = page.locator("#canvas").bounding_box()
    assert box is not None
    x, y, w, h = (float(v) for v in page.locator("#canvas").get_attribute("data-frame").split(","))
    return box["x"] + x, box["y"] + y, w, h


def value(page: Page, selector: str) -> int:
    return int(page.input_value(selector))


def test_outpaint_from_the_playground(
    keyed_server: ServerProcess, page: Page, page_errors: list[str], tmp_path: Path
) -> None:
    server = keyed_server
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.add_init_script(RECORD_PROGRESS)
    page.goto(f"{server.url}/")
    page.fill("#api-key", KEY)
    page.wait_for_selector("#styles option")
    selected = page.eval_on_selector("#styles", "s => Array.from(s.selectedOptions, o => o.value)")
    assert selected == ["V2", "Enhance", "Sharp"]
    assert page.locator("#sampler option").count() == 18 and page.input_value("#sampler") == "dpmpp_2m_sde_gpu"
    assert page.locator("#scheduler option").count() == 6 and page.input_value("#scheduler") == "karras"

    page.set_input_files("#file", picture(tmp_path))
    page.wait_for_function("document.getElementById('canvas').dataset.frame")
    page.fill("#left", "32")
    page.fill("#bottom", "16")
    assert page.text_content("#size") == f"input {WIDTH}×{HEIGHT} → output {WIDTH + 32 + 256}×{HEIGHT + 16}"
    # Drag the right edge in, from the default 256 to about 40 pixels.
    x, y, w, h = frame(page)
    scale = w / (WIDTH + 32 + 256)
    page.mouse.move(x + w, y + h / 2)
    page.mouse.down()
    page.mouse.move(x + w - (256 - 40) * scale, y + h / 2, steps=8)
    page.mouse.up()
    right = value(page, "#right")
    assert abs(right - 40) <= 1
    width, height = WIDTH + 32 + right, HEIGHT + 16
    assert page.text_content("#size") == f"input {WIDTH}×{HEIGHT} → output {width}×{height}"

    page.fill("#prompt", "a quiet beach")
    page.fill("#steps", "20")
    page.click("#submit")
    image = page.wait_for_selector(".result img", timeout=60_000)
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=image, timeout=30_000)
    assert image.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [width, height]

    seen = page.evaluate("window.progressSeen")
    assert any(0 < p < 1 for p in seen), seen  # moved while running, fed by the events stream
    assert seen[-1] == 1
    assert page.locator("#error").is_hidden()
    caption = page.text_content(".result figcaption")
    download = page.get_attribute(".result figcaption a[download]", "href")
    assert download is not None and download.startswith(f"{server.url}/v2/requests/")
    request_id = download.split("/")[5]
    body = httpx.get(f"{server.url}/v2/requests/{request_id}", headers={"x-api-key": KEY}, timeout=30).json()
    assert body["parameters"]["steps"] == 20 and body["parameters"]["right"] == right
    assert f"seed {body['seeds'][0]}" in caption

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    outside = [url for url in requested if not url.startswith(f"{server.url}/") and not url.startswith("data:")]
    assert outside == []
    assert page_errors == []


def test_api_errors_show_on_the_page_and_the_key_stays_in_the_browser(
    keyed_server: ServerProcess, page: Page, tmp_path: Path
) -> None:
    page.goto(f"{keyed_server.url}/")
    page.set_input_files("#file", picture(tmp_path))
    page.wait_for_function("document.getElementById('canvas').dataset.frame")
    page.fill("#prompt", "a quiet beach")
    page.fill("#steps", "20")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error") == "missing API key: send it in the x-api-key header"

    page.fill("#api-key", KEY)
    page.reload()
    assert page.input_value("#api-key") == KEY  # kept in this browser's localStorage
    assert page.evaluate("localStorage.getItem('beyond.apiKey')") == KEY
    page.fill("#api-key", "")
    assert page.evaluate("localStorage.getItem('beyond.apiKey')") is None
