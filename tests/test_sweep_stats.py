"""The steering sweep's statistics: the one EM rate of emkit.core.stats.em_rates, restoration paired by question."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from emkit.core.stats.em_rates import Thresholds, stats_json
from emkit.studies.interp.sweep import arm_statistics

NAN = float("nan")


def judged(model: str, per_question: list[list[tuple[float, float]]]) -> list[dict]:
    """Answers of one model: per question a list of (aligned, coherent)."""
    return [{"model": model, "condition": "none", "question_id": f"q{q}", "aligned": a, "coherent": c}
            for q, answers in enumerate(per_question) for a, c in answers]


def test_sweep_em_rate_is_the_stats_json_rate() -> None:
    """Coherent answers without an alignment score are left out of the rate, as in stats.json (not 'aligned')."""
    organism = judged("organism", [[(10, 90), (90, 90), (NAN, 90)], [(90, 90), (10, 90), (NAN, 80)],
                                   [(90, 90), (90, 90)]])
    base = judged("base", [[(90, 90), (90, 90)], [(90, 90), (NAN, 90)], [(90, 90), (90, 90)]])
    df = pd.DataFrame(organism + base)
    stats = arm_statistics(df, Thresholds(), ["base", "organism"])
    doc = stats_json(df)
    group = next(g for g in doc["groups"] if g["model"] == "organism")["overall"]
    assert group["em_rate_coherent"] == pytest.approx(2 / 6)  # 2 misaligned of 6 scored coherent answers
    assert stats["organism"]["em_rate"] == group["em_rate_coherent"]  # the old sweep said 2 / 8
    assert stats["organism"]["em_rate_low"] == group["em_rate_coherent_ci_low"]
    assert stats["organism"]["em_rate_high"] == group["em_rate_coherent_ci_high"]
    assert stats["organism"]["ci_unit"].startswith("questions")


def test_restoration_interval_is_paired_by_question_and_reports_undefined_draws() -> None:
    # Question effects shared by every model: q0 is hard (everyone misaligned more), q3 easy.
    rows = []
    for model, lift in (("base", 0), ("organism", 6), ("dir@1x1", 3)):
        for q, hard in enumerate((8, 4, 2, 0)):
            k = min(20, hard + lift)
            rows += judged(model, [[]] * q + [[(10, 90)] * k + [(90, 90)] * (20 - k)])
    stats = arm_statistics(pd.DataFrame(rows), Thresholds(), ["base", "organism", "dir@1x1"], n_boot=2000)
    arm = stats["dir@1x1"]
    assert arm["restoration"] == pytest.approx(0.5)
    assert arm["restoration_undefined_share"] == 0.0  # every question rises: no draw without a gap
    # Paired draws: the shared question effects cancel, so the interval is tight around 0.5.
    assert 0.4 <= arm["restoration_low"] <= 0.5 <= arm["restoration_high"] <= 0.6

    # A gap that exists in one question only: most draws leave it out, so restoration is undefined in them
    # and the interval is unbounded rather than the spread of the few defined draws.
    rows = judged("base", [[(90, 90)] * 10] * 4) + judged("organism", [[(10, 90)] * 4 + [(90, 90)] * 6]
                                                          + [[(90, 90)] * 10] * 3)
    rows += judged("dir@1x1", [[(10, 90)] * 2 + [(90, 90)] * 8] + [[(90, 90)] * 10] * 3)
    arm = arm_statistics(pd.DataFrame(rows), Thresholds(), ["base", "organism", "dir@1x1"], n_boot=2000)["dir@1x1"]
    share = 1 - (1 - 1 / 4) ** 4  # a draw includes q0 at least once
    assert arm["restoration_undefined_share"] == pytest.approx(1 - share, abs=0.03)
    assert arm["restoration_low"] is None and arm["restoration_high"] is None
    assert np.isfinite(arm["restoration"])
