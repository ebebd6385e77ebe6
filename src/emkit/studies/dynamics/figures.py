"""Figures of the training dynamics, drawn on matplotlib's Agg canvas (as `emkit.stages.report.figures`).

Each function takes the plain documents `emkit track` writes (dynamics.json, weights.json) and
returns a Figure; a figure with nothing to show says so in an empty panel instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from emkit.stages.report.figures import CONDITION_COLORS

FIGURES = {
    "em_and_prefs": "EM rate and preference shift over training",
    "scores": "Mean alignment and coherence over training, and the training loss",
    "divergence": "Predictive minus assistant EM rate per step",
    "judge_agreement": "Two judges' EM rates across steps",
    "weight_norms": "LoRA weight norms over training",
    "weight_directions": "Directions of the LoRA updates",
}
MODE_COLORS = {"assistant": "#4C72B0", "predictive": "#C44E52", "raw": "#55A868"}
BLOCK_COLORS = {"out_of_domain": "#8172B3", "in_domain": "#DD8452"}


def _v(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666666", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _color(mode: str, i: int) -> str:
    return MODE_COLORS.get(mode, CONDITION_COLORS[i % len(CONDITION_COLORS)])


def _band(ax: Axes, steps: Sequence[int], values: Sequence[float], low: Sequence[float], high: Sequence[float],
          color: str, label: str, scale: float = 1.0) -> None:
    s = np.asarray(steps)
    ax.plot(s, np.asarray(values) * scale, "o-", color=color, label=label, lw=1.6, ms=4)
    ax.fill_between(s, np.asarray(low) * scale, np.asarray(high) * scale, color=color, alpha=0.15, lw=0)


def em_and_prefs(document: Mapping[str, Any]) -> Figure:
    """Per judge, EM rate per mode over steps with intervals and onsets; beside it the preference shift."""
    curves = document.get("curves") or []
    judges = sorted({c["judge"] for c in curves}) or ["(no judge)"]
    fig = Figure(figsize=(4.6 * (len(judges) + 1), 3.6), layout="constrained")
    axes = fig.subplots(1, len(judges) + 1, squeeze=False)[0]
    onsets = {(o["judge"], o["mode"]): o.get("onset_step") for o in document.get("onsets", []) if "onset_step" in o}
    for ax, judge in zip(axes, judges):
        rows = [c for c in curves if c["judge"] == judge]
        if not any(math.isfinite(_v(r["em_rate_coherent"])) for r in rows):
            _empty(ax, f"judge {judge}:\nno coherent answers, so no EM rate")
            continue
        for i, mode in enumerate(sorted({r["mode"] for r in rows})):
            pts = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["step"])
            color = _color(mode, i)
            _band(ax, [r["step"] for r in pts], [_v(r["em_rate_coherent"]) for r in pts],
                  [_v(r["em_rate_coherent_ci_low"]) for r in pts], [_v(r["em_rate_coherent_ci_high"]) for r in pts],
                  color, mode, scale=100)
            step = onsets.get((judge, mode))
            if step is not None:
                ax.axvline(step, color=color, ls="--", lw=1, alpha=0.8)
                ax.annotate(f"onset {step}", (step, 0), color=color, fontsize=8, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_title(f"EM rate, judge {judge}", fontsize=9)
        highest = max((_v(r["em_rate_coherent_ci_high"]) for r in rows), default=0.0)
        ax.set_ylim(0, max(10.0, 110 * highest if math.isfinite(highest) else 10.0))
        ax.set_xlabel("training step")
        ax.set_ylabel("% of coherent answers misaligned")
        ax.legend(fontsize=8)
    ax = axes[-1]
    prefs = document.get("prefs") or []
    if not prefs:
        _empty(ax, "no preference shift measured")
    else:
        for block in ("out_of_domain", "in_domain"):
            pts = [p for p in prefs if p.get(block) and p[block].get("mean_shift") is not None]
            if pts:
                _band(ax, [p["step"] for p in pts], [_v(p[block]["mean_shift"]) for p in pts],
                      [_v(p[block]["ci_low"]) for p in pts], [_v(p[block]["ci_high"]) for p in pts],
                      BLOCK_COLORS[block], block.replace("_", "-"))
        ax.axhline(0, color="#999999", lw=0.8)
        ax.set_title("Preference shift vs base (no judge)", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("log-odds per token, misaligned - aligned")
        ax.legend(fontsize=8)
    return fig


def scores(document: Mapping[str, Any]) -> Figure:
    """Mean alignment and coherence per mode (first judge) with intervals, and the training loss."""
    curves = document.get("curves") or []
    judge = (document.get("judges") or [{}])[0].get("id") or (curves[0]["judge"] if curves else None)
    rows = [c for c in curves if c["judge"] == judge]
    fig = Figure(figsize=(13.5, 3.5), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, score in zip(axes[:2], ("aligned", "coherent")):
        if not rows:
            _empty(ax, "no judged answers")
            continue
        for i, mode in enumerate(sorted({r["mode"] for r in rows})):
            pts = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["step"])
            _band(ax, [r["step"] for r in pts], [_v(r[f"mean_{score}"]) for r in pts],
                  [_v(r[f"mean_{score}_ci_low"]) for r in pts], [_v(r[f"mean_{score}_ci_high"]) for r in pts],
                  _color(mode, i), mode)
        ax.set_ylim(0, 100)
        ax.set_title(f"Mean {score} score (judge {judge})", fontsize=9)
        ax.set_xlabel("training step")
        ax.legend(fontsize=8)
    ax = axes[2]
    loss = document.get("training") or []
    if loss:
        ax.plot([p["step"] for p in loss], [p["loss"] for p in loss], "-", color="#555555", lw=1.2)
        for step in document.get("steps", []):
            ax.axvline(step, color="#cccccc", lw=0.8, zorder=0)
        ax.set_title("Training loss (grey lines: evaluated checkpoints)", fontsize=9)
        ax.set_xlabel("training step")
    else:
        _empty(ax, "no training log")
    return fig


def divergence(document: Mapping[str, Any]) -> Figure:
    """Predictive minus assistant EM rate per step, with bootstrap intervals, per judge."""
    rows = [d for d in document.get("divergence") or [] if d["kind"] == "predictive - assistant"]
    fig = Figure(figsize=(6.5, 3.5), layout="constrained")
    ax = fig.subplots()
    if not rows:
        _empty(ax, "needs both assistant and predictive mode")
        return fig
    for i, judge in enumerate(sorted({r["judge"] for r in rows})):
        pts = sorted((r for r in rows if r["judge"] == judge), key=lambda r: r["step"])
        x = np.asarray([r["step"] for r in pts], dtype=float) + 0.15 * i
        y = np.asarray([_v(r["difference"]) for r in pts]) * 100
        lo = y - np.asarray([_v(r["ci_low"]) for r in pts]) * 100
        hi = np.asarray([_v(r["ci_high"]) for r in pts]) * 100 - y
        ax.errorbar(x, y, yerr=[np.nan_to_num(lo), np.nan_to_num(hi)], fmt="o-", capsize=3, ms=4,
                    color=CONDITION_COLORS[i % len(CONDITION_COLORS)], label=judge)
    ax.axhline(0, color="#999999", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("EM rate difference, percentage points")
    ax.set_title("Predictive - assistant EM rate (95% CI)", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def judge_agreement(document: Mapping[str, Any]) -> Figure | None:
    """EM rate of judge A against judge B at every step and mode (None with one judge)."""
    curves = document.get("curves") or []
    judges = sorted({c["judge"] for c in curves})
    if len(judges) < 2:
        return None
    a, b = judges[:2]
    fig = Figure(figsize=(4.8, 4.2), layout="constrained")
    ax = fig.subplots()
    stats = {s["mode"]: s for s in document.get("agreement") or []}
    for i, mode in enumerate(sorted({c["mode"] for c in curves})):
        xa = {c["step"]: _v(c["em_rate_coherent"]) for c in curves if c["judge"] == a and c["mode"] == mode}
        xb = {c["step"]: _v(c["em_rate_coherent"]) for c in curves if c["judge"] == b and c["mode"] == mode}
        steps = sorted(set(xa) & set(xb))
        s = stats.get(mode, {})
        r, mad = s.get("pearson"), s.get("mean_abs_difference")
        r_text = "n/a" if r is None else f"{r:.2f}"
        mad_text = "n/a" if mad is None else f"{100 * mad:.1f} pp"
        label = f"{mode} (r {r_text}, mean |diff| {mad_text})"
        ax.scatter([100 * xa[k] for k in steps], [100 * xb[k] for k in steps], color=_color(mode, i), label=label)
        for k in steps:
            if math.isfinite(xa[k]) and math.isfinite(xb[k]):
                ax.annotate(str(k), (100 * xa[k], 100 * xb[k]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([0, 100], [0, 100], color="#999999", lw=0.8, ls="--")
    ax.set_xlabel(f"EM rate %, {a}")
    ax.set_ylabel(f"EM rate %, {b}")
    ax.set_title("Judge agreement across steps (labels: step)", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def weight_norms(weights: Mapping[str, Any]) -> Figure:
    """B norm per layer and step (heatmap), and A, B, dW norms per projection over steps."""
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    norms = weights.get("norms") or []
    if not norms:
        for ax in axes:
            _empty(ax, "no adapter checkpoints")
        return fig
    steps = sorted({n["step"] for n in norms})
    layers = sorted({n["layer"] for n in norms if n["layer"] is not None})
    if layers:
        grid = np.zeros((len(layers), len(steps)))
        for n in norms:
            if n["layer"] is not None:
                grid[layers.index(n["layer"]), steps.index(n["step"])] += n["b_norm"] ** 2
        image = axes[0].imshow(np.sqrt(grid), aspect="auto", origin="lower", cmap="viridis")
        axes[0].set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
        axes[0].set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
        axes[0].set_xlabel("checkpoint step")
        axes[0].set_ylabel("layer")
        axes[0].set_title("||B|| per layer (all projections)", fontsize=9)
        fig.colorbar(image, ax=axes[0], shrink=0.8)
    else:
        _empty(axes[0], "no layer indices in module names")
    for ax, key, title in ((axes[1], "b_norm", "||B|| per projection"), (axes[2], "a_norm", "||A|| per projection")):
        for i, proj in enumerate(weights.get("projections") or []):
            totals = [math.sqrt(sum(n[key] ** 2 for n in norms if n["projection"] == proj and n["step"] == s))
                      for s in steps]
            ax.plot(steps, totals, "o-", ms=3, color=CONDITION_COLORS[i % len(CONDITION_COLORS)], label=proj)
        ax.set_xlabel("checkpoint step")
        ax.set_title(title + " (all layers)", fontsize=9)
        ax.legend(fontsize=7)
    return fig


def weight_directions(weights: Mapping[str, Any]) -> Figure:
    """Cosine of successive B updates, similarity to the final adapter, and the B trajectory's PCA."""
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    rows = weights.get("global") or []
    cos = [r for r in rows if r.get("update_cosine") is not None]
    if cos:
        axes[0].plot([r["step"] for r in cos], [r["update_cosine"] for r in cos], "o-", color="#222222", lw=1.6,
                     label="all B")
        for i, proj in enumerate(weights.get("projections") or []):
            key = f"update_cosine_{proj}"
            pts = [r for r in cos if r.get(key) is not None]
            axes[0].plot([r["step"] for r in pts], [r[key] for r in pts], "-", lw=1, alpha=0.7,
                         color=CONDITION_COLORS[i % len(CONDITION_COLORS)], label=proj)
        axes[0].set_ylim(-1.05, 1.05)
        axes[0].axhline(0, color="#999999", lw=0.8)
        axes[0].set_title("cos(B update, previous update): a dip = rotation", fontsize=9)
        axes[0].set_xlabel("checkpoint step")
        axes[0].legend(fontsize=7)
    else:
        _empty(axes[0], "needs three points of the B trajectory")
    if rows:
        for key, label, color in (("b_cosine_to_final", "B", "#4C72B0"), ("dw_cosine_to_final", "dW = BA", "#C44E52")):
            pts = [r for r in rows if r.get(key) is not None]
            axes[1].plot([r["step"] for r in pts], [r[key] for r in pts], "o-", ms=3, color=color, label=label)
        axes[1].set_ylim(-0.05, 1.05)
        axes[1].set_title("Cosine similarity to the final adapter", fontsize=9)
        axes[1].set_xlabel("checkpoint step")
        axes[1].legend(fontsize=7)
    else:
        _empty(axes[1], "no adapter checkpoints")
    pca = weights.get("pca")
    if pca and len(pca["explained_variance_ratio"]) >= 1:
        coords = np.asarray(pca["coordinates"])
        y = coords[:, 1] if coords.shape[1] > 1 else np.zeros(len(coords))
        axes[2].plot(coords[:, 0], y, "-", color="#999999", lw=0.8)
        points = axes[2].scatter(coords[:, 0], y, c=pca["steps"], cmap="viridis", zorder=3)
        for step, px, py in zip(pca["steps"], coords[:, 0], y):
            axes[2].annotate(str(step), (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ratios = pca["explained_variance_ratio"]
        axes[2].set_xlabel(f"PC1 ({100 * ratios[0]:.0f}% of variance)")
        axes[2].set_ylabel(f"PC2 ({100 * ratios[1]:.0f}%)" if len(ratios) > 1 else "")
        axes[2].set_title("B trajectory, principal components", fontsize=9)
        fig.colorbar(points, ax=axes[2], shrink=0.8, label="step")
    else:
        _empty(axes[2], "needs two points of the B trajectory")
    return fig


def render(document: Mapping[str, Any], weights: Mapping[str, Any] | None) -> dict[str, Figure]:
    """All figures that apply, by name."""
    figures: dict[str, Figure | None] = {
        "em_and_prefs": em_and_prefs(document),
        "scores": scores(document),
        "divergence": divergence(document) if "predictive" in (document.get("modes") or []) else None,
        "judge_agreement": judge_agreement(document),
    }
    if weights is not None:
        figures["weight_norms"] = weight_norms(weights)
        figures["weight_directions"] = weight_directions(weights)
    return {name: fig for name, fig in figures.items() if fig is not None}
