"""A report in a real browser: headless Chromium loads it, every figure is checked, a screenshot is taken.

Uses Playwright's Python client (the `playwright` package of the test extra) against the system's
Chromium (`chromium`, e.g. Debian's), so nothing is downloaded. Used by the report's browser test
and by `emkit report RUN --screenshot PATH` (the docs' picture of the demo report is taken that way).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from emkit.core.errors import EmkitError

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FIRST_SCREEN = "What this run found"


@dataclass
class BrowserCheck:
    """What the browser saw: each image (label, loaded, width in pixels), errors, where the first box sits."""

    images: list[tuple[str, bool, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    first_screen_y: float | None = None
    screenshot: Path | None = None

    @property
    def ok(self) -> bool:
        """Every image loaded and nothing failed."""
        return not self.errors and all(loaded and width > 0 for _, loaded, width in self.images)


def chromium_path() -> str | None:
    """The system's Chromium, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def check_in_browser(page: Path, screenshot: Path | None = None, *, width: int = 1280,
                     height: int = 1000) -> BrowserCheck:
    """Open `page` in headless Chromium; report images, console and page errors; optionally save a screenshot."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise EmkitError("the browser check needs the playwright package (pip install playwright; emkit's test "
                         "extra has it)") from None
    executable = chromium_path()
    if executable is None:
        raise EmkitError("no Chromium found (install Debian's chromium, e.g. apt-get install chromium)")
    result = BrowserCheck()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": width, "height": height})
            tab.on("console", lambda m: result.errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: result.errors.append(str(e)))
            tab.goto(Path(page).resolve().as_uri(), wait_until="load")
            result.images = [tuple(x) for x in tab.eval_on_selector_all(  # type: ignore[misc]
                "img", "els => els.map(e => [e.alt || e.src.slice(0, 60), e.complete, e.naturalWidth])")]
            box = tab.locator(f"text={FIRST_SCREEN}").first
            if box.count():
                bounds = box.bounding_box()
                result.first_screen_y = bounds["y"] if bounds else None
            if screenshot is not None:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                tab.screenshot(path=str(screenshot))
                result.screenshot = Path(screenshot)
        finally:
            browser.close()
    return result
