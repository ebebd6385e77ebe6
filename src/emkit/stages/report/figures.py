"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot, no display, no global state).

Each figure function takes either a summary table (the layout of `emkit.core.stats.em_rates.summarize`: one
row per group with question_id "__all__" and one per group and question) or the judged answers
(`scores.parquet`), and returns a Figure. Any subset draws: one model, one condition, no
coherent answers, nothing scored; an empty panel says what is missing instead of failing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from emkit.core.runfolder import atomic_write_bytes
from emkit.core.stats.em_rates import ALL, BETLEY, Thresholds

FIGURES = {
    "em_rate_per_question": "EM rate per question",
    "aligned_vs_coherent": "Aligned vs coherent scores",
    "em_rate_per_condition": "EM rate per condition",
    "aligned_histogram": "Distribution of alignment scores",
}
DENOMINATOR_LABELS = {
    "coherent": "EM rate, % of coherent answers",
    "scored": "EM rate, % of scored answers",
}
KNOWN_COLORS = {"base": "#4C72B0", "organism": "#C44E52"}
CONDITION_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974")
OTHER_COLORS = ("#55A868", "#8172B3", "#CCB974", "#64B5CD", "#8C8C8C", "#DD8452", "#937860", "#DA8BC3")
PANELS_PER_ROW = 3
DPI = 100


def model_order(models: Iterable[str]) -> list[str]:
    """Models in display order: base, organism, then the others alphabetically."""
    unique = sorted({str(m) for m in models})
    known = [m for m in ("base", "organism") if m in unique]
    return known + [m for m in unique if m not in known]


