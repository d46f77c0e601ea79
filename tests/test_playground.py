"""The playground at / in a real browser: Debian's Chromium, headless, driven by Playwright (no browser download)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.helpers import ROOT, ImageServer, ServerProcess, b64, encode, smooth_image

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
    server: ServerProcess, page: Page, page_errors: list[str], tmp_path: Path
) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.add_init_script(RECORD_PROGRESS)
    page.goto(f"{server.url}/")
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
    body = httpx.get(f"{server.url}/v2/requests/{request_id}", timeout=30).json()
    assert body["parameters"]["steps"] == 20 and body["parameters"]["right"] == right
    assert f"seed {body['seeds'][0]}" in caption

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    outside = [url for url in requested if not url.startswith(f"{server.url}/") and not url.startswith("data:")]
    assert outside == []
    assert page_errors == []


def test_drop_url_key_cancel_and_api_errors_on_the_page(server: ServerProcess, page: Page, images: ImageServer) -> None:
    page.goto(f"{server.url}/")
    # Dropped on the canvas: a file made in the page, as a drag from the desktop would bring it.
    page.evaluate(
        """data => {
          const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
          const transfer = new DataTransfer();
          transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
          const drop = new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true });
          document.getElementById("drop").dispatchEvent(drop);
        }""",
        b64(encode(smooth_image(80, 48))),
    )
    page.wait_for_function("document.getElementById('size').textContent.startsWith('input 80×48 ')")
    # By URL: shown here, and sent to the server as given.
    url = images.add("/playground.png", encode(smooth_image(WIDTH, HEIGHT)))
    page.fill("#url", url)
    page.click("#use-url")
    page.wait_for_function(f"document.getElementById('size').textContent.startsWith('input {WIDTH}×{HEIGHT} ')")
    # The key goes in the x-api-key header of every API call (this server has no keys: it ignores it).
    page.fill("#api-key", KEY)
    page.fill("#prompt", "a quiet beach")
    page.fill("#steps", "100")
    with page.expect_request(lambda r: r.method == "POST") as submitted, page.expect_request("**/events") as events:
        page.click("#submit")
    body = submitted.value.post_data_json
    assert body["input_image"] == url and body["steps"] == 100 and body["styles"] == "V2,Enhance,Sharp"
    sides = {side: body[side] for side in ("left", "right", "top", "bottom")}
    assert sides == {"left": 256, "right": 256, "top": 0, "bottom": 0}
    assert submitted.value.headers["x-api-key"] == KEY and events.value.headers["x-api-key"] == KEY
    # Cancelled from the page: the API's FAILED result and its error are what the page shows.
    page.click("#cancel")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert page.text_content("#error") == "cancelled"
    assert page.locator("#submit").is_enabled() and page.locator("#cancel").is_hidden()

    page.reload()
    assert page.input_value("#api-key") == KEY  # kept in this browser's localStorage
    assert page.evaluate("localStorage.getItem('beyond.apiKey')") == KEY
    page.fill("#api-key", "")
    assert page.evaluate("localStorage.getItem('beyond.apiKey')") is None
