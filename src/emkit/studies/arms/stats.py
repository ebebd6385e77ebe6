"""Statistics of a multi-arm run: EM per arm x condition with intervals, question-aware tests, masked-LoRA fits.

Input: the judged answers of every arm (`scores.parquet` of the run), one row per answer with
`arm`, `seed`, `condition`, `question_id`, `aligned`, `coherent` (and `method`, `budget`,
`budget_scalars` for masked arms). Every rate and test comes from `emkit.core.stats.em_rates`.

- `rates`: per arm and condition, both EM rates and the coherence rate with intervals that treat
  the questions as the sampling unit (`ci_unit`), the questions-fixed interval beside them, and with
  several seeds a t interval over the per-seed rates (`em_rate_*_seeds_ci_*`, seeds as replicates).
- `seeds`: the same rates per seed (no intervals), to show the spread between replicates.
- `tests`: two families of comparisons (`emkit.core.stats.em_rates.compare_many`), each corrected for multiple
  comparisons within itself: `arms` (every arm against the reference arm, within each condition) and
  `conditions` (every condition against the reference condition, within each arm). The headline
  p-value and interval of each comparison name their unit (`units.headline`): training seeds when
  an arm has several seeds, else questions (paired sign-flip test); the exact stratified (CMH) test
  and the pooled Fisher test are kept beside them.
- `fits`: per masked arm group and condition, the logistic of EM rate against
  log10(trainable scalars) (`emkit.studies.arms.fit`); budget 'all' is the adapter's scalar count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from emkit.core.stats.em_rates import (
    ALL,
    DENOMINATORS,
    Thresholds,
    compare_many,
    flag_answers,
    inference_doc,
    summarize,
)
from emkit.core.stats.inference import UNIT_SEEDS, mean_interval_answers
from emkit.studies.arms.fit import fit_logistic

RATE_KEYS = ("n_questions", "n_answers", "n_scored", "n_coherent", "n_misaligned", "ci_unit",
             *(f"em_rate_{d}{s}" for d in DENOMINATORS
               for s in ("", "_ci_low", "_ci_high", "_within_ci_low", "_within_ci_high", "_cluster_ci_low",
                         "_cluster_ci_high")),
             "coherence_rate", "mean_aligned", "mean_coherent")


def _clean(value: Any) -> Any:
    """JSON-ready: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def rates_table(scores: pd.DataFrame, thresholds: Thresholds, *, ci: float) -> list[dict]:
    """Pooled EM rates per arm and condition with question-unit intervals, and seed-level intervals with 2+ seeds."""
    summary = summarize(scores, by=["arm", "condition"], thresholds=thresholds, ci=ci)
    overall = summary[summary["question_id"] == ALL]
    per_seed = pd.DataFrame(seeds_table(scores, thresholds))
    rows = []
    for r in overall.to_dict("records"):
        row = {"arm": r["arm"], "condition": r["condition"], **{k: r[k] for k in RATE_KEYS}}
        seeds = per_seed[(per_seed["arm"] == r["arm"]) & (per_seed["condition"] == r["condition"])] \
            if len(per_seed) else per_seed
        row["n_seeds"] = int(len(seeds))
        if len(seeds) >= 2:
            for d in DENOMINATORS:
                values = seeds[f"em_rate_{d}"].astype(float).to_numpy()
                values = values[np.isfinite(values)]
                row[f"em_rate_{d}_seeds_mean"] = float(values.mean()) if len(values) else None
                # t interval of the mean per-seed rate: each seed's rate is one replicate of training
                low, high = mean_interval_answers(values, ci)
                row[f"em_rate_{d}_seeds_ci_low"], row[f"em_rate_{d}_seeds_ci_high"] = low, high
            row["seeds_unit"] = UNIT_SEEDS
        rows.append(_clean(row))
    return rows


def seeds_table(scores: pd.DataFrame, thresholds: Thresholds) -> list[dict]:
    """Counts and EM rates per arm, condition and seed (point estimates); empty without a seed column."""
    if "seed" not in scores:
        return []
    flags = flag_answers(scores, thresholds)
    flags["coh"] = flags["is_scored"] & flags["is_coherent"]
    flags["mis"] = flags["coh"] & flags["is_misaligned"]
    grouped = flags.groupby(["arm", "condition", "seed"], sort=True)
    table = grouped.agg(n_answers=("is_scored", "size"), n_scored=("is_scored", "sum"), n_coherent=("coh", "sum"),
                        n_misaligned=("mis", "sum")).reset_index()
    rows = []
    for r in table.to_dict("records"):
        coh, scored = r["n_coherent"], r["n_scored"]
        rows.append(_clean({**r, "em_rate_coherent": r["n_misaligned"] / coh if coh else None,
                            "em_rate_scored": r["n_misaligned"] / scored if scored else None}))
    return rows


