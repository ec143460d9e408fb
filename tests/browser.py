"""A real browser's view of a report page: Debian's chromium driven by Playwright, no network.

    check = check_page(tmp_path / "report.html", tmp_path / "report.png")   # one launch per call
    assert check.images and check.broken == [] and check.external_requests == [] and not_blank(check.element_png)

The browser is Debian's chromium (scripts/test.sh installs it), not Playwright's download: the machines' network is
closed. A missing browser fails the test rather than skipping it: a skipped check is a check that cannot fail.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageStat
from playwright.sync_api import Request, Route, sync_playwright

# no GPU, no sandbox (containers), and none of chromium's own traffic, which floods a closed network with retries
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# the page, and the images it carries inline; anything else is a reference to the outside
LOCAL_SCHEMES = ("data:", "file:", "about:")
_BROKEN_IMAGES = """() => Array.from(document.images)
    .filter(img => !img.complete || img.naturalWidth === 0)
    .map(img => img.title || img.alt || img.getAttribute('src').slice(0, 60))"""


@dataclass(frozen=True)
class PageCheck:
    images: int  # <img> elements on the page
    broken: list[str]  # images that did not load: their title, alt or the start of their src
    external_requests: list[str]  # URLs the page asked for that are not data: or file: (all blocked)
    dialogs: list[str]  # alert/confirm messages: a script the page should not have run (e.g. injected markup)
    screenshot: Path  # the whole page
    element_png: bytes  # the element of `selector`
    title: str


def chromium_path() -> str:
    """$ELITE_CHROMIUM, else Debian's /usr/bin/chromium; fails the test when there is none."""
    path = os.environ.get("ELITE_CHROMIUM", "/usr/bin/chromium")
    if not os.access(path, os.X_OK):
        pytest.fail(f"no chromium at {path}: scripts/test.sh installs Debian's (apt-get install chromium); "
                    "or set ELITE_CHROMIUM to a Chromium binary")
    return path


def check_page(html_path: Path, screenshot_path: Path, selector: str = "#contact-sheets") -> PageCheck:
    """Open `html_path` as file:// in headless chromium, wait for it to load, and report what a reader would
    miss: broken images, requests leaving the file (aborted, so a bad page fails fast), script dialogs."""
    external: list[str] = []
    dialogs: list[str] = []

    def block(route: Route, request: Request) -> None:
        external.append(request.url)
        route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route(lambda url: not url.startswith(LOCAL_SCHEMES), block)
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(html_path.resolve().as_uri(), wait_until="load")
            broken = page.evaluate(_BROKEN_IMAGES)
            images = page.evaluate("document.images.length")
            page.screenshot(path=str(screenshot_path), full_page=True)
            element_png = page.locator(selector).screenshot()
            title = page.title()
        finally:
            browser.close()
    return PageCheck(images, broken, external, dialogs, screenshot_path, element_png, title)


def not_blank(png: bytes, colours: int = 32, spread: float = 8.0) -> bool:
    """Whether a picture has real content: more than `colours` distinct colours and a pixel standard deviation
    above `spread` (a white or grey area, or one flat box, has neither)."""
    with Image.open(io.BytesIO(png)) as opened:
        rgb = opened.convert("RGB")
    distinct = rgb.getcolors(maxcolors=colours)  # None: more than `colours`
    deviation = sum(ImageStat.Stat(rgb).stddev) / 3
    return distinct is None and deviation > spread
