"""Figures of a multi-arm run (matplotlib's Agg canvas, as in emkit.stages.report.figures).

- `overview`: EM rate of every arm under every condition, with intervals and each seed's rate as a dot.
- `comparison`: one arm against the reference arm, per condition, with the Fisher p-values.
- `budget_curve`: masked LoRA, EM rate against trainable scalars (log axis) with the logistic fit and its band.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from emkit.stages.report.figures import CONDITION_COLORS, DENOMINATOR_LABELS
from emkit.stages.report.html import fmt_p

REFERENCE_COLOR = "#8C8C8C"
ARM_COLOR = "#C44E52"


def _rate(row: Mapping[str, Any] | None, denominator: str) -> tuple[float, float, float]:
    """Rate and its interval in percent (NaN where undefined)."""
    if row is None:
        return (np.nan, np.nan, np.nan)
    key = f"em_rate_{denominator}"

    def pct(v: Any) -> float:
        return np.nan if v is None else 100.0 * float(v)

    return pct(row.get(key)), pct(row.get(f"{key}_ci_low")), pct(row.get(f"{key}_ci_high"))


def _errors(values: list[tuple[float, float, float]]) -> np.ndarray:
    rate = np.array([v[0] for v in values])
    low = np.array([v[1] for v in values])
    high = np.array([v[2] for v in values])
    below = np.nan_to_num(np.clip(rate - low, 0, None), nan=0.0)
    above = np.nan_to_num(np.clip(high - rate, 0, None), nan=0.0)
    return np.vstack([below, above])


def _lookup(rates: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    return {(r["arm"], r["condition"]): r for r in rates}


def _top(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return max(10.0, min(100.0, (max(finite) if finite else 0) * 1.25 + 5))


def overview(rates: Sequence[Mapping[str, Any]], seeds: Sequence[Mapping[str, Any]], arms: Sequence[str],
             conditions: Sequence[str], denominator: str, reference: str) -> Figure:
    """EM rate per arm (groups) and condition (bars), intervals as error bars, seeds as dots."""
    table = _lookup(rates)
    fig = Figure(figsize=(max(6.0, 1.1 * len(arms) * max(1, len(conditions)) ** 0.5 + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(arms))
    width = 0.8 / max(len(conditions), 1)
    highs = []
    for j, condition in enumerate(conditions):
        values = [_rate(table.get((a, condition)), denominator) for a in arms]
        offset = (j - (len(conditions) - 1) / 2) * width
        color = CONDITION_COLORS[j % len(CONDITION_COLORS)]
        ax.bar(x + offset, [v[0] for v in values], width * 0.92, yerr=_errors(values), capsize=3, color=color,
               label=condition, alpha=0.85)
        highs += [v[2] if np.isfinite(v[2]) else v[0] for v in values]
        for i, arm in enumerate(arms):
            dots = [100.0 * s[f"em_rate_{denominator}"] for s in seeds
                    if s["arm"] == arm and s["condition"] == condition and s.get(f"em_rate_{denominator}") is not None]
            if len(dots) > 1:
                ax.scatter(np.full(len(dots), x[i] + offset), dots, s=10, color="black", zorder=3)
    labels = [f"{a}\n(reference)" if a == reference else a for a in arms]
    slanted = max(len(a) for a in arms) * len(arms) > 90  # long names would run into each other
    ax.set_xticks(x, labels, fontsize=8, rotation=25 if slanted else 0, ha="right" if slanted else "center")
    ax.set_ylabel(DENOMINATOR_LABELS[denominator])
    ax.set_ylim(0, _top(highs))
    ax.set_title("EM rate per arm and condition (bars: pooled over seeds; dots: single seeds)", fontsize=10)
    ax.legend(title="condition", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def comparison(rates: Sequence[Mapping[str, Any]], tests: Sequence[Mapping[str, Any]], arm: str, reference: str,
               conditions: Sequence[str], denominator: str) -> Figure:
    """One arm against the reference arm in each condition, with Fisher p (raw and adjusted)."""
    table = _lookup(rates)
    by_condition = {t["a"]["condition"]: t for t in tests if t["a"]["arm"] == arm and t["b"]["arm"] == reference}
    fig = Figure(figsize=(max(4.5, 1.8 * len(conditions) + 1.5), 3.8), layout="constrained")
    ax: Axes = fig.subplots()
    x = np.arange(len(conditions))
    ref_values = [_rate(table.get((reference, c)), denominator) for c in conditions]
    arm_values = [_rate(table.get((arm, c)), denominator) for c in conditions]
    ax.bar(x - 0.2, [v[0] for v in ref_values], 0.38, yerr=_errors(ref_values), capsize=3, color=REFERENCE_COLOR,
           label=f"{reference} (reference)")
    ax.bar(x + 0.2, [v[0] for v in arm_values], 0.38, yerr=_errors(arm_values), capsize=3, color=ARM_COLOR, label=arm)
    highs = [v[2] if np.isfinite(v[2]) else v[0] for v in ref_values + arm_values]
    top = _top(highs)
    for i, c in enumerate(conditions):
        t = by_condition.get(c)
        if t is None:
            continue
        label = f"p={fmt_p(t.get(f'p_value_{denominator}'))}\nadj {fmt_p(t.get(f'p_value_{denominator}_adj'))}"
        peak = np.nanmax([ref_values[i][2], arm_values[i][2], ref_values[i][0], arm_values[i][0], 0.0])
        ax.text(x[i], min(peak + 0.04 * top, top * 0.9), label, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, list(conditions))
    ax.set_ylabel(DENOMINATOR_LABELS[denominator])
    ax.set_ylim(0, top * 1.12)
    ax.set_title(f"{arm}\nvs {reference} (Fisher exact test)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def budget_curve(fits: Sequence[Mapping[str, Any]], rates: Sequence[Mapping[str, Any]], group: str,
                 denominator: str) -> Figure:
    """Masked LoRA: EM rate against trainable scalars per condition, with the logistic fit and its band."""
    table = _lookup(rates)
    mine = [f for f in fits if f["group"] == group]
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    highs = []
    for j, fit in enumerate(mine):
        color = CONDITION_COLORS[j % len(CONDITION_COLORS)]
        xs = [p["budget_scalars"] for p in fit["points"]]
        values = [_rate(table.get((p["arm"], fit["condition"])), denominator) for p in fit["points"]]
        fitted = fit.get("status") == "ok" and fit.get("curve")
        # the legend says when a condition's points have no curve; the reason is in the report's table
        ax.errorbar(xs, [v[0] for v in values], yerr=_errors(values), fmt="o", color=color, capsize=3,
                    label=f"{fit['condition']}" + ("" if fitted else " (no fit)"))
        highs += [v[2] for v in values]
        if fitted:
            curve = fit["curve"]
            bx = 10 ** np.array(curve["log10_budget"])
            ax.plot(bx, 100 * np.array(curve["rate"]), color=color, lw=1.5)
            low = np.array(curve["low"], dtype=float)
            if np.isfinite(low).all():
                ax.fill_between(bx, 100 * low, 100 * np.array(curve["high"], dtype=float), color=color, alpha=0.15)
            # a midpoint on the edge of the measured budgets is a bound, not an estimate: no line for it
            if not (fit.get("estimate_at_bound") or {}).get("log10_mid"):
                ax.axvline(fit["midpoint_budget"], color=color, ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("trainable adapter scalars (log scale)")
    ax.set_ylabel(DENOMINATOR_LABELS[denominator])
    ax.set_ylim(0, _top(highs))
    ax.set_title(f"{group}: EM rate vs masked-LoRA budget, 4-parameter logistic fit", fontsize=10)
    ax.legend(title="condition", fontsize=8)
    ax.grid(alpha=0.3)
    return fig
