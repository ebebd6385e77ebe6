"""The dynamics analysis of judged answers over checkpoints: curves, onsets, divergence, judge agreement.

Input: one row per judged answer with `judge`, `step`, `mode`, `question_id`, `aligned`, `coherent`
(and `id`, the answer's id, for answer-level judge agreement). Output (`analyse`):

- `curves`: per judge, step and mode, the EM rates of `emkit.metrics.summarize` (both denominators,
  within-question bootstrap intervals) and mean alignment and coherence with bootstrap intervals
  (answers resampled within questions).
- `onsets`: per judge and mode, the onset step (first step whose EM interval clears the base's)
  and the sustained onset; the crossing order of predictive vs assistant mode.
- `divergence`: per judge and step, predictive minus assistant EM rate (Fisher exact test and
  bootstrap interval of the difference, `emkit.metrics.compare`), and each step against the base.
- `agreement`: with two judges, per mode, the correlation of their EM rates across steps
  (Pearson, Spearman), the mean absolute difference, and answer-level agreement (Spearman of the
  alignment scores, Cohen's kappa of the EM flags).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from emkit.dynamics.onset import CurvePoint, crossing_order, largest_jump, onset
from emkit.metrics import ALL, Thresholds, compare, finite_or_none, flag_answers, summarize

RATE = "em_rate_coherent"  # the headline rate (Betley et al.); em_rate_scored is kept beside it


_num = finite_or_none


def mean_intervals(df: pd.DataFrame, column: str, n_boot: int, seed: int, ci: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of the mean of `column`, answers resampled within each question."""
    rng = np.random.default_rng(seed)
    values = df[["question_id", column]].dropna()
    if len(values) < 2:
        return (float("nan"), float("nan"))
    totals = np.zeros(n_boot)
    count = 0
    for _, group in values.groupby("question_id", sort=True):
        v = group[column].to_numpy(dtype=float)
        totals += v[rng.integers(0, len(v), size=(n_boot, len(v)))].sum(axis=1)
        count += len(v)
    means = totals / count
    low, high = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])
    return float(low), float(high)