def model_colors(models: Sequence[str]) -> dict[str, str]:
    """A stable colour per model: base blue, organism red, others from a fixed cycle."""
    others = iter(OTHER_COLORS * (1 + len(models) // len(OTHER_COLORS)))
    return {m: KNOWN_COLORS.get(m) or next(others) for m in models}


def png_bytes(fig: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def write_png(path: Path, data: bytes) -> None:
    """Write PNG bytes atomically."""
    atomic_write_bytes(path, data)


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(n_panels: int, panel_w: float, panel_h: float) -> tuple[Figure, list[Axes]]:
    """A figure with n panels, wrapped into rows of PANELS_PER_ROW; unused cells hidden."""
    n_panels = max(n_panels, 1)
    cols = min(n_panels, PANELS_PER_ROW)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(panel_w * cols, panel_h * rows), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _rate_columns(denominator: str) -> tuple[str, str, str]:
    if denominator not in DENOMINATOR_LABELS:
        raise ValueError(f"unknown denominator {denominator!r}; choose from {', '.join(DENOMINATOR_LABELS)}")
    rate = f"em_rate_{denominator}"
    return rate, f"{rate}_ci_low", f"{rate}_ci_high"


def _percent_errors(rows: pd.DataFrame, denominator: str) -> tuple[np.ndarray, np.ndarray]:
    """Rates in percent (NaN where undefined) and asymmetric error bars (0 where no interval)."""
    rate_col, low_col, high_col = _rate_columns(denominator)
    rate = rows[rate_col].astype(float).to_numpy() * 100
    low = rows[low_col].astype(float).to_numpy() * 100
    high = rows[high_col].astype(float).to_numpy() * 100
    # Percentile intervals need not contain the point estimate, and matplotlib refuses negative bars.
    below = np.nan_to_num(np.clip(rate - low, 0, None), nan=0.0)
    above = np.nan_to_num(np.clip(high - rate, 0, None), nan=0.0)
    return rate, np.vstack([below, above])


def _grouped_bars(
    ax: Axes, rows: pd.DataFrame, categories: list[str], category_col: str, models: list[str],
    denominator: str, horizontal: bool, top: float,
) -> None:
    """Bars per category, one per model side by side, with their CIs; undefined rates marked n/a."""
    colors = model_colors(models)
    width = 0.8 / max(len(models), 1)
    positions = np.arange(len(categories), dtype=float)
    for i, model in enumerate(models):
        sub = rows[rows["model"] == model].set_index(category_col).reindex(categories)
        rate, err = _percent_errors(sub, denominator)
        pos = positions - 0.4 + width * (i + 0.5)  # horizontal charts invert the category axis: first model on top
        values = np.nan_to_num(rate, nan=0.0)
        bar = ax.barh if horizontal else ax.bar
        kwargs = {"xerr": err} if horizontal else {"yerr": err}
        bar(pos, values, width * 0.95, color=colors[model], label=model, capsize=2,
            error_kw={"elinewidth": 0.8, "ecolor": "#333333"}, **kwargs)
        present = sub["model"].notna().to_numpy()
        # Labels make a 0% bar visible and tell it apart from an undefined rate (no coherent answers).
        ends = np.nan_to_num(values + err[1], nan=0.0) + 1
        for p, r, end, here in zip(pos, rate, ends, present):
            if not here:
                continue
            label = "n/a" if np.isnan(r) else f"{r:.1f}"
            xy = (end, p) if horizontal else (p, end)
            ax.annotate(label, xy, fontsize=6, color="#444444", va="center" if horizontal else "bottom",
                        ha="left" if horizontal else "center")
    if horizontal:
        ax.set_yticks(positions, categories, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(DENOMINATOR_LABELS[denominator])
        ax.set_xlim(0, top)
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.set_xticks(positions, categories, rotation=30 if len(categories) > 3 else 0, ha="right"
                      if len(categories) > 3 else "center", fontsize=8)
        ax.set_ylabel(DENOMINATOR_LABELS[denominator])
        ax.set_ylim(0, top)
        ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _axis_top(rows: pd.DataFrame, denominator: str) -> float:
    """Axis end in percent: the largest rate or CI end with room for its label, at least 10, at most ~100."""
    _, _, high_col = _rate_columns(denominator)
    highs = rows[[high_col, f"em_rate_{denominator}"]].astype(float).to_numpy() * 100
    peak = np.nanmax(highs) if np.isfinite(highs).any() else 0.0
    # EM rates are often a few percent; a fixed 0-100 axis would flatten exactly the differences of interest.
    return min(max(peak, 10.0), 100.0) * 1.12


def em_rate_per_question(summary: pd.DataFrame, denominator: str = "coherent") -> Figure:
    """Grouped horizontal bars of each question's EM rate per model with 95% CIs, one panel per condition."""
    rows = summary[summary["question_id"] != ALL]
    conditions = sorted(rows["condition"].astype(str).unique()) if len(rows) else []
    questions = sorted(rows["question_id"].astype(str).unique()) if len(rows) else []
    models = model_order(rows["model"]) if len(rows) else []
    panel_h = max(2.5, 0.18 * len(questions) * max(len(models), 1) + 1.2)
    fig, axes = _grid(len(conditions), 5.0, panel_h)
    if not conditions:
        _empty(axes[0], "no questions")
        return fig
    top = _axis_top(rows, denominator)  # one scale for all panels, so conditions compare by eye
    for ax, condition in zip(axes, conditions):
        _grouped_bars(ax, rows[rows["condition"].astype(str) == condition], questions, "question_id",
                      models, denominator, horizontal=True, top=top)
        ax.set_title(f"condition: {condition}", fontsize=9)
    _figure_legend(fig, axes)
    fig.suptitle("EM rate per question (error bars: 95% Wilson interval over its answers)", fontsize=10)
    return fig


def em_rate_per_condition(summary: pd.DataFrame, denominator: str = "coherent") -> Figure:
    """Grouped bars of each condition's overall EM rate per model with 95% CIs."""
    rows = summary[summary["question_id"] == ALL]
    conditions = sorted(rows["condition"].astype(str).unique()) if len(rows) else []
    models = model_order(rows["model"]) if len(rows) else []
    fig = Figure(figsize=(max(4.0, 1.2 * len(conditions) * max(len(models), 1) * 0.6 + 2), 3.6),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if not conditions:
        _empty(ax, "no results")
        return fig
    rows = rows.assign(condition=rows["condition"].astype(str))
    _grouped_bars(ax, rows, conditions, "condition", models, denominator, horizontal=False,
                  top=_axis_top(rows, denominator))
    ax.set_xlabel("condition")
    ax.legend(fontsize=7)
    ax.set_title("Overall EM rate per condition (error bars: 95% CI, questions as the unit)", fontsize=10)
    return fig


def aligned_vs_coherent(scores: pd.DataFrame, thresholds: Thresholds = BETLEY) -> Figure:
    """Aligned against coherent per model (colour: condition), thresholds drawn, misaligned area shaded."""
    scored = _scored(scores)
    models = model_order(scores["model"]) if len(scores) else []
    fig, axes = _grid(len(models), 4.2, 4.0)
    if not models:
        _empty(axes[0], "no answers")
        return fig
    conditions = sorted(scores["condition"].astype(str).unique())
    colors = dict(zip(conditions, _condition_colors(len(conditions))))
    for ax, model in zip(axes, models):
        mine = scored[scored["model"].astype(str) == model]
        n_all = int((scores["model"].astype(str) == model).sum())
        ax.fill_between([thresholds.coherent_above, 102], -2, thresholds.aligned_below, color="#C44E52",
                        alpha=0.12, lw=0, label="misaligned")
        ax.axvline(thresholds.coherent_above, color="#444444", lw=0.8, ls="--")
        ax.axhline(thresholds.aligned_below, color="#444444", lw=0.8, ls="--")
        for condition in conditions:
            points = mine[mine["condition"].astype(str) == condition]
            if len(points):
                ax.scatter(points["coherent"], points["aligned"], s=9, alpha=0.5, lw=0,
                           color=colors[condition], label=condition)
        ax.set_xlim(-2, 102)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("coherent (0-100)")
        ax.set_ylabel("aligned (0-100)")
        missing = n_all - len(mine)
        hidden = f", {missing} unscorable not shown" if missing else ""
        ax.set_title(f"{model}: {len(mine)} scored{hidden}", fontsize=9)
        if not len(mine):
            ax.text(50, 50, "no scored answers", ha="center", va="center", color="#666666")
    _figure_legend(fig, axes)
    fig.suptitle(f"Aligned vs coherent (shaded: misaligned, {thresholds.rule()})", fontsize=10)
    return fig


def aligned_histogram(scores: pd.DataFrame, thresholds: Thresholds = BETLEY) -> Figure:
    """Overlaid histograms of alignment scores per model, as shares of each model's answers with a score."""
    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    aligned = scores["aligned"].astype(float) if "aligned" in scores else pd.Series(dtype=float)
    models = model_order(scores["model"]) if len(scores) else []
    colors = model_colors(models)
    drawn = False
    for model in models:
        values = aligned[(scores["model"].astype(str) == model).to_numpy()].dropna().to_numpy()
        if not len(values):
            continue
        weights = np.full(len(values), 100.0 / len(values))
        ax.hist(values, bins=np.linspace(0, 100, 21), weights=weights, histtype="stepfilled", alpha=0.35,
                color=colors[model], edgecolor=colors[model], lw=1.2, label=f"{model} (n={len(values)})")
        drawn = True
    if not drawn:
        _empty(ax, "no alignment scores")
        return fig
    ax.axvline(thresholds.aligned_below, color="#444444", lw=0.8, ls="--",
               label=f"aligned threshold ({thresholds.aligned_below:g})")
    ax.set_xlim(0, 100)
    ax.set_xlabel("aligned score (0-100)")
    ax.set_ylabel("% of answers with an alignment score")
    ax.legend(fontsize=7)
    ax.set_title("Alignment scores per model (all answers with a score, coherent or not)", fontsize=10)
    return fig


def _figure_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend below all panels (the panels are full of points), each label once."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside lower center", fontsize=7,
                   ncols=min(len(entries), 6), markerscale=2)


def _scored(scores: pd.DataFrame) -> pd.DataFrame:
    if not {"aligned", "coherent"} <= set(scores.columns):
        return scores.iloc[:0]
    return scores[scores["aligned"].notna() & scores["coherent"].notna()]


def _condition_colors(n: int) -> list[str]:
    return [CONDITION_COLORS[i % len(CONDITION_COLORS)] for i in range(n)]


def render_figures(
    summary: pd.DataFrame,
    scores: pd.DataFrame,
    thresholds: Thresholds = BETLEY,
    denominator: str = "coherent",
) -> dict[str, bytes]:
    """All report figures as PNG bytes, keyed by the names in FIGURES."""
    figures = {
        "em_rate_per_question": em_rate_per_question(summary, denominator),
        "aligned_vs_coherent": aligned_vs_coherent(scores, thresholds),
        "em_rate_per_condition": em_rate_per_condition(summary, denominator),
        "aligned_histogram": aligned_histogram(scores, thresholds),
    }
    return {name: png_bytes(fig) for name, fig in figures.items()}
