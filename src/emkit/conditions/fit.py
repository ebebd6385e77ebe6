"""A 4-parameter logistic of EM rate against log10(budget), fitted by least squares, with bootstrap intervals.

    rate(x) = bottom + (top - bottom) / (1 + exp(-slope * (log10(x) - log10_mid)))

`bottom` is the rate at small budgets, `top` at large ones, `10**log10_mid` the budget half-way
between them, `slope` how sharp the rise is (per decade). Points are pooled rates (misaligned / n
per budget); the fit is unweighted, as in the masked-LoRA elicitation literature. Intervals come from
refitting `n_boot` resamples in which each budget's count is redrawn as Binomial(n, k / n) (resampling
its answers); percentile intervals of each parameter and a pointwise band of the curve. Resamples
whose fit fails are left out and counted.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

PARAMS = ("bottom", "top", "log10_mid", "slope")
MIN_POINTS = 4


def logistic4(log_x: np.ndarray, bottom: float, top: float, log10_mid: float, slope: float) -> np.ndarray:
    """The 4-parameter logistic at log10 budgets `log_x`."""
    return bottom + (top - bottom) / (1.0 + np.exp(-slope * (np.asarray(log_x, dtype=float) - log10_mid)))


def _fit_once(log_x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from scipy.optimize import curve_fit

    lo, hi = float(log_x.min()), float(log_x.max())
    # Start at the data's own floor, ceiling and middle; the bounds keep rates in 0..1, the midpoint
    # within a decade of the budgets tried, and the slope rising (a falling curve has bottom > top).
    p0 = [float(np.clip(y[np.argmin(log_x)], 0, 1)), float(np.clip(y[np.argmax(log_x)], 0, 1)),
          float(np.median(log_x)), 2.0]
    bounds = ([0.0, 0.0, lo - 1.0, 0.05], [1.0, 1.0, hi + 1.0, 20.0])
    p0 = [min(max(v, b0 + 1e-9), b1 - 1e-9) for v, b0, b1 in zip(p0, *bounds)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, _ = curve_fit(logistic4, log_x, y, p0=p0, bounds=bounds, maxfev=20000)
    return params


def fit_logistic(budgets: Any, misaligned: Any, n: Any, *, n_boot: int = 500, seed: int = 0,
                 ci: float = 0.95, grid: int = 60) -> dict[str, Any]:
    """Fit rate = k / n against log10(budget); parameters, their intervals and a curve band for drawing."""
    x = np.asarray(budgets, dtype=float)
    k = np.asarray(misaligned, dtype=np.int64)
    n = np.asarray(n, dtype=np.int64)
    keep = n > 0
    out: dict[str, Any] = {"n_points": int(keep.sum()), "n_boot": n_boot, "ci": ci}
    if keep.sum() < MIN_POINTS:
        out["status"] = f"skipped: needs {MIN_POINTS} budgets with answers, has {int(keep.sum())}"
        return out
    x, k, n = x[keep], k[keep], n[keep]
    log_x = np.log10(x)
    y = k / n
    try:
        params = _fit_once(log_x, y)
    except (RuntimeError, ValueError) as exc:
        out["status"] = f"failed: {exc}"
        return out
    out["status"] = "ok"
    out["params"] = dict(zip(PARAMS, map(float, params)))
    out["midpoint_budget"] = float(10 ** params[2])
    residual = y - logistic4(log_x, *params)
    out["rmse"] = float(np.sqrt(np.mean(residual ** 2)))

    rng = np.random.default_rng(seed)
    xs = np.linspace(log_x.min(), log_x.max(), grid)
    draws, curves, failed = [], [], 0
    for _ in range(n_boot):
        yb = rng.binomial(n, y) / n
        try:
            pb = _fit_once(log_x, yb)
        except (RuntimeError, ValueError):
            failed += 1
            continue
        draws.append(pb)
        curves.append(logistic4(xs, *pb))
    out["boot_failed"] = failed
    q = [(1 - ci) / 2, (1 + ci) / 2]
    if draws:
        d = np.array(draws)
        low, high = np.quantile(d, q, axis=0)
        out["ci_low"] = dict(zip(PARAMS, map(float, low)))
        out["ci_high"] = dict(zip(PARAMS, map(float, high)))
        out["midpoint_budget_ci"] = [float(10 ** low[2]), float(10 ** high[2])]
        band_low, band_high = np.quantile(np.array(curves), q, axis=0)
    else:
        band_low = band_high = np.full(grid, np.nan)
    out["curve"] = {"log10_budget": xs.tolist(), "rate": logistic4(xs, *params).tolist(),
                    "low": band_low.tolist(), "high": band_high.tolist()}
    return out