def curves(scores: pd.DataFrame, thresholds: Thresholds, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (judge, step, mode): answers, EM rates with intervals, mean scores with intervals."""
    keys = ["judge", "step", "mode"]
    table = summarize(scores, by=keys, thresholds=thresholds, n_boot=n_boot, seed=seed)
    overall = table[table["question_id"] == ALL].drop(columns=["question_id"]).reset_index(drop=True)
    for score in ("aligned", "coherent"):
        lows, highs = [], []
        for row in overall.itertuples(index=False):
            sel = scores[(scores["judge"] == row.judge) & (scores["step"] == row.step) & (scores["mode"] == row.mode)]
            low, high = mean_intervals(sel, score, n_boot, seed)
            lows.append(low)
            highs.append(high)
        overall[f"mean_{score}_ci_low"] = lows
        overall[f"mean_{score}_ci_high"] = highs
    overall["step"] = overall["step"].astype(int)
    return overall.sort_values(keys, kind="stable").reset_index(drop=True)


def _points(curve: pd.DataFrame, rate: str = RATE) -> list[CurvePoint]:
    return [CurvePoint(int(r["step"]), _num(r[rate]), _num(r[f"{rate}_ci_low"]), _num(r[f"{rate}_ci_high"]))
            for r in curve.to_dict("records")]


def onsets(table: pd.DataFrame, rate: str = RATE) -> list[dict[str, Any]]:
    """Onset per judge and mode, and per judge the crossing order of predictive vs assistant."""
    out = []
    for judge, per_judge in table.groupby("judge", sort=True):
        found: dict[str, int | None] = {}
        for mode, curve in per_judge.groupby("mode", sort=True):
            points = _points(curve, rate)
            result = onset(points)
            found[str(mode)] = result["onset_step"]
            out.append({"judge": judge, "mode": mode, "rate": rate, **{k: v for k, v in result.items() if k != "clears"},
                        "largest_jump": largest_jump(points)})
        if {"predictive", "assistant"} <= set(found):
            out.append({"judge": judge, "mode": "predictive vs assistant", "rate": rate,
                        "crossing": crossing_order(found),
                        "predictive_first": (found["predictive"] is not None
                                             and (found["assistant"] is None or found["predictive"] < found["assistant"]))})
    return out


def divergence(scores: pd.DataFrame, thresholds: Thresholds, *, n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Per judge and step: predictive - assistant EM rate, and each mode's step - base difference."""
    rows = []
    for judge, per_judge in scores.groupby("judge", sort=True):
        modes = set(per_judge["mode"])
        for step, at_step in per_judge.groupby("step", sort=True):
            if {"predictive", "assistant"} <= set(at_step["mode"]):
                c = compare(at_step, {"mode": "predictive"}, {"mode": "assistant"}, thresholds=thresholds,
                            n_boot=n_boot, seed=seed)
                rows.append({"judge": judge, "step": int(step), "kind": "predictive - assistant", **_brief(c)})
            if int(step) == 0:
                continue
            for mode in sorted(modes):
                pair = per_judge[per_judge["mode"] == mode]
                if (pair["step"] == step).any() and (pair["step"] == 0).any():
                    c = compare(pair, {"step": step}, {"step": 0}, thresholds=thresholds, n_boot=n_boot, seed=seed)
                    rows.append({"judge": judge, "step": int(step), "kind": f"{mode}: step - base", **_brief(c)})
    return rows


def _brief(c: dict[str, Any]) -> dict[str, Any]:
    r = RATE
    return {"rate_a": c[f"{r}_a"], "rate_b": c[f"{r}_b"], "difference": c[f"diff_{r}"],
            "ci_low": c[f"diff_{r}_ci_low"], "ci_high": c[f"diff_{r}_ci_high"],
            "cluster_ci_low": c[f"diff_{r}_cluster_ci_low"], "cluster_ci_high": c[f"diff_{r}_cluster_ci_high"],
            "p_value": c["p_value_coherent"], "odds_ratio": c["odds_ratio_coherent"]}


def _correlations(x: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
    from scipy import stats

    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pearson": None, "spearman": None, "n": int(len(x))}
    return {"pearson": float(stats.pearsonr(x, y).statistic), "spearman": float(stats.spearmanr(x, y).statistic),
            "n": int(len(x))}


def agreement(scores: pd.DataFrame, table: pd.DataFrame, thresholds: Thresholds) -> list[dict[str, Any]]:
    """Agreement of the first two judges per mode: across steps (EM rates) and across answers."""
    from sklearn.metrics import cohen_kappa_score

    judges = sorted(scores["judge"].unique())
    if len(judges) < 2:
        return []
    first, second = judges[:2]
    out = []
    for mode in sorted(table["mode"].unique()):
        a = table[(table["judge"] == first) & (table["mode"] == mode)].set_index("step")[RATE]
        b = table[(table["judge"] == second) & (table["mode"] == mode)].set_index("step")[RATE]
        steps = a.index.intersection(b.index)
        x, y = a.loc[steps].to_numpy(dtype=float), b.loc[steps].to_numpy(dtype=float)
        both = np.isfinite(x) & np.isfinite(y)
        per_answer = scores[scores["mode"] == mode]
        flags = flag_answers(per_answer, thresholds)
        wide = flags.pivot_table(index="id", columns="judge", values=["aligned", "is_misaligned"], aggfunc="first")
        answer_level: dict[str, Any] = {"n_answers": 0, "aligned_spearman": None, "em_kappa": None}
        if ("aligned", first) in wide and ("aligned", second) in wide:
            pair = wide[[("aligned", first), ("aligned", second)]].dropna()
            answer_level["n_answers"] = int(len(pair))
            answer_level["aligned_spearman"] = _correlations(pair.iloc[:, 0].to_numpy(float),
                                                             pair.iloc[:, 1].to_numpy(float))["spearman"]
            em = wide[[("is_misaligned", first), ("is_misaligned", second)]].dropna().astype(int)
            if len(em) and len(set(em.iloc[:, 0]) | set(em.iloc[:, 1])) > 1:
                kappa = cohen_kappa_score(em.iloc[:, 0], em.iloc[:, 1])
                answer_level["em_kappa"] = None if np.isnan(kappa) else float(kappa)
        out.append({"mode": mode, "judges": [first, second], **_correlations(x, y),
                    "mean_abs_difference": float(np.abs(x[both] - y[both]).mean()) if both.any() else None,
                    **answer_level})
    return out


def analyse(scores: pd.DataFrame, thresholds: Thresholds, *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Curves, onsets, divergence and judge agreement of the judged answers of every step."""
    table = curves(scores, thresholds, n_boot=n_boot, seed=seed)
    return {
        "curves": table,
        "onsets": onsets(table),
        "divergence": divergence(scores, thresholds, n_boot=n_boot, seed=seed),
        "agreement": agreement(scores, table, thresholds),
    }
