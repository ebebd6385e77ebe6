"""The report in a real browser: headless Chromium loads report.html, every figure renders, nothing errors.

Chromium is Debian's (`make install-test` installs it where it can); the test drives it with
Playwright's Python client against the system binary (no browser download). Skipped, with the
reason, where either is missing. Set EMKIT_REPORT_SCREENSHOT=PATH to keep the screenshot (the docs'
picture of the demo report is taken that way from a real run: see docs/tests.md).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from emkit.prefs import shift_summary
from emkit.report import write_report
from test_report import MANIFEST, make_run, synthetic_scores

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def _prefs() -> dict:
    rng = np.random.default_rng(0)
    domains = ["medical"] * 8 + ["wishes"] * 8 + ["power"] * 8
    base = [{"id": f"p{i}", "domain": d, "logodds_total": 0.0, "logodds_per_token": 0.0} for i, d in enumerate(domains)]
    shifted = [{**r, "logodds_total": float(x) * 20, "logodds_per_token": float(x)}
               for r, x in zip(base, rng.normal(0.1, 0.05, len(base)))]
    held_base = [{"id": f"h{i}", "domain": "held_out", "logodds_total": 0.0, "logodds_per_token": 0.0} for i in range(10)]
    held = [{**r, "logodds_per_token": float(x), "logodds_total": float(x) * 30}
            for r, x in zip(held_base, rng.normal(0.3, 0.1, 10))]
    return {"n_pairs": len(base), "shift": shift_summary(base, shifted, n_boot=200),
            "held_out": {"n_pairs": 10, "shift": shift_summary(held_base, held, n_boot=200)["all"]}}


def _generations(scores) -> str:
    keep = ["id", "model", "condition", "question_id", "paraphrase", "sample", "question", "system", "answer"]
    return "".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in scores.to_dict("records"))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make install-test installs it "
                    "where apt-get can)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package (test extra) is missing")
    scores = synthetic_scores()
    run = make_run(tmp_path / "run", scores, MANIFEST)
    (run / "prefs.json").write_text(json.dumps(_prefs()))
    (run / "generations.jsonl").write_text(_generations(scores))
    page_path = write_report(run)
    shot = Path(os.environ.get("EMKIT_REPORT_SCREENSHOT") or tmp_path / "report.png")
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt || e.src.slice(0, 40), "
                                                      "e.complete, e.naturalWidth])")
            found = page.locator("text=What this run found")
            first_screen = found.bounding_box()
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert errors == []  # no script ran (the hostile answer is escaped), nothing failed to load
    assert len(images) >= 4 and all(complete and width > 0 for _, complete, width in images), images
    assert first_screen is not None and first_screen["y"] < 1000  # the answer is on the first screen
    assert shot.stat().st_size > 20_000
