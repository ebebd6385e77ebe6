"""Figures of the detection and steering runs (matplotlib Agg, no pyplot state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

METHOD_COLORS = {"mean_diff": "#4C72B0", "probe": "#C44E52"}


def _layer_ticks(layers: Sequence[int]) -> list[str]:
    return ["emb" if k == -1 else str(k) for k in layers]


def per_layer_metric(rows: Sequence[Mapping[str, Any]], metric: str, *, chance: float | None = None,
                     bow: float | None = None, ylabel: str = "") -> Figure:
    """A held-out metric per layer for each method, with its interval as a band."""
    fig = Figure(figsize=(8, 3.6))
    ax = fig.subplots()
    for method in sorted({r["method"] for r in rows}):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["layer"])
        x = np.array([r["layer"] for r in rs])
        y = np.array([np.nan if r[metric] is None else r[metric] for r in rs], dtype=float)
        lo = np.array([np.nan if r[f"{metric}_ci"][0] is None else r[f"{metric}_ci"][0] for r in rs], dtype=float)
        hi = np.array([np.nan if r[f"{metric}_ci"][1] is None else r[f"{metric}_ci"][1] for r in rs], dtype=float)
        color = METHOD_COLORS.get(method, "#555")
        ax.plot(x, y, "o-", color=color, label=method, ms=3)
        ax.fill_between(x, lo, hi, color=color, alpha=0.18)
        ax.set_xticks(x, _layer_ticks(list(x)), fontsize=7)
    if chance is not None:
        ax.axhline(chance, color="#999", lw=0.8, ls=":", label="chance")
    if bow is not None:
        ax.axhline(bow, color="#55A868", lw=1, ls="--", label="bag-of-words (held out)")
    ax.set_xlabel("layer (block output k; emb = embeddings)")
    ax.set_ylabel(ylabel or metric)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def projection_histogram(scores: Sequence[float], labels: Sequence[int], layer: int,
                         names: tuple[str, str] = ("label 0", "label 1")) -> Figure:
    """Held-out projections on the direction at one layer, by class."""
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    s, y = np.asarray(scores, dtype=float), np.asarray(labels)
    bins = np.histogram_bin_edges(s, bins=30) if len(s) else 10
    for label, color in ((0, "#4C72B0"), (1, "#C44E52")):
        ax.hist(s[y == label], bins=bins, alpha=0.55, color=color, label=f"{names[label]} (n={int((y == label).sum())})")
    ax.set_xlabel(f"projection on the mean-difference direction, layer {layer} (held out)")
    ax.set_ylabel("examples")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def cosine_heatmap(matrix: Mapping[str, Mapping[str, float]]) -> Figure:
    """Cosine similarity between the directions of different layers."""
    keys = sorted(matrix, key=int)
    m = np.array([[matrix[i][j] for j in keys] for i in keys], dtype=float)
    fig = Figure(figsize=(5, 4.2))
    ax = fig.subplots()
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(keys)), keys, fontsize=6)
    ax.set_yticks(range(len(keys)), keys, fontsize=6)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine")
    fig.tight_layout()
    return fig


# Line style of each arm kind: the direction solid, the isotropic random control dotted, the
# variance-matched control dash-dot.
STYLES = {"direction": "-", "random": ":", "matched": "-."}


def steering_curves(rows: Sequence[Mapping[str, Any]], metric: str, ylabel: str) -> Figure:
    """`metric` against strength, one line per layer set and kind (direction, random and matched controls)."""
    fig = Figure(figsize=(8, 3.8))
    ax = fig.subplots()
    keys = sorted({(r["layers"], r["kind"]) for r in rows if r.get("kind") in STYLES})
    palette = ["#4C72B0", "#DD8452", "#55A868", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974"]
    layer_sets = sorted({k[0] for k in keys})
    for layers, kind in keys:
        rs = sorted((r for r in rows if r["layers"] == layers and r["kind"] == kind), key=lambda r: r["strength"])
        x = np.array([r["strength"] for r in rs], dtype=float)
        y = np.array([np.nan if r.get(metric) is None else r[metric] for r in rs], dtype=float)
        lo = np.array([np.nan if r.get(f"{metric}_low") is None else r[f"{metric}_low"] for r in rs], dtype=float)
        hi = np.array([np.nan if r.get(f"{metric}_high") is None else r[f"{metric}_high"] for r in rs], dtype=float)
        color = palette[layer_sets.index(layers) % len(palette)]
        style = STYLES[kind]
        ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], fmt="o" + style, color=color,
                    ms=3, capsize=2, label=f"layers {layers}, {kind}")
    if not any(r.get(metric) is not None for r in rows):
        ax.text(0.5, 0.5, f"no values of {ylabel}\n(e.g. no coherent answers: the EM rate is undefined)",
                ha="center", va="center", transform=ax.transAxes, color="#777")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.tight_layout()
        return fig
    for ref, color in (("organism", "#C44E52"), ("base", "#4C72B0")):
        r = next((r for r in rows if r.get("kind") == ref), None)
        if r is not None and r.get(metric) is not None:
            ax.axhline(r[metric], color=color, lw=0.8, ls="--", label=ref)
    ax.set_xlabel("strength")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, frameon=False, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
