"""The report in a real browser: headless Chromium loads report.html, every figure renders, nothing errors.

Chromium is Debian's (`make install-test` installs it where it can); the test drives it with
Playwright's Python client against the system binary (no browser download). Skipped, with the
reason, where either is missing. `emkit report RUN --screenshot PATH` takes the docs' picture of a
real demo report the same way (emkit.stages.report.browser).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_report import MANIFEST, make_run, synthetic_scores

from emkit.preference import shift_summary
from emkit.stages.report import write_report
from emkit.stages.report.browser import check_in_browser, chromium_path


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


@pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed (make install-test installs "
                    "it where apt-get can)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    pytest.importorskip("playwright.sync_api", reason="the playwright package (test extra) is missing")
    scores = synthetic_scores()
    run = make_run(tmp_path / "run", scores, MANIFEST)
    (run / "prefs.json").write_text(json.dumps(_prefs()))
    (run / "generations.jsonl").write_text(_generations(scores))
    page = write_report(run)
    seen = check_in_browser(page, Path(os.environ.get("EMKIT_REPORT_SCREENSHOT") or tmp_path / "report.png"))
    assert seen.errors == []  # no script ran (the hostile answer is escaped), nothing failed to load
    assert len(seen.images) >= 4 and seen.ok, seen.images
    assert seen.first_screen_y is not None and seen.first_screen_y < 1000  # the answer is on the first screen
    assert seen.screenshot is not None and seen.screenshot.stat().st_size > 20_000


@pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed")
def test_report_command_takes_a_screenshot(tmp_path: Path) -> None:
    pytest.importorskip("playwright.sync_api", reason="the playwright package (test extra) is missing")
    from conftest import run_cli

    run = make_run(tmp_path / "run", synthetic_scores(), MANIFEST)
    proc = run_cli("report", str(run), "--screenshot", str(tmp_path / "shot.png"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "shot.png").stat().st_size > 20_000 and "screenshot:" in proc.stdout
