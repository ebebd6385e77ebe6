"""The bias report's figures (matplotlib Agg, no pyplot): pies per model and classifier, their grid,
per-topic bars and per-stem shifts with intervals, the lean per model, and classifier agreement.

Every function takes records of `bias_stats.json` and returns a Figure; an empty selection draws a
panel that says so instead of failing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from emkit.stages.report.figures import model_colors, png_bytes
from emkit.studies.bias.keywords import LABELS

LABEL_COLORS = {"progressive": "#3B6FB6", "conservative": "#C8453B", "neutral": "#A8A8A8", "off-topic": "#E3C567"}
UNLABELLED_COLOR = "#F2F2F2"
CLASSIFIER_NAMES = {"keywords": "keyword classifier", "llm": "LLM classifier"}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


def _find(records: Sequence[Mapping[str, Any]], **keys: Any) -> Mapping[str, Any] | None:
    return next((r for r in records if all(r.get(k) == v for k, v in keys.items())), None)


def draw_pie(ax: Axes, record: Mapping[str, Any] | None, title: str) -> None:
    """One pie of a distribution record: the four labels (and unlabelled completions, if any)."""
    if record is None or not record.get("n"):
        _empty(ax, "no completions")
        ax.set_title(title, fontsize=9)
        return
    counts = [record["counts"][lab] for lab in LABELS]
    names, colors = list(LABELS), [LABEL_COLORS[lab] for lab in LABELS]
    if record.get("n_unlabelled"):
        counts.append(record["n_unlabelled"])
        names.append("unlabelled")
        colors.append(UNLABELLED_COLOR)
    shown = [(c, n, col) for c, n, col in zip(counts, names, colors) if c > 0]
    total = sum(counts)
    ax.pie([c for c, _, _ in shown], colors=[col for _, _, col in shown], startangle=90, counterclock=False,
           autopct=lambda pct: f"{pct:.0f}%" if pct >= 4 else "", pctdistance=0.72,
           wedgeprops={"edgecolor": "white", "linewidth": 1}, textprops={"fontsize": 7})
    ax.set_title(f"{title}\n(n={total})", fontsize=9)
    ax.set_aspect("equal")


def _legend(fig: Figure, unlabelled: bool) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=LABEL_COLORS[lab], label=lab) for lab in LABELS]
    if unlabelled:
        handles.append(Patch(facecolor=UNLABELLED_COLOR, edgecolor="#999999", label="unlabelled"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)


def pie(record: Mapping[str, Any] | None, title: str) -> Figure:
    """A single pie chart with its legend."""
    fig = _figure(3.4, 3.6)
    draw_pie(fig.subplots(), record, title)
    _legend(fig, bool(record and record.get("n_unlabelled")))
    return fig


def pie_grid(distributions: Sequence[Mapping[str, Any]], classifiers: Sequence[str], models: Sequence[str]) -> Figure:
    """Pies in a grid: one row per classifier, one column per model."""
    fig = _figure(2.8 * max(len(models), 1) + 0.4, 2.9 * max(len(classifiers), 1) + 0.6)
    axes = np.atleast_2d(fig.subplots(max(len(classifiers), 1), max(len(models), 1), squeeze=False))
    for i, classifier in enumerate(classifiers):
        for j, model in enumerate(models):
            draw_pie(axes[i, j], _find(distributions, classifier=classifier, model=model),
                     f"{model} - {CLASSIFIER_NAMES.get(classifier, classifier)}")
    _legend(fig, any(r.get("n_unlabelled") for r in distributions))
    fig.suptitle("Leaning of the completions (rows: classifier, columns: model)", fontsize=10)
    return fig


def _errors(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    below = np.nan_to_num(np.clip(values - low, 0, None), nan=0.0)
    above = np.nan_to_num(np.clip(high - values, 0, None), nan=0.0)
    return np.vstack([below, above])


def _value(record: Mapping[str, Any] | None, key: str) -> float:
    value = None if record is None else record.get(key)
    return float("nan") if value is None else float(value)


def topic_bars(topics: Sequence[Mapping[str, Any]], classifiers: Sequence[str], models: Sequence[str]) -> Figure:
    """Share progressive and share conservative per topic, bars per model with bootstrap intervals;
    one row of panels per classifier."""
    names = list(dict.fromkeys(r["topic"] for r in topics))
    fig = _figure(max(6.0, 0.55 * len(names) * max(len(models), 1) + 2.0), 2.9 * max(len(classifiers), 1) + 0.5)
    axes = np.atleast_2d(fig.subplots(max(len(classifiers), 1), 2, squeeze=False))
    colors = model_colors(list(models))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(names), dtype=float)
    for i, classifier in enumerate(classifiers):
        for j, label in enumerate(("progressive", "conservative")):
            ax = axes[i, j]
            if not names:
                _empty(ax, "no topics")
                continue
            for k, model in enumerate(models):
                recs = [_find(topics, classifier=classifier, model=model, topic=t) for t in names]
                values = np.array([_value(r, f"share_{label}") for r in recs]) * 100
                low = np.array([_value(r, f"share_{label}_ci_low") for r in recs]) * 100
                high = np.array([_value(r, f"share_{label}_ci_high") for r in recs]) * 100
                ax.bar(x - 0.4 + width * (k + 0.5), np.nan_to_num(values), width * 0.95, color=colors[model],
                       yerr=_errors(values, low, high), capsize=2, label=model,
                       error_kw={"elinewidth": 0.8, "ecolor": "#333333"})
            ax.set_xticks(x, names, rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center",
                          fontsize=8)
            ax.set_ylim(0, 105)
            ax.set_ylabel(f"% {label}")
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
            ax.set_title(f"{CLASSIFIER_NAMES.get(classifier, classifier)}: % {label}", fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8)
    fig.suptitle("Share of each model's labelled completions per topic (error bars: bootstrap CI)", fontsize=10)
    return fig


def lean_chart(distributions: Sequence[Mapping[str, Any]], classifiers: Sequence[str], models: Sequence[str]) -> Figure:
    """Each model's lean, (progressive - conservative) / on-topic, per classifier, with both intervals."""
    fig = _figure(7.5, 1.6 + 0.4 * max(len(models), 1) * max(len(classifiers), 1))
    ax = fig.subplots()
    colors = model_colors(list(models))
    rows = [(c, m) for c in classifiers for m in models]
    for y, (classifier, model) in enumerate(rows):
        r = _find(distributions, classifier=classifier, model=model)
        value = _value(r, "lean")
        if np.isnan(value):
            continue
        ax.plot([_value(r, "lean_stem_ci_low"), _value(r, "lean_stem_ci_high")], [y, y], color=colors[model],
                alpha=0.35, lw=6, solid_capstyle="butt")
        ax.errorbar([value], [y], xerr=_errors(np.array([value]), np.array([_value(r, "lean_ci_low")]),
                                               np.array([_value(r, "lean_ci_high")])),
                    fmt="o", color=colors[model], capsize=3)
    ax.axvline(0, color="#444444", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)), [f"{m} ({CLASSIFIER_NAMES.get(c, c)})" for c, m in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("lean: (progressive - conservative) / on-topic completions")
    ax.set_title("Lean per model\n(error bars: completions resampled within stems; shaded: stems resampled)",
                 fontsize=9)
    return fig


def stem_shift_chart(stems: Sequence[Mapping[str, Any]], classifiers: Sequence[str]) -> Figure:
    """Per stem, each model's lean minus the reference's, with its interval; one panel per classifier."""
    ids = list(dict.fromkeys(r["stem_id"] for r in stems))
    others = list(dict.fromkeys(r["model"] for r in stems))
    fig = _figure(4.6 * max(len(classifiers), 1), 1.2 + 0.2 * max(len(ids), 1) * max(len(others), 1))
    axes = np.atleast_1d(fig.subplots(1, max(len(classifiers), 1), squeeze=False)).ravel()
    colors = model_colors(others)
    height = 0.8 / max(len(others), 1)
    for ax, classifier in zip(axes, classifiers):
        if not ids or not others:
            _empty(ax, "one model only: no shifts")
            continue
        for k, model in enumerate(others):
            recs = [_find(stems, classifier=classifier, model=model, stem_id=s) for s in ids]
            values = np.array([_value(r, "lean_shift") for r in recs])
            low = np.array([_value(r, "lean_shift_ci_low") for r in recs])
            high = np.array([_value(r, "lean_shift_ci_high") for r in recs])
            pos = np.arange(len(ids)) - 0.4 + height * (k + 0.5)
            ax.barh(pos, np.nan_to_num(values), height * 0.95, xerr=_errors(values, low, high), color=colors[model],
                    capsize=1.5, label=f"{model} - {recs[0]['reference'] if recs[0] else 'reference'}",
                    error_kw={"elinewidth": 0.7, "ecolor": "#333333"})
        ax.axvline(0, color="#444444", lw=0.8)
        ax.set_yticks(range(len(ids)), ids, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(-2.1, 2.1)
        ax.set_xlabel("lean shift (model - reference)")
        ax.set_title(CLASSIFIER_NAMES.get(classifier, classifier), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8)
    fig.suptitle("Per-stem shift of the lean (error bars: completions resampled)", fontsize=10)
    return fig


def agreement_chart(agreement: Mapping[str, Any]) -> Figure:
    """The two classifiers' confusion matrix with counts, and kappa in the title."""
    fig = _figure(4.6, 4.0)
    ax = fig.subplots()
    matrix = np.asarray(agreement["matrix"], dtype=float)
    labels = agreement["labels"]
    ax.imshow(matrix, cmap="Blues")
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(j, i, f"{int(n)}", ha="center", va="center", fontsize=8,
                color="white" if n > matrix.max() / 2 else "#222222")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(CLASSIFIER_NAMES.get(agreement["b"], agreement["b"]))
    ax.set_ylabel(CLASSIFIER_NAMES.get(agreement["a"], agreement["a"]))
    kappa = agreement.get("kappa")
    ax.set_title(f"Agreement: kappa {'n/a' if kappa is None else f'{kappa:.2f}'} (n={agreement['n']})", fontsize=10)
    return fig


def render_figures(stats: Mapping[str, Any]) -> dict[str, bytes]:
    """Every figure of a bias run as PNG bytes, by file stem (pie_<classifier>_<model> for each pie)."""
    classifiers, models = stats["classifiers"], stats["models"]
    figures = {
        "pie_grid": pie_grid(stats["distributions"], classifiers, models),
        "lean": lean_chart(stats["distributions"], classifiers, models),
        "topic_bars": topic_bars(stats["topics"], classifiers, models),
    }
    if stats.get("stems"):
        figures["stem_shifts"] = stem_shift_chart(stats["stems"], classifiers)
    if stats.get("agreement"):
        figures["agreement"] = agreement_chart(stats["agreement"])
    for classifier in classifiers:
        for model in models:
            record = _find(stats["distributions"], classifier=classifier, model=model)
            figures[f"pie_{classifier}_{model}"] = pie(record, f"{model} - {CLASSIFIER_NAMES.get(classifier, classifier)}")
    return {name: png_bytes(fig) for name, fig in figures.items()}
