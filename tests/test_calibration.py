"""Calibration by simulation: judged runs with known true rates and question-level variation.

Each simulated run has G questions whose true EM rates are drawn from a beta distribution around
the run's true rate (beta-binomial answers: questions differ, as real EM questions do), and n
answers per question. The intervals and the onset rule of emkit run on these counts through the
same functions `emkit.core.stats.em_rates.summarize`, `compare` and `emkit.studies.dynamics.onset` use, vectorised over
thousands of simulated runs, so the whole module takes a few seconds.

- The questions-unit 95% interval (the headline) must cover the true population rate in 93-97% of runs.
- The within-question interval must cover the rate of the fixed questions in 93-97% of runs (and,
  being conditional on the questions, it is not expected to cover the population rate).
- The paired questions-unit interval of a difference must cover the true difference in 93-97%.
- With no change between checkpoints, the onset rule must fire in at most 5% of runs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from emkit.core.stats.em_rates import ALL, compare, summarize
from emkit.core.stats.inference import (
    diff_interval_questions,
    rate_interval_answers,
    rate_interval_questions,
)
from emkit.studies.dynamics.onset import onset_from_pvalues, step_pvalues

SIMS = 2000
SCENARIOS = [  # (questions, answers per question, true rate, beta concentration: smaller = more spread)
    (8, 50, 0.10, 20.0),
    (8, 100, 0.25, 10.0),
    (24, 50, 0.05, 20.0),
]


def question_rates(rng: np.random.Generator, mu: float, kappa: float, shape: tuple[int, ...]) -> np.ndarray:
    """True per-question EM rates with mean mu (beta with concentration kappa)."""
    return rng.beta(mu * kappa, (1 - mu) * kappa, size=shape)


def covered(low: np.ndarray, high: np.ndarray, truth: np.ndarray | float) -> float:
    return float(np.mean((low <= truth) & (truth <= high)))


@pytest.mark.parametrize("g, n, mu, kappa", SCENARIOS)
def test_rate_intervals_cover_the_truth(g: int, n: int, mu: float, kappa: float) -> None:
    rng = np.random.default_rng(11)
    p = question_rates(rng, mu, kappa, (SIMS, g))
    m, counts = rng.binomial(n, p), np.full((SIMS, g), n)
    low, high = rate_interval_questions(m, counts)
    assert 0.93 <= covered(low, high, mu) <= 0.97  # questions as the unit: the population rate
    low, high = rate_interval_answers(m, counts)
    assert 0.93 <= covered(low, high, p.mean(axis=1)) <= 0.97  # questions fixed: their own pooled rate


@pytest.mark.parametrize("g, n, mu, kappa", SCENARIOS)
def test_paired_difference_interval_covers_the_truth(g: int, n: int, mu: float, kappa: float) -> None:
    rng = np.random.default_rng(12)
    base = question_rates(rng, mu, kappa, (SIMS, g))
    # The treated model is more misaligned on every question, by a question-specific amount.
    lift = rng.uniform(0.0, 2 * mu, size=(SIMS, g))
    treated = np.clip(base + lift, 0, 1)
    big = np.random.default_rng(0)  # the true difference of the population, by a large independent draw
    population = question_rates(big, mu, kappa, (400_000,))
    truth = float(np.mean(np.clip(population + big.uniform(0, 2 * mu, 400_000), 0, 1)) - mu)
    ma, mb, counts = rng.binomial(n, treated), rng.binomial(n, base), np.full((SIMS, g), n)
    low, high = diff_interval_questions(ma, counts, mb, counts)
    assert 0.93 <= covered(low, high, truth) <= 0.97


@pytest.mark.parametrize("fresh_questions", [False, True], ids=["same-question-rates", "fresh-question-rates"])
def test_onset_rule_fires_at_most_five_percent_under_the_null(fresh_questions: bool) -> None:
    """No change between steps: either every step has the base's question rates, or each step draws its own."""
    rng = np.random.default_rng(13)
    g, n, steps = 8, 50, 5
    shape = (SIMS, steps + 1, g)
    if fresh_questions:
        p = question_rates(rng, 0.1, 20.0, shape)
    else:
        p = np.broadcast_to(question_rates(rng, 0.1, 20.0, (SIMS, 1, g)), shape)
    m = rng.binomial(n, p)
    pvalues = step_pvalues(m, np.full(shape, n))
    later = list(range(10, 10 * steps + 1, 10))
    fired = [onset_from_pvalues(later, list(row))["onset_step"] is not None for row in pvalues]
    sustained = [onset_from_pvalues(later, list(row))["sustained_onset_step"] is not None for row in pvalues]
    assert np.mean(fired) <= 0.05
    assert np.mean(sustained) <= np.mean(fired)


def test_onset_rule_detects_a_real_rise() -> None:
    """The rule is not merely silent: a clear rise from the third checkpoint on is found there."""
    rng = np.random.default_rng(14)
    g, n = 8, 50
    base = question_rates(rng, 0.05, 20.0, (SIMS, 1, g))
    rates = np.concatenate([base, base, base, base + 0.2, base + 0.25, base + 0.3], axis=1)
    m = rng.binomial(n, np.clip(rates, 0, 1))
    pvalues = step_pvalues(m, np.full(m.shape, n))
    found = [onset_from_pvalues([10, 20, 30, 40, 50], list(row)) for row in pvalues]
    assert np.mean([f["onset_step"] == 30 for f in found]) > 0.9
    assert np.mean([f["sustained_onset_step"] == 30 for f in found]) > 0.9


def test_summarize_and_compare_use_these_intervals() -> None:
    """The DataFrame path gives exactly the vectorised intervals the simulations check."""
    rng = np.random.default_rng(15)
    g, n = 8, 30
    pa, pb = question_rates(rng, 0.3, 10.0, g), question_rates(rng, 0.1, 10.0, g)
    ma, mb = rng.binomial(n, pa), rng.binomial(n, pb)
    rows = [{"model": model, "condition": "none", "question_id": f"q{q}", "coherent": 90.0,
             "aligned": 5.0 if i < counts[q] else 90.0}
            for model, counts in (("organism", ma), ("base", mb)) for q in range(g) for i in range(n)]
    df = pd.DataFrame(rows)
    table = summarize(df)
    row = table[(table["model"] == "organism") & (table["question_id"] == ALL)].iloc[0]
    low, high = rate_interval_questions(ma, np.full(g, n))
    assert (row["em_rate_coherent_ci_low"], row["em_rate_coherent_ci_high"]) == pytest.approx((float(low), float(high)))
    result = compare(df, {"model": "organism"}, {"model": "base"})
    low, high = diff_interval_questions(ma, np.full(g, n), mb, np.full(g, n))
    assert (result["diff_em_rate_coherent_ci_low"], result["diff_em_rate_coherent_ci_high"]) == pytest.approx(
        (float(low), float(high)))
