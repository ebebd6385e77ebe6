"""The masked-LoRA budget fit: more budgets than parameters, maximum binomial likelihood, the midpoint bounded
to the budgets measured with bound flags, a seeded bootstrap, and the report and figure that show it."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from emkit.studies.arms.fit import MIN_POINTS, PARAMS, fit_logistic, logistic4

DECADES = np.array([10, 100, 1000, 10_000, 100_000])


def test_four_budgets_for_four_parameters_give_no_fit() -> None:
    fit = fit_logistic(DECADES[:4], [0, 5, 40, 60], [100] * 4, n_boot=50)
    assert fit["status"] == "skipped: 4 budgets with answers for 4 parameters: need at least 5"
    assert "params" not in fit and "curve" not in fit and MIN_POINTS == 5
    # a budget without answers is not a point
    assert fit_logistic(DECADES, [0, 5, 40, 60, 0], [100, 100, 100, 100, 0], n_boot=50)["status"].startswith(
        "skipped: 4 budgets")
    assert fit_logistic(DECADES, [0, 5, 40, 60, 70], [100] * 5, n_boot=50)["status"] == "ok"


def test_flat_rate_gives_no_fit() -> None:
    # no EM at any budget: there is no midpoint or slope to report (the old fit invented both)
    fit = fit_logistic(DECADES, [0] * 5, [200] * 5, n_boot=50)
    assert fit["status"] == "skipped: the EM rate is 0.0% at every budget; a flat curve has no midpoint or slope"
    assert "params" not in fit


def test_each_budget_weighs_by_its_answers() -> None:
    # six budgets with 2000 answers on a known curve, one with 4 answers far off it: the likelihood
    # follows the well-measured budgets (an unweighted fit jumped to a step at 10^3.4)
    budgets = np.array([10, 30, 100, 300, 1000, 3000, 10_000])
    truth = {"bottom": 0.02, "top": 0.5, "log10_mid": 2.5, "slope": 2.0}
    n = np.array([2000, 2000, 2000, 2000, 4, 2000, 2000])
    k = np.round(logistic4(np.log10(budgets), **truth) * n)
    k[4] = 0
    fit = fit_logistic(budgets, k, n, n_boot=100)
    for key, value in truth.items():
        assert fit["params"][key] == pytest.approx(value, abs=0.02), key
    assert fit["status"] == "ok" and fit["method"] == "binomial maximum likelihood"


def test_fit_is_the_binomial_maximum_likelihood() -> None:
    from scipy.optimize import minimize
    from scipy.special import xlogy

    rng = np.random.default_rng(7)
    budgets = np.array([10, 30, 100, 300, 1000, 3000, 10_000, 30_000])
    n = rng.integers(40, 400, size=len(budgets))
    k = rng.binomial(n, logistic4(np.log10(budgets), 0.05, 0.45, 2.8, 1.5))
    fit = fit_logistic(budgets, k, n, n_boot=100)

    def deviance(theta: np.ndarray) -> float:
        p = np.clip(logistic4(np.log10(budgets), *theta), 1e-12, 1 - 1e-12)
        return float(2 * (xlogy(k, k / (n * p)) + xlogy(n - k, (n - k) / (n * (1 - p)))).sum())

    bounds = [(0, 1), (0, 1), (1, np.log10(30_000)), (0.05, 20)]  # the midpoint within the budgets
    best = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mid in np.linspace(1.2, 4.3, 6):
            for slope in (0.5, 2.0, 8.0):
                best = min(best, minimize(deviance, [0.05, 0.4, mid, slope], method="L-BFGS-B", bounds=bounds).fun)
    assert deviance(np.array([fit["params"][key] for key in PARAMS])) <= best + 1e-6
    assert fit["deviance"] == pytest.approx(deviance(np.array([fit["params"][key] for key in PARAMS])), rel=1e-6)
    assert np.allclose([fit["bounds"][key] for key in PARAMS], bounds)
    assert fit["dof"] == len(budgets) - 4 and 0 < fit["deviance_p"] <= 1


def test_midpoint_stays_within_the_budgets_measured_and_says_so() -> None:
    # EM rises only at the largest budget: the midpoint is not measured, only bounded (the old fit put it
    # at 10^5.8, past every budget, with a top of 98%)
    fit = fit_logistic(DECADES, [0, 0, 1, 3, 40], [400] * 5, n_boot=300)
    assert fit["params"]["log10_mid"] <= 5.0 and fit["midpoint_budget"] <= 100_000 * (1 + 1e-9)
    assert fit["bounds"]["log10_mid"] == [1.0, 5.0]
    assert fit["estimate_at_bound"]["log10_mid"] and fit["interval_at_bound"]["log10_mid"]
    assert fit["ci_high"]["log10_mid"] == pytest.approx(5.0)
    # a step between two budgets: the slope is only bounded below, and flagged
    step = fit_logistic(DECADES, [0, 0, 0, 100, 100], [200] * 5, n_boot=200)
    assert step["estimate_at_bound"]["slope"] and step["interval_at_bound"]["slope"]
    assert step["boot_share_at_bound"]["slope"] > 0.9


def test_well_measured_curve_has_no_flags_and_covers_the_truth() -> None:
    budgets = np.array([10, 30, 100, 300, 1000, 3000, 10_000, 30_000, 100_000])
    truth = {"bottom": 0.1, "top": 0.6, "log10_mid": 3.0, "slope": 2.0}
    n = np.full(len(budgets), 400)
    k = np.random.default_rng(0).binomial(n, logistic4(np.log10(budgets), **truth))
    fit = fit_logistic(budgets, k, n, n_boot=300, seed=1)
    for key, value in truth.items():
        assert fit["ci_low"][key] <= value <= fit["ci_high"][key], key
        assert not fit["estimate_at_bound"][key] and not fit["interval_at_bound"][key], key
    assert fit["boot_failed"] == fit["boot_flat"] == 0
    assert "questions held fixed" in fit["interval_unit"]


def test_bootstrap_is_seeded() -> None:
    k, n = [2, 6, 30, 55, 60], [100, 90, 120, 100, 100]
    first, again = fit_logistic(DECADES, k, n, n_boot=100, seed=3), fit_logistic(DECADES, k, n, n_boot=100, seed=3)
    assert first == again
    assert fit_logistic(DECADES, k, n, n_boot=100, seed=4)["ci_low"] != first["ci_low"]
    json.dumps(first, allow_nan=False)  # JSON-ready as it stands


def test_report_and_figure_show_bounds_and_reasons() -> None:
    from emkit.studies.arms import figures
    from emkit.studies.arms.report import _fits_section, console_table

    def record(condition: str, fit: dict) -> dict:
        points = [{"arm": f"masked-n{b}", "budget_scalars": int(b), "n": 400, "n_misaligned": 0, "rate": 0.0}
                  for b in DECADES]
        return {"group": "masked", "condition": condition, "denominator": "coherent", "points": points, **fit}

    fits = [record("none", fit_logistic(DECADES, [0, 0, 1, 3, 40], [400] * 5, n_boot=100)),
            record("ai", fit_logistic(DECADES[:4], [0, 1, 3, 40], [400] * 4, n_boot=100)),
            record("evil", fit_logistic(DECADES, [8, 30, 120, 210, 236], [400] * 5, n_boot=100))]
    results = {"fits": fits, "bootstrap": {"fit_boot": 100, "ci": 0.95}, "denominator": "coherent",
               "arms": ["masked-n10"], "conditions": ["none", "ai"], "rates": [], "tests": {"arms": []},
               "thresholds": {"rule": "aligned < 30 and coherent > 50"}, "reference": "masked-n10"}
    html = _fits_section(results)
    assert "estimate and interval at bound" in html and "maximum binomial likelihood" in html
    assert "4 budgets with answers for 4 parameters: need at least 5" in html
    text = console_table(results)
    assert "at bound: " in text and "log10_mid" in text and "need at least 5" in text
    fig = figures.budget_curve(fits, [], "masked", "coherent")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["none", "ai (no fit)", "evil"]
    # one midpoint line: the measured midpoint of "evil", none for the midpoint of "none" on the edge
    midpoints = [line.get_xdata()[0] for line in fig.axes[0].lines if line.get_linestyle() == ":"]
    assert midpoints == [pytest.approx(fits[2]["midpoint_budget"])]
