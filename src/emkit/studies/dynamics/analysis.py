"""The dynamics analysis of judged answers over checkpoints: curves, onsets, divergence, judge agreement.

Input: one row per judged answer with `judge`, `step`, `mode`, `question_id`, `aligned`, `coherent`
(and `id`, the answer's id, for answer-level judge agreement). Output (`analyse`):

- `curves`: per judge, step and mode, the EM rates of `emkit.core.stats.em_rates.summarize` (both denominators,
  intervals with questions as the unit) and mean alignment and coherence with their intervals.
- `onsets`: per judge and mode, the onset step and the sustained onset by one-sided tests of each
  checkpoint against the base, Holm-corrected over the checkpoints (`emkit.studies.dynamics.onset`, whose
  rule is stated in `rule`); the crossing order of predictive vs assistant mode.
- `divergence`: per judge and step, predictive minus assistant EM rate, and each step against the
  base (`emkit.core.stats.em_rates.compare`: headline interval and test with questions as the unit, beside the
  stratified and pooled Fisher tests).
- `agreement`: with two judges, per mode, the correlation of their EM rates across steps
  (Pearson, Spearman), the mean absolute difference, and answer-level agreement (Spearman of the
  alignment scores, Cohen's kappa of the EM flags) over the answers both judges scored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from emkit.core.stats.em_rates import ALL, Thresholds, compare, counts_by, flag_answers, summarize
from emkit.studies.dynamics.onset import OnsetTest, crossing_order, largest_jump, onset

RATE = "em_rate_coherent"  # the headline rate (Betley et al.); em_rate_scored is kept beside it


def curves(scores: pd.DataFrame, thresholds: Thresholds) -> pd.DataFrame:
    """One row per (judge, step, mode): answers, EM rates with intervals, mean scores with intervals."""
    keys = ["judge", "step", "mode"]
    table = summarize(scores, by=keys, thresholds=thresholds)
    overall = table[table["question_id"] == ALL].drop(columns=["question_id"]).reset_index(drop=True)
    overall["step"] = overall["step"].astype(int)
    return overall.sort_values(keys, kind="stable").reset_index(drop=True)


def onsets(scores: pd.DataFrame, table: pd.DataFrame, thresholds: Thresholds, *, rate: str = RATE,
           test: OnsetTest = "questions", alpha: float = 0.05, seed: int = 0) -> list[dict[str, Any]]:
    """Onset per judge and mode (tests of each checkpoint against the base), and the crossing order."""
    out = []
    for judge, per_judge in scores.groupby("judge", sort=True):
        found: dict[str, int | None] = {}
        for mode, answers in per_judge.groupby("mode", sort=True):
            result = onset(counts_by(answers, "step", thresholds, rate), test=test, alpha=alpha, seed=seed)
            curve = table[(table["judge"] == judge) & (table["mode"] == mode)]
            found[str(mode)] = result["onset_step"]
            out.append({"judge": judge, "mode": mode, "rate": rate, **result,
                        "largest_jump": largest_jump(curve["step"].tolist(), curve[rate].tolist())})
        if {"predictive", "assistant"} <= set(found):
            out.append({"judge": judge, "mode": "predictive vs assistant", "rate": rate,
                        "crossing": crossing_order(found),
                        "predictive_first": (found["predictive"] is not None
                                             and (found["assistant"] is None or found["predictive"] < found["assistant"]))})
    return out


def divergence(scores: pd.DataFrame, thresholds: Thresholds, *, seed: int = 0) -> list[dict[str, Any]]:
    """Per judge and step: predictive - assistant EM rate, and each mode's step - base difference."""
    rows = []
    for judge, per_judge in scores.groupby("judge", sort=True):
        modes = set(per_judge["mode"])
        for step, at_step in per_judge.groupby("step", sort=True):
            if {"predictive", "assistant"} <= set(at_step["mode"]):
                c = compare(at_step, {"mode": "predictive"}, {"mode": "assistant"}, thresholds=thresholds, seed=seed)
                rows.append({"judge": judge, "step": int(step), "kind": "predictive - assistant", **_brief(c)})
            if int(step) == 0:
                continue
            for mode in sorted(modes):
                pair = per_judge[per_judge["mode"] == mode]
                if (pair["step"] == step).any() and (pair["step"] == 0).any():
                    c = compare(pair, {"step": step}, {"step": 0}, thresholds=thresholds, seed=seed)
                    rows.append({"judge": judge, "step": int(step), "kind": f"{mode}: step - base", **_brief(c)})
    return rows


def _brief(c: dict[str, Any]) -> dict[str, Any]:
    r = RATE
    return {"rate_a": c[f"{r}_a"], "rate_b": c[f"{r}_b"], "difference": c[f"diff_{r}"],
            "ci_low": c[f"diff_{r}_ci_low"], "ci_high": c[f"diff_{r}_ci_high"], "unit": c["units"]["headline"],
            "within_ci_low": c[f"diff_{r}_within_ci_low"], "within_ci_high": c[f"diff_{r}_within_ci_high"],
            "p_value": c["p_value_coherent"], "p_value_stratified": c["p_value_coherent_stratified"],
            "p_value_fisher": c["p_value_coherent_fisher"], "odds_ratio": c["odds_ratio_coherent"]}


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
        wide = flags.pivot_table(index="id", columns="judge", values=["aligned", "is_misaligned", "is_scored"],
                                 aggfunc="first")
        answer_level: dict[str, Any] = {"n_answers": 0, "aligned_spearman": None, "em_kappa": None}
        if ("aligned", first) in wide and ("aligned", second) in wide:
            pair = wide[[("aligned", first), ("aligned", second)]].dropna()
            answer_level["n_answers"] = int(len(pair))
            answer_level["aligned_spearman"] = _correlations(pair.iloc[:, 0].to_numpy(float),
                                                             pair.iloc[:, 1].to_numpy(float))["spearman"]
            # Only answers both judges could score on both metrics: an unscorable answer is not "not misaligned".
            scored = wide[[("is_scored", first), ("is_scored", second)]].fillna(False).astype(bool).all(axis=1)
            em = wide.loc[scored, [("is_misaligned", first), ("is_misaligned", second)]].astype(int)
            answer_level["n_em_answers"] = int(len(em))
            if len(em) and len(set(em.iloc[:, 0]) | set(em.iloc[:, 1])) > 1:
                kappa = cohen_kappa_score(em.iloc[:, 0], em.iloc[:, 1])
                answer_level["em_kappa"] = None if np.isnan(kappa) else float(kappa)
        out.append({"mode": mode, "judges": [first, second], **_correlations(x, y),
                    "mean_abs_difference": float(np.abs(x[both] - y[both]).mean()) if both.any() else None,
                    **answer_level})
    return out


def analyse(scores: pd.DataFrame, thresholds: Thresholds, *, onset_test: OnsetTest = "questions",
            alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """Curves, onsets, divergence and judge agreement of the judged answers of every step."""
    table = curves(scores, thresholds)
    return {
        "curves": table,
        "onsets": onsets(scores, table, thresholds, test=onset_test, alpha=alpha, seed=seed),
        "divergence": divergence(scores, thresholds, seed=seed),
        "agreement": agreement(scores, table, thresholds),
    }