def comparison_pairs(arms: Sequence[str], conditions: Sequence[str], reference: str, reference_condition: str) -> dict:
    """The selectors of both families: arm vs reference arm per condition; condition vs reference per arm."""
    arm_pairs = [({"arm": a, "condition": c}, {"arm": reference, "condition": c})
                 for c in conditions for a in arms if a != reference]
    condition_pairs = [({"arm": a, "condition": c}, {"arm": a, "condition": reference_condition})
                       for a in arms for c in conditions if c != reference_condition]
    return {"arms": arm_pairs, "conditions": condition_pairs}


def tests_table(scores: pd.DataFrame, pairs: list, thresholds: Thresholds, *, method: str, ci: float, seed: int,
                n_perm: int) -> list[dict]:
    """Each pair (a vs b): differences with intervals and every test, p-values corrected over the pairs."""
    if not pairs:
        return []
    table = compare_many(scores, pairs, method, thresholds=thresholds, ci=ci, seed=seed, n_perm=n_perm)
    return [_clean(r) for r in table.to_dict("records")]


def fits_table(scores: pd.DataFrame, thresholds: Thresholds, denominator: str, *, n_boot: int, seed: int,
               ci: float) -> list[dict]:
    """Logistic fits of EM rate against log10(trainable scalars), per masked arm group and condition."""
    masked = scores[scores["method"] == "masked"] if "method" in scores else scores.iloc[:0]
    if masked.empty:
        return []
    flags = flag_answers(masked, thresholds)
    flags["coh"] = flags["is_scored"] & flags["is_coherent"]
    flags["mis"] = flags["coh"] & flags["is_misaligned"]
    out = []
    for (group, condition), rows in flags.groupby(["group", "condition"], sort=False):
        points = rows.groupby("budget_scalars", sort=True).agg(
            arm=("arm", "first"), n_scored=("is_scored", "sum"), n_coherent=("coh", "sum"),
            n_misaligned=("mis", "sum")).reset_index()
        n = points[f"n_{denominator}"].to_numpy()
        fit = fit_logistic(points["budget_scalars"].to_numpy(), points["n_misaligned"].to_numpy(), n,
                           n_boot=n_boot, seed=seed, ci=ci)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = points["n_misaligned"].to_numpy() / n
        out.append(_clean({
            "group": group, "condition": condition, "denominator": denominator,
            "points": [{"arm": a, "budget_scalars": int(b), "n": int(m), "n_misaligned": int(k), "rate": float(r)}
                       for a, b, m, k, r in zip(points["arm"], points["budget_scalars"], n,
                                                points["n_misaligned"], rate)],
            **fit,
        }))
    return out


def conditions_stats(scores: pd.DataFrame, *, arms: Sequence[str], conditions: Sequence[str], reference: str,
                     reference_condition: str, thresholds: Thresholds, method: str = "holm",
                     denominator: str = "coherent", n_boot: int = 2000, fit_boot: int = 500, seed: int = 0,
                     ci: float = 0.95) -> dict[str, Any]:
    """Everything `conditions.json` holds: rates, per-seed rates, both test families and the fits.

    `n_boot` is the number of Monte Carlo sign patterns of the questions-unit test beyond 16 questions
    (below that every pattern is enumerated exactly); `fit_boot` the refits of the budget fit.
    """
    pairs = comparison_pairs(arms, conditions, reference, reference_condition)
    return {
        "thresholds": {"aligned_below": thresholds.aligned_below, "coherent_above": thresholds.coherent_above,
                       "aligned_inclusive": thresholds.aligned_inclusive, "rule": thresholds.rule()},
        "inference": {**inference_doc(ci), "n_perm": n_boot, "seed": seed, "fit_boot": fit_boot},
        "bootstrap": {"n_boot": n_boot, "fit_boot": fit_boot, "seed": seed, "ci": ci},
        "arms": list(arms), "conditions": list(conditions), "reference": reference,
        "reference_condition": reference_condition, "correction": method, "denominator": denominator,
        "rates": rates_table(scores, thresholds, ci=ci),
        "seeds": seeds_table(scores, thresholds),
        "tests": {family: tests_table(scores, p, thresholds, method=method, ci=ci, seed=seed, n_perm=n_boot)
                  for family, p in pairs.items()},
        "fits": fits_table(scores, thresholds, denominator, n_boot=fit_boot, seed=seed, ci=ci),
    }
