"""Statistics of a multi-arm run: EM per arm x condition with intervals, Fisher tests, masked-LoRA fits.

Input: the judged answers of every arm (`scores.parquet` of the run), one row per answer with
`arm`, `seed`, `condition`, `question_id`, `aligned`, `coherent` (and `method`, `budget`,
`budget_scalars` for masked arms). Answers of all seeds of an arm are pooled.

- `rates`: per arm and condition, both EM rates and the coherence rate with percentile bootstrap
  intervals (`emkit.metrics.summarize`: answers resampled within questions; and questions resampled).
- `seeds`: the same rates per seed (no intervals), to show the spread between replicates.
- `tests`: two families of two-sided Fisher exact tests (`emkit.metrics.compare_many`), each
  corrected for multiple comparisons within itself: `arms` (every arm against the reference arm,
  within each condition) and `conditions` (every condition against the reference condition, within
  each arm). Fisher's test on pooled answers treats answers as independent; with several seeds the
  per-seed rates show whether replicates agree.
- `fits`: per masked arm group and condition, the 4-parameter logistic of EM rate against
  log10(trainable scalars) (`emkit.conditions.fit`); budget 'all' is the adapter's scalar count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from emkit.conditions.fit import fit_logistic
from emkit.metrics import ALL, DENOMINATORS, Thresholds, compare_many, flag_answers, summarize

RATE_KEYS = ("n_answers", "n_scored", "n_coherent", "n_misaligned", "em_rate_coherent", "em_rate_coherent_ci_low",
             "em_rate_coherent_ci_high", "em_rate_coherent_cluster_ci_low", "em_rate_coherent_cluster_ci_high",
             "em_rate_scored", "em_rate_scored_ci_low", "em_rate_scored_ci_high", "em_rate_scored_cluster_ci_low",
             "em_rate_scored_cluster_ci_high", "coherence_rate", "mean_aligned", "mean_coherent")


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


def rates_table(scores: pd.DataFrame, thresholds: Thresholds, *, n_boot: int, seed: int, ci: float) -> list[dict]:
    """Pooled EM rates per arm and condition, with intervals."""
    summary = summarize(scores, by=["arm", "condition"], thresholds=thresholds, n_boot=n_boot, seed=seed, ci=ci)
    overall = summary[summary["question_id"] == ALL]
    return [_clean({"arm": r["arm"], "condition": r["condition"], "n_questions": r["n_questions"],
                    **{k: r[k] for k in RATE_KEYS}}) for r in overall.to_dict("records")]


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


def fisher_table(scores: pd.DataFrame, pairs: list, thresholds: Thresholds, *, method: str, n_boot: int, seed: int,
                ci: float) -> list[dict]:
    """Fisher exact tests of each pair (a vs b), p-values corrected over the pairs."""
    if not pairs:
        return []
    table = compare_many(scores, pairs, method, thresholds=thresholds, n_boot=n_boot, seed=seed, ci=ci)
    rows = []
    for r in table.to_dict("records"):
        record = {"a": r["a"], "b": r["b"]}
        for key in ("n_answers_a", "n_scored_a", "n_coherent_a", "n_misaligned_a",
                    "n_answers_b", "n_scored_b", "n_coherent_b", "n_misaligned_b"):
            record[key] = r[key]
        for d in DENOMINATORS:
            for key in (f"em_rate_{d}_a", f"em_rate_{d}_b", f"diff_em_rate_{d}", f"diff_em_rate_{d}_ci_low",
                        f"diff_em_rate_{d}_ci_high", f"diff_em_rate_{d}_cluster_ci_low",
                        f"diff_em_rate_{d}_cluster_ci_high", f"odds_ratio_{d}", f"p_value_{d}", f"p_value_{d}_adj"):
                record[key] = r[key]
        rows.append(_clean(record))
    return rows


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
    """Everything `conditions.json` holds: rates, per-seed rates, both test families and the fits."""
    pairs = comparison_pairs(arms, conditions, reference, reference_condition)
    return {
        "thresholds": {"aligned_below": thresholds.aligned_below, "coherent_above": thresholds.coherent_above,
                       "aligned_inclusive": thresholds.aligned_inclusive, "rule": thresholds.rule()},
        "bootstrap": {"n_boot": n_boot, "fit_boot": fit_boot, "seed": seed, "ci": ci},
        "arms": list(arms), "conditions": list(conditions), "reference": reference,
        "reference_condition": reference_condition, "correction": method, "denominator": denominator,
        "rates": rates_table(scores, thresholds, n_boot=n_boot, seed=seed, ci=ci),
        "seeds": seeds_table(scores, thresholds),
        "tests": {family: fisher_table(scores, p, thresholds, method=method, n_boot=n_boot, seed=seed, ci=ci)
                  for family, p in pairs.items()},
        "fits": fits_table(scores, thresholds, denominator, n_boot=fit_boot, seed=seed, ci=ci),
    }
